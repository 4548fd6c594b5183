"""Housekeeping says a rotation problem it cannot fix once, not every 15 s."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

import pytest
from test_supervision import World, run

from ocp_agentd import ticker
from ocp_agentd.repeats import Once
from ocp_agentd.supervision import Supervisor, output
from ocp_agentd.systemd import Notifier


def _rotate_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "cannot rotate" in r.getMessage()]


def test_planted_fifo_and_missing_user_are_said_once(world: World,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    logs = world.tmp / "log"
    logs.mkdir()
    fifo = logs / "planted.out"
    os.mkfifo(fifo)
    ghost = f"nouser-{uuid.uuid4().hex[:8]}"
    # Neither program is started: housekeeping rotates the logs of every configured one.
    world.add("planted", ["/bin/sleep", "1000"], stdout_log=str(fifo), log_max_bytes=1024)
    world.add("ghost", ["/bin/sleep", "1000"], user=ghost, log_max_bytes=1024)

    async def main() -> None:
        sup = Supervisor(world.settings())
        try:
            with caplog.at_level(logging.INFO, logger="ocp_agentd.supervisor"):
                for _ in range(4):
                    await sup.housekeep()
                said = _rotate_warnings(caplog)
                assert len([m for m in said if str(fifo) in m]) == 1, said
                assert len([m for m in said if "ghost" in m]) == 2, said  # its two logs
                assert len(said) == 3, said
                # The condition goes away: said so once, and a new one is said again.
                fifo.unlink()
                fifo.write_bytes(b"")
                caplog.clear()
                await sup.housekeep()
                assert any("rotating" in r.getMessage() and str(fifo) in r.getMessage()
                           for r in caplog.records), caplog.records
                os.unlink(fifo)
                os.mkfifo(fifo)
                await sup.housekeep()
                assert len([m for m in _rotate_warnings(caplog) if str(fifo) in m]) == 1
        finally:
            await sup.shutdown()

    asyncio.run(main())


def test_once_says_a_standing_problem_again_after_the_repeat_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger(f"test.once.{uuid.uuid4().hex}")
    once = Once(log, repeat=0.0)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert once.problem("k", "bad")
        assert once.problem("k", "bad")  # repeat=0: due again at once
    hourly = Once(log)
    assert hourly.problem("k", "bad") and not hourly.problem("k", "bad")
    assert hourly.problem("k", "worse")  # a changed message is said
    assert hourly.solved("k", "fine") and not hourly.solved("k", "fine")


def test_housekeeping_leaves_the_logs_of_programs_on_this_daemons_keeper(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program this daemon started writes through its log keeper, which rotates the
    file exactly: housekeeping does not look into its logs while they are within their
    limit (one stat each, no walk). A stopped program's logs are looked at; after that
    a log is looked at again only once it changed (logwatch.py)."""
    looked: list[Path] = []
    real = output.rotate_if_needed

    def counted(path: Path, *args: object, **kwargs: object) -> bool:
        looked.append(path)
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(output, "rotate_if_needed", counted)
    world.add("running", ["/bin/sleep", "1000"], start_seconds=0.0)
    world.add("stopped", ["/bin/sleep", "1000"], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        await sup.stop("stopped")
        await sup.housekeep()
        stopped = sup.program("stopped").spec
        assert sorted(looked) == sorted({stopped.stdout_log, stopped.stderr_log})
        looked.clear()
        await sup.stop("running")  # no longer on the keeper
        assert not await sup.housekeep()  # every file watched: no round due for itself
        assert looked == []  # nothing changed since the last look
        running = sup.program("running").spec
        with running.stdout_log.open("ab") as appended:  # appended to by name
            appended.write(b"more\n")
        await sup.housekeep()
        assert looked == [running.stdout_log]

    run(world, body)


def test_housekeeping_bounds_a_log_its_running_program_appends_to_itself(
        world: World) -> None:
    """A program on this daemon's keeper that also opens its log by name and appends to
    it (a wrapper's `exec >>log`, a logging library pointed at the same file) writes past
    the keeper, which counts only what it pumps: housekeeping still rotates that file,
    or it grows without bound."""
    logs = world.tmp / "log"
    logs.mkdir()
    log = logs / "direct.log"
    world.add("direct", ["/bin/sh", "-c",
                         f'exec >>{log}; head -c 262144 /dev/zero; exec sleep 1000'],
              stdout_log=str(log), stderr_log=str(log), log_max_bytes=16384,
              log_backups=1, start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        program = sup.program("direct")
        assert program.alive()
        deadline = asyncio.get_running_loop().time() + 20
        while log.stat().st_size < 262144:
            assert asyncio.get_running_loop().time() < deadline, "the program's writes"
            await asyncio.sleep(0.05)
        await sup.housekeep()
        assert log.stat().st_size <= 16384 + os.statvfs(log).f_bsize

    run(world, body)


def test_a_log_written_while_housekeeping_looks_is_looked_at_again(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program appending to its log by name writes at any moment, also between the
    arming of the file's one-shot watch and the event loop recording it: the next round
    still comes (the real ticker, its interval shortened), or the file is never looked at
    again and grows without bound."""
    monkeypatch.setattr(ticker, "HOUSEKEEPING_SECONDS", 0.05)
    logs = world.tmp / "log"
    logs.mkdir()
    log = logs / "direct.log"
    looked: list[Path] = []
    real = output.rotate_if_needed

    def written_during_the_look(path: Path, *args: object, **kwargs: object) -> bool:
        looked.append(path)
        rotated = real(path, *args, **kwargs)  # type: ignore[arg-type]
        if len(looked) == 1:
            with path.open("ab") as appended:  # the program's write, during the look
                appended.write(b"x" * 100)
        return rotated

    monkeypatch.setattr(output, "rotate_if_needed", written_during_the_look)
    # Not started: not on this daemon's keeper, so each look is rotate_if_needed.
    world.add("direct", ["/bin/sleep", "1000"], stdout_log=str(log), stderr_log=str(log),
              log_max_bytes=16384, log_backups=1)
    log.write_bytes(b"")

    async def body(sup: Supervisor) -> None:
        clock = ticker.Ticker(Notifier(env={}), sup.housekeep, lambda _: None)
        sup.log_watch.on_change = clock.want_housekeeping
        task = asyncio.create_task(clock.run())
        loop = asyncio.get_running_loop()
        try:
            deadline = loop.time() + 10
            while len(looked) < 2:
                assert loop.time() < deadline, f"looked at {looked}, then never again"
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    run(world, body, boot=False)
