"""The daemon's event hub: what happened, published once, read by every subscriber.

Supervision (state changes), liveness (probe failures), reload and the task engine publish
here; ``GET /api/v1/events`` (SPEC section 12) streams it as server-sent events. The hub
imports nothing of the daemon, so any part may publish without importing the API.

Each event is a flat dict, one line of JSON on the wire::

    {"id": 42, "time": "2026-11-30T05:10:37.913+00:00", "kind": "state",
     "program": "ocp_exporter", "from": "RUNNING", "to": "BACKOFF",
     "reason": "killed by SIGKILL; restarting"}

Kinds and their fields (besides ``id``, ``time``, ``kind``, ``reason``):

- ``state``: ``program``, ``from``, ``to`` (the states of SPEC section 3);
- ``probe``: ``program``, ``probe`` (which check failed, e.g. ``tcp_connect 62889``),
  ``from`` and ``to`` empty; call :meth:`EventHub.probe_failed`;
- ``reload``: ``added``, ``removed``, ``changed``, ``unchanged`` (program names), or
  ``error`` with the reason when the file was refused; ``from`` and ``to`` empty;
- ``task``: ``task`` (id), ``name``, ``from``, ``to`` (task statuses, SPEC section 5);
- ``subtask``: ``task``, ``subtask`` (ids), ``name``, ``from``, ``to``.

Every event carries an ``id`` (1, 2, ... for the daemon's life). The last ``KEEP`` events
are kept, so a reader can start with the recent past (``subscribe(last=N)``) or resume
after the last id it saw (``subscribe(after=ID)``: the SSE ``Last-Event-ID``) without a gap.

Publishing never blocks and never fails the publisher: a subscriber that falls
``QUEUE_LIMIT`` events behind (besides its replay of kept events) is dropped, its stream
ending with a ``lost`` event saying it lagged, rather than slowing the daemon or holding
the events for it (as a Kubernetes API watcher or an etcd watch that falls behind is
ended). At most ``MAX_SUBSCRIBERS`` subscriptions are open at once; past that
:meth:`EventHub.subscribe` raises :class:`TooManySubscribers`. So the hub's memory is
bounded whatever its readers do. Publish from the event loop's thread, or from any thread once the
hub has seen its loop (a subscription or an earlier publish on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("ocp_agentd.events")

KINDS = ("state", "probe", "reload", "task", "subtask")
# Events a subscriber may be behind before it is dropped. A flapping program makes a few
# events a second, so a reader that keeps up never comes near; one that does not read
# holds at most this many references (about 150 KiB of events at worst).
QUEUE_LIMIT = 256
# Subscriptions open at once: ocp-agentctl events sessions, an OCP server's watcher and a
# few scripts use a handful; a caller opening hundreds that never read cannot grow the
# daemon without bound (each one also holds a connection and its buffers).
MAX_SUBSCRIBERS = 64
# Log followers (``GET .../logs?follow=1``) open at once, counted here because they too
# live until the hub closes: each holds a connection and an open log file descriptor.
MAX_FOLLOWERS = 64
KEEP = 1000
LOST = "lost"


def now_iso() -> str:
    """The current time as RFC 3339 with milliseconds, UTC."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class TooManySubscribers(Exception):
    """``MAX_SUBSCRIBERS`` subscriptions are open already; the message says so."""


