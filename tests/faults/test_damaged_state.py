"""Damaged state: unwritable state_dir, half-written pid records, a full disk, a corrupted
task database. The daemon must refuse clearly, or carry on safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from faultlib import by_cmdline, fill, host_id, kill_and_wait_restart, marked, python_sleeper, tmpfs
from harness import DaemonRunner, free_port_block, kill_marked, wait_for, write_demo_config

from ocp_agentd.supervision.pid_records import RECORDS_FILE

pytestmark = pytest.mark.faults


def _run_once(config: Path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Runs the daemon in the foreground; it is expected to refuse to start."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCP_AGENTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ocp_agentd", "--config", str(config)],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )


def _refuses(tmp_path: Path, state_dir: Path, log_dir: Path | None = None) -> None:
    """The daemon refuses to start, naming state_dir (or log_dir, when given) as not
    writable, and starts no program."""
    agent = {"state_dir": str(state_dir)}
    if log_dir is not None:
        agent["log_dir"] = str(log_dir)
    config = write_demo_config(tmp_path / "cfg", free_port_block(2), overrides={"agent": agent})
    try:
        done = _run_once(config)
    finally:
        kill_marked("OCP_AGENTD_STATE_DIR", str(state_dir))
    assert done.returncode == 1, (done.returncode, done.stderr)
    unwritable = str(log_dir or state_dir)
    assert unwritable in done.stderr and "not writable" in done.stderr, done.stderr
    assert not marked(str(state_dir)), "a program was started although the daemon refused"


def test_state_dir_is_a_file(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("not a folder\n")
    _refuses(tmp_path, blocker)


def test_state_dir_under_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    _refuses(tmp_path, blocker / "state")


def test_state_dir_on_read_only_mount(tmp_path):
    # Root ignores permission bits, not a read-only file system.
    with tmpfs(tmp_path / "ro", options="ro") as mount:
        _refuses(tmp_path, mount / "state")


def test_state_dir_immutable(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    if subprocess.run(["chattr", "+i", str(state)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        _refuses(tmp_path, state)
    finally:
        subprocess.run(["chattr", "-i", str(state)], capture_output=True)


def _records_path(runner: DaemonRunner) -> Path:
    assert runner.state_dir is not None
    return Path(runner.state_dir) / "pids" / RECORDS_FILE


@pytest.mark.parametrize("damage", ["half", "empty", "garbage", "wrong-types", "tmp-leftover"])
def test_half_written_pid_record(daemon_factory, damage):
    """Damaged pid records are ignored: the programs are adopted by their markers, never
    doubled."""
    runner = daemon_factory(wait_running=True)
    before = runner.process("ocp_exporter")
    command = before["command"]
    runner.kill9()
    records = _records_path(runner)
    text = records.read_text()
    if damage == "half":
        records.write_text(text[: len(text) // 2])
    elif damage == "empty":
        records.write_text("")
    elif damage == "garbage":
        records.write_bytes(b"\xff\xfe{{{\x00")
    elif damage == "wrong-types":
        data = json.loads(text)
        data["ocp_exporter"] = {"name": 3, "pid": "x"}
        records.write_text(json.dumps(data))
    else:  # a crash between writing the temporary file and renaming it
        (records.parent / f".{RECORDS_FILE}.0123.tmp").write_text(text[: len(text) // 3])
    runner.start()
    after = runner.wait_state("ocp_exporter", "RUNNING", timeout=20)
    assert after["pid"] == before["pid"], "the healthy program was restarted, not adopted"
    runner.wait_all_running()
    assert len(by_cmdline(command)) == 1
    if damage != "tmp-leftover":
        assert "unreadable pid record" in runner.log()


def test_pid_record_of_a_stranger_is_never_signalled(daemon_factory, tmp_path):
    """A record naming a live unrelated process (pid reuse) must not make it a target."""
    runner = daemon_factory(wait_running=True)
    runner.kill9()
    stranger = subprocess.Popen(python_sleeper(f"stranger-{tmp_path.name}"))
    try:
        records = _records_path(runner)
        assert runner.settings is not None
        data = json.loads(records.read_text())
        kill_marked("OCP_AGENTD_PROGRAM", "ob_logtailer")  # the real one is gone meanwhile
        data["ob_logtailer"]["pid"] = stranger.pid  # its start time and command do not match
        records.write_text(json.dumps(data))
        runner.start()
        runner.wait_all_running()
        stop = runner.post("/api/v1/processes/ob_logtailer/stop")
        assert stop.successful, stop.text
        assert stranger.poll() is None, "an unrelated process was signalled"
        assert psutil.Process(stranger.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        stranger.kill()
        stranger.wait(10)


def test_disk_full_while_logging(tmp_path, figures):
    """log_dir on a tiny tmpfs, filled up: supervision and the API go on."""
    base = tmp_path / "d"
    with tmpfs(tmp_path / "logs", size="2m") as logs:
        quiet = python_sleeper(f"quiet-{tmp_path.name}")
        config = write_demo_config(
            base,
            free_port_block(2),
            extra_programs={
                "quiet": {"command": quiet},
                "spammer": {
                    "command": [sys.executable, "-m", "ocp_agentd.demo.misbehave", "spam",
                                "--bytes", str(8 * 1024 * 1024), "--line", "4096"],
                    "autorestart": "never",
                },
            },
            overrides={"agent": {"log_dir": str(logs)}},
        )
        runner = DaemonRunner(config)
        try:
            runner.start()
            runner.wait_state("quiet", "RUNNING", timeout=20)

            def full() -> bool:
                return psutil.disk_usage(str(logs)).free < 64 * 1024

            wait_for(full, 30, "the spammer to fill the log file system")
            fill(logs / "filler", 4096)  # whatever room is left goes too
            assert psutil.disk_usage(str(logs)).free < 4096 * 2
            first, again = kill_and_wait_restart(runner, "quiet", "quiet restarted on a full disk")
            assert len(by_cmdline(quiet)) == 1
            status = runner.status()
            assert status
            # The daemon's own log file is on the full disk too: it must still answer.
            answered = sum(runner.get("/api/v1/processes").successful for _ in range(20))
            assert answered == 20
            assert runner.running
            figures["restart on a full disk (pid)"] = f"{first['pid']} -> {again['pid']}"
            started = time.monotonic()
            runner.stop()
            figures["clean stop on a full disk (s)"] = round(time.monotonic() - started, 2)
            assert runner.returncode == 0
        finally:
            runner.cleanup()


def _restart_path(runner: DaemonRunner) -> str:
    return f"/compute/hosts/{host_id(runner)}/agent/restart"


def _wait_final(runner: DaemonRunner, task_id: int, timeout: float, message: str) -> dict:
    def final() -> dict | None:
        got = runner.get(f"/api/v2/tasks/instances/{task_id}").check()
        return got if got["status"] in ("SUCCESSFUL", "FAILED") else None

    return wait_for(final, timeout, message)


def _restart_task(runner: DaemonRunner) -> dict:
    task = runner.post(_restart_path(runner)).check()
    return _wait_final(runner, task["id"], 120, f"task {task['id']} final")


@pytest.mark.parametrize("damage", ["garbage", "pages"])
def test_corrupted_task_database_moved_aside(daemon_factory, damage):
    runner = daemon_factory(wait_running=True)
    assert _restart_task(runner)["status"] == "SUCCESSFUL"
    assert runner.stop() == 0
    assert runner.state_dir is not None
    database = Path(runner.state_dir) / "tasks.sqlite3"
    assert database.exists()
    for suffix in ("-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        database.write_bytes(b"this is not a database\n" * 300)
    else:  # the header survives, the pages after it do not
        raw = bytearray(database.read_bytes())
        raw[100:] = b"\xa5" * (len(raw) - 100)
        database.write_bytes(bytes(raw))
    damaged = database.read_bytes()
    runner.start()
    aside = wait_for(lambda: sorted(database.parent.glob("tasks.sqlite3.corrupt-*")), 10,
                     "the damaged database moved aside")
    assert any(p.read_bytes() == damaged for p in aside), "the damaged file was not kept"
    log = runner.log()
    assert "ERROR" in log and "unreadable" in log and "moved aside" in log, log[-2000:]
    # A fresh database serves: new tasks run and are listed, old ids are unknown (20000).
    listed = runner.get("/api/v2/tasks/instances?page=1&size=10").check()
    assert listed["contents"] == []
    task = _restart_task(runner)
    assert task["status"] == "SUCCESSFUL"
    listed = runner.get("/api/v2/tasks/instances?page=1&size=10").check()
    assert [t["id"] for t in listed["contents"]] == [task["id"]]
    runner.wait_all_running()


def test_state_disk_full(daemon_factory, tmp_path):
    """state_dir's disk fills up: a new task is refused with the envelope and the real cause
    in the log, supervision goes on, and once there is room tasks run again, none lost."""
    with tmpfs(tmp_path / "state", size="4m") as mount:
        runner = daemon_factory(overrides={"agent": {"state_dir": str(mount / "state")}},
                                wait_running=True)
        first = _restart_task(runner)
        assert first["status"] == "SUCCESSFUL"
        filler = mount / "filler"
        fill(filler)
        refused = runner.post(_restart_path(runner))
        assert not refused.successful and refused.code == 5000, refused.text
        assert "disk is full" in refused.error["message"], refused.text
        assert "Traceback" not in refused.text
        assert "disk is full" in runner.log(), "the real cause is not in the log"
        kill_and_wait_restart(runner, "ocp_exporter", "a restart on a full state disk")
        filler.unlink()
        second = _restart_task(runner)
        assert second["status"] == "SUCCESSFUL"
        listed = runner.get("/api/v2/tasks/instances?page=1&size=100").check()
        assert {t["id"] for t in listed["contents"]} >= {first["id"], second["id"]}
        runner.stop()


def test_state_disk_full_during_a_task(daemon_factory, tmp_path):
    """The disk fills while a restart task runs: its state cannot be recorded, so it waits;
    once there is room it finishes without a daemon restart and frees the host's lock."""
    slow = {"slow": {"command": [sys.executable, "-m", "ocp_agentd.demo.misbehave",
                                 "ignore-term"], "stop_timeout": 3.0}}
    with tmpfs(tmp_path / "state", size="4m") as mount:
        runner = daemon_factory(slow, {"agent": {"state_dir": str(mount / "state")}},
                                wait_running=True)
        task = runner.post(_restart_path(runner)).check()  # >= 3 s long
        filler = mount / "filler"
        fill(filler)
        wait_for(lambda: "disk is full" in runner.log(), 30, "the task store to hit the full disk")
        filler.unlink()
        daemon_pid = runner.pid
        done = _wait_final(runner, task["id"], 60, "the task to finish once there is room")
        assert runner.pid == daemon_pid and runner.running
        assert done["status"] == "SUCCESSFUL", done
        assert _restart_task(runner)["status"] == "SUCCESSFUL"  # the lock was released
        runner.wait_all_running()
        runner.stop()


