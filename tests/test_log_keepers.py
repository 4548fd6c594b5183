"""One log keeper per program, not per instance (README, Security: "Bounded program logs").

The daemon keeps the write ends of a program's log pipes while the program is configured
and gives them to each new instance, so restarts reuse the keeper and its log goes on
without a gap; a reload that removes the program, the daemon's exit, or a restart after
the daemon was killed (the new daemon has no write ends of the old pipes) end it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
from harness import DaemonRunner, wait_for

from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output

NO_DEMO = {"programs": {"pos_proxy": None, "ocp_exporter": None, "ob_logtailer": None}}
# One "start <pid>" line, then "tick <pid> <n>" lines numbered from 0, 100 a second.
TICKER = ('echo "start $$"; i=0; '
          'while :; do echo "tick $$ $i"; i=$((i+1)); sleep 0.01; done')
SLEEPER = {"command": ["/bin/sleep", "100000"], "start_seconds": 0}


def ticker(max_bytes: int = 1024) -> dict:
    """A program that logs numbered lines; small files, so the log rotates meanwhile."""
    return {"command": ["/bin/sh", "-c", TICKER], "start_seconds": 0, "cwd": "/",
            "log_max_bytes": max_bytes, "log_backups": 100}


def keepers(runner: DaemonRunner, name: str | None = None) -> list[psutil.Process]:
    """Live (not zombie) log keepers of the daemon's state dir; of one program if named."""
    wanted = f"{runner.state_dir}:{name}" if name else f"{runner.state_dir}:"
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            mark = proc.environ().get(output.KEEPER_MARK, "")
            if (mark == wanted if name else mark.startswith(wanted)) and (
                proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
    return found


def one_keeper(runner: DaemonRunner, name: str) -> int:
    """The pid of the program's only keeper, once there is exactly one."""
    found = wait_for(lambda: (k := keepers(runner, name)) and len(k) == 1 and k,
                     timeout=20, message=f"one keeper of {name}")
    return found[0].pid


def log_lines(runner: DaemonRunner, name: str) -> list[bytes]:
    """Every line of the program's stdout log, rotated copies first (oldest first)."""
    assert runner.settings is not None
    log = runner.settings.programs[name].stdout_log
    assert log is not None
    copies = sorted(log.parent.glob(f"{log.name}.*"), key=lambda p: -int(p.suffix[1:]))
    return b"".join(p.read_bytes() for p in [*copies, log]).splitlines()


def ticks_of(runner: DaemonRunner, name: str, pid: int) -> int:
    return sum(1 for line in log_lines(runner, name) if line.startswith(b"tick %d " % pid))


def assert_continuous(lines: list[bytes], pids: list[int]) -> None:
    """The log holds each instance in turn: its start line, then ticks 0, 1, 2... with no
    line lost or out of place, the instances in the order they ran."""
    runs: list[tuple[int, list[int]]] = []
    for line in lines:
        start = re.fullmatch(rb"start (\d+)", line)
        tick = re.fullmatch(rb"tick (\d+) (\d+)", line)
        if start:
            runs.append((int(start[1]), []))
        else:
            assert tick and runs and int(tick[1]) == runs[-1][0], (line, runs[-1:])
            runs[-1][1].append(int(tick[2]))
    assert [pid for pid, _ in runs] == pids
    for pid, numbers in runs:
        assert numbers == list(range(len(numbers))), pid


def restart(runner: DaemonRunner, name: str, old_pid: int) -> int:
    runner.post(f"/api/v1/processes/{name}/restart").check()
    return wait_for(lambda: (r := runner.process(name))["state"] == "RUNNING"
                    and r["pid"] != old_pid and r["pid"], timeout=20,
                    message=f"{name} running again")


def test_restarts_keep_one_keeper_and_a_continuous_log(daemon_factory):
    runner = daemon_factory({"ticker": ticker()}, NO_DEMO)
    pids = [runner.wait_state("ticker", "RUNNING", timeout=20)["pid"]]
    keeper = one_keeper(runner, "ticker")
    for _ in range(3):
        wait_for(lambda: ticks_of(runner, "ticker", pids[-1]) >= 50, timeout=20,
                 message="the instance's lines")
        pids.append(restart(runner, "ticker", pids[-1]))
        assert [k.pid for k in keepers(runner, "ticker")] == [keeper]
    wait_for(lambda: ticks_of(runner, "ticker", pids[-1]) >= 50, timeout=20,
             message="the last instance's lines")
    assert [k.pid for k in keepers(runner, "ticker")] == [keeper]
    assert_continuous(log_lines(runner, "ticker"), pids)
    assert runner.settings is not None
    log = runner.settings.programs["ticker"].stdout_log
    assert log is not None and Path(f"{log}.2").exists()  # it rotated meanwhile


def test_a_reload_that_removes_the_program_ends_its_keeper(daemon_factory):
    runner = daemon_factory({"kept": SLEEPER, "doomed": SLEEPER}, NO_DEMO)
    for name in ("kept", "doomed"):
        runner.wait_state(name, "RUNNING", timeout=20)
    kept, doomed = one_keeper(runner, "kept"), one_keeper(runner, "doomed")
    text = runner.config.read_text()
    cut = text.index("[programs.doomed]")
    end = text.find("\n[", cut)
    runner.config.write_text(text[:cut] + (text[end + 1:] if end != -1 else ""))
    runner.send_signal(signal.SIGHUP)
    wait_for(lambda: "doomed" not in {p["name"] for p in runner.processes()}, timeout=20,
             message="the program removed")
    wait_for(lambda: not keepers(runner, "doomed"), timeout=20, message="its keeper ended")
    assert not psutil.pid_exists(doomed) or psutil.Process(doomed).status() == "zombie"
    assert [k.pid for k in keepers(runner, "kept")] == [kept]


def test_a_stopped_daemon_leaves_no_keeper_after_restarts(daemon_factory):
    runner = daemon_factory({"ticker": ticker(), "sleeper": SLEEPER}, NO_DEMO)
    pid = runner.wait_state("ticker", "RUNNING", timeout=20)["pid"]
    runner.wait_state("sleeper", "RUNNING", timeout=20)
    restart(runner, "ticker", pid)
    assert len(keepers(runner)) == 2
    assert runner.stop() == 0
    assert keepers(runner) == []


def test_after_a_daemon_kill_the_first_restart_leaves_a_single_keeper(daemon_factory):
    """After kill -9 the program keeps logging through the keeper it was started with; the
    next daemon has no write ends of those pipes, so the program's first restart starts a
    new keeper, and the old one ends with the old instance."""
    runner = daemon_factory({"ticker": ticker(4096)}, NO_DEMO)
    pid = runner.wait_state("ticker", "RUNNING", timeout=20)["pid"]
    old_keeper = one_keeper(runner, "ticker")
    runner.kill9()
    seen = ticks_of(runner, "ticker", pid)
    wait_for(lambda: ticks_of(runner, "ticker", pid) > seen + 50, timeout=20,
             message="lines written while no daemon runs")
    runner.start(timeout=20)
    assert runner.wait_state("ticker", "RUNNING", timeout=20)["pid"] == pid  # adopted
    assert [k.pid for k in keepers(runner, "ticker")] == [old_keeper]
    new_pid = restart(runner, "ticker", pid)
    new_keeper = one_keeper(runner, "ticker")
    assert new_keeper != old_keeper
    wait_for(lambda: ticks_of(runner, "ticker", new_pid) >= 50, timeout=20,
             message="the new instance's lines")
    assert [k.pid for k in keepers(runner, "ticker")] == [new_keeper]
    assert_continuous(log_lines(runner, "ticker"), [pid, new_pid])


def test_a_stopped_daemon_waits_for_the_keeper_of_an_adopted_program(daemon_factory):
    """The keeper of a program adopted after a crash was started by the earlier daemon: a
    stop of the new one still leaves no keeper behind."""
    runner = daemon_factory({"sleeper": SLEEPER}, NO_DEMO)
    pid = runner.wait_state("sleeper", "RUNNING", timeout=20)["pid"]
    one_keeper(runner, "sleeper")
    runner.kill9()
    runner.start(timeout=20)
    assert runner.wait_state("sleeper", "RUNNING", timeout=20)["pid"] == pid
    assert runner.stop() == 0
    assert keepers(runner) == []


def test_a_keeper_pumps_pipes_numbered_past_fd_setsize(tmp_path):
    """A daemon with many programs hands its keepers pipes numbered past 1023, which
    select(2) cannot watch: every byte must still reach the file, and the keeper must end
    when the writer does."""
    read_end, write_end = os.pipe()
    high = 1500
    log = tmp_path / "high.log"
    file_fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o640)  # as open_log: no O_APPEND
    os.dup2(read_end, high)
    os.close(read_end)
    config = {"uid": os.getuid(), "gid": os.getgid(), "streams": [
        {"pipe": high, "file": file_fd, "path": str(log), "max_bytes": 1 << 20,
         "backups": 1}]}
    keeper = subprocess.Popen(
        [sys.executable, "-m", "ocp_agentd.logkeeper", json.dumps(config)],
        pass_fds=[high, file_fd], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        os.close(high)
        os.close(file_fd)
        os.write(write_end, b"past FD_SETSIZE\n")
        os.close(write_end)
        _, err = keeper.communicate(timeout=30)
        assert keeper.returncode == 0, err
        assert log.read_bytes() == b"past FD_SETSIZE\n"
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()


def test_a_log_moved_away_gets_a_new_keeper_and_a_rotation_keeps_the_keeper(tmp_path):
    """The keeper is reused while it writes the files at the logs' paths. Someone else's
    rotation (the log moved away, a new file at its path) gets a new keeper; the keeper's
    own rotation (it puts the new file there itself) keeps it. Checked through the daemon's
    own open_streams, the keeper real."""
    log = tmp_path / "logs" / "moved.log"
    log.parent.mkdir()
    spec = ProgramSpec(name="moved", command=["/bin/true"], cwd="/", stdout_log=log,
                       stderr_log=log, log_max_bytes=64, log_backups=3)

    def keeper_pid() -> int:
        fds = output.open_streams(spec)
        try:
            held = output.keeper_of(spec)
            assert held is not None
            return held.keeper.pid  # type: ignore[attr-defined]
        finally:
            for fd in set(fds):
                os.close(fd)

    try:
        first = keeper_pid()
        assert keeper_pid() == first
        log.rename(log.with_suffix(".old"))
        log.touch()
        second = keeper_pid()
        assert second != first  # the old keeper writes a file no longer at the path
        before = log.stat().st_ino
        out, err = output.open_streams(spec)
        try:
            os.write(out, b"x" * 200)  # past log_max_bytes: the keeper rotates
        finally:
            for fd in {out, err}:
                os.close(fd)
        wait_for(lambda: log.exists() and log.stat().st_ino != before, 10, "the rotation")
        assert keeper_pid() == second
    finally:
        output.close_streams(spec.name)


def test_one_thread_collects_the_exits_of_every_keeper(tmp_path):
    """Twenty programs' keepers are watched by one thread, not a thread each; each is
    reaped (no zombie) once its program's last writer is gone."""
    specs = [
        ProgramSpec(name=f"many{index}", command=["/bin/true"], cwd="/",
                    stdout_log=tmp_path / f"many{index}.log",
                    stderr_log=tmp_path / f"many{index}.log")
        for index in range(20)
    ]
    before = {thread.name for thread in threading.enumerate()}
    pids = []
    try:
        for spec in specs:
            for fd in set(output.open_streams(spec)):
                os.close(fd)
            held = output.keeper_of(spec)
            pids.append(held.keeper.pid)  # type: ignore[union-attr]
        new = {thread.name for thread in threading.enumerate()} - before
        assert not any(name.startswith("keeper-many") for name in new), new
        assert output._KEEPER_EXITS.watching() >= 20
    finally:
        for spec in specs:
            output.close_streams(spec.name)

    # A zombie still exists: gone means reaped.
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), 20, "every keeper reaped")


