"""Start-all releases every program's standby before any program's bookkeeping.

A standby's release is one write to its GO pipe; the start's bookkeeping (the state
change, its log line and event, the readiness wait) costs more. The programs here are
observed, in the daemon's own process, at the moment of the first STARTING transition
of a start-all: each must already have its new instance, the standby that waited for it.
"""

from __future__ import annotations

from test_stop_all_pass import needs_cgroups
from test_supervision import World, marked, run, until

from ocp_agentd.supervision import State, Supervisor


def test_every_standby_is_released_before_the_first_state_change(world: World) -> None:
    needs_cgroups(world)
    names = [f"s{index}" for index in range(5)]
    for name in names:
        world.add(name, ["/bin/sleep", "1000"], start_seconds=0.0)
    seen: dict[str, int | None] = {}

    async def body(sup: Supervisor) -> None:
        programs = [sup.programs[name] for name in names]
        await until(
            lambda: all(p.standbys is not None and p.standbys.waiting for p in programs),
            what="every program's standby",
        )
        await sup.stop_all()
        waiting = {p.name: p.standbys.waiting.popen.pid for p in programs}  # type: ignore[union-attr]

        def on_change(name: str, old: State, new: State) -> None:
            if new == State.STARTING and not seen:
                seen.update({
                    p.name: p.instance.pid if p.instance is not None else None
                    for p in programs
                })

        sup.add_listener(on_change)
        results = await sup.start_all()
        assert {r.state for r in results.values()} == {State.RUNNING}  # type: ignore[union-attr]
        assert seen == waiting, (seen, waiting)  # each one's standby, all before the first
        # Each released shell execs the program with its markers: soon, not at once.
        await until(lambda: len(marked(world.state)) == len(names), what="the programs")

    run(world, body)
