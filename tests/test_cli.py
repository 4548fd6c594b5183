"""ocp-agentctl against a real daemon: tables, --json, exit codes, socket discovery."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness import DaemonRunner, demo_command, free_port, wait_for

CTL = Path(sys.executable).parent / "ocp-agentctl"
PROGRAMS = ["pos_proxy", "ocp_exporter", "ob_logtailer"]


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [str(CTL)] if CTL.exists() else [sys.executable, "-m", "ocp_agentd.cli"]
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OCP_AGENTD_", "OCP_AGENTCTL_"))}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, stdin=subprocess.DEVNULL)


def rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by program name (first column)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.startswith("NAME"))
    return {line.split()[0]: line.split() for line in lines[header + 1:]}


def test_status_table_and_json(demo_daemon: DaemonRunner) -> None:
    result = demo_daemon.ctl("status")
    assert result.returncode == 0, result.stderr
    assert f"pid {demo_daemon.pid}" in result.stdout
    header = next(line for line in result.stdout.splitlines() if line.startswith("NAME"))
    assert header.split() == ["NAME", "ROLE", "STATE", "PID", "UPTIME", "RESTARTS", "PORTS",
                              "LAST", "EXIT"]
    table = rows(result.stdout)
    assert list(table) == PROGRAMS
    for record in demo_daemon.processes():
        row = table[record["name"]]
        assert row[1] == record["role"] and row[2] == "RUNNING" and row[3] == str(record["pid"])
    assert table["pos_proxy"][6] == str(demo_daemon.base_port)

    for args in (("status", "--json"), ("--json", "status")):
        result = demo_daemon.ctl(*args)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["daemon"]["pid"] == demo_daemon.pid
        assert [p["name"] for p in data["processes"]] == PROGRAMS


def test_operations_and_exit_codes(demo_daemon: DaemonRunner) -> None:
    before = demo_daemon.process("ocp_exporter")["pid"]
    result = demo_daemon.ctl("restart", "ocp_exporter", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    after = demo_daemon.process("ocp_exporter")["pid"]
    assert after != before and rows(result.stdout)["ocp_exporter"][3] == str(after)

    result = demo_daemon.ctl("stop", "all")
    assert result.returncode == 0, result.stderr
    assert {p["name"]: p["state"] for p in demo_daemon.processes()} == {
        "pos_proxy": "RUNNING", "ocp_exporter": "STOPPED", "ob_logtailer": "STOPPED"}
    result = demo_daemon.ctl("verify")
    assert result.returncode == 1 and "ob_logtailer" in result.stderr
    result = demo_daemon.ctl("start", "all", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True
    assert all(p["state"] == "RUNNING" for p in demo_daemon.processes())
    pids = {p["name"]: p["pid"] for p in demo_daemon.processes()}
    result = demo_daemon.ctl("restart", "all")
    assert result.returncode == 0, result.stderr
    now = {p["name"]: p["pid"] for p in demo_daemon.processes()}
    assert now["pos_proxy"] == pids["pos_proxy"]
    assert now["ocp_exporter"] != pids["ocp_exporter"]
    assert now["ob_logtailer"] != pids["ob_logtailer"]
    result = demo_daemon.ctl("verify", "ocp_exporter")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr

    # Refused operations: exit 1, one line with the reason and code, no traceback.
    result = demo_daemon.ctl("restart", "pos_proxy")
    assert result.returncode == 1
    assert "code 2002" in result.stderr and "Traceback" not in result.stderr
    assert demo_daemon.process("pos_proxy")["pid"] == pids["pos_proxy"]
    result = demo_daemon.ctl("start", "no_such_program", "--json")
    assert result.returncode == 1 and "code 2001" in result.stderr
    assert json.loads(result.stdout)["error"]["code"] == 2001
    result = demo_daemon.ctl("restart", "pos_proxy", "--force")
    assert result.returncode == 0, result.stderr
    assert demo_daemon.process("pos_proxy")["pid"] != pids["pos_proxy"]


def test_usage_errors_exit_2(demo_daemon: DaemonRunner) -> None:
    for args in ([], ["start"], ["bogus"], ["start", "x", "--timeout", "-1"],
                 ["stop", "all", "--force"], ["status", "--url", "http://x", "--socket", "/y"]):
        result = demo_daemon.ctl(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "usage:" in result.stderr
    result = ctl("--help")
    assert result.returncode == 0
    for word in ("status", "start", "stop", "restart", "verify", "--json", "exit status"):
        assert word in result.stdout
    assert all(p["state"] == "RUNNING" for p in demo_daemon.processes())


def test_daemon_not_running_exits_3(daemon_factory, tmp_path: Path) -> None:
    missing = tmp_path / "nothing" / "agentd.sock"
    result = ctl("--socket", str(missing), "status")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"ocp-agentctl: ocp-agentd is not running (no socket at {missing}; is --socket or "
        "--config right?)"
    )
    assert result.stdout == ""
    # A path that is there but is not a socket (a directory given for the socket).
    result = ctl("--socket", str(tmp_path), "status")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"ocp-agentctl: ocp-agentd is not running ({tmp_path} is not a socket; is --socket "
        "or --config right?)"
    )
    # A socket nobody listens on (left by a daemon killed with SIGKILL).
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(stale))
    listener.close()
    result = ctl("--socket", str(stale), "status")
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"ocp-agentctl: ocp-agentd is not running (no answer on {stale})"
    )
    # A daemon that stopped: its socket is gone, the same answer.
    runner = daemon_factory()
    assert runner.ctl("status").returncode == 0
    assert runner.stop() == 0
    result = runner.ctl("stop", "all")
    assert result.returncode == 3 and "not running" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = ctl("--url", f"http://127.0.0.1:{free_port()}", "status")
    assert result.returncode == 3 and "not running" in result.stderr


def test_socket_from_config_and_tcp_token(daemon_factory) -> None:
    port = free_port()
    token = "ctl-test-token"
    runner = daemon_factory(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": [
        {"name": "ops", "sha256": hashlib.sha256(token.encode()).hexdigest()}]}})
    result = ctl("--config", str(runner.config), "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"]["pid"] == runner.pid
    result = ctl("status", "--json", env={"OCP_AGENTD_CONFIG": str(runner.config)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"]["pid"] == runner.pid
    url = f"http://127.0.0.1:{port}"
    result = ctl("--url", url, "status")
    assert result.returncode == 1 and "code 1004" in result.stderr
    result = ctl("--url", url, "--token", token, "status")
    assert result.returncode == 0, result.stderr
    result = ctl("--url", url, "verify", "--json", env={"OCP_AGENTCTL_TOKEN": token})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


@pytest.fixture
def failing_daemon(daemon_factory) -> DaemonRunner:
    return daemon_factory(extra_programs={"failer": {
        "command": demo_command("misbehave", "exit-now", 3), "autorestart": "never",
        "start_seconds": 0.5}})


def test_start_all_failure_names_the_program(failing_daemon: DaemonRunner) -> None:
    result = failing_daemon.ctl("start", "all", "--timeout", "20")
    assert result.returncode == 1
    assert "code 2004" in result.stderr
    assert any(line.strip().startswith("failer:") for line in result.stderr.splitlines())
    result = failing_daemon.ctl("start", "failer")
    assert result.returncode == 1 and "failer" in result.stderr
    assert failing_daemon.process("ocp_exporter")["state"] == "RUNNING"


def test_status_long_shows_each_programs_details(demo_daemon: DaemonRunner) -> None:
    """status -l NAME: the record's command, user, cgroup, limits, usage, liveness and logs,
    each from the daemon's own answer."""
    record = demo_daemon.process("ocp_exporter")
    result = demo_daemon.ctl("status", "-l", "ocp_exporter")
    assert result.returncode == 0, result.stderr
    details = {}
    for line in result.stdout.splitlines():
        if line.startswith("  ") and line.strip():
            label, _, text = line.strip().partition(" ")
            details[label] = text  # "last exit" files under "last"
    assert "ocp_exporter:" in result.stdout
    assert details["command"].strip() == " ".join(record["command"])
    assert details["user"].strip() == record["user"]
    assert details["cgroup"].strip() == (record["cgroup"] or
                                         "- (process tree from the process table)")
    assert ("OOM kills" in details["usage"]) and ("memory" in details["usage"])
    assert record["log_files"][0] in details["logs"]
    if record.get("liveness"):
        assert "failures in a row" in details["liveness"]
    else:
        assert details["liveness"].strip() == "no probe configured"


