"""GET /metrics: Prometheus text format, from a registry of this app's own.

Program metrics are read from the supervisor at scrape time (nothing to keep in sync):

- ``ocp_agentd_program_up{program}``: 1 when RUNNING
- ``ocp_agentd_program_state{program,state}``: 1 for the program's current state, else 0
- ``ocp_agentd_program_restarts_total{program}``
- ``ocp_agentd_program_uptime_seconds{program}``: 0 when not running

API metrics come from the app's middleware (:meth:`AgentMetrics.observe_request`):
``ocp_agentd_api_requests_total{route,method,status}`` and
``ocp_agentd_api_request_duration_seconds{route,method}``.

Hooks for the rest of the daemon (all cheap, synchronous, safe to call from the loop):

- the task engine: ``metrics.task_finished(name, status)`` ->
  ``ocp_agentd_tasks_total{name,status}``
- the daemon: ``metrics.observe_loop_lag(seconds)`` -> ``ocp_agentd_event_loop_lag_seconds``,
  the largest lag reported since the previous scrape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from ocp_agentd import __version__
from ocp_agentd.api.routes import Route
from ocp_agentd.supervision import State

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SupervisorCollector:
    """Reads the supervisor on every scrape."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        build = GaugeMetricFamily(
            "ocp_agentd_build_info", "The running ocp-agentd version", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        started = GaugeMetricFamily(
            "ocp_agentd_start_time_seconds", "When the daemon started, seconds since the epoch"
        )
        started.add_metric([], metrics.started_at)
        yield started
        lag = GaugeMetricFamily(
            "ocp_agentd_event_loop_lag_seconds",
            "Largest event loop lag reported since the previous scrape",
        )
        lag.add_metric([], metrics.take_loop_lag())
        yield lag

        supervisor = metrics.supervisor_source() if metrics.supervisor_source else None
        if supervisor is None:
            return
        up = GaugeMetricFamily("ocp_agentd_program_up", "1 when the program is RUNNING",
                               labels=["program"])
        state = GaugeMetricFamily(
            "ocp_agentd_program_state", "1 for the program's current state",
            labels=["program", "state"],
        )
        restarts = CounterMetricFamily(
            "ocp_agentd_program_restarts", "Restarts of the program since the daemon started it",
            labels=["program"],
        )
        uptime = GaugeMetricFamily(
            "ocp_agentd_program_uptime_seconds", "Seconds the program has been running",
            labels=["program"],
        )
        for info in supervisor.infos():
            current = State(info.state)
            up.add_metric([info.name], 1 if current == State.RUNNING else 0)
            for candidate in State:
                state.add_metric([info.name, candidate.value], 1 if candidate == current else 0)
            restarts.add_metric([info.name], info.restarts)
            uptime.add_metric([info.name], info.uptime or 0.0)
        yield up
        yield state
        yield restarts
        yield uptime


class AgentMetrics:
    """The daemon's metrics: one CollectorRegistry per instance (never the global one)."""

    def __init__(self) -> None:
        # The *_created series only double the output; nothing here reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.started_at = time.time()
        self.supervisor_source: Callable[[], Any] | None = None
        self._loop_lag = 0.0
        self.requests = Counter(
            "ocp_agentd_api_requests", "Control API requests answered",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "ocp_agentd_api_request_duration_seconds", "Control API request handling time",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tasks = Counter(
            "ocp_agentd_tasks", "Agent tasks finished, by template name and final status",
            ["name", "status"], registry=self.registry,
        )
        self.registry.register(_SupervisorCollector(self))

    def bind_supervisor(self, source: Callable[[], Any]) -> None:
        """``source()`` returns the current Supervisor (or None) at scrape time."""
        self.supervisor_source = source

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def task_finished(self, name: str, status: str) -> None:
        """Hook for the task engine: one task reached a final status."""
        self.tasks.labels(name, status).inc()

    def observe_loop_lag(self, seconds: float) -> None:
        """Hook for the daemon: an event loop lag measurement (kept: the max until scraped)."""
        if seconds > self._loop_lag:
            self._loop_lag = seconds

    def take_loop_lag(self) -> float:
        lag, self._loop_lag = self._loop_lag, 0.0
        return lag

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The app's AgentMetrics (set by app.create_app); keyed here so this module needs no context.
METRICS: web.AppKey[AgentMetrics] = web.AppKey("ocp_agentd_metrics")


async def get_metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def routes() -> list[Route]:
    return [
        Route(
            "GET", "/metrics", get_metrics, permission="HOST_VIEWER",
            summary="Prometheus metrics",
            description="Prometheus text exposition format: per-program up, state, restarts "
            "and uptime; API requests and latency; task outcomes; event loop lag.",
            raw=True, content_type=CONTENT_TYPE_LATEST.split(";")[0], tags=("metrics",),
        )
    ]
