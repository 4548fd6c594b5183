"""GET /metrics: Prometheus exposition from a registry of this app's own.

The text format (0.0.4) by default, OpenMetrics 1.0 when the scraper's ``Accept`` asks
for ``application/openmetrics-text`` (prometheus-client's ``choose_encoder``, as its
own exporters do). Names follow the Prometheus naming conventions and are checked with
``promtool check metrics`` in the tests.

Program metrics are read from the supervisor at scrape time (nothing to keep in sync):

- ``ocp_agentd_program_up{program}``: 1 when RUNNING
- ``ocp_agentd_program_state{program,state}``: 1 for the program's current state, else 0
- ``ocp_agentd_program_restarts_total{program}``
- ``ocp_agentd_program_start_time_seconds{program}``: when the program's current process
  started, seconds since the epoch; 0 when it has none (as node_exporter's
  ``node_systemd_unit_start_time_seconds``): ``time() - start_time`` is the uptime
- ``ocp_agentd_program_liveness_failures_total{program}``: failed liveness probes (SPEC
  section 10), for the programs that have a liveness probe
- ``ocp_agentd_program_cpu_seconds_total{program}``, ``ocp_agentd_program_memory_bytes
  {program}``: from the program's cgroup, else its main process (SPEC section 9); absent
  while unknown
- ``ocp_agentd_program_oom_kills_total{program}``: OOM kills in its cgroup

API metrics come from the app's middleware (:meth:`AgentMetrics.observe_request`), with
the label names of Prometheus' own HTTP metrics: ``handler`` (the route template),
``method``, ``code``: ``ocp_agentd_api_requests_total{handler,method,code}`` and
``ocp_agentd_api_request_duration_seconds{handler,method}``.

The daemon's own process: ``process_*`` (CPU seconds, resident memory, open fds, start
time) from prometheus-client's ProcessCollector.

Hooks for the rest of the daemon (all cheap, synchronous, safe to call from the loop):

- the task engine: ``metrics.task_finished(name, status)`` ->
  ``ocp_agentd_tasks_total{name,status}``
- the daemon: ``metrics.observe_loop_lag(seconds)`` -> the histogram
  ``ocp_agentd_event_loop_lag_seconds``: every scraper sees every measurement (a
  "largest since the last scrape" gauge would split them between two scrapers).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ocp_agentd import __version__
from ocp_agentd.api.routes import Route
from ocp_agentd.supervision import State

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Up to the default WatchdogSec (30 s): a lag that long gets the daemon killed.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The media type of the text format 0.0.4 (prometheus_client.CONTENT_TYPE_LATEST without
# its parameters), named here so that the route table needs no prometheus-client.
_TEXT_FORMAT = "text/plain"


class _Buckets:
    """One histogram series: how many observations fell in each bucket (an observation
    counts in the first bucket whose upper bound is >= it, the last slot being +Inf, as
    prometheus-client's Histogram counts), and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, bounds: tuple[float, ...], amount: float) -> None:
        self.counts[bisect_left(bounds, amount)] += 1
        self.sum += amount

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        """The ``le`` buckets as the exposition has them: (bound as Go prints it, count
        of observations <= bound), the last one "+Inf"."""
        from prometheus_client.utils import floatToGoString  # first scrape; see render()

        total = 0
        buckets = []
        for bound, count in zip((*bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append((floatToGoString(bound), total))
        return buckets


class _Families:
    """A collector yielding what ``families()`` makes at each scrape."""

    def __init__(self, families: Callable[[], Iterator[Metric]]) -> None:
        self.collect = families


class _SupervisorCollector:
    """Reads the supervisor on every scrape."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        # A scrape: prometheus-client is loaded by then (see AgentMetrics).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        start_time = GaugeMetricFamily(
            "ocp_agentd_program_start_time_seconds",
            "When the program's current process started, seconds since the epoch; "
            "0 when it has none",
            labels=["program"],
        )
        liveness = CounterMetricFamily(
            "ocp_agentd_program_liveness_failures",
            "Failed liveness probes of the program since the daemon started it",
            labels=["program"],
        )
        cpu = CounterMetricFamily(
            "ocp_agentd_program_cpu_seconds", "CPU time used by the program's processes",
            labels=["program"],
        )
        memory = GaugeMetricFamily(
            "ocp_agentd_program_memory_bytes", "Memory in use by the program's processes",
            labels=["program"],
        )
        oom = CounterMetricFamily(
            "ocp_agentd_program_oom_kills", "Processes of the program ended by the OOM killer",
            labels=["program"],
        )
        for info in supervisor.infos():
            if info.liveness is not None:
                liveness.add_metric([info.name], info.liveness["failures_total"])
            if info.cpu_seconds is not None:
                cpu.add_metric([info.name], info.cpu_seconds)
            if info.memory_bytes is not None:
                memory.add_metric([info.name], info.memory_bytes)
            oom.add_metric([info.name], info.oom_kills)
            current = State(info.state)
            up.add_metric([info.name], 1 if current == State.RUNNING else 0)
            for candidate in State:
                state.add_metric([info.name, candidate.value], 1 if candidate == current else 0)
            restarts.add_metric([info.name], info.restarts)
            start_time.add_metric([info.name], info.started_at or 0.0)
        yield up
        yield state
        yield restarts
        yield start_time
        yield liveness
        yield cpu
        yield memory
        yield oom


class AgentMetrics:
    """The daemon's metrics: one CollectorRegistry per instance (never the global one).

    The API, task and loop-lag series are counted here, in plain dicts, and handed to
    prometheus-client's registry as metric families at each scrape; prometheus-client
    itself (about 1 MiB of the daemon's memory and 7 ms of its start) is loaded by the
    first :meth:`render`, so a daemon nobody scrapes never loads it. Every hook is called
    on the event loop's thread, as render() is: the counts need no lock.
    """

    def __init__(self) -> None:
        self.started_at = time.time()
        self.supervisor_source: Callable[[], Any] | None = None
        # (handler, method, code) -> count; (handler, method) -> latency buckets
        self._requests: dict[tuple[str, str, str], int] = {}
        self._latency: dict[tuple[str, str], _Buckets] = {}
        self._loop_lag = _Buckets(_LAG_BUCKETS)
        self._tasks: dict[tuple[str, str], int] = {}  # (name, status) -> count
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The registry scrapes read, made (with prometheus-client) on first use."""
        if self._registry is None:
            self._registry = self._make_registry()
        return self._registry

    def _make_registry(self) -> CollectorRegistry:
        # Imported on the first scrape, not with the daemon: see the class docstring.
        from prometheus_client import CollectorRegistry, ProcessCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self._api_families))
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        ProcessCollector(registry=registry)
        registry.register(_Families(self._task_families))
        registry.register(_SupervisorCollector(self))
        return registry

    def _api_families(self) -> Iterator[Metric]:
        from prometheus_client.core import (  # first scrape; see the class docstring
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "ocp_agentd_api_requests", "Control API requests answered",
            labels=["handler", "method", "code"],
        )
        for labels, count in list(self._requests.items()):
            requests.add_metric(labels, count)
        yield requests
        latency = HistogramMetricFamily(
            "ocp_agentd_api_request_duration_seconds", "Control API request handling time",
            labels=["handler", "method"],
        )
        for labels, buckets in list(self._latency.items()):
            latency.add_metric(labels, buckets.cumulative(_LATENCY_BUCKETS), buckets.sum)
        yield latency
        lag = HistogramMetricFamily(
            "ocp_agentd_event_loop_lag_seconds",
            "How late the event loop ran a timed wake-up (measured while busy)",
            labels=[],
        )
        lag.add_metric([], self._loop_lag.cumulative(_LAG_BUCKETS), self._loop_lag.sum)
        yield lag

    def _task_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily  # first scrape, as above

        tasks = CounterMetricFamily(
            "ocp_agentd_tasks", "Agent tasks finished, by template name and final status",
            labels=["name", "status"],
        )
        for labels, count in list(self._tasks.items()):
            tasks.add_metric(labels, count)
        yield tasks

    def bind_supervisor(self, source: Callable[[], Any]) -> None:
        """``source()`` returns the current Supervisor (or None) at scrape time."""
        self.supervisor_source = source

    def observe_request(self, handler: str, method: str, code: int, seconds: float) -> None:
        """One answered request: its route template (or "unmatched"), method, HTTP
        status code and handling time in seconds."""
        key = (handler, method, str(code))
        self._requests[key] = self._requests.get(key, 0) + 1
        buckets = self._latency.get((handler, method))
        if buckets is None:
            buckets = self._latency[(handler, method)] = _Buckets(_LATENCY_BUCKETS)
        buckets.observe(_LATENCY_BUCKETS, seconds)

    def task_finished(self, name: str, status: str) -> None:
        """Hook for the task engine: one task reached a final status."""
        self._tasks[(name, status)] = self._tasks.get((name, status), 0) + 1

    def observe_loop_lag(self, seconds: float) -> None:
        """Hook for the daemon: one event loop lag measurement, in seconds."""
        self._loop_lag.observe(_LAG_BUCKETS, max(0.0, seconds))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, Content-Type) in the format `accept` (an HTTP Accept header) asks for:
        OpenMetrics 1.0 or, by default, the Prometheus text format 0.0.4."""
        from prometheus_client.exposition import choose_encoder  # first scrape, as above

        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# The app's AgentMetrics (set by app.create_app); keyed here so this module needs no context.
METRICS: web.AppKey[AgentMetrics] = web.AppKey("ocp_agentd_metrics")


async def get_metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render(request.headers.get("Accept"))
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def routes() -> list[Route]:
    return [
        Route(
            "GET", "/metrics", get_metrics, permission="HOST_VIEWER",
            summary="Prometheus metrics",
            description="Prometheus text exposition format (OpenMetrics when the Accept "
            "header asks for application/openmetrics-text): per-program up, state, restarts, "
            "start time and liveness probe failures; API requests and latency; task outcomes; "
            "event loop lag; the daemon's process_* metrics.",
            raw=True, content_type=_TEXT_FORMAT, tags=("metrics",),
        )
    ]
