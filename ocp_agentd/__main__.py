"""The daemon's entry point: ``ocp-agentd`` and ``python -m ocp_agentd``.

The daemon's modules make some 56,000 objects as they load, nearly all of them living as
long as the process. With the collector's default threshold (a collection of the
youngest generation every 700 new objects) it ran about 80 times over them while they
were made, and a full collection on top: some 30 ms of a start-up of about 290 ms of
CPU. It collects every 20,000 new objects until they are loaded (no full collection, and
the few cycles the imports leave are still collected: a paused collector cost 0.8 MiB of
resident memory, this about 0.1), then the thresholds are back to what they were.

Once loaded, those objects are frozen (``gc.freeze()``, moved to the collector's
permanent generation): the next collections of the older generations would otherwise go
over all of them again, to find nothing (the first one, before the daemon's first answer,
took 12-15 ms of CPU), and so would every full collection the daemon makes afterwards. A
frozen object is still freed when its last reference goes; only a reference cycle among
them would outlive its use, and the daemon drops none of what it has loaded.
"""

import gc

_THRESHOLDS = gc.get_threshold()
gc.set_threshold(20_000, *_THRESHOLDS[1:])

from ocp_agentd.daemon import main as run_daemon  # noqa: E402 - after set_threshold, on purpose

gc.freeze()
gc.set_threshold(*_THRESHOLDS)


def main() -> int:
    """Runs the daemon (daemon.main); answers its exit status."""
    return run_daemon()


if __name__ == "__main__":
    raise SystemExit(main())
