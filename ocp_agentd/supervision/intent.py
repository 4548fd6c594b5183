"""Operator intent: the state a caller wants a program in, and the rule every queued
operation re-checks (SPEC section 12, last paragraph).

Every operation takes a ticket when it is requested: a caller's start, stop or restart,
the daemon's start at boot, a reload's start or restart, an automatic restart after an
exit. A stop is recorded the moment it is requested (before it waits for anything), with
a ticket of its own. When a start reaches the front of the program's queue it goes ahead
only if no stop was requested after its ticket and the caller's desired state is still
RUNNING; otherwise it ends as "cancelled by a stop" (409/2004 to a caller). So a stop
once answered is never undone by a start queued before it or by a reload in flight, and a
start that comes after the stop is served.
"""

from __future__ import annotations

import itertools
from enum import StrEnum

CANCELLED_BY_STOP = "cancelled by a stop"

# One clock for every program: a reload's ticket, taken before it reads the file, compares
# with the stops of programs that did not exist yet.
_clock = itertools.count(1)


def ticket() -> int:
    """A new ticket: later than every ticket and stop before it."""
    return next(_clock)


class Desired(StrEnum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class Intent:
    """One program's desired state and the ticket of the last stop requested for it."""

    def __init__(self) -> None:
        self.desired = Desired.RUNNING  # a configured program is wanted up until stopped
        self.stopped_at = 0

    def stop_requested(self) -> int:
        """Records a stop (call it before waiting for anything); returns its ticket."""
        self.desired = Desired.STOPPED
        self.stopped_at = ticket()
        return self.stopped_at

    def start_requested(self) -> int:
        """Records a caller's start or restart; returns its ticket."""
        self.desired = Desired.RUNNING
        return ticket()

    def overridden(self, since: int) -> bool:
        """True if an operation requested at ticket `since` must not start the program:
        a stop came after it, or the desired state is STOPPED."""
        return self.stopped_at > since or self.desired == Desired.STOPPED
