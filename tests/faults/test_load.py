"""Load: 200 concurrent clients on the status and process routes for 20 s while restart
tasks run one after another. Every answer must be an envelope, none a 5xx, and the event
loop lag the daemon measures itself (ocp_agentd_event_loop_lag_seconds) must stay < 1 s.

    FAULTS_LOAD_CLIENTS=<n>  FAULTS_LOAD_SECONDS=<s>   (defaults 200 and 20)
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import time
from collections import Counter
from typing import Any

import aiohttp
import psutil
import pytest
from faultlib import envelope_problem, host_id
from harness import DaemonRunner, wait_for

pytestmark = pytest.mark.faults

CLIENTS = int(os.environ.get("FAULTS_LOAD_CLIENTS", "200"))
SECONDS = float(os.environ.get("FAULTS_LOAD_SECONDS", "20"))
LAG_LIMIT = 1.0
_LAG_BUCKET = re.compile(
    r'^ocp_agentd_event_loop_lag_seconds_bucket\{le="([^"]+)"\}\s+([0-9.eE+-]+)\s*$', re.M)


def lag_buckets(runner: DaemonRunner) -> dict[float, float]:
    """The daemon's loop lag histogram: {upper bound in seconds: cumulative count}."""
    response = runner.get("/metrics")
    assert response.status == 200, response.text
    found = {float(le): float(count) for le, count in _LAG_BUCKET.findall(response.text)}
    assert found, "ocp_agentd_event_loop_lag_seconds is missing from /metrics"
    return found


def lags_over(before: dict[float, float], after: dict[float, float], seconds: float) -> float:
    """How many lag measurements between two scrapes were longer than `seconds` (a bucket
    bound): the growth of the +Inf bucket less the growth of the `seconds` bucket."""
    inf = float("inf")
    return (after[inf] - before[inf]) - (after[seconds] - before[seconds])


def test_loop_lag_metric_sees_a_stall(daemon_factory):
    """The lag histogram is wired and real: a daemon frozen for 2.5 s records a lag of
    more than 1 s and less than 5 s (busy, the daemon measures once a second, so a stall
    shows minus at most that second)."""
    runner = daemon_factory(wait_running=True)
    before = lag_buckets(runner)
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)  # the length of the stall being made, not a wait on a condition
    finally:
        os.kill(runner.pid, signal.SIGCONT)
    after = wait_for(lambda: (b := lag_buckets(runner)) and lags_over(before, b, LAG_LIMIT) >= 1
                     and b, 5, "the stall in the metric")
    assert lags_over(before, after, 5.0) == 0


class Load:
    def __init__(self, runner: DaemonRunner, session: aiohttp.ClientSession) -> None:
        self.runner = runner
        self.session = session
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []
        self.tasks: Counter[str] = Counter()
        self.task_seconds: list[float] = []
        self.host = host_id(runner)
        self.paths = [
            "/api/v1/status",
            "/api/v1/processes",
            "/api/v1/processes/ocp_exporter",
            "/api/v1/processes/pos_proxy",
            f"/compute/hosts/{self.host}/agent/processes?page=1&size=10",
            f"/compute/hosts/{self.host}/agent",
        ]

    async def call(self, method: str, path: str) -> tuple[int, Any]:
        async with self.session.request(method, f"http://agent{path}") as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return response.status, body

    async def client(self, index: int, deadline: float) -> None:
        turn = index
        while time.monotonic() < deadline:
            path = self.paths[turn % len(self.paths)]
            turn += 1
            started = time.monotonic()
            try:
                status, body = await self.call("GET", path)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.problems.append(f"GET {path}: {type(exc).__name__}: {exc}")
                continue
            self.latencies.append(time.monotonic() - started)
            self.statuses[status] += 1
            problem = envelope_problem(status, body)
            if problem:
                self.problems.append(f"GET {path}: {problem}")

    async def restart_tasks(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            status, body = await self.call("POST", f"/compute/hosts/{self.host}/agent/restart")
            problem = envelope_problem(status, body)
            if problem:
                self.problems.append(f"restart task: {problem}")
                return
            if not body["successful"]:
                self.tasks[f"refused {body['error']['code']}"] += 1
                await asyncio.sleep(0.5)
                continue
            task_id = body["data"]["id"]
            while True:
                status, body = await self.call("GET", f"/api/v2/tasks/instances/{task_id}")
                if problem := envelope_problem(status, body):
                    self.problems.append(f"task {task_id}: {problem}")
                    return
                if body["data"]["status"] in ("SUCCESSFUL", "FAILED"):
                    break
                await asyncio.sleep(0.2)
            self.tasks[body["data"]["status"]] += 1
            self.task_seconds.append(time.monotonic() - started)

    async def run(self, clients: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            self.restart_tasks(deadline),
            *(self.client(i, deadline) for i in range(clients)),
        )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_load_200_clients_during_restart_tasks(daemon_factory, figures):
    runner = daemon_factory(wait_running=True)
    lags_before = lag_buckets(runner)  # only the load phase counts
    daemon = psutil.Process(runner.pid)
    rss_before = daemon.memory_info().rss

    async def drive() -> Load:
        connector = aiohttp.UnixConnector(path=str(runner.socket), limit=CLIENTS + 5)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            load = Load(runner, session)
            await load.run(CLIENTS, SECONDS)
            return load

    started = time.monotonic()
    load = asyncio.run(drive())
    elapsed = time.monotonic() - started
    long_lags = lags_over(lags_before, lag_buckets(runner), LAG_LIMIT)
    rss_after = daemon.memory_info().rss
    runner.wait_all_running(timeout=60)

    served = len(load.latencies)
    five_xx = sum(n for status, n in load.statuses.items() if status >= 500)
    figures.update({
        "clients": CLIENTS,
        "seconds": round(elapsed, 1),
        "requests answered": served,
        "requests/s": round(served / elapsed),
        "latency p50 (ms)": round(statistics.median(load.latencies) * 1000, 1),
        "latency p99 (ms)": round(_percentile(load.latencies, 0.99) * 1000, 1),
        "latency max (ms)": round(max(load.latencies) * 1000, 1),
        "HTTP statuses": dict(load.statuses),
        "5xx": five_xx,
        "non-envelope or failed answers": len(load.problems),
        "restart tasks": dict(load.tasks),
        "restart task p50 (s)": round(statistics.median(load.task_seconds), 2)
        if load.task_seconds else None,
        "event loop lags over 1 s in the daemon": long_lags,
        "daemon RSS before -> after (MiB)":
            f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f}",
    })
    assert served > 0
    assert not load.problems, load.problems[:20]
    assert five_xx == 0
    assert sum(load.tasks.values()) > 0 and load.tasks["FAILED"] == 0, dict(load.tasks)
    assert long_lags == 0, f"{long_lags} event loop lags over {LAG_LIMIT} s"
