"""A reload that changes a program while a start of it is under way (SPEC section 12:
a reload restarts the programs whose command changed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_supervision import World, run, sleeper

from ocp_agentd.supervision import State, Supervisor
from ocp_agentd.supervision.program import Program


@pytest.mark.parametrize("standby", [True, False], ids=["standby", "spawn"])
def test_a_reload_while_the_process_is_released_leaves_it_on_the_new_command(
        world: World, standby: bool) -> None:
    """The reload lands after the start's process runs but before its STARTING
    bookkeeping (the start yields there, and waits there for its cgroup move): the state
    still says STOPPED, yet the program must end up running the new command, not the one
    the reload replaced."""
    world.add("p", sleeper(), start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        program = sup.program("p")
        if not standby and program.standbys is not None:
            program.standbys.discard()
        elif standby and program.standbys is not None:
            await asyncio.wait_for(_standby_ready(program), 20)
        await sup.stop("p")
        if not standby and program.standbys is not None:
            program.standbys.discard()
        old = program.instance
        start = asyncio.ensure_future(sup.start("p"))
        while program.instance is old and not start.done():
            await asyncio.sleep(0)  # one turn of the loop at a time: stop in the window
        assert not start.done()
        world.add("p", sleeper(999), start_seconds=0.0)
        await sup.reload(world.settings())
        await start

        def now() -> tuple[str, list[str]]:
            inst = program.instance
            return str(program.state), _cmdline(inst.pid) if inst is not None else []

        deadline = asyncio.get_running_loop().time() + 20
        while now() != (str(State.RUNNING), sleeper(999)):
            assert asyncio.get_running_loop().time() < deadline, now()
            await asyncio.sleep(0.02)

    run(world, body)


async def _standby_ready(program: Program) -> None:
    while program.standbys.waiting is None:
        await asyncio.sleep(0.02)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []
