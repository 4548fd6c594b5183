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
from dataclasses import dataclass

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
    """start_ticks of pid, or None if there is no such process or it cannot be read.

    Read from /proc/PID/stat itself (field 22, after the last ")" of the command name):
    the same number start_ticks gives, without psutil's second read, of /proc/stat for the
    boot time; every spawn asks it once.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
        return int(raw[raw.rfind(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
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
