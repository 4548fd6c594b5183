"""The seed's task, ocp-agentd only: POST /compute/hosts/{id}/agent/restart on the demo
programs. Measures the POST's answer time and the whole task until it ends, and, in
turn with each task, the same steps called directly over the local API (restart
pos_proxy, stop all, start all, verify): the programs' own readiness, so the task's
overhead beyond it is the difference of the two medians.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.clients import JsonUnixClient
from bench.procs import Reaper, wait_for
from bench.targets import Agentd

HOST_ID = 2
TASK_TIMEOUT = 120.0


@dataclass
class SeedResult:
    post_seconds: list[float]
    task_seconds: list[float]
    direct_seconds: list[float]
    programs: int


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on 127.0.0.1 (the demo uses two)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


class DemoDaemon(Agentd):
    """ocp-agentd on the demo configuration written by ocp_agentd.demo.config."""

    def __init__(self, workdir: Path, reaper: Reaper, python: str) -> None:
        super().__init__(workdir, 0, reaper, python, host_id=HOST_ID)

    def write_config(self) -> None:
        subprocess.run(
            [self.python, "-m", "ocp_agentd.demo.config", str(self.workdir),
             "--base-port", str(_free_port_pair()), "--host-id", str(HOST_ID)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        self.config = self.workdir / "demo.toml"
        self.socket = self.workdir / "run" / "agentd.sock"
        self.api = JsonUnixClient(str(self.socket))

    def start(self) -> float:
        took = super().start()
        self.names = sorted(self.states())
        self.n = len(self.names)
        self.wait_all_running()
        return took

    def wait_all_running(self) -> None:
        wait_for(self.reported_running, TASK_TIMEOUT, "the demo programs RUNNING", 0.02)

    def run_task(self) -> tuple[float, float]:
        """(POST answer time, whole task time) of one restart task, in seconds."""
        begin = time.perf_counter()
        task = self.api.request("POST", f"/compute/hosts/{HOST_ID}/agent/restart", {})
        answered = time.perf_counter() - begin
        path = f"/api/v2/tasks/instances/{task['id']}"

        def ended() -> dict | None:
            current = self.api.request("GET", path)
            return current if current["status"] != "RUNNING" else None

        done = wait_for(ended, TASK_TIMEOUT, f"task {task['id']} to end", 0.005)
        took = time.perf_counter() - begin
        if done["status"] != "SUCCESSFUL":
            failed = [s["name"] for s in done.get("subtasks", []) if s["status"] == "FAILED"]
            raise RuntimeError(f"restart task {task['id']} ended {done['status']}: {failed}")
        return answered, took

    def run_direct(self) -> float:
        """The task's process steps, called one after the other over the local API."""
        begin = time.perf_counter()
        self.api.request("POST", "/api/v1/processes/pos_proxy/restart", {"force": True})
        self.stop_all()
        self.start_all()
        self.api.request("POST", "/api/v1/agent/verify", {})
        return time.perf_counter() - begin


def seed_task(workdir: Path, reaper: Reaper, reps: int, python: str) -> SeedResult:
    """``reps`` restart tasks and as many direct runs of their steps, alternated."""
    daemon = DemoDaemon(workdir, reaper, python)
    result = SeedResult([], [], [], 0)
    try:
        daemon.start()
        result.programs = daemon.n
        for i in range(reps):
            order = ("task", "direct") if i % 2 == 0 else ("direct", "task")
            for step in order:
                daemon.wait_all_running()
                if step == "task":
                    answered, took = daemon.run_task()
                    result.post_seconds.append(answered)
                    result.task_seconds.append(took)
                else:
                    result.direct_seconds.append(daemon.run_direct())
    finally:
        daemon.stop()
    return result
