"""Stand-in log tailer (a worker without a port): prints one line every --interval seconds.

    python -m ocp_agentd.demo.logtailer [--interval 5]

Sleeps between lines, so it costs no CPU when idle. Exits with status 0 on SIGTERM; SIGHUP
is logged and ignored.
"""

from __future__ import annotations

import argparse
import signal
import time

from ocp_agentd.demo._serve import log

NAME = "ob_logtailer"


def _stop(signum, frame):
    log(NAME, f"stopped on signal {signal.Signals(signum).name}")
    raise SystemExit(0)


def _reopen(signum, frame):
    log(NAME, "SIGHUP: re-opened observer.log")  # as real tailers do: HUP is not a stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=5.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reopen)
    log(NAME, f"starting (a line every {args.interval}s)")
    tailed = 0
    while True:
        tailed += 1
        log(NAME, f"tailed observer.log: batch {tailed}, 0 new errors")
        time.sleep(args.interval)


if __name__ == "__main__":
    raise SystemExit(main())
