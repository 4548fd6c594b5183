"""The daemon's log handlers in a thread of their own: the event loop only queues records.

Each state change of each program is logged; with the handlers on the loop, their locks,
writes and flushes (a file and stderr or the journal) were a tenth of the loop's time when
restarting 200 programs. The stdlib's QueueHandler/QueueListener pair moves them to one
thread, in order; the listener is stopped, and so drained, at interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import queue
from logging.handlers import QueueHandler, QueueListener


class _Listener(QueueListener):
    """A QueueListener whose stop() may be called again (by atexit after an explicit stop)."""

    def stop(self) -> None:
        if self._thread is not None:
            super().stop()


def handlers_off_the_loop(logger: logging.Logger) -> QueueListener:
    """Replaces logger's handlers by a QueueHandler whose listener thread runs them.

    Returns the started listener (stopped by atexit; stop() drains the queue first).
    """
    handlers = list(logger.handlers)
    for handler in handlers:
        logger.removeHandler(handler)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = _Listener(records, *handlers, respect_handler_level=True)
    logger.addHandler(QueueHandler(records))
    listener.start()
    atexit.register(listener.stop)
    return listener