class Subscription:
    """One reader's queue of events; iterate with ``async for`` until :meth:`close`.

    After an overflow the iteration yields one ``{"kind": "lost", ...}`` event and ends.
    """

    def __init__(self, hub: EventHub, replayed: int = 0) -> None:
        self._hub = hub
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        # The replay (at most KEEP events, held by the hub anyway) does not count as lag.
        self._limit = QUEUE_LIMIT + replayed
        self.dropped = 0
        self.closed = False

    def _offer(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        if self._queue.qsize() >= self._limit:
            self.dropped += 1
            self.closed = True
            self._queue.put_nowait({"time": now_iso(), "kind": LOST,
                                    "reason": f"this reader lagged {QUEUE_LIMIT} events behind "
                                    "and was disconnected; reconnect (Last-Event-ID) to go on"})
            self._queue.put_nowait(None)
            self._hub._forget(self)
            return
        self._queue.put_nowait(event)

    async def get(self) -> dict[str, Any] | None:
        """The next event; None once the subscription is closed and drained."""
        return await self._queue.get()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)
        self._hub._forget(self)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while (event := await self.get()) is not None:
            yield event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Publish/subscribe of the daemon's events (see the module docstring)."""

    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self.published = 0
        self.closed = False
        self._recent: deque[dict[str, Any]] = deque(maxlen=KEEP)
        self.followers = 0

    # ---- reading ------------------------------------------------------------------------

    def subscribe(self, last: int = 0, after: int | None = None) -> Subscription:
        """A new subscription (call from the loop): first the ``last`` most recent kept
        events, or those kept with an id above ``after``; then every event from now on.
        Raises TooManySubscribers when ``MAX_SUBSCRIBERS`` are open."""
        self._remember_loop()
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"{len(self._subscribers)} event streams are open, the "
                                     f"most this daemon serves at once; close one or retry "
                                     "later")
        if after is not None:
            replay = [e for e in self._recent if e["id"] > after]
        else:
            replay = list(self._recent)[-last:] if last > 0 else []
        subscription = Subscription(self, len(replay))
        for event in replay:
            subscription._offer(event)
        if self.closed:
            subscription.close()
        else:
            self._subscribers.append(subscription)
        return subscription

    def close(self) -> None:
        """Ends every subscription (and log followers, which watch ``closed``): the daemon
        is stopping. Later subscriptions end at once."""
        self.closed = True
        for subscription in list(self._subscribers):
            subscription.close()

    @contextlib.contextmanager
    def following(self) -> Iterator[None]:
        """Holds one of the ``MAX_FOLLOWERS`` log follower places for the ``with`` block.
        Raises TooManySubscribers when all are taken."""
        if self.followers >= MAX_FOLLOWERS:
            raise TooManySubscribers(f"{self.followers} log followers are open, the most "
                                     "this daemon serves at once; close one or retry later")
        self.followers += 1
        try:
            yield
        finally:
            self.followers -= 1

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _forget(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscription)

    def _remember_loop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
            self._thread = threading.get_ident()

    # ---- publishing ------------------------------------------------------------------------

    def publish(self, kind: str, reason: str = "", **fields: Any) -> None:
        """Sends one event of ``kind`` with ``fields`` (JSON values) to every subscriber."""
        event: dict[str, Any] = {"id": 0, "time": now_iso(), "kind": kind, **fields,
                                 "reason": reason}
        if self._loop is not None and threading.get_ident() != self._thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self._loop.call_soon_threadsafe(self._deliver, event)
            return
        self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        # Ids are given here, on the loop's thread, so they follow the order of delivery.
        self.published += 1
        event["id"] = self.published
        self._recent.append(event)
        for subscription in list(self._subscribers):
            try:
                subscription._offer(event)
            except Exception:  # a reader must never break the publisher
                log.exception("event subscriber failed")

    def state_changed(self, program: str, old: str, new: str, reason: str = "") -> None:
        """A program moved from state ``old`` to ``new`` (SPEC section 3)."""
        self.publish("state", reason, program=program, **{"from": str(old), "to": str(new)})

    def probe_failed(self, program: str, probe: str, reason: str) -> None:
        """A liveness probe of ``program`` failed (SPEC section 10): ``probe`` names the
        check (e.g. ``"tcp_connect 62889"``), ``reason`` says why (e.g. ``"refused"``)."""
        self.publish("probe", reason, program=program, probe=probe,
                     **{"from": "", "to": ""})

    def reloaded(self, report: dict[str, list[str]] | None, error: str = "") -> None:
        """A reload ended: ``report`` as ``{added, removed, changed, unchanged}``, or None
        with ``error`` when the configuration was refused."""
        empty = {"from": "", "to": ""}
        if report is None:
            self.publish("reload", error, error=error, **empty)
        else:
            changed = {k: v for k, v in report.items() if v and k != "unchanged"}
            summary = "; ".join(f"{k} {', '.join(v)}" for k, v in changed.items())
            self.publish("reload", summary or "nothing changed", **report, **empty)

    def task_changed(self, task: int, name: str, old: str | None, new: str,
                     reason: str = "") -> None:
        """A task's status moved (``old`` None: the task was created)."""
        self.publish("task", reason, task=task, name=name, **{"from": old or "", "to": new})

    def subtask_changed(self, task: int, subtask: int, name: str, old: str | None, new: str,
                        reason: str = "") -> None:
        """A subtask's status moved (``old`` None: first seen)."""
        self.publish("subtask", reason, task=task, subtask=subtask, name=name,
                     **{"from": old or "", "to": new})


class TaskEvents:
    """Publishes the task engine's status moves as ``task`` and ``subtask`` events.

    The engine calls its listeners with one ``tasks.model.StatusChange`` per move, after
    the store committed it (``old`` None: just created), so ``from`` and ``to`` come
    straight from the engine's transition point.
    """

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub

    def __call__(self, change: Any) -> None:
        task, sub = change.task, change.subtask
        old = None if change.old is None else str(change.old)
        if sub is None:
            self._hub.task_changed(task.id, task.name, old, str(change.new), change.why)
        else:
            self._hub.subtask_changed(task.id, sub.id, sub.name, old, str(change.new),
                                      change.why)
