"""Stop-all signals every program in one pass before any program's bookkeeping.

The programs here block SIGTERM (sigprocmask), so a stop signal sent to them stays
pending and can be read from /proc/PID/status (ShdPnd, the process-wide pending set;
proc(5)) at the moment of the first STOPPING transition.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
from test_supervision import SH, World, kill_marked, marked, run, until

from ocp_agentd.supervision import OperationFailed, ProcessInfo, State, Supervisor
from ocp_agentd.supervision.cgroups import CgroupError, detect
from ocp_agentd.supervision.intent import CANCELLED_BY_STOP
from ocp_agentd.supervision.program import Program

TERM_BIT = 1 << (signal.SIGTERM - 1)
BLOCKS_TERM = (
    "import os, signal, time\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    "if os.environ.get('FORK_ONE'):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "time.sleep(1000)\n"
)


def pending(pid: int) -> int:
    """The process-wide pending signal set of pid (proc(5): ShdPnd), as a bit mask."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no ShdPnd in /proc/{pid}/status")


def needs_cgroups(world: World) -> None:
    try:
        usable = detect(world.state).usable
    except CgroupError:
        usable = False
    if not usable or os.geteuid() != 0:
        pytest.skip("needs root and usable cgroups (the one-pass stop is for programs in one)")


@pytest.fixture
def blocking_world(world: World) -> World:
    needs_cgroups(world)
    for index in range(5):
        env = {"FORK_ONE": "1"} if index == 0 else {}
        world.add(
            f"b{index}", [sys.executable, "-c", BLOCKS_TERM], env=env, stop_timeout=0.5,
            start_seconds=0.0,
        )
    return world


def test_every_main_has_its_signal_before_the_first_state_change(blocking_world: World) -> None:
    world = blocking_world
    seen: dict[str, int] = {}

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 6, what="5 mains and a grandchild")
        mains = {name: sup.info(name).pid for name in sup.workers()}
        grandchild = next(
            p.pid for p in marked(world.state) if p.pid not in mains.values()
        )

        def on_change(name: str, old: State, new: State) -> None:
            if new == State.STOPPING and not seen:
                seen.update({n: pending(pid) for n, pid in mains.items() if pid})
                seen["grandchild of b0"] = pending(grandchild)

        sup.add_listener(on_change)
        results = await sup.stop_all()
        assert {r.state for r in results.values()} == {State.STOPPED}  # type: ignore[union-attr]

    run(world, body)
    assert marked(world.state) == []
    # The first STOPPING is b0's: every main, and b0's own grandchild, were signalled.
    assert len(seen) == 6, seen
    assert all(mask & TERM_BIT for mask in seen.values()), seen


