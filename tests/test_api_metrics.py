"""GET /metrics: Prometheus text from the daemon's own registry, read at scrape time."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from harness import ApiClient, DaemonRunner, free_port, wait_for
from prometheus_client.openmetrics.parser import text_fd_to_metric_families
from prometheus_client.parser import text_string_to_metric_families

from ocp_agentd.api.metrics import AgentMetrics

VIEWER = "metrics-viewer-token"
TASKS_ONLY = "metrics-task-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, metric: str, /, **labels: str) -> float | None:
    return samples(text).get((metric, tuple(sorted(labels.items()))))


def scrape(runner: DaemonRunner) -> str:
    response = runner.get("/metrics")
    assert response.status == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.headers["X-OCP-Trace-ID"]
    return response.text


def test_program_metrics_follow_the_supervisor(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    text = scrape(runner)
    for program in ("pos_proxy", "ocp_exporter", "ob_logtailer"):
        assert value(text, "ocp_agentd_program_up", program=program) == 1.0
        assert value(text, "ocp_agentd_program_state", program=program, state="RUNNING") == 1.0
        assert value(text, "ocp_agentd_program_state", program=program, state="FATAL") == 0.0
        assert value(text, "ocp_agentd_program_restarts_total", program=program) == 0.0
        started = value(text, "ocp_agentd_program_start_time_seconds", program=program)
        assert time.time() - 120 < started < time.time()
    # Exactly one state is 1 per program.
    states = [v for (name, labels), v in samples(text).items()
              if name == "ocp_agentd_program_state" and ("program", "pos_proxy") in labels]
    assert sorted(states) == [0.0] * 6 + [1.0]
    assert value(text, "ocp_agentd_build_info", version="0.1.0") == 1.0

    # A crash and its restart show up at the next scrape.
    pid = runner.process("ocp_exporter")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runner.process("ocp_exporter")["restarts"] == 1
             and runner.process("ocp_exporter")["state"] == "RUNNING", 20, "the restart")
    text = scrape(runner)
    assert value(text, "ocp_agentd_program_restarts_total", program="ocp_exporter") == 1.0
    runner.post("/api/v1/processes/ob_logtailer/stop").check()
    text = scrape(runner)
    assert value(text, "ocp_agentd_program_up", program="ob_logtailer") == 0.0
    assert value(text, "ocp_agentd_program_state", program="ob_logtailer", state="STOPPED") == 1.0
    assert value(text, "ocp_agentd_program_start_time_seconds", program="ob_logtailer") == 0.0
    # The API's own requests, by route template (handler), method and status code.
    assert value(text, "ocp_agentd_api_requests_total", handler="/api/v1/processes/{name}/stop",
                 method="POST", code="200") == 1.0
    assert value(text, "ocp_agentd_api_requests_total", handler="/metrics", method="GET",
                 code="200") == 2.0
    runner.get("/api/v1/processes/nobody")
    runner.get("/no/such/route")
    text = scrape(runner)
    assert value(text, "ocp_agentd_api_requests_total", handler="/api/v1/processes/{name}",
                 method="GET", code="404") == 1.0
    assert value(text, "ocp_agentd_api_requests_total", handler="unmatched", method="GET",
                 code="404") == 1.0
    assert value(text, "ocp_agentd_api_request_duration_seconds_count", handler="/metrics",
                 method="GET") == 3.0
    # The daemon's own process, from prometheus-client's process collector.
    daemon = psutil.Process(runner.pid)
    assert value(text, "process_start_time_seconds") == pytest.approx(daemon.create_time(),
                                                                      abs=1.0)
    assert value(text, "process_open_fds") > 5
    assert value(text, "process_resident_memory_bytes") > 10 * 1024 * 1024
    promtool_check(text)


def promtool_check(text: str) -> None:
    """`promtool check metrics` (Prometheus 2.42, from Debian's package: scripts/bootstrap.sh
    puts it in the venv) finds nothing to say about `text`."""
    tool = Path(sys.prefix) / "bin" / "promtool"
    if not tool.exists():
        pytest.fail(f"{tool} is missing: run make venv (as root, it unpacks Debian's promtool)")
    result = subprocess.run([str(tool), "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result


def test_openmetrics_when_the_scraper_asks(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    response = runner.get("/metrics", headers={"Accept": accept})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in text_fd_to_metric_families(io.StringIO(response.text))}
    assert families["ocp_agentd_program_restarts"].type == "counter"
    assert families["ocp_agentd_event_loop_lag_seconds"].type == "histogram"
    # Without the header: the Prometheus text format.
    assert not scrape(runner).rstrip().endswith("# EOF")


def test_metrics_over_tcp_need_host_viewer(daemon_factory) -> None:
    port = free_port()
    daemon_factory(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": [
        {"name": "viewer", "permissions": ["HOST_VIEWER"],
         "sha256": hashlib.sha256(VIEWER.encode()).hexdigest()},
        {"name": "tasks", "permissions": ["TASK_VIEWER"],
         "sha256": hashlib.sha256(TASKS_ONLY.encode()).hexdigest()},
    ]}})
    response = ApiClient(host="127.0.0.1", port=port).get("/metrics")
    assert response.status == 401 and response.code == 1004
    response = ApiClient(host="127.0.0.1", port=port, token=TASKS_ONLY).get("/metrics")
    assert response.status == 403 and response.code == 1005
    response = ApiClient(host="127.0.0.1", port=port, token=VIEWER).get("/metrics")
    assert response.status == 200 and "ocp_agentd_program_up" in response.text


def test_hooks_for_tasks_and_loop_lag() -> None:
    metrics = AgentMetrics()
    other = AgentMetrics()  # registries are per instance: no clash, no sharing
    metrics.task_finished("Restart OCP agent", "SUCCESSFUL")
    metrics.task_finished("Restart OCP agent", "SUCCESSFUL")
    metrics.task_finished("Stop OCP agent", "FAILED")
    metrics.observe_loop_lag(0.25)
    metrics.observe_loop_lag(0.05)
    text = metrics.render()[0].decode()
    assert value(text, "ocp_agentd_tasks_total", name="Restart OCP agent",
                 status="SUCCESSFUL") == 2.0
    assert value(text, "ocp_agentd_tasks_total", name="Stop OCP agent", status="FAILED") == 1.0
    # Every measurement is in the histogram, and a scrape takes none away (two scrapers
    # see the same).
    for rendered in (text, metrics.render()[0].decode()):
        assert value(rendered, "ocp_agentd_event_loop_lag_seconds_count") == 2.0
        assert value(rendered, "ocp_agentd_event_loop_lag_seconds_sum") == pytest.approx(0.3)
        assert value(rendered, "ocp_agentd_event_loop_lag_seconds_bucket", le="0.1") == 1.0
        assert value(rendered, "ocp_agentd_event_loop_lag_seconds_bucket", le="0.25") == 2.0
    assert "ocp_agentd_tasks_total{" not in other.render()[0].decode()
    # Without a supervisor bound, the daemon-level series still render.
    assert "ocp_agentd_program_up" not in text
    promtool_check(text)
