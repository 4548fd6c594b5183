"""Operator intent across a daemon restart (SPEC section 12): a program stopped on request,
or an exit left so by autorestart = "never", stays so under the next daemon of the same
boot (kill -9, handover, SIGTERM), but not under a daemon of another boot."""

from __future__ import annotations

import os
import signal
import uuid

import orjson
import pytest
from harness import DaemonRunner, wait_for
from test_daemon import instances

from ocp_agentd.demo.config import demo_command
from ocp_agentd.supervision.intent_records import IntentRecords, boot_id


def record_dir(runner: DaemonRunner):
    assert runner.state_dir is not None
    return runner.state_dir / "intent"


def wait_booted(runner: DaemonRunner) -> None:
    """Until the daemon's initial starts are over (status state "running")."""
    wait_for(
        lambda: runner.status()["state"] == "running",
        timeout=20,
        message="daemon booted",
    )


def test_a_stop_survives_kill9_of_the_daemon_and_start_undoes_it(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/pos_proxy/stop", json={"force": True}).check()
    assert runner.process("pos_proxy")["state"] == "STOPPED"
    runner.kill9()
    runner.start()
    wait_booted(runner)
    assert runner.process("pos_proxy")["state"] == "STOPPED"
    assert instances(runner, "pos_proxy") == 0
    assert runner.process("ocp_exporter")["state"] == "RUNNING"
    second = runner.log().rsplit("--- harness: starting daemon", 1)[1]
    assert second.count("pos_proxy: left stopped, as requested at ") == 1
    assert "pos_proxy: STOPPED -> " not in second

    runner.post("/api/v1/processes/pos_proxy/start", json={"force": True}).check()
    assert runner.process("pos_proxy")["state"] == "RUNNING"
    assert not (record_dir(runner) / "pos_proxy.json").exists()
    runner.kill9()
    runner.start()
    runner.wait_all_running()  # started, not left stopped: the start removed the record


def test_stop_all_survives_kill9_of_the_daemon(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/agent/stop-all").check()
    workers = [n for n, s in runner.settings.programs.items() if s.role == "worker"]
    assert workers
    runner.kill9()
    runner.start()
    wait_booted(runner)
    for name in workers:
        assert runner.process(name)["state"] == "STOPPED", name
        assert instances(runner, name) == 0, name
    assert runner.process("pos_proxy")["state"] == "RUNNING"
    runner.post("/api/v1/agent/start-all").check()
    for name in workers:
        assert runner.process(name)["state"] == "RUNNING", name
    assert sorted(p.stem for p in record_dir(runner).glob("*.json")) == []


def test_a_record_of_another_boot_is_ignored(daemon_factory) -> None:
    runner = daemon_factory(start=False)
    directory = record_dir(runner)
    directory.mkdir(parents=True)
    other = str(uuid.uuid4())
    assert other != boot_id()
    record = {"name": "pos_proxy", "state": "STOPPED", "at": 1.0, "boot_id": other, "reason": ""}
    (directory / "pos_proxy.json").write_bytes(orjson.dumps(record))
    runner.start()
    runner.wait_all_running()
    assert not (directory / "pos_proxy.json").exists()
    # The same record of this boot is obeyed (so the test above can fail).
    runner.kill9()
    (directory / "pos_proxy.json").write_bytes(orjson.dumps({**record, "boot_id": boot_id()}))
    runner.start()
    wait_booted(runner)
    assert runner.process("pos_proxy")["state"] == "STOPPED"
    assert instances(runner, "pos_proxy") == 0


@pytest.mark.parametrize("how", ["handover", "sigterm"])
def test_a_stop_survives_handover_and_a_full_stop(daemon_factory, how: str) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/ocp_exporter/stop").check()
    if how == "handover":
        runner.send_signal(signal.SIGUSR2)
        assert runner.wait_exit(30) == 75
    else:
        assert runner.stop() == 0
    runner.start()
    wait_booted(runner)
    assert runner.process("ocp_exporter")["state"] == "STOPPED"
    assert instances(runner, "ocp_exporter") == 0
    # The daemon's own stops (SIGTERM) are not a caller's: the others come back.
    assert runner.process("pos_proxy")["state"] == "RUNNING"
    assert runner.process("ob_logtailer")["state"] == "RUNNING"


def test_an_exit_left_so_stays_exited_after_kill9_of_the_daemon(daemon_factory) -> None:
    runner = daemon_factory(
        extra_programs={"once": {
            "command": demo_command("misbehave", "tree", "0"),
            "autorestart": "never",
            "start_seconds": 0.1,
        }},
        wait_running=True,
    )
    pid = runner.process("once")["pid"]
    os.kill(pid, signal.SIGKILL)  # it ends by itself, as far as the daemon knows
    runner.wait_state("once", "EXITED")
    # An exit nobody asked for is recorded by the writer thread a moment after the state
    # change (no caller waits for it): the daemon is killed once the record is on disk.
    wait_for(lambda: (record_dir(runner) / "once.json").exists(), timeout=10,
             message="the exit recorded")
    runner.kill9()
    runner.start()
    wait_booted(runner)
    assert runner.process("once")["state"] == "EXITED"
    assert instances(runner, "once") == 0
    runner.post("/api/v1/processes/once/start").check()
    assert runner.process("once")["state"] == "RUNNING"


def test_reload_leaves_a_program_stopped_on_request_stopped(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/ob_logtailer/stop").check()
    runner.kill9()
    runner.start()
    wait_booted(runner)
    text = runner.config.read_text()
    # Changed (the environment is part of its fingerprint) and unchanged programs alike.
    runner.config.write_text(text.replace("[programs.ob_logtailer]", (
        "[programs.ob_logtailer]\ncwd = \"/\""
    ), 1))
    runner.post("/api/v1/agent/reload").check()
    assert runner.process("ob_logtailer")["state"] == "STOPPED"
    runner.post("/api/v1/agent/reload").check()
    assert runner.process("ob_logtailer")["state"] == "STOPPED"
    assert instances(runner, "ob_logtailer") == 0


def test_records_are_not_followed_through_links(tmp_path) -> None:
    """A link where a record goes is replaced, never written through."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    records = IntentRecords(tmp_path / "intent")
    (tmp_path / "intent").mkdir()
    (tmp_path / "intent" / "p.json").symlink_to(victim)
    assert records.load("p") is None  # a link is not read either
    records.save("p", "STOPPED")
    assert victim.read_text() == "keep"
    loaded = records.load("p")
    assert loaded is not None and loaded.state == "STOPPED" and loaded.boot_id == boot_id()
    records.remove("p")
    assert records.load("p") is None
