"""Operator intent wins (issue #10, kind 3; SPEC section 12, last paragraph).

The API serves operations from the moment it listens; a stop is served at once whatever
is queued on the program; a stop once answered is not undone by a start queued before it
or by a reload in flight; a start that a stop overrides answers 409/2004 "cancelled by a
stop".
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any

from harness import DaemonRunner, Response, WaitTimeout, demo_command, free_port, wait_for

from ocp_agentd.demo.config import write_demo_config

DEBUG = {"OCP_AGENTD_LOG_LEVEL": "DEBUG"}
QUICK_STOP = 20.0  # far below every readiness wait below (120 s): a stop never waits one


def never_ready(port: int, **fields: Any) -> dict[str, Any]:
    """A program that runs but never listens on its port: its start waits for good."""
    return {"command": demo_command("misbehave", "never-ready", port), "ports": [port],
            "start_timeout": 120, "start_seconds": 0.1, "autorestart": "never", **fields}


def post_in_thread(runner: DaemonRunner, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Sends the request from a thread; the result dict gets "response" when it answers."""
    result: dict[str, Any] = {}

    def send() -> None:
        result["response"] = runner.post(path, json=body, timeout=150)

    thread = threading.Thread(target=send, daemon=True)
    result["thread"] = thread
    thread.start()
    return result


def answer(result: dict[str, Any], timeout: float = 150) -> Response:
    result["thread"].join(timeout)
    assert "response" in result, "no answer"
    return result["response"]


def requested(runner: DaemonRunner, name: str, verb: str, count: int) -> None:
    """Waits until the daemon has taken `count` `verb` requests for `name` (its DEBUG log
    says so as each one is queued). A daemon that does not say so gets ten seconds."""
    line = f"{name}: {verb} requested"
    with contextlib.suppress(WaitTimeout):
        wait_for(lambda: runner.log().count(line) >= count, timeout=10, message=line)


def serving(runner: DaemonRunner) -> DaemonRunner:
    """Starts the daemon and waits until its API answers (boot starts may still wait)."""
    runner.start(wait=False)
    wait_for(lambda: runner.get("/api/v1/status", timeout=5).status == 200, timeout=30,
             message="the API answering")
    return runner


def assert_stays_stopped(runner: DaemonRunner, name: str) -> None:
    record = runner.process(name)
    assert record["state"] == "STOPPED" and record["pid"] is None, record


def test_the_api_serves_operations_while_boot_starts_wait(daemon_factory) -> None:
    port = free_port()
    runner = serving(daemon_factory({"slowstart": never_ready(port)}, start=False))
    runner.wait_state("slowstart", "STARTING", timeout=30)

    began = time.monotonic()
    response = runner.post("/api/v1/processes/ocp_exporter/restart", json={"timeout": 30},
                           timeout=60)
    assert response.status == 200, response.text
    response = runner.post("/api/v1/processes/slowstart/stop", json={"timeout": 30}, timeout=60)
    assert response.status == 200, response.text
    assert response.data["state"] == "STOPPED"
    assert time.monotonic() - began < 2 * QUICK_STOP
    wait_for(lambda: runner.status()["state"] == "running", timeout=30, message="running")
    assert_stays_stopped(runner, "slowstart")


def test_a_stop_cancels_the_start_in_progress_and_the_queued_ones(daemon_factory) -> None:
    port = free_port()
    runner = serving(daemon_factory({"slow": never_ready(port)}, env=DEBUG, start=False))
    runner.post("/api/v1/processes/slow/stop", json={"timeout": 30}).check()

    first = post_in_thread(runner, "/api/v1/processes/slow/start", {"timeout": 140})
    runner.wait_state("slow", "STARTING", timeout=30)
    second = post_in_thread(runner, "/api/v1/processes/slow/start", {"timeout": 140})
    requested(runner, "slow", "start", 2)

    began = time.monotonic()
    response = runner.post("/api/v1/processes/slow/stop", json={"timeout": 30}, timeout=60)
    assert response.status == 200 and response.data["state"] == "STOPPED", response.text
    assert time.monotonic() - began < QUICK_STOP
    for overridden in (answer(first), answer(second)):
        assert overridden.status == 409 and overridden.code == 2004, overridden.text
        assert "cancelled by a stop" in overridden.error["message"], overridden.text
    assert_stays_stopped(runner, "slow")


def test_a_reload_in_flight_does_not_undo_an_answered_stop(daemon_factory) -> None:
    stubborn = {"command": demo_command("misbehave", "ignore-term"), "stop_timeout": 4}
    runner = daemon_factory({"stubborn": stubborn}, env=DEBUG, wait_running=True)
    assert runner.base_port is not None

    stopping = post_in_thread(runner, "/api/v1/processes/stubborn/stop", {"timeout": 30})
    runner.wait_state("stubborn", "STOPPING", timeout=10)
    # The reload changes the program (its environment), so it would restart it.
    changed = {**stubborn, "env": {"EDITED": "1"}}
    write_demo_config(runner.config.parent, runner.base_port, 2, {"stubborn": changed})
    runner.send_signal(signal.SIGHUP)
    response = answer(stopping)
    assert response.status == 200 and response.data["state"] == "STOPPED", response.text

    wait_for(lambda: "reloaded" in runner.log(), timeout=30, message="the reload finished")
    wait_for(lambda: runner.status()["state"] == "running", timeout=30, message="running")
    assert_stays_stopped(runner, "stubborn")


def test_a_start_after_the_stop_still_starts(daemon_factory) -> None:
    """Intent is the latest request's: the rule cancels only what was asked before."""
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/ob_logtailer/stop", json={"timeout": 30}).check()
    response = runner.post("/api/v1/processes/ob_logtailer/start", json={"timeout": 30})
    assert response.status == 200 and response.data["state"] == "RUNNING", response.text
