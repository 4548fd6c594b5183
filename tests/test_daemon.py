"""The daemon as a whole process: config errors, SIGTERM, crash and adoption, reload, handover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from harness import DaemonRunner, check_config, wait_for

from ocp_agentd.demo.config import demo_command
from ocp_agentd.ticker import BUSY_SECONDS, HOUSEKEEPING_SECONDS


def run_daemon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ocp_agentd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OCP_AGENTD_")},
             **(env or {})},
    )


def pids_by_name(runner: DaemonRunner) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in runner.processes()}


def instances(runner: DaemonRunner, name: str) -> int:
    """How many live processes of this daemon's tree run the program's command line."""
    command = runner.settings.programs[name].command
    count = 0
    for proc in runner.leftovers():
        try:
            if proc.cmdline() == command and proc.status() != psutil.STATUS_ZOMBIE:
                count += 1
        except psutil.Error:
            continue
    return count


def test_check_accepts_the_demo_config(daemon_factory) -> None:
    runner = daemon_factory(start=False)
    result = check_config(runner.config)
    assert result.returncode == 0, result.stderr
    assert "pos_proxy" in result.stdout and "is valid" in result.stdout


def test_check_into_a_closed_pipe_prints_no_traceback(daemon_factory) -> None:
    """`ocp-agentd --check | head -1`: the reader goes away after one line; the rest is
    dropped quietly and the exit status still says what the check found."""
    runner = daemon_factory(start=False)
    read, write = os.pipe()
    os.close(read)  # a reader that has gone already: every write is EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ocp_agentd", "--config", str(runner.config), "--check"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
        )
    finally:
        os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == check_config(runner.config).returncode == 0


def test_a_bad_value_from_the_environment_is_named_as_such(tmp_path: Path) -> None:
    """OCP_AGENTD_<SECTION>__<KEY> overrides the file (any case); an operator reading the
    error must be sent to the variable, not to a file that holds no such value."""
    good = tmp_path / "good.toml"
    good.write_text("[programs.a]\nrole = 'pos_proxy'\ncommand = ['/bin/sleep', '1']\n")
    result = run_daemon("--check", "--config", str(good),
                        env={"ocp_agentd_agent__host_id": "abc"})
    assert result.returncode == 2, result.stderr
    assert "agent.host_id" in result.stderr
    assert "set by the environment variable ocp_agentd_agent__host_id" in result.stderr
    from_file = tmp_path / "bad.toml"
    from_file.write_text("[agent]\nhost_id = 'abc'\n" + good.read_text())
    result = run_daemon("--check", "--config", str(from_file))
    assert result.returncode == 2 and "agent.host_id" in result.stderr
    assert "environment" not in result.stderr


def test_bad_config_is_rejected_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[agent]\nhost_id = 'two'\n"
        "[programs.a]\nrole = 'pos_proxy'\ncommand = ['/bin/sleep', '1']\n"
        "[programs.b]\nrole = 'pos_proxy'\ncommand = ['sleep', '1']\nstop_signal = 'NOPE'\n"
        "color = 'red'\n"
    )
    result = run_daemon("--config", str(bad))
    assert result.returncode == 2
    for expected in (
        "agent.host_id",
        "programs.b.command",
        "must be absolute",
        "programs.b.stop_signal",
        "unknown signal",
        "programs.b.color: unknown key",
    ):
        assert expected in result.stderr, (expected, result.stderr)
    two = tmp_path / "two.toml"
    two.write_text(
        "[programs.a]\nrole = 'pos_proxy'\ncommand = ['/bin/sleep', '1']\n"
        "[programs.b]\nrole = 'pos_proxy'\ncommand = ['/bin/sleep', '1']\n"
    )
    result = run_daemon("--config", str(two))
    assert result.returncode == 2 and "programs" in result.stderr and "pos_proxy" in result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run_daemon("--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_unwritable_state_dir_stops_the_daemon_at_start(daemon_factory, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    runner = daemon_factory(start=False, overrides={"agent": {"state_dir": str(blocker / "x")}})
    result = run_daemon("--config", str(runner.config))
    assert result.returncode == 1
    assert "not writable" in result.stderr
    assert runner.leftovers() == []


def test_sigterm_stops_every_program(demo_daemon: DaemonRunner) -> None:
    pids = pids_by_name(demo_daemon)
    assert demo_daemon.stop() == 0
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert demo_daemon.leftovers() == []


def test_kill9_of_daemon_then_restart_adopts_and_replaces_the_dead(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    before = pids_by_name(runner)
    runner.kill9()
    os.kill(before["ocp_exporter"], signal.SIGKILL)  # dies while no daemon watches
    runner.start()
    after = runner.wait_all_running()
    now = {p["name"]: p["pid"] for p in after}
    assert now["pos_proxy"] == before["pos_proxy"]
    assert now["ob_logtailer"] == before["ob_logtailer"]
    assert now["ocp_exporter"] != before["ocp_exporter"]
    for name in now:
        assert instances(runner, name) == 1, name
    # The adopted pos_proxy is watched by the new daemon: a crash is seen and repaired.
    os.kill(now["pos_proxy"], signal.SIGKILL)
    wait_for(
        lambda: (
            runner.process("pos_proxy")["pid"] not in (None, now["pos_proxy"])
            and runner.process("pos_proxy")["state"] == "RUNNING"
        ),
        timeout=15,
        message="pos_proxy restarted by the second daemon",
    )


def test_handover_leaves_programs_for_the_next_daemon(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    before = pids_by_name(runner)
    runner.send_signal(signal.SIGUSR2)
    assert runner.wait_exit(30) == 75
    for pid in before.values():
        assert psutil.pid_exists(pid)
    runner.start()
    runner.wait_all_running()
    assert pids_by_name(runner) == before


def test_sighup_reload_applies_the_edited_config(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    before = pids_by_name(runner)
    text = runner.config.read_text()
    extra = " ".join(f'"{part}"' for part in demo_command("misbehave", "tree", "1"))
    text += f"\n[programs.added]\ncommand = [{extra.replace(' ', ', ')}]\nstart_seconds = 0.1\n"
    runner.config.write_text(text)
    runner.send_signal(signal.SIGHUP)
    wait_for(
        lambda: (runner.get("/api/v1/processes/added").data or {}).get("state") == "RUNNING",
        timeout=15,
        message="the added program RUNNING",
    )
    assert {k: v for k, v in pids_by_name(runner).items() if k != "added"} == before

    runner.config.write_text(text + "\n[programs.broken]\nthis is not toml\n")
    runner.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in runner.log(), timeout=10, message="refusal logged")
    assert pids_by_name(runner)["added"] is not None
    assert "broken" not in pids_by_name(runner)


def test_second_daemon_on_the_same_state_dir_refuses_to_start(demo_daemon: DaemonRunner) -> None:
    before = pids_by_name(demo_daemon)
    result = run_daemon("--config", str(demo_daemon.config))
    assert result.returncode == 1
    assert "already runs" in result.stderr and str(demo_daemon.pid) in result.stderr
    assert pids_by_name(demo_daemon) == before
    for name in before:
        assert instances(demo_daemon, name) == 1


def test_status_reports_the_daemon_state(demo_daemon: DaemonRunner) -> None:
    status = demo_daemon.status()
    assert status["state"] == "running"
    assert status["pid"] == demo_daemon.pid
    assert status["counts"]["RUNNING"] == 3


def _main_thread_wakeups(pid: int) -> int:
    for line in Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for {pid}")


def test_idle_daemon_wakes_only_for_housekeeping(daemon_factory) -> None:
    """Left alone, the event loop sleeps until housekeeping is due (no per-second tick), and
    log files still rotate: the keeper's, and one a program appends to by name, which
    housekeeping rotates once its watch says it changed (logwatch.py). No program has a
    liveness probe here (SPEC section 10: those cost nothing between periods, and without
    one, nothing at all)."""
    spammer = {"command": [sys.executable, "-m", "ocp_agentd.demo.misbehave", "spam",
                           "--bytes", "20000"],
               "log_max_bytes": 5000, "log_backups": 1}
    quiet = {"command": ["/bin/sleep", "100000"], "log_max_bytes": 5000, "log_backups": 1}
    no_probe = {"programs": {"ocp_exporter": {"liveness": None}}}
    daemon = daemon_factory({"spammer": spammer, "quiet": quiet}, no_probe,
                            wait_running=True)
    assert all(spec.liveness is None for spec in daemon.settings.programs.values())
    assert daemon.pid is not None and daemon.settings is not None
    stdout_log = daemon.settings.programs["spammer"].stdout_log
    assert stdout_log is not None
    # Nothing asks the daemon anything from here on: its busy window runs out first.
    time.sleep(BUSY_SECONDS + 1)
    before = _main_thread_wakeups(daemon.pid)
    window = HOUSEKEEPING_SECONDS - BUSY_SECONDS
    time.sleep(window)  # the idle stretch being measured
    wakeups = _main_thread_wakeups(daemon.pid) - before
    # A one-second tick would wake it about `window` times; housekeeping wakes it once or
    # twice (its rotation runs on a worker thread).
    assert wakeups <= window / 2, f"{wakeups} wake-ups in {window:.0f} s of idleness"
    backup = stdout_log.with_name(stdout_log.name + ".1")
    wait_for(backup.exists, HOUSEKEEPING_SECONDS, "the grown log file rotated")
    # The copy ends at a file system block: the rest stays in the live file, none is lost.
    assert stdout_log.stat().st_size <= 5000
    assert backup.stat().st_size >= 4096
    # A log appended to by name past its limit: the change wakes housekeeping.
    quiet_log = daemon.settings.programs["quiet"].stdout_log
    assert quiet_log is not None
    with quiet_log.open("ab") as appended:
        appended.write(b"x" * 20000)
    quiet_backup = quiet_log.with_name(quiet_log.name + ".1")
    wait_for(quiet_backup.exists, 2 * HOUSEKEEPING_SECONDS, "the appended log rotated")
    assert quiet_log.stat().st_size <= 5000
