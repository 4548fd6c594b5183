"""handlers_off_the_loop: the handlers run in the listener's thread, every record in order."""

from __future__ import annotations

import logging
import threading

from ocp_agentd.logqueue import handlers_off_the_loop


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self.threads: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.threads.add(threading.current_thread().name)
        self.lines.append(self.format(record))


def test_records_reach_the_handlers_from_another_thread_in_order() -> None:
    logger = logging.getLogger("test_logqueue")
    logger.propagate = False
    collect = Collect()
    collect.setFormatter(logging.Formatter("%(levelname)s %(message)s %(PROGRAM)s"))
    logger.addHandler(collect)
    listener = handlers_off_the_loop(logger)
    try:
        assert collect not in logger.handlers
        for i in range(500):
            logger.warning("p%d: %s -> %s", i, "STARTING", "RUNNING", extra={"PROGRAM": f"p{i}"})
    finally:
        listener.stop()  # drains the queue
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
    assert collect.lines == [f"WARNING p{i}: STARTING -> RUNNING p{i}" for i in range(500)]
    assert threading.current_thread().name not in collect.threads

