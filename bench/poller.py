"""A client that asks supervisord its state every PERIOD seconds until SIGTERM.

    python -m bench.poller SOCKET PERIOD

What a monitoring agent or a dashboard does to a supervisord; each request wakes the
loop of supervisord, which then also reaps and restarts programs.
"""

from __future__ import annotations

import signal
import sys
import time

from bench.clients import xmlrpc_proxy


def main(argv: list[str]) -> int:
    socket, period = argv[0], float(argv[1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    rpc = xmlrpc_proxy(socket, 60.0)
    while True:
        begin = time.monotonic()
        rpc.supervisor.getState()
        time.sleep(max(0.0, period - (time.monotonic() - begin)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