def test_a_config_being_edited_does_not_lock_the_operator_out(
    demo_daemon: DaemonRunner, tmp_path: Path
) -> None:
    """A syntax error elsewhere in the file: the socket still comes from its [api] table,
    with a warning; a broken [api] table itself: exit 2 with the --socket hint."""
    text = demo_daemon.config.read_text()
    edited = tmp_path / "edited.toml"
    edited.write_text(text + "\nthis is [not toml\n")
    result = ctl("--config", str(edited), "status", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"]["pid"] == demo_daemon.pid
    assert "does not parse" in result.stderr and "last" in result.stderr

    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace("[api]", "[api]\nsocket = \"unterminated", 1))
    result = ctl("--config", str(broken), "status")
    assert result.returncode == 2
    assert "cannot parse" in result.stderr and "--socket" in result.stderr


def test_signal_names_and_numbers(demo_daemon: DaemonRunner) -> None:
    """signal takes names in any case, with or without SIG, and numbers; anything else is a
    usage error (exit 2) said by the client, before the daemon is asked."""
    result = demo_daemon.ctl("signal", "1", "ocp_exporter")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sent SIGHUP to ocp_exporter")
    tailer = demo_daemon.process("ob_logtailer")["pid"]
    result = demo_daemon.ctl("signal", "sighup", "ob_logtailer")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: "SIGHUP: re-opened" in demo_daemon.ctl("logs", "ob_logtailer").stdout,
             timeout=20, message="the tailer to log the HUP")
    assert demo_daemon.process("ob_logtailer")["pid"] == tailer  # HUP is not a stop
    for bad in ("FOO", "999", "SIG_DFL"):
        result = demo_daemon.ctl("signal", bad, "ocp_exporter")
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert "no signal" in result.stderr
