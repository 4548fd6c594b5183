"""A subtask past its timeout (set in [tasks] timeouts) ends FAILED with that reason."""

from __future__ import annotations

import signal
import time
from typing import Any

from harness import demo_command, wait_for, write_demo_config

TASKS = "/api/v2/tasks/instances"


def test_start_all_past_its_configured_timeout_fails_with_the_reason(daemon_factory: Any) -> None:
    timeouts = {"tasks": {"timeouts": {"StartAllOcpAgentProcessesTask": 2}}}
    daemon = daemon_factory(wait_running=True, overrides=timeouts)
    port = daemon.base_port + 1
    # ocp_exporter now never listens, and its own start_timeout is far past the subtask's.
    never_ready = demo_command("misbehave", "never-ready", port)
    write_demo_config(
        daemon.config.parent,
        daemon.base_port,
        2,
        overrides={
            **timeouts,
            "programs": {"ocp_exporter": {"command": never_ready, "start_timeout": 120.0}},
        },
    )
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_state("ocp_exporter", "STARTING")
    started = time.monotonic()
    task_id = daemon.post("/compute/hosts/2/agent/restart").check()["id"]

    def ended() -> dict[str, Any] | None:
        task = daemon.get(f"{TASKS}/{task_id}").check()
        return task if task["status"] != "RUNNING" else None

    task = wait_for(ended, 30, "the task to end")
    took = time.monotonic() - started
    assert task["status"] == "FAILED"
    by_name = {s["name"]: s for s in task["subtasks"]}
    # The stop did not wait for the start in progress: Stop all succeeded at once.
    assert by_name["Stop all OCP agent processes"]["status"] == "SUCCESSFUL"
    start_all = by_name["Start all OCP agent processes"]
    assert start_all["status"] == "FAILED" and start_all["timeout"] == 2
    log = daemon.get(f"{TASKS}/{task_id}/subtasks/{start_all['id']}/log").check()["log"]
    assert "timed out" in log or "timeout" in log, log
    assert by_name["Finish OCP agent operation"]["status"] == "PENDING"
    assert took < 15, took
