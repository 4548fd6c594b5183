"""One bad program never takes the daemon down (issue #10, kind 1).

What this host can check (the user exists, the cwd is a directory, the command is an
executable file) is checked by --check, at start and on reload, naming the key; what
goes wrong at spawn time anyway fails that program alone with its true reason.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from harness import check_config, wait_for, write_demo_config

SLEEP = ["/bin/sleep", "100000"]
SETTLED = ("BACKOFF", "FATAL")


def absent_user() -> str:
    return f"nouser{uuid.uuid4().hex[:10]}"


@pytest.fixture
def host_user():
    """A real system user for the test, deleted afterwards (whatever the test did)."""
    name = f"agentd{uuid.uuid4().hex[:10]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_check_names_every_key_this_host_cannot_satisfy(daemon_factory, tmp_path: Path) -> None:
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    runner = daemon_factory(
        {
            "baduser": {"command": SLEEP, "user": absent_user()},
            "badcwd": {"command": SLEEP, "cwd": str(tmp_path / "gone")},
            "badcmd": {"command": [str(tmp_path / "no-such-binary")]},
            "noexec": {"command": [str(not_executable)]},
            "dircmd": {"command": [str(tmp_path)]},
        },
        start=False,
    )
    result = check_config(runner.config)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for key in (
        "programs.baduser.user",
        "programs.badcwd.cwd",
        "programs.badcmd.command",
        "programs.noexec.command",
        "programs.dircmd.command",
    ):
        assert key in output, output
    assert "programs.ocp_exporter" not in output and "Traceback" not in output


def test_a_missing_user_fails_that_program_alone(daemon_factory) -> None:
    runner = daemon_factory({"baduser": {"command": SLEEP, "user": absent_user()}})
    record = runner.wait_state("baduser", *SETTLED, timeout=30)
    assert "programs.baduser.user" in record["last_exit"]["reason"], record
    runner.wait_state("ocp_exporter", timeout=30)
    runner.wait_state("pos_proxy", timeout=30)

    response = runner.post("/api/v1/processes/baduser/start", json={"timeout": 10})
    assert response.status == 409 and response.code == 2004, response.text
    assert "programs.baduser.user" in response.error["message"]
    assert runner.running

    assert runner.stop() == 0
    assert runner.leftovers() == []
    assert not runner.socket.exists()


def test_a_missing_cwd_is_reported_as_the_cwd(daemon_factory, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    runner = daemon_factory({"nocwd": {"command": SLEEP, "cwd": str(gone)}})
    reason = runner.wait_state("nocwd", *SETTLED, timeout=30)["last_exit"]["reason"]
    assert "programs.nocwd.cwd" in reason and str(gone) in reason, reason
    assert "/bin/sleep" not in reason, reason


def test_reload_with_a_bad_program_returns_to_running(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    assert runner.base_port is not None
    write_demo_config(
        runner.config.parent, runner.base_port, 2,
        {"baduser": {"command": SLEEP, "user": absent_user()}},
    )
    runner.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        status = runner.status()
        names = {p["name"] for p in runner.processes()}
        return status["state"] == "running" and "baduser" in names

    wait_for(reloaded, timeout=30, message="the reload done, baduser added")
    response = runner.post("/api/v1/processes/baduser/start", json={"timeout": 10})
    assert response.status == 409 and response.code == 2004, response.text
    assert "programs.baduser.user" in response.error["message"]
    for name in ("pos_proxy", "ocp_exporter", "ob_logtailer"):
        assert runner.process(name)["state"] == "RUNNING"


def test_a_user_deleted_after_start_fails_that_program_alone(
    daemon_factory, host_user: str
) -> None:
    runner = daemon_factory({"asuser": {"command": SLEEP, "user": host_user}})
    runner.wait_state("asuser", timeout=30)
    runner.post("/api/v1/processes/asuser/stop", json={"timeout": 20}).check()
    subprocess.run(["userdel", host_user], check=True, capture_output=True)

    response = runner.post("/api/v1/processes/asuser/start", json={"timeout": 10})
    assert response.status == 409 and response.code == 2004, response.text
    assert "programs.asuser.user" in response.error["message"], response.text
    assert runner.running and runner.status()["state"] == "running"
    assert runner.process("ocp_exporter")["state"] == "RUNNING"


def test_check_and_start_agree_on_a_good_config(daemon_factory) -> None:
    """The host checks refuse nothing the demo needs (a check that refused all would pass
    the tests above)."""
    runner = daemon_factory(start=False)
    result = check_config(runner.config)
    assert result.returncode == 0, result.stdout + result.stderr
    runner.start()
    runner.wait_all_running()
