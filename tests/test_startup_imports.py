"""What loading the daemon does, and what it leaves for later (the start-up of #16).

Loading ``ocp_agentd.daemon`` is most of the daemon's start-up (bench/ measures it); these
tests keep out of it what start-up does not need: building the validators of the OCP
shapes and request bodies (built on first use), finding the source of model classes for
attribute docstrings, systemd-python outside systemd, and prometheus-client until the first
scrape; and what it loads is frozen out of later garbage collections. Each check runs in
a fresh interpreter, as the daemon does; none of them is timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

# Runs in a fresh interpreter; prints one JSON object.
_PROBE = textwrap.dedent(
    """
    import json, sys
    from pydantic._internal import _docs_extraction, _fields

    looked_up = []
    _original = _fields.extract_docstrings_from_cls

    def _recording(cls, *args, **kwargs):
        looked_up.append(f"{cls.__module__}.{cls.__qualname__}")
        return _original(cls, *args, **kwargs)

    _fields.extract_docstrings_from_cls = _recording

    import ocp_agentd.__main__  # what ocp-agentd and python -m ocp_agentd load
    from pydantic import BaseModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # A generic model's own class (Page, not Page[TaskInstance]) is built when it is
    # parametrized, whatever defer_build says: a fraction of a millisecond.
    own = [c for c in subclasses(BaseModel) if c.__module__.startswith("ocp_agentd.")
           and not c.__pydantic_generic_metadata__["parameters"]]
    # What start-up and the requests before the first scrape do with the metrics.
    from ocp_agentd.api.metrics import AgentMetrics, routes as metrics_routes
    metrics = AgentMetrics()
    metrics_routes()
    metrics.observe_request("/api/v1/status", "GET", 200, 0.001)
    metrics.observe_loop_lag(0.01)
    metrics.task_finished("Restart OCP agent", "SUCCESSFUL")
    prometheus_before_scrape = sorted(m for m in sys.modules if m.startswith("prometheus_client"))
    import gc
    from ocp_agentd.daemon import Daemon
    from ocp_agentd.config import Settings
    collected_over = gc.get_objects()  # the objects collections still go over
    loaded_still_collected = [name for name, obj in (("Daemon", Daemon), ("Settings", Settings))
                              if any(o is obj for o in collected_over)]
    print(json.dumps({
        "built": sorted(f"{c.__module__}.{c.__qualname__}" for c in own
                        if c.__pydantic_complete__),
        "docstrings_looked_up": looked_up,
        "systemd_modules": sorted(m for m in sys.modules
                                  if m == "systemd" or m.startswith("systemd.")),
        "prometheus_before_scrape": prometheus_before_scrape,
        "frozen": gc.get_freeze_count(),
        "loaded_still_collected": loaded_still_collected,
    }))
    """
)


def _load_daemon() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID")}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    return json.loads(done.stdout)


def test_loading_the_daemon_builds_only_the_configuration_models() -> None:
    """The OCP shapes (wire.OcpModel) and request bodies (RequestModel) are
    ``defer_build``: their validators are built by their first use, not at import."""
    loaded = _load_daemon()
    assert loaded["built"], "no model of the daemon was found: the probe is broken"
    assert all(name.startswith("ocp_agentd.config.") for name in loaded["built"]), (
        loaded["built"]
    )


def test_loading_the_daemon_reads_no_model_source_for_docstrings() -> None:
    """use_attribute_docstrings on a BaseModel makes pydantic find and parse the class's
    source at import (~30 ms of start-up); BaseModel descriptions are Field(description=)."""
    assert _load_daemon()["docstrings_looked_up"] == []


def test_outside_systemd_the_daemon_does_not_load_systemd_python() -> None:
    assert _load_daemon()["systemd_modules"] == []


def test_prometheus_client_waits_for_the_first_scrape() -> None:
    """prometheus-client (~1 MiB resident, ~7 ms to import) is loaded by the first
    /metrics scrape; until then the hooks count without it (test_api_metrics checks
    what a scrape then shows)."""
    assert _load_daemon()["prometheus_before_scrape"] == []


def test_what_the_daemon_loads_is_frozen_out_of_later_collections() -> None:
    """__main__ freezes the objects its imports made (gc.freeze): collections after that
    do not go over the daemon's classes, functions and modules again."""
    loaded = _load_daemon()
    assert loaded["frozen"] > 10_000, loaded["frozen"]
    assert loaded["loaded_still_collected"] == []
