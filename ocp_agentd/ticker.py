"""The daemon's periodic work from the event loop: loop-lag probes, watchdog pings and
housekeeping (log rotation).

Idle, the ticker wakes only for what is due: the watchdog ping (half of WatchdogSec, see
sd_watchdog_enabled(3)) and housekeeping, which is due HOUSEKEEPING_SECONDS after start,
then after each round that asks for another and HOUSEKEEPING_SECONDS after
want_housekeeping() (a watched log file changed): with nothing changing, the daemon sleeps.
While there is work (a request being answered) and for BUSY_SECONDS after the last
activity (a request's start or end, a program's state change) it also wakes every
PROBE_SECONDS: how late each timer wake-up comes is the event loop's lag, so a stall that
could make the watchdog miss its ping shows in ocp_agentd_event_loop_lag_seconds. The loop
can only stall while it runs work, and each piece of work begins or ends with activity.
Activity wakes an idle ticker, and how late that wake-up comes (from the activity to the
ticker running) is lag too: a stall that begins with the work that woke the ticker, before
its first await, shows there; one that begins later delays the probe due meanwhile. A
stream's work ends once its headers are out (api.context.work_ended): a follower that stays
connected brings no probes (its own polls remain: an event stream looks for a client gone
every streams.GONE_CHECK_SECONDS, a log follower reads every logtail.POLL_SECONDS).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from ocp_agentd.systemd import Notifier

log = logging.getLogger("ocp_agentd")

HOUSEKEEPING_SECONDS = 15.0
PROBE_SECONDS = 1.0
BUSY_SECONDS = PROBE_SECONDS


class Ticker:
    """Runs until cancelled. housekeep() is awaited when due (see the module docstring;
    its errors are logged, and a round that raised is followed by another) and answers
    whether another round is due in HOUSEKEEPING_SECONDS whatever happens;
    observe_lag(seconds) gets each wake-up's lateness (a timer's, or an activity's). It is
    the API's RequestWatch (api.context): request_started()/request_ended() bracket each
    request's work."""

    def __init__(
        self,
        notifier: Notifier,
        housekeep: Callable[[], Awaitable[bool]],
        observe_lag: Callable[[float], None],
    ) -> None:
        self._notifier = notifier
        self._housekeep = housekeep
        self._observe_lag = observe_lag
        self._last_activity = time.monotonic()
        self._requests = 0  # requests whose work is not over
        self._wake = asyncio.Event()  # set by activity; ends the long idle sleep
        self._woken_at = 0.0  # time.monotonic() when _wake was last set
        self._next_housekeeping = math.inf  # event loop time; set when run() starts

    def want_housekeeping(self) -> None:
        """A round is due HOUSEKEEPING_SECONDS from now, unless one is due sooner (call on
        the event loop: a watched log file changed, a reload named new files)."""
        if self._next_housekeeping == math.inf:
            self._next_housekeeping = (asyncio.get_running_loop().time()
                                       + HOUSEKEEPING_SECONDS)
            self._set_wake()  # the idle sleep is recomputed with the new due time

    def note_activity(self) -> None:
        """Something happened: probe the loop closely for the next BUSY_SECONDS."""
        self._last_activity = time.monotonic()
        self._set_wake()

    def _set_wake(self) -> None:
        if not self._wake.is_set():
            self._woken_at = time.monotonic()
            self._wake.set()

    def request_started(self) -> None:
        """A request's work begins: probe the loop closely until it is over."""
        self._requests += 1
        self.note_activity()

    def request_ended(self) -> None:
        """A request's work is over (call once per request_started)."""
        self._requests = max(0, self._requests - 1)
        self._last_activity = time.monotonic()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        watchdog = self._notifier.watchdog_interval()
        now = loop.time()
        next_ping = now if watchdog else math.inf
        self._next_housekeeping = now + HOUSEKEEPING_SECONDS
        while True:
            now = loop.time()
            due = min(next_ping, self._next_housekeeping)
            busy = self._requests > 0 or (
                time.monotonic() - self._last_activity < BUSY_SECONDS)
            if busy:
                due = min(due, now + PROBE_SECONDS)
                await asyncio.sleep(due - now)
                woken = False
            else:
                self._wake.clear()
                try:
                    async with asyncio.timeout_at(due):
                        await self._wake.wait()
                    woken = True
                except TimeoutError:
                    woken = False
            now = loop.time()
            if woken:  # from the activity that woke it to now: the loop's lag too
                self._observe_lag(max(0.0, time.monotonic() - self._woken_at))
            else:  # a timer wake-up: its lateness is the loop's lag
                self._observe_lag(max(0.0, now - due))
            if watchdog and now >= next_ping:
                self._notifier.ping()
                next_ping = now + watchdog
            if now >= self._next_housekeeping:
                # A change during the round schedules the next one (want_housekeeping).
                self._next_housekeeping = math.inf
                try:
                    again = await self._housekeep()
                except Exception:
                    log.exception("housekeeping failed")
                    again = True
                if again:
                    self._next_housekeeping = min(self._next_housekeeping,
                                                  loop.time() + HOUSEKEEPING_SECONDS)