def test_log_dir_on_read_only_mount(tmp_path):
    with tmpfs(tmp_path / "ro", options="ro") as mount:
        _refuses(tmp_path, tmp_path / "state", log_dir=mount / "log")


def test_second_daemon_on_the_same_state_dir(daemon_factory):
    """A second daemon on the same state refuses, naming the first; nothing is doubled."""
    first = daemon_factory(wait_running=True)
    records = {r["name"]: r["pid"] for r in first.processes()}
    done = _run_once(first.config)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert f"pid {first.pid}" in done.stderr, done.stderr
    assert first.running
    assert {r["name"]: r["pid"] for r in first.processes()} == records
    for record in first.processes():
        assert len(by_cmdline(record["command"])) == 1


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage", b"99999999\n"])
def test_stale_or_damaged_instance_lock(daemon_factory, content):
    """A lock file left by a dead daemon, empty or damaged, does not stop the next one."""
    runner = daemon_factory(wait_running=True)
    runner.kill9()
    assert runner.state_dir is not None
    (Path(runner.state_dir) / "ocp_agentd.lock").write_bytes(content)
    runner.start()
    runner.wait_all_running()


def test_socket_path_taken_by_a_file(daemon_factory):
    """Something else sits where the socket goes: a clear refusal, no program left behind."""
    runner = daemon_factory(start=False)
    runner.socket.parent.mkdir(parents=True, exist_ok=True)
    runner.socket.write_text("not a socket\n")
    try:
        done = _run_once(runner.config)
    finally:
        leftovers = runner.leftovers()
        runner.cleanup()
    assert done.returncode != 0, done.stderr
    assert str(runner.socket) in done.stderr and "not a socket" in done.stderr, done.stderr
    assert runner.socket.read_text() == "not a socket\n"
    assert not leftovers, f"programs left running by a daemon that could not start: {leftovers}"