def test_the_cpu_is_yielded_once_between_the_signals_and_the_bookkeeping(
        blocking_world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first pass the signalled programs get the daemon's CPU before its
    bookkeeping: one sched_yield(2), when every main has its signal and no program is
    STOPPING yet."""
    world = blocking_world
    at_yield: list[tuple[dict[str, int], set[State]]] = []
    real_yield = os.sched_yield

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 6, what="5 mains and a grandchild")
        mains = {name: sup.info(name).pid for name in sup.workers()}

        def spy() -> None:
            at_yield.append(({n: pending(pid) for n, pid in mains.items() if pid},
                             {sup.info(n).state for n in mains}))
            real_yield()

        monkeypatch.setattr(os, "sched_yield", spy)
        await sup.stop_all()
        assert {sup.info(n).state for n in mains} == {State.STOPPED}
        await sup.stop_all()  # nothing left to signal: no yield

    run(world, body)
    assert len(at_yield) == 1, at_yield
    masks, states = at_yield[0]
    assert len(masks) == 5 and all(mask & TERM_BIT for mask in masks.values()), masks
    assert states == {State.RUNNING}, states


def test_a_stop_all_exit_is_a_stop_not_a_crash(world: World) -> None:
    needs_cgroups(world)
    world.add("quick", ["/bin/sleep", "1000"], autorestart="always", start_seconds=0.0)
    world.add("slow", [SH, "-c", "trap 'sleep 0.3; exit 0' TERM; sleep 1000 & wait"])
    changes: list[tuple[str, State, State]] = []

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 3, what="the programs")
        sup.add_listener(lambda name, old, new: changes.append((name, old, new)))
        await sup.stop_all()
        await asyncio.sleep(0)
        for name in ("quick", "slow"):
            info = sup.info(name)
            assert info.state == State.STOPPED
            assert info.last_exit is not None
            assert info.last_exit["reason"].startswith("stopped on request"), info.last_exit
        assert sup.programs["quick"].restarts == 0

    run(world, body)
    for name in ("quick", "slow"):
        mine = [(old, new) for n, old, new in changes if n == name]
        assert mine == [(State.RUNNING, State.STOPPING), (State.STOPPING, State.STOPPED)], mine


def test_a_program_mid_start_is_stopped_by_the_ordinary_path(world: World) -> None:
    needs_cgroups(world)
    world.add("steady", ["/bin/sleep", "1000"], start_seconds=0.0)
    world.add("starting", ["/bin/sleep", "1000"], start_seconds=30.0, start_timeout=60.0)

    async def body(sup: Supervisor) -> None:
        starting = asyncio.ensure_future(sup.start("starting"))
        await until(lambda: sup.info("starting").state == State.STARTING, what="STARTING")
        results = await sup.stop_all()
        assert {r.state for r in results.values()} == {State.STOPPED}  # type: ignore[union-attr]
        with pytest.raises(OperationFailed, match=CANCELLED_BY_STOP):
            await starting
        assert marked(world.state) == []

    try:
        run(world, body, boot=False)
    finally:
        kill_marked(world.state)


def test_an_exit_seen_before_the_stop_takes_its_turn_is_the_stops(world: World) -> None:
    """The main ends at the first pass's signal and its exit is handled before its stop
    gets the program's lock: the stop still reports it as the stop's exit."""
    needs_cgroups(world)
    world.add("quick", ["/bin/sleep", "1000"], autorestart="always", start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        program = sup.programs["quick"]
        inst = program.instance
        assert inst is not None
        assert program.signal_stop_ahead()
        program.mark_stopping()
        await until(lambda: inst.exited.done(), what="the exit seen")
        info = await program.stop()
        assert info.state == State.STOPPED
        assert info.last_exit is not None
        assert info.last_exit["reason"] == "stopped on request (killed by SIGTERM)", info
        assert program.restarts == 0

    run(world, body)
    assert marked(world.state) == []


# A child that counts the SIGTERMs it gets (one line each in argv[1]) and exits 0.5 s
# after the last one, as a program with a graceful shutdown does.
COUNTS_TERMS = (
    "import os, signal, sys, time\n"
    "path = sys.argv[1]\n"
    "last = [None]\n"
    "def on_term(*_):\n"
    "    with open(path, 'a') as f:\n"
    "        f.write('TERM\\n')\n"
    "    last[0] = time.monotonic()\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "open(path + '.ready', 'w').close()\n"
    "while last[0] is None or time.monotonic() - last[0] < 0.5:\n"
    "    time.sleep(0.02)\n"
)


def add_counting(world: World, tmp_path: Path, number: int) -> list[Path]:
    """`number` programs p0.. whose main has a COUNTS_TERMS child in its process group;
    answers the files the children count their SIGTERMs in."""
    counts = [tmp_path / f"terms{index}" for index in range(number)]
    for index, path in enumerate(counts):
        world.add(
            f"p{index}",
            [SH, "-c", f'{sys.executable} -c "$0" {path} & exec sleep 1000', COUNTS_TERMS],
            start_seconds=0.0,
            stop_timeout=5.0,
        )
    return counts


async def stop_after_the_exits(programs: list[Program]) -> list[ProcessInfo]:
    """Stop-all's two passes, then each program's stop only once every main's exit has
    been handled (the order a busy loop can give)."""
    instances = [program.instance for program in programs]
    assert all(program.signal_stop_ahead() for program in programs)
    for program in programs:
        program.mark_stopping()
    await until(lambda: all(i is not None and i.exited.done() for i in instances),
                what="the mains' exits seen")
    return list(await asyncio.gather(*(program.stop() for program in programs)))


async def counting_ready(counts: list[Path]) -> None:
    await until(lambda: all(Path(f"{path}.ready").exists() for path in counts), what="children")


def test_a_child_gets_one_stop_signal_when_its_main_ends_first(
    world: World, tmp_path: Path
) -> None:
    """The main ends at stop-all's first signal and its exit is handled before its stop's
    turn: the cgroup's other members, signalled by the first pass already, must not get
    the stop signal a second time (a second SIGTERM is "now, not gracefully" to many
    programs), only the kill once stop_timeout is over."""
    needs_cgroups(world)
    counts = add_counting(world, tmp_path, 4)

    async def body(sup: Supervisor) -> None:
        await counting_ready(counts)
        programs = [sup.programs[f"p{index}"] for index in range(len(counts))]
        infos = await stop_after_the_exits(programs)
        assert {info.state for info in infos} == {State.STOPPED}

    run(world, body)
    terms = {path.name: path.read_text().count("TERM") for path in counts}
    assert set(terms.values()) == {1}, terms


def test_a_cgroup_that_cannot_be_read_in_the_second_pass_fails_no_stop(world: World) -> None:
    """Out of descriptors (clients may take them all), the cgroup's member list cannot be
    read while the second pass signals the rest of each cgroup: every main has had its
    signal by then, so each program must still end STOPPED by its own stop, not be left
    signalled and unstopped (BACKOFF, nothing running, no stop recorded) while stop-all
    fails as a whole."""
    needs_cgroups(world)
    for index in range(3):
        world.add(f"p{index}", ["/bin/sleep", "1000"], start_seconds=0.0, autorestart="always")

    async def body(sup: Supervisor) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (1, hard))  # no new descriptor at all
        try:
            stopping = asyncio.ensure_future(sup.stop_all())
            await asyncio.sleep(0)  # the passes before the first await
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        results = await stopping
        assert {r.state for r in results.values()} == {State.STOPPED}, results  # type: ignore[union-attr]
        for program in sup.programs.values():
            assert program.last_exit is not None
            assert program.last_exit.reason.startswith("stopped on request"), program.last_exit
            assert program.restarts == 0
        assert marked(world.state) == []

    run(world, body)


def test_a_stopped_main_is_continued_and_ends_at_its_stop_signal(world: World) -> None:
    """SIGCONT reaches a SIGSTOPped main in the second pass: it ends at SIGTERM, not at
    the SIGKILL that stop_timeout (long here) would bring."""
    needs_cgroups(world)
    world.add("frozen", ["/bin/sleep", "1000"], start_seconds=0.0, stop_timeout=120.0)
    world.add("other", ["/bin/sleep", "1000"], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        pid = sup.info("frozen").pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        await until(lambda: Path(f"/proc/{pid}/stat").read_text().split()[2] == "T",
                    what="the main stopped")
        results = await asyncio.wait_for(sup.stop_all(), 60)
        info = results["frozen"]
        assert info.state == State.STOPPED  # type: ignore[union-attr]
        assert info.last_exit["reason"] == "stopped on request (killed by SIGTERM)"  # type: ignore[union-attr,index]

    run(world, body)
    assert marked(world.state) == []


class BareWorld(World):
    """A World whose daemon uses no cgroup (agent.cgroup = "off", SPEC section 9)."""

    def settings(self):  # type: ignore[no-untyped-def]
        settings = super().settings()
        settings.agent.cgroup = "off"
        return settings


@pytest.fixture
def bare_world(tmp_path: Path):
    w = BareWorld(tmp_path)
    yield w
    kill_marked(w.state)


@pytest.mark.parametrize("how", ["stop-all", "the main ends first"])
def test_without_a_cgroup_each_process_of_the_group_gets_one_stop_signal(
    bare_world: World, tmp_path: Path, how: str
) -> None:
    """Without a cgroup the first pass signals each main's process group (killpg(2)); the
    stop then signals only the rest of the tree, and waits for all of it."""
    counts = add_counting(bare_world, tmp_path, 3)

    async def body(sup: Supervisor) -> None:
        await counting_ready(counts)
        mains = {name: sup.info(name).pid for name in sup.workers()}
        assert all(p.cgroup is None for p in sup.programs.values())
        if how == "stop-all":
            results = await sup.stop_all()
            infos = list(results.values())
        else:
            infos = await stop_after_the_exits([sup.programs[name] for name in mains])
        assert {info.state for info in infos} == {State.STOPPED}  # type: ignore[union-attr]
        for info in infos:
            assert info.last_exit["reason"].startswith("stopped on request")  # type: ignore[union-attr,index]
        assert marked(bare_world.state) == []  # the children too: the stop waited for them

    run(bare_world, body)
    terms = {path.name: path.read_text().count("TERM") for path in counts}
    assert set(terms.values()) == {1}, terms


def test_without_a_cgroup_every_group_has_its_signal_before_the_first_state_change(
    bare_world: World,
) -> None:
    for index in range(4):
        bare_world.add(f"b{index}", [sys.executable, "-c", BLOCKS_TERM], stop_timeout=0.5,
                       start_seconds=0.0)
    seen: dict[str, int] = {}

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(bare_world.state)) == 4, what="4 mains")
        mains = {name: sup.info(name).pid for name in sup.workers()}

        def on_change(name: str, old: State, new: State) -> None:
            if new == State.STOPPING and not seen:
                seen.update({n: pending(pid) for n, pid in mains.items() if pid})

        sup.add_listener(on_change)
        results = await sup.stop_all()
        assert {r.state for r in results.values()} == {State.STOPPED}  # type: ignore[union-attr]

    run(bare_world, body)
    assert marked(bare_world.state) == []
    assert len(seen) == 4 and all(mask & TERM_BIT for mask in seen.values()), seen
