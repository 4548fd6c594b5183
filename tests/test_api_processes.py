"""SPEC section 6 over a real daemon: records, start/stop/restart/verify, all-at-once,
failures (2004), and serialized operations."""

from __future__ import annotations

import socket
import threading
import time

import psutil
import pytest
from harness import DaemonRunner, demo_command, free_port, wait_for
from pydantic import TypeAdapter

from ocp_agentd.demo.config import to_toml
from ocp_agentd.supervision import ProcessInfo

RECORD_KEYS = {"name", "role", "operable", "state", "pid", "create_time", "uptime", "restarts",
               "last_exit", "ports", "command"}


def program_processes(runner: DaemonRunner, name: str) -> list[psutil.Process]:
    """Live processes of this daemon's tree that belong to program `name`."""
    found = []
    for proc in runner.leftovers():
        try:
            if proc.environ().get("OCP_AGENTD_PROGRAM") == name:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_status_and_records(demo_daemon: DaemonRunner) -> None:
    status = demo_daemon.status()
    assert {"version", "pid", "uptime", "host_id", "state", "counts"} <= set(status)
    assert status["state"] == "running" and status["counts"]["RUNNING"] == 3
    records = demo_daemon.processes()
    assert [r["name"] for r in records] == ["pos_proxy", "ocp_exporter", "ob_logtailer"]
    for record in records:
        assert set(record) >= RECORD_KEYS
        assert record["state"] == "RUNNING" and psutil.pid_exists(record["pid"])
    proxy = records[0]
    assert proxy["role"] == "pos_proxy" and proxy["operable"] is False
    assert proxy["ports"] == [demo_daemon.base_port]
    assert records[1]["operable"] is True
    one = demo_daemon.process("ocp_exporter")
    # uptime and the cgroup usage (sampled in the background) move between the two calls.
    moving = {"uptime": None, "cpu_seconds": None, "memory_bytes": None}
    assert {**one, **moving} == {**records[1], **moving}


def test_records_answer_is_the_model_and_follows_changes_at_once(
    demo_daemon: DaemonRunner,
) -> None:
    records = TypeAdapter(list[ProcessInfo])
    # What may move between two requests: the clock's fields, and the liveness probes'
    # outcomes (they run on their own period).
    moving = {"uptime": None, "cpu_seconds": None, "memory_bytes": None, "liveness": None}

    def answer() -> dict[str, dict]:
        got = demo_daemon.processes()
        # Every field of the model, of its type, and nothing else.
        assert records.dump_python(records.validate_python(got), mode="json") == got
        # Each record is the one-program answer (Program.info()) but for what moves.
        for record in got:
            assert {**demo_daemon.process(record["name"]), **moving} == {**record, **moving}
        return {record["name"]: record for record in got}

    first = answer()["ocp_exporter"]["uptime"]
    wait_for(lambda: answer()["ocp_exporter"]["uptime"] > first, 10, "uptime moving")

    demo_daemon.post("/api/v1/processes/ocp_exporter/stop").check()
    stopped = answer()["ocp_exporter"]
    assert (stopped["state"], stopped["pid"], stopped["uptime"]) == ("STOPPED", None, None)
    started = demo_daemon.post("/api/v1/processes/ocp_exporter/start").check()
    assert answer()["ocp_exporter"]["pid"] == started["pid"]

    config = demo_daemon.config
    config.write_text(config.read_text() + "\n" + to_toml({"programs": {"extra": {
        "command": demo_command("misbehave", "tree", "0")}}}))
    assert demo_daemon.post("/api/v1/agent/reload").check()["added"] == ["extra"]
    assert list(answer()) == ["pos_proxy", "ocp_exporter", "ob_logtailer", "extra"]


def test_stop_start_restart_one(demo_daemon: DaemonRunner) -> None:
    port = demo_daemon.base_port + 1
    before = demo_daemon.process("ocp_exporter")
    stopped = demo_daemon.post("/api/v1/processes/ocp_exporter/stop", json={"timeout": 20})
    assert stopped.status == 200, stopped.text
    assert stopped.data["state"] == "STOPPED" and stopped.data["pid"] is None
    assert not psutil.pid_exists(before["pid"])
    assert not program_processes(demo_daemon, "ocp_exporter")
    started = demo_daemon.post("/api/v1/processes/ocp_exporter/start").check()
    assert started["state"] == "RUNNING" and started["pid"] != before["pid"]
    assert listening(port)  # RUNNING only once the port listens
    restarted = demo_daemon.post("/api/v1/processes/ocp_exporter/restart").check()
    assert restarted["state"] == "RUNNING" and restarted["pid"] != started["pid"]
    assert [p.pid for p in program_processes(demo_daemon, "ocp_exporter")] == [restarted["pid"]]
    # pos_proxy only with force.
    proxy = demo_daemon.process("pos_proxy")
    forced = demo_daemon.post("/api/v1/processes/pos_proxy/restart", json={"force": True}).check()
    assert forced["state"] == "RUNNING" and forced["pid"] != proxy["pid"]


def test_verify(demo_daemon: DaemonRunner) -> None:
    result = demo_daemon.post("/api/v1/processes/ocp_exporter/verify").check()
    assert result["ok"] is True and all(c["ok"] for c in result["checks"])
    assert {"name", "ok", "detail"} <= set(result["checks"][0])
    everything = demo_daemon.post("/api/v1/agent/verify").check()
    assert everything["ok"] is True
    assert [p["name"] for p in everything["programs"]] == [
        "pos_proxy", "ocp_exporter", "ob_logtailer"
    ]
    demo_daemon.post("/api/v1/processes/ob_logtailer/stop").check()
    result = demo_daemon.post("/api/v1/processes/ob_logtailer/verify").check()
    assert result["ok"] is False
    everything = demo_daemon.post("/api/v1/agent/verify").check()
    assert everything["ok"] is False
    failed = [p["name"] for p in everything["programs"] if not p["ok"]]
    assert failed == ["ob_logtailer"]


def test_stop_all_and_start_all(demo_daemon: DaemonRunner) -> None:
    proxy = demo_daemon.process("pos_proxy")
    stopped = demo_daemon.post("/api/v1/agent/stop-all", json={"timeout": 30}).check()
    assert stopped["ok"] is True
    assert sorted(p["name"] for p in stopped["processes"]) == ["ob_logtailer", "ocp_exporter"]
    assert all(p["state"] == "STOPPED" for p in stopped["processes"])
    assert not program_processes(demo_daemon, "ocp_exporter")
    assert not program_processes(demo_daemon, "ob_logtailer")
    # Workers only: pos_proxy is untouched.
    assert demo_daemon.process("pos_proxy")["pid"] == proxy["pid"]
    started = demo_daemon.post("/api/v1/agent/start-all").check()
    assert all(p["state"] == "RUNNING" for p in started["processes"])
    assert len(started["processes"]) == 2


def test_concurrent_starts_give_one_process(demo_daemon: DaemonRunner) -> None:
    demo_daemon.post("/api/v1/processes/ob_logtailer/stop").check()
    assert not program_processes(demo_daemon, "ob_logtailer")
    barrier = threading.Barrier(3)
    answers: list = [None, None, None]

    def start(index: int) -> None:
        barrier.wait()
        answers[index] = demo_daemon.post("/api/v1/processes/ob_logtailer/start")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(a is not None and a.status == 200 for a in answers), [a and a.text for a in answers]
    pids = {a.data["pid"] for a in answers}
    assert len(pids) == 1
    assert [p.pid for p in program_processes(demo_daemon, "ob_logtailer")] == list(pids)
    assert demo_daemon.process("ob_logtailer")["restarts"] == 0


@pytest.fixture
def troubled_daemon(daemon_factory) -> DaemonRunner:
    """The demo plus `failer` (exits at once) and `slowpoke` (never listens on its port).

    Neither can ever become RUNNING, however slow the machine: each must listen on a port
    it never opens (a start_seconds window alone would let a slow-starting failer pass)."""
    return daemon_factory(
        extra_programs={
            "failer": {"command": demo_command("misbehave", "exit-now", 3),
                       "ports": [free_port()], "autorestart": "never", "start_seconds": 0},
            "slowpoke": {"command": demo_command("misbehave", "never-ready"),
                         "ports": [free_port()], "start_timeout": 4, "autorestart": "never"},
        },
    )


def test_2004_operation_failed(troubled_daemon: DaemonRunner) -> None:
    runner = troubled_daemon
    runner.wait_state("ocp_exporter", "RUNNING", timeout=20)
    response = runner.post("/api/v1/processes/failer/start", json={"timeout": 20})
    assert response.status == 409 and response.code == 2004, response.text
    error = response.error
    assert error["target"] == "failer" and "failer" in error["message"]
    assert "Traceback" not in response.text
    # A start that does not finish within the caller's timeout fails the same way.
    runner.post("/api/v1/processes/slowpoke/stop", json={"timeout": 20}).check()
    began = time.monotonic()
    response = runner.post("/api/v1/processes/slowpoke/start", json={"timeout": 1})
    assert response.code == 2004 and response.error["target"] == "slowpoke", response.text
    assert time.monotonic() - began < 10
    # stop-all then start-all: the failures are named, one subError each.
    runner.post("/api/v1/agent/stop-all", json={"timeout": 30}).check()
    response = runner.post("/api/v1/agent/start-all", json={"timeout": 3})
    assert response.status == 409 and response.code == 2004, response.text
    subs = {sub["target"]: sub for sub in response.error["subErrors"]}
    assert set(subs) == {"failer", "slowpoke"}
    assert all(sub["code"] == 2004 for sub in subs.values())
    assert "failer" in response.error["message"] and "slowpoke" in response.error["message"]
    # The others did start.
    assert runner.process("ocp_exporter")["state"] == "RUNNING"
    assert runner.process("ob_logtailer")["state"] == "RUNNING"
