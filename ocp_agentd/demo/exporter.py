"""Stand-in metrics exporter (a worker with a port): serves /metrics and /health.

    python -m ocp_agentd.demo.exporter --port 62889 [--host 127.0.0.1]

/metrics answers a few Prometheus lines (the host load is real, the rest is made up).
Exits with status 0 on SIGTERM. SIGUSR1 wedges it: it keeps its pid and its port but
answers nothing (a second SIGUSR1 ends the wedge), which only a liveness probe notices.
"""

from __future__ import annotations

import argparse
import os
import signal

from ocp_agentd.demo._serve import health_route, log, run_http, text_reply

NAME = "ocp_exporter"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=62889)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    scrapes = [0]

    def metrics():
        scrapes[0] += 1
        load1 = os.getloadavg()[0]
        return text_reply(
            "# HELP ocp_exporter_up Whether the exporter runs.\n"
            "# TYPE ocp_exporter_up gauge\n"
            "ocp_exporter_up 1\n"
            "# HELP ocp_exporter_scrapes_total Scrapes served since start.\n"
            "# TYPE ocp_exporter_scrapes_total counter\n"
            f"ocp_exporter_scrapes_total {scrapes[0]}\n"
            "# HELP ob_host_load1 One-minute load average of the host.\n"
            "# TYPE ob_host_load1 gauge\n"
            f"ob_host_load1 {load1:.2f}\n"
            "# HELP ob_server_active_sessions Active sessions of the observer (made up).\n"
            "# TYPE ob_server_active_sessions gauge\n"
            'ob_server_active_sessions{tenant="sys"} 3\n'
        )

    log(NAME, f"starting (port {args.port})")
    routes = {"/metrics": metrics, "/health": health_route()}
    return run_http(NAME, args.host, args.port, routes, wedge_signal=signal.SIGUSR1)


if __name__ == "__main__":
    raise SystemExit(main())
