"""The supervisor on real processes, in-process: states, stop trees, restarts, adoption."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import free_port, marked_processes, wait_for

from ocp_agentd.config import ProgramSpec, Settings
from ocp_agentd.supervision import IllegalTransition, OperationFailed, State, Supervisor
from ocp_agentd.supervision.identity import PidRecord
from ocp_agentd.supervision.pid_records import PidRecords
from ocp_agentd.supervision.proctable import MARK_STATE_DIR
from ocp_agentd.supervision.program import TRANSITIONS

SH = "/bin/sh"


def _dead(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def marked(state_dir: Path) -> list[psutil.Process]:
    """Every live process carrying this test's state-dir marker."""
    return marked_processes([(MARK_STATE_DIR, str(state_dir))])


def kill_marked(state_dir: Path) -> None:
    for proc in marked(state_dir):
        with contextlib.suppress(psutil.Error):
            proc.kill()


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)


class World:
    """A settings object for a test, with every path under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.programs: dict[str, dict[str, Any]] = {}

    def add(self, name: str, command: list[str], **fields: Any) -> None:
        fields.setdefault("start_seconds", 0.1)
        fields.setdefault("stop_timeout", 3.0)
        fields.setdefault("backoff_initial", 0.1)
        self.programs[name] = {"command": command, **fields}

    def settings(self) -> Settings:
        settings = Settings(
            agent={
                "host_id": 2,
                "state_dir": str(self.state),
                "log_dir": str(self.tmp / "log"),
                "install_home": str(self.tmp),
            },
            api={"socket": str(self.tmp / "run" / "agentd.sock")},
            programs={n: ProgramSpec(**f) for n, f in self.programs.items()},
        )
        settings.resolve_paths(self.tmp)
        return settings


def run(world: World, body: Callable[[Supervisor], Awaitable[None]], boot: bool = True) -> None:
    async def main() -> None:
        sup = Supervisor(world.settings())
        try:
            if boot:
                await sup.start_pending(await sup.adopt())
            await body(sup)
        finally:
            await sup.shutdown()

    asyncio.run(main())


def sleeper(seconds: int = 1000) -> list[str]:
    return ["/bin/sleep", str(seconds)]


def listener(port: int) -> list[str]:
    return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]


def test_start_stop_restart_one_program(world: World) -> None:
    world.add("w1", sleeper())

    async def body(sup: Supervisor) -> None:
        info = sup.info("w1")
        assert info.state == State.RUNNING and info.pid
        first = info.pid
        info = await sup.stop("w1")
        assert info.state == State.STOPPED and info.pid is None
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        # The last exit beside STOPPED is the stop's, not an older one's.
        assert info.last_exit is not None
        assert info.last_exit["reason"].startswith("stopped on request (")
        info = await sup.start("w1")
        assert info.state == State.RUNNING
        second = info.pid
        info = await sup.restart("w1")
        assert info.state == State.RUNNING and info.pid not in (first, second)
        assert info.restarts == 0  # commands are not counted as restarts

    run(world, body)
    assert marked(world.state) == []


def test_running_only_once_port_listens(world: World) -> None:
    port = free_port()
    delayed = f"sleep 0.6; exec {sys.executable} -m http.server --bind 127.0.0.1 {port}"
    world.add("web", [SH, "-c", delayed], ports=[port], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        started = time.monotonic()
        info = await sup.start("web")
        assert info.state == State.RUNNING
        assert time.monotonic() - started >= 0.5
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        result = await sup.verify("web")
        assert result.ok, result.as_dict()

    run(world, body, boot=False)


def test_start_all_stop_all_in_parallel(world: World) -> None:
    for index in range(6):
        world.add(f"w{index}", sleeper(), stop_timeout=2.0)
    world.add("ignorer", [SH, "-c", "trap '' TERM; sleep 1000 & wait"], stop_timeout=1.0)

    async def body(sup: Supervisor) -> None:
        results = await sup.stop_all()
        assert all(r.state == State.STOPPED for r in results.values())  # type: ignore[union-attr]
        assert marked(world.state) == []
        results = await sup.start_all()
        assert {r.state for r in results.values()} == {State.RUNNING}  # type: ignore[union-attr]
        assert len(marked(world.state)) == 6 + 2

    run(world, body, boot=False)


def test_sigterm_ignoring_tree_is_gone_within_stop_timeout(world: World) -> None:
    script = "trap '' TERM; for i in 1 2 3; do sleep 1000 & done; wait"
    world.add("stubborn", [SH, "-c", script], stop_timeout=1.0)

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 4, what="the tree of 4")
        started = time.monotonic()
        info = await sup.stop("stubborn")
        took = time.monotonic() - started
        assert info.state == State.STOPPED
        assert marked(world.state) == []
        assert 0.9 <= took <= 2.0, took

    run(world, body)


def test_setsid_grandchild_is_stopped_too(world: World) -> None:
    script = "setsid /bin/sh -c 'trap \"\" TERM; sleep 1000' & sleep 1000"
    world.add("forker", [SH, "-c", script], stop_timeout=1.0)

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) >= 4, what="the setsid grandchild")
        sids = {p.pid: os.getsid(p.pid) for p in marked(world.state)}
        assert len(set(sids.values())) == 2, sids
        await sup.stop("forker")
        assert marked(world.state) == []

    run(world, body)


def test_kill9_gives_new_pid_and_counts_a_restart(world: World) -> None:
    world.add("w1", sleeper(), start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        first = sup.info("w1").pid
        assert first
        moves: list[tuple[str, str]] = []
        sup.add_listener(lambda name, old, new: moves.append((str(old), str(new))))
        # An exit sooner than a second after spawn would count as a quick exit.
        await until(lambda: (sup.info("w1").uptime or 0) > 1.05, what="uptime over a second")
        os.kill(first, signal.SIGKILL)
        await until(
            lambda: sup.info("w1").state == State.RUNNING and sup.info("w1").pid != first,
            what="a new pid",
        )
        info = sup.info("w1")
        assert info.restarts == 1
        assert info.last_exit and info.last_exit["signal"] == "SIGKILL"
        # The state says what happens: it will be restarted, so BACKOFF, not EXITED.
        assert moves == [("RUNNING", "BACKOFF"), ("BACKOFF", "STARTING"),
                         ("STARTING", "RUNNING")]

    run(world, body)


def test_an_exit_that_is_not_restarted_is_exited(world: World) -> None:
    world.add("once", sleeper(), start_seconds=0.0, autorestart="never")

    async def body(sup: Supervisor) -> None:
        pid = sup.info("once").pid
        assert pid
        await until(lambda: (sup.info("once").uptime or 0) > 1.05, what="uptime over a second")
        os.kill(pid, signal.SIGKILL)
        await until(lambda: sup.info("once").state == State.EXITED, what="EXITED")
        program = sup.program("once")
        assert not program.alive() and program._timer is None
        assert not program._restart_pending
        await sup.start("once")
        assert sup.info("once").state == State.RUNNING

    run(world, body)


def test_quick_exits_back_off_then_fatal_and_start_leaves_fatal(world: World) -> None:
    world.add(
        "crasher",
        [SH, "-c", "exit 3"],
        start_seconds=0.2,
        backoff_initial=0.1,
        max_quick_exits=4,
    )
    transitions: list[tuple[float, str]] = []

    async def body(sup: Supervisor) -> None:
        sup.add_listener(lambda name, old, new: transitions.append((time.monotonic(), str(new))))
        subscription = sup.events.subscribe()
        with pytest.raises(OperationFailed):
            await sup.start("crasher")
        await until(lambda: sup.info("crasher").state == State.FATAL, what="FATAL")
        subscription.close()
        events = [event async for event in subscription]
        moves = [event["to"] for event in events]
        assert moves == ["STARTING", "BACKOFF"] * 3 + ["STARTING", "FATAL"], moves
        starts = [t for t, s in transitions if s == "STARTING"]
        backoffs = [t for t, s in transitions if s == "BACKOFF"]
        assert len(starts) == 4 and len(backoffs) == 3
        # The delay each BACKOFF announced doubles from backoff_initial, and each retry
        # really waited at least that long (a loaded machine only makes the waits longer,
        # so no ratio of wall times is asserted).
        reasons = [event["reason"] for event in events if event["to"] == "BACKOFF"]
        delays = [float(reason.rsplit("next try in ", 1)[1].removesuffix("s"))
                  for reason in reasons]
        assert delays == [0.1, 0.2, 0.4], reasons
        waits = [start - back for back, start in zip(backoffs, starts[1:], strict=True)]
        assert all(wait >= delay for wait, delay in zip(waits, delays, strict=True)), waits
        assert sup.info("crasher").last_exit["code"] == 3  # type: ignore[index]
        # An explicit start leaves FATAL (and fails again, here).
        transitions.clear()
        with pytest.raises(OperationFailed):
            await sup.start("crasher")
        assert transitions[0][1] == "STARTING"

    run(world, body, boot=False)


def test_bad_command_fails_start_with_reason(world: World) -> None:
    world.add("missing", ["/nonexistent/binary"], max_quick_exits=1)

    async def body(sup: Supervisor) -> None:
        with pytest.raises(OperationFailed) as caught:
            await sup.start("missing")
        assert "programs.missing.command" in caught.value.reason
        assert sup.info("missing").state == State.FATAL

    run(world, body, boot=False)


def test_two_concurrent_starts_give_one_process(world: World) -> None:
    world.add("w1", sleeper(), start_seconds=0.3)

    async def body(sup: Supervisor) -> None:
        a, b = await asyncio.gather(sup.start("w1"), sup.start("w1"))
        assert a.pid == b.pid
        assert len(marked(world.state)) == 1

    run(world, body, boot=False)


def test_adoption_after_daemon_loss_and_restart_of_the_dead(world: World) -> None:
    world.add("keep", sleeper())
    world.add("dies", sleeper())
    pids: dict[str, int] = {}

    async def first() -> None:
        sup = Supervisor(world.settings())
        await sup.start_pending(await sup.adopt())
        pids.update({n: sup.info(n).pid for n in sup.names()})  # type: ignore[misc]
        await sup.close()  # what a crashed daemon leaves: programs running, records on disk

    asyncio.run(first())
    victim = psutil.Process(pids["dies"])
    os.kill(pids["dies"], signal.SIGKILL)
    # SIGKILL ends the victim when it next runs; until then a new daemon would rightly
    # adopt it alive. The scenario is a program that died before the daemon came back.
    wait_for(lambda: _dead(victim), timeout=10, message="the killed program to die")

    async def second(sup: Supervisor) -> None:
        assert sup.info("keep").pid == pids["keep"]
        assert sup.info("keep").state == State.RUNNING
        assert sup.info("dies").state == State.RUNNING
        assert sup.info("dies").pid != pids["dies"]
        assert len(marked(world.state)) == 2
        # The adopted process is watched: its exit is noticed and it is restarted.
        os.kill(pids["keep"], signal.SIGKILL)
        await until(lambda: sup.info("keep").pid not in (None, pids["keep"]), what="restart")

    run(world, second)


def test_unreadable_record_falls_back_to_the_marker(world: World) -> None:
    world.add("w1", sleeper())
    pid: list[int] = []

    async def first() -> None:
        sup = Supervisor(world.settings())
        await sup.start_pending(await sup.adopt())
        pid.append(sup.info("w1").pid)  # type: ignore[arg-type]
        await sup.close()

    asyncio.run(first())
    (world.state / "pids" / "w1.json").write_text('{"name": "w1", "pid": ')  # half-written

    async def second(sup: Supervisor) -> None:
        assert sup.info("w1").pid == pid[0]
        assert len(marked(world.state)) == 1

    run(world, second)


def test_reused_pid_is_never_signalled(world: World, tmp_path: Path) -> None:
    world.add("w1", sleeper())
    stranger = psutil.Popen(["/bin/sleep", "1000"])
    try:
        stat = Path(f"/proc/{stranger.pid}/stat").read_bytes()
        starttime = int(stat[stat.rfind(b")") + 2 :].split()[19])
        records = PidRecords(world.state / "pids")
        # The record names the stranger's pid with another start time: a reused pid.
        records.save(
            PidRecord("w1", stranger.pid, starttime - 1, ["/bin/sleep", "1000"], "x", "", 0.0)
        )
        # And a record of a removed program naming its pid and command line with another
        # start time (pid and start time are the identity; a command line alone is not).
        records.save(
            PidRecord("gone", stranger.pid, starttime + 1, ["/bin/sleep", "1000"], "y", "", 0.0)
        )
        assert records.flush()  # written by a thread: on disk before the daemon reads them

        async def body(sup: Supervisor) -> None:
            assert sup.info("w1").pid != stranger.pid
            await sup.stop("w1")

        run(world, body)
        assert stranger.is_running() and stranger.status() != psutil.STATUS_ZOMBIE
    finally:
        stranger.kill()
        stranger.wait()


def test_reload_adds_removes_and_restarts_changed(world: World) -> None:
    world.add("same", sleeper())
    world.add("edited", sleeper())
    world.add("removed", sleeper())

    async def body(sup: Supervisor) -> None:
        before = {n: sup.info(n).pid for n in sup.names()}
        world.programs.pop("removed")
        world.add("edited", sleeper(999))
        world.add("added", sleeper())
        report = await sup.reload(world.settings())
        assert report["added"] == ["added"] and report["removed"] == ["removed"]
        assert report["changed"] == ["edited"] and report["unchanged"] == ["same"]
        assert sup.info("same").pid == before["same"]
        assert sup.info("edited").pid != before["edited"]
        assert sup.info("added").state == State.RUNNING
        assert len(marked(world.state)) == 3

    run(world, body)


def test_child_output_goes_to_log_files(world: World) -> None:
    world.add("talker", [SH, "-c", "echo out-line; echo err-line >&2; exec sleep 1000"])

    async def body(sup: Supervisor) -> None:
        spec = sup.program("talker").spec
        assert spec.stdout_log and spec.stderr_log
        await until(
            lambda: spec.stderr_log.exists() and b"err-line" in spec.stderr_log.read_bytes()
        )
        assert b"out-line" in spec.stdout_log.read_bytes()

    run(world, body)


def test_stopped_sigstopped_program_gets_its_signal(world: World) -> None:
    world.add("frozen", sleeper(), stop_timeout=5.0)

    async def body(sup: Supervisor) -> None:
        pid = sup.info("frozen").pid
        assert pid
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        await sup.stop("frozen")
        # SIGCONT follows SIGTERM, so it ends well before the SIGKILL at stop_timeout.
        assert time.monotonic() - started < 2.0
        assert marked(world.state) == []

    run(world, body)


def test_stop_interrupts_a_start_that_never_becomes_ready(world: World) -> None:
    world.add("slow", sleeper(), ports=[free_port()], start_timeout=60.0, stop_timeout=2.0)

    async def body(sup: Supervisor) -> None:
        starting = asyncio.ensure_future(sup.start("slow"))
        await until(lambda: sup.info("slow").state == State.STARTING, what="STARTING")
        started = time.monotonic()
        info = await sup.stop("slow")
        assert time.monotonic() - started < 3.0
        assert info.state == State.STOPPED
        with pytest.raises(OperationFailed, match="cancelled by a stop"):
            await starting
        assert sup.info("slow").state == State.STOPPED  # no backoff after an interrupted start
        assert marked(world.state) == []

    run(world, body, boot=False)


def test_cached_records_follow_every_change(world: World) -> None:
    world.add("w1", sleeper(), start_seconds=0.0)

    def same(sup: Supervisor) -> None:
        for record, info in zip(sup.process_records(), sup.infos(), strict=True):
            expected = info.as_dict()
            got, want = record.pop("uptime"), expected.pop("uptime")
            assert (got is None and want is None) or abs(got - want) < 0.05
            assert record == expected

    async def body(sup: Supervisor) -> None:
        same(sup)
        first = sup.process_records()[0]["pid"]
        await until(lambda: (sup.info("w1").uptime or 0) > 1.05, what="uptime over a second")
        assert sup.process_records()[0]["uptime"] > 1.0  # the uptime moves while the rest is cached
        os.kill(first, signal.SIGKILL)
        await until(lambda: sup.process_records()[0]["pid"] not in (None, first), what="new pid")
        same(sup)
        assert sup.process_records()[0]["restarts"] == 1
        await sup.stop("w1")
        assert (
            sup.process_records()[0]["pid"] is None
            and sup.process_records()[0]["state"] == "STOPPED"
        )
        same(sup)

    run(world, body)


def test_rotation_keeps_the_newest_lines_in_order_and_the_program_keeps_writing(
    world: World,
) -> None:
    script = ('trap "echo after-rotation" USR1; i=0; while [ $i -lt 2000 ]; do '
              'echo "line $i"; i=$((i+1)); done; echo written; '
              'while :; do sleep 0.05; done')
    world.add("writer", [SH, "-c", script], log_max_bytes=4000, log_backups=2)

    async def body(sup: Supervisor) -> None:
        spec = sup.program("writer").spec
        log = spec.stdout_log
        assert log is not None
        first, second, third = (log.with_name(f"{log.name}.{i}") for i in (1, 2, 3))

        def kept() -> bytes:
            return b"".join(p.read_bytes() for p in (second, first, log) if p.exists())

        await until(lambda: kept().endswith(b"written\n"), what="output")
        await sup.housekeep()
        assert not third.exists()
        block = os.statvfs(log).f_bsize
        assert log.stat().st_size <= 4000 + block
        # What is kept is the newest output, every line once and in order.
        lines = kept().splitlines()
        assert lines[-1] == b"written"
        numbers = [int(line.split()[1]) for line in lines[:-1] if line.startswith(b"line ")]
        assert numbers and numbers == list(range(numbers[0], 2000))

        # The program's descriptor appends: its next line follows at the end of the live file.
        pid = sup.info("writer").pid
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)
        await until(lambda: log.read_bytes().endswith(b"after-rotation\n"), what="next line")

    run(world, body)


def test_an_illegal_state_move_raises_and_changes_nothing(world: World) -> None:
    world.add("idle", sleeper())

    async def body(sup: Supervisor) -> None:
        program = sup.program("idle")
        assert program.state == State.STOPPED
        with pytest.raises(IllegalTransition, match="STOPPED -> STOPPING"):
            program._set_state(State.STOPPING, "nothing runs to stop")
        assert program.state == State.STOPPED
        await sup.start("idle")
        with pytest.raises(IllegalTransition, match="RUNNING -> STARTING"):
            program._set_state(State.STARTING, "a running program is never started again")
        assert sup.info("idle").state == State.RUNNING

    run(world, body, boot=False)


def test_every_state_has_its_legal_moves() -> None:
    assert set(TRANSITIONS) == set(State)
    for old, moves in TRANSITIONS.items():
        assert old not in moves  # staying is not a move
        assert moves, f"{old} would be a dead end"
