"""Speaking to systemd: sd_notify states, the watchdog and journald logging.

Everything here is a silent no-op when the daemon does not run under systemd
(no NOTIFY_SOCKET, no JOURNAL_STREAM/INVOCATION_ID), so the daemon can call it
unconditionally.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from types import ModuleType

log = logging.getLogger(__name__)

# Attributes of log records that become journal fields of the same name.
STRUCTURED_FIELDS = ("PROGRAM", "TASK_ID", "TRACE_ID")


@functools.cache
def _systemd_python() -> tuple[ModuleType | None, ModuleType | None]:
    """(systemd.daemon, systemd.journal) of systemd-python, or (None, None) when its C
    extension is missing (the raw datagram path then keeps notify working)."""
    # Imported on first use, not with this module: a daemon that systemd did not start
    # never needs them, and they cost about 1 MiB of resident memory.
    try:
        from systemd import daemon, journal
    except ImportError:  # pragma: no cover - only when the C extension is missing
        return None, None
    return daemon, journal


def _raw_notify(address: str, message: str) -> bool:
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


class Notifier:
    """sd_notify(3) for the daemon: READY, STATUS, RELOADING, STOPPING, WATCHDOG."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if env is None else env

    @property
    def enabled(self) -> bool:
        return bool(self._env.get("NOTIFY_SOCKET"))

    def notify(self, *lines: str) -> bool:
        """Send one notification made of `lines`; False (and no error) when not under systemd."""
        address = self._env.get("NOTIFY_SOCKET")
        if not address:
            return False
        message = "\n".join(line.replace("\n", " ") for line in lines)
        try:
            sd_daemon = _systemd_python()[0] if self._env is os.environ else None
            if sd_daemon is not None:
                return bool(sd_daemon.notify(message))
            return _raw_notify(address, message)
        except OSError as exc:  # a vanished socket must never take the daemon down
            log.debug("sd_notify failed: %s", exc)
            return False

    def ready(self, status: str = "") -> bool:
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={status}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 match the reload to this notification.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def ping(self) -> bool:
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when no watchdog."""
        raw = self._env.get("WATCHDOG_USEC")
        if not raw:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(raw)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000


class JournalHandler(logging.Handler):
    """logging -> journald with PROGRAM/TASK_ID/TRACE_ID taken from record attributes."""

    def __init__(
        self,
        identifier: str = "ocp-agentd",
        sender: Callable[..., None] | None = None,
        level: int = logging.NOTSET,
    ) -> None:
        super().__init__(level)
        self.identifier = identifier
        if sender is None:
            sd_journal = _systemd_python()[1]
            if sd_journal is None:  # pragma: no cover
                raise RuntimeError("systemd-python is not installed")
            sender = sd_journal.send
        self._send = sender

    @staticmethod
    def priority(levelno: int) -> int:
        if levelno >= logging.CRITICAL:
            return 2
        if levelno >= logging.ERROR:
            return 3
        if levelno >= logging.WARNING:
            return 4
        if levelno >= logging.INFO:
            return 6
        return 7

    def fields(self, record: logging.LogRecord) -> dict[str, str | int]:
        # systemd.journal.send wants CODE_LINE as an int; every other value a str.
        fields: dict[str, str | int] = {
            "PRIORITY": str(self.priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": int(record.lineno),
            "CODE_FUNC": record.funcName or "",
        }
        for name in STRUCTURED_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "":
                fields[name] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.format(record), **self.fields(record))
        except Exception:
            self.handleError(record)


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def journal_handler(
    env: Mapping[str, str] | None = None, identifier: str = "ocp-agentd"
) -> logging.Handler | None:
    """A journald handler when started by systemd, else None (log to stderr then)."""
    if not under_systemd(env) or _systemd_python()[1] is None:
        return None
    if not os.path.exists("/run/systemd/journal/socket"):
        return None
    with contextlib.suppress(Exception):
        handler = JournalHandler(identifier=identifier)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    print("ocp-agentd: journald is not reachable, logging to stderr", file=sys.stderr)
    return None


def status_text(counts: Mapping[str, int]) -> str:
    """The STATUS= line from program counts by state: "N of M programs running (...)"."""
    total = sum(counts.values())
    text = f"{counts.get('RUNNING', 0)} of {total} programs running"
    troubled = [f"{n} {s.lower()}" for s, n in counts.items() if n and s in ("FATAL", "BACKOFF")]
    return f"{text} ({', '.join(troubled)})" if troubled else text


class StatusReporter:
    """Sends STATUS= when the programs' states change: one datagram per event loop
    iteration at most, and only when the text changed.

    Transitions come in bursts (a restart of 50 programs makes 200): counting every
    program for each of them cost O(N^2) and one datagram each.
    """

    def __init__(self, notifier: Notifier, text: Callable[[], str]) -> None:
        self._notifier = notifier
        self._text = text
        self._pending = False
        self._sent = ""

    def changed(self) -> None:
        """A state changed: schedule a STATUS update (sent at once outside an event loop)."""
        if self._pending or not self._notifier.enabled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send()
            return
        self._pending = True
        loop.call_soon(self._send)

    def _send(self) -> None:
        self._pending = False
        text = self._text()
        if text != self._sent:
            self._sent = text
            self._notifier.status(text)
