"""Liveness probing of one RUNNING program (SPEC section 10).

One timer per program at most: the first probe runs initial_delay after start(), each
next one a period after the previous one began (or as soon as it ended, when it took
longer). Nothing runs between probes, and a program without liveness never creates a
Liveness timer at all. After failure_threshold failed probes in a row, the program is told
once (on_failed) and probing stops until the next start(); what to do about it (the
restart through the state machine) is the program's business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ocp_agentd.config import LivenessSpec
from ocp_agentd.supervision.probes import Probe
from ocp_agentd.supervision.types import LivenessStatus, ProbeResult

log = logging.getLogger("ocp_agentd.liveness")


class Liveness:
    """Probes one program while it runs; counts failures; reports the threshold once.

    on_result(result) is called after every probe (e.g. to refresh a cached status record);
    on_failed(detail, was_healthy) once failure_threshold probes failed in a row: detail is
    the last probe's, was_healthy whether any probe succeeded since start(). Both are called
    on the event loop and must not block.
    """

    def __init__(
        self,
        name: str,
        on_result: Callable[[ProbeResult], None],
        on_failed: Callable[[str, bool], None],
    ) -> None:
        self.name = name
        self.last: ProbeResult | None = None
        self.consecutive_failures = 0
        self.failures_total = 0  # every failed probe since the daemon made the program
        self.healthy = False  # a probe succeeded since start()
        self._on_result = on_result
        self._on_failed = on_failed
        self._spec: LivenessSpec | None = None
        self._probe: Probe | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """True from start() until stop() or the failure threshold."""
        return self._spec is not None

    def start(self, spec: LivenessSpec, probe: Probe) -> None:
        """Begins probing (the program just became RUNNING): first probe after initial_delay."""
        self.stop()
        self._spec = spec
        self._probe = probe
        self.consecutive_failures = 0
        self.healthy = False
        self._timer = asyncio.get_running_loop().call_later(spec.initial_delay, self._fire)

    def stop(self) -> None:
        """Ends probing at once: the timer is cancelled, a probe in flight is cancelled (an
        exec probe's process group is killed) and its result is never counted."""
        self._spec = None
        self._probe = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def as_dict(self) -> LivenessStatus:
        """{"last_probe": ProbeResult.as_dict() or None, "consecutive_failures",
        "failures_total"} for the status record."""
        return {
            "last_probe": self.last.as_dict() if self.last else None,
            "consecutive_failures": self.consecutive_failures,
            "failures_total": self.failures_total,
        }

    def _fire(self) -> None:
        self._timer = None
        if self._probe is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._probe), name=f"liveness {self.name}"
            )

    async def _run(self, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            result = await probe()
        except Exception as exc:  # a probe that breaks is a failed probe, not a dead loop
            log.exception("%s: liveness probe raised", self.name)
            result = ProbeResult(False, f"probe error: {exc!r}", time.time(), 0.0)
        spec = self._spec
        if spec is None or self._task is not asyncio.current_task():
            return  # stopped (or restarted) while the probe ran: the result is stale
        self._task = None
        self.last = result
        if result.ok:
            self.consecutive_failures = 0
            self.healthy = True
        else:
            self.consecutive_failures += 1
            self.failures_total += 1
            log.warning(
                "%s: liveness probe failed (%d of %d): %s",
                self.name,
                self.consecutive_failures,
                spec.failure_threshold,
                result.detail,
                extra={"PROGRAM": self.name},
            )
        try:
            self._on_result(result)
        except Exception:  # a listener must never stop the probing
            log.exception("%s: liveness result listener failed", self.name)
        if self.consecutive_failures >= spec.failure_threshold:
            healthy = self.healthy
            self.stop()
            self._on_failed(result.detail, healthy)
            return
        self._timer = loop.call_at(max(began + spec.period, loop.time()), self._fire)


__all__ = ["Liveness"]
