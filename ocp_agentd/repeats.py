"""Says a standing problem once, not on every pass of a loop that keeps meeting it.

Housekeeping runs every 15 s; a condition it cannot fix (a FIFO a program's user put in
place of its log, a program whose user does not exist) would otherwise log the same
warning four times a minute forever. :class:`Once` logs a problem when it first appears,
when its message changes, and again after ``REPEAT_SECONDS`` if it is still there (so an
operator reading only the last hour of the log still sees it), and says when it is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

from ocp_agentd.logsafe import escape

# A problem still standing is said again after this long (seconds).
REPEAT_SECONDS = 3600.0


class Once:
    """Per-key memory of the last problem logged to ``log``.

    ``problem(key, message)`` logs ``message`` at WARNING unless the same message was
    logged for ``key`` less than ``repeat`` seconds ago; ``solved(key, message)`` logs
    ``message`` at INFO when ``key`` had a problem, and forgets it. Keys are any hashable
    (e.g. a log file's path). Not thread-safe: one caller at a time.
    """

    def __init__(self, log: logging.Logger, repeat: float = REPEAT_SECONDS) -> None:
        self._log = log
        self._repeat = repeat
        self._said: dict[Hashable, tuple[str, float]] = {}

    def problem(self, key: Hashable, message: str) -> bool:
        """Logs ``message`` when it is new or due again for ``key``; True when it did."""
        now = time.monotonic()
        said = self._said.get(key)
        if said is not None and said[0] == message and now - said[1] < self._repeat:
            return False
        self._said[key] = (message, now)
        self._log.warning("%s", escape(message))
        return True

    def solved(self, key: Hashable, message: str) -> bool:
        """Logs ``message`` when ``key`` had a problem logged; True when it did."""
        if self._said.pop(key, None) is None:
            return False
        self._log.info("%s", escape(message))
        return True

    def forget_all_but(self, keys: set[Hashable]) -> None:
        """Drops the memory of keys no longer watched (a program removed by reload)."""
        for key in [k for k in self._said if k not in keys]:
            del self._said[key]
