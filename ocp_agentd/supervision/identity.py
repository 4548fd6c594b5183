"""Pid records and process identity (SPEC section 3).

A process is a program's only if its pid and its start time match the record written when
it was spawned: pid and start time name one process since boot. The start time comes from
psutil (``Process.create_time()`` less ``psutil.boot_time()``, in clock ticks since boot),
so a step of the wall clock cannot change it. The command line is recorded for people and
compared only where the start time cannot be read; a program may rewrite its title and its
environment, so neither is evidence. Signals go through pidfds opened *before* the
identity is confirmed, so a pid that is reused afterwards can never receive them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import psutil

log = logging.getLogger("ocp_agentd.identity")


@dataclass(frozen=True)
class PidRecord:
    name: str
    pid: int
    starttime: int  # clock ticks since boot (start_ticks): with pid, the process's identity
    cmdline: list[str]  # for people; evidence only where the start time cannot be read
    run_id: str
    fingerprint: str
    started_at: float  # epoch seconds
    restarts: int = 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@functools.cache
def boot_time() -> float:
    """Epoch seconds of the boot, as psutil reads it once (for display only: identity
    compares clock ticks since boot, which a later clock step cannot move)."""
    return psutil.boot_time()


def create_time(starttime: int) -> float:
    """Epoch seconds of a process start given in clock ticks since boot."""
    return boot_time() + starttime / CLOCK_TICKS


def start_ticks(process: psutil.Process) -> int:
    """The process's start in clock ticks since boot (field 22 of /proc/PID/stat, proc(5)).

    psutil gives epoch seconds (boot time + ticks / CLK_TCK); subtracting the boot time read
    at the same moment gives back the exact tick count, whatever the wall clock did since.
    Raises psutil.NoSuchProcess or psutil.AccessDenied.
    """
    return round((process.create_time() - psutil.boot_time()) * CLOCK_TICKS)


def starttime_of(pid: int) -> int | None:
    """start_ticks of pid, or None if there is no such process or it cannot be read."""
    try:
        return start_ticks(psutil.Process(pid))
    except psutil.Error:
        return None


def read_cmdline(pid: int) -> list[str] | None:
    """The process's argv as it reads now (a program may have rewritten it), or None."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return None


def same_process(pid: int, starttime: int, cmdline: list[str] | None = None) -> bool:
    """True if pid is alive, not a zombie, and is the process that started at `starttime`.

    Only where the start time cannot be read (psutil.AccessDenied) is the command line
    compared instead, and then only if one is given; title and environment are never
    compared otherwise.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        try:
            return start_ticks(process) == starttime
        except psutil.AccessDenied:
            return cmdline is not None and process.cmdline() == cmdline
    except psutil.Error:
        return False


class PidRecords:
    """One small JSON file per program under <state_dir>/pids, replaced atomically.

    Written off the event loop: save() and remove() only note the change (the newest per
    program wins) and one writer thread puts it on disk, so a spawn does not wait for a
    file system. load() and names() see the noted changes at once. flush() waits until
    every change is on disk: the supervisor calls it when it closes (a shutdown, or a
    handover whose successor reads the records). A daemon killed before its writer caught
    up leaves a record missing or stale, the same as a crash a moment earlier; adoption
    then falls back to the markers, and a stale record fails its identity check.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pending: dict[str, bytes | None] = {}  # name -> JSON to write, None: remove
        # The change the writer is putting on disk: still what load() and names() see.
        self._writing: dict[str, bytes | None] = {}
        self._busy = False
        self._changed = threading.Condition()
        self._writer: threading.Thread | None = None
        self._made = False  # the directory exists (made once, not per save)

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def save(self, record: PidRecord) -> None:
        self._note(record.name, orjson.dumps(asdict(record)))

    def remove(self, name: str) -> None:
        self._note(name, None)

    def _note(self, name: str, data: bytes | None) -> None:
        with self._changed:
            self._pending[name] = data
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_forever, name="pid-records", daemon=True
                )
                self._writer.start()
            self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until every noted change is on disk; False if that took over timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                self._writing = {}
                self._busy = False
                self._changed.notify_all()
                self._changed.wait_for(lambda: bool(self._pending))
                name, data = next(iter(self._pending.items()))
                del self._pending[name]
                self._writing = {name: data}
                self._busy = True
            if data is None:
                with contextlib.suppress(OSError):
                    self._path(name).unlink()
            else:
                self._write(name, data)

    def _write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = path.with_suffix(".json.tmp")
        for attempt in (0, 1):
            try:
                if not self._made:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._made = True
                # No fsync: a record only matters while its process lives, and a power
                # loss ends every process anyway; the page cache outlives a daemon crash.
                with open(tmp, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, path)
                return
            except FileNotFoundError:
                if attempt:
                    raise
                self._made = False  # the directory went away: made again, once
            except OSError as exc:
                # Supervision goes on without the record; adoption falls back to markers.
                log.error("cannot write pid record %s: %s", path, exc)
                return

    def load(self, name: str) -> PidRecord | None:
        path = self._path(name)
        with self._changed:
            noted = {**self._writing, **self._pending}.get(name, b"")
        try:
            if noted is None:
                return None
            data = orjson.loads(noted or path.read_bytes())
            record = PidRecord(**data)
            if not isinstance(record.pid, int) or record.pid <= 0:
                raise ValueError("bad pid")
            if not isinstance(record.starttime, int) or record.starttime < 0:
                raise ValueError("bad start time")
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable pid record %s: %s", path, exc)
            self.remove(name)
            return None

    def names(self) -> list[str]:
        with self._changed:
            pending = {**self._writing, **self._pending}
        try:
            on_disk = {p.stem for p in self.directory.glob("*.json")}
        except OSError:
            on_disk = set()
        on_disk |= {name for name, data in pending.items() if data is not None}
        return sorted(on_disk - {name for name, data in pending.items() if data is None})


@dataclass
class Handle:
    """A confirmed process: pid, start time (clock ticks since boot) and an open pidfd
    that pins it (pidfd_open(2)): whatever happens to the pid, the pidfd names this one."""

    pid: int
    starttime: int
    pidfd: int

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1

    def alive(self) -> bool:
        """False once the process has exited (its pidfd turns readable; a zombie counts as
        exited) or the handle was closed."""
        if self.pidfd < 0:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def send(self, signum: int) -> bool:
        """Signals exactly this process; False if it is already gone."""
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
            return True
        except ProcessLookupError:
            return False
        except OSError as exc:
            log.warning("cannot signal pid %d: %s", self.pid, exc)
            return False


def pin(pid: int, starttime: int, cmdline: list[str] | None = None) -> Handle | None:
    """Opens a pidfd for pid and keeps it only if the process is the one described
    (same_process); None otherwise, or if no pidfd can be opened."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    if not same_process(pid, starttime, cmdline):
        os.close(pidfd)
        return None
    return Handle(pid=pid, starttime=starttime, pidfd=pidfd)
