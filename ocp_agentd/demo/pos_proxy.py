"""Stand-in pos_proxy: listens on TCP and answers GET /health with {"status": "ok", "pid": ...}.

    python -m ocp_agentd.demo.pos_proxy --port 62888 [--host 127.0.0.1]

Logs every request to stdout; exits with status 0 on SIGTERM.
"""

from __future__ import annotations

import argparse

from ocp_agentd.demo._serve import health_route, log, run_http

NAME = "pos_proxy"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=62888)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    health = health_route()
    log(NAME, f"starting (port {args.port})")
    return run_http(NAME, args.host, args.port, {"/health": health, "/": health})


if __name__ == "__main__":
    raise SystemExit(main())