def test_a_rotated_log_renamed_back_over_the_live_one_gets_a_new_keeper(tmp_path):
    """After the keeper's own rotation (<log> -> <log>.1, a new <log>), the log's owner
    renames <log>.1 back over <log>: the file at the path is one the keeper wrote once
    but no longer writes (it writes the replaced file, now without a name). The next
    process must get a keeper that writes the file at the path, not the old one: its
    output would go to a file nobody can read. The keeper real, through open_streams."""
    log = tmp_path / "logs" / "back.log"
    log.parent.mkdir()
    spec = ProgramSpec(name="back", command=["/bin/true"], cwd="/", stdout_log=log,
                       stderr_log=log, log_max_bytes=64, log_backups=3)

    def write(data: bytes) -> int:
        out, err = output.open_streams(spec)
        try:
            os.write(out, data)
            held = output.keeper_of(spec)
            assert held is not None
            return held.keeper.pid  # type: ignore[attr-defined]
        finally:
            for fd in {out, err}:
                os.close(fd)

    try:
        write(b"")
        first_ino = log.stat().st_ino
        write(b"a" * 64 + b"b" * 10)  # 64 bytes fill the first file, then a rotation
        rotated = log.with_name("back.log.1")
        wait_for(lambda: rotated.exists() and rotated.stat().st_ino == first_ino
                 and log.exists() and log.stat().st_size == 10, 10, "the rotation")
        os.rename(rotated, log)  # the first file back at the path; the live one unnamed
        marker = f"marker-{os.getpid()}\n".encode()
        write(marker)
        wait_for(lambda: marker in log.read_bytes(), 10,
                 "the next process's output in the file at the log's path")
    finally:
        output.close_streams(spec.name)
