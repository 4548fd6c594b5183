"""The daemon's periodic work from the event loop: loop-lag probes, watchdog pings and
housekeeping (log rotation).

Idle, the ticker wakes only for what is due: the watchdog ping (half of WatchdogSec, see
sd_watchdog_enabled(3)) and housekeeping. For BUSY_SECONDS after activity (a request or a
state change) it also wakes every PROBE_SECONDS: how late each timer wake-up comes is the
event loop's lag, so a stall that could make the watchdog miss its ping shows in
ocp_agentd_event_loop_lag_seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ocp_agentd.systemd import Notifier

log = logging.getLogger("ocp_agentd")

HOUSEKEEPING_SECONDS = 15.0
PROBE_SECONDS = 1.0
BUSY_SECONDS = 5.0


class Ticker:
    """Runs until cancelled. housekeep() is awaited every HOUSEKEEPING_SECONDS (its errors
    are logged); observe_lag(seconds) gets each timer wake-up's lateness."""

    def __init__(
        self,
        notifier: Notifier,
        housekeep: Callable[[], Awaitable[None]],
        observe_lag: Callable[[float], None],
    ) -> None:
        self._notifier = notifier
        self._housekeep = housekeep
        self._observe_lag = observe_lag
        self._last_activity = time.monotonic()
        self._wake = asyncio.Event()  # set by activity; ends the long idle sleep

    def note_activity(self) -> None:
        """Something happened: probe the loop closely for the next BUSY_SECONDS."""
        self._last_activity = time.monotonic()
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        watchdog = self._notifier.watchdog_interval()
        now = loop.time()
        next_ping = now if watchdog else float("inf")
        next_housekeeping = now + HOUSEKEEPING_SECONDS
        while True:
            now = loop.time()
            due = min(next_ping, next_housekeeping)
            busy = time.monotonic() - self._last_activity < BUSY_SECONDS
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
            if not woken:  # a timer wake-up: its lateness is the loop's lag
                self._observe_lag(max(0.0, now - due))
            if watchdog and now >= next_ping:
                self._notifier.ping()
                next_ping = now + watchdog
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                try:
                    await self._housekeep()
                except Exception:
                    log.exception("housekeeping failed")
