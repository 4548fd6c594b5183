"""The daemon as a child subreaper, and the reaping of the orphans it inherits.

With PR_SET_CHILD_SUBREAPER (prctl(2)), a process that loses its parent is reparented to
the nearest subreaper ancestor instead of init: whatever a program's processes leave
behind (a `setsid cmd &` whose parent exited) stays below the daemon, where the process
table fallback still finds it and the daemon outlives it (SPEC section 3). Such orphans
become the daemon's children, so the daemon must wait(2) for them or they stay zombies.

Direct children are reaped by their owners (subprocess.Popen.poll for a program's main
process, asyncio's child watcher for a subprocess of the daemon's own): reaping one of
those here would steal its exit status. So an exited child is reaped here only if it is
not claimed (claim() is called for every program main and log keeper spawned; both
start sessions of their own) and it is not in the
daemon's own session (a program starts a session of its own and its descendants can
never rejoin the daemon's, while the daemon's helper subprocesses stay in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

from ocp_agentd import linux, signals
from ocp_agentd.supervision.proctable import ProcEntry, Snapshot, read_stat

log = logging.getLogger("ocp_agentd.subreaper")

_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0


def become_subreaper() -> bool:
    """Marks this process a child subreaper (Linux 3.4+). False, logged, if refused."""
    try:
        linux.set_child_subreaper()
    except OSError as exc:
        log.warning("cannot become a child subreaper: %s", exc.strerror or exc)
        return False
    return True


def is_subreaper() -> bool:
    """Whether this process is a child subreaper now (prctl PR_GET_CHILD_SUBREAPER)."""
    return linux.is_child_subreaper()


class Reaper:
    """Reaps exited orphans on SIGCHLD (and when asked), leaving claimed children alone.

    One per process (the subreaper attribute is per process): use the module's REAPER.
    """

    def __init__(self) -> None:
        self._claimed: set[int] = set()
        self._own_sid = os.getsid(0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_FIRST
        self.reaped = 0  # orphans reaped since start, for tests and the log
        self.uncontained = False  # see note_uncontained()

    def note_uncontained(self) -> None:
        """A child is about to run outside every program cgroup (a program without one, a
        liveness probe's command): from now on its descendants may come to this process
        as orphans that no stop ends, and stop-all and shutdown look for them
        (tree.end_orphans). Until then every descendant ran in a program's cgroup, which
        the kernel keeps it in and its program's stop empties (SPEC section 9), so there
        is nothing to look for, and no reason to read every process's stat file on the
        host: like systemd, a process that moves itself out of its cgroup (root only) is
        no longer the program's."""
        self.uncontained = True

    def claim(self, pid: int) -> None:
        """pid is a direct child whose owner reaps it (a program's main process)."""
        self._claimed.add(pid)

    def release(self, pid: int) -> None:
        """The owner has reaped pid; look again for orphans it may have hidden. Safe to
        call from any thread."""
        self._claimed.discard(pid)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.reap_soon)

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Becomes the subreaper and reaps on every SIGCHLD of this event loop."""
        become_subreaper()
        self._own_sid = os.getsid(0)
        self._loop = loop or asyncio.get_running_loop()
        try:
            self._loop.add_signal_handler(signal.SIGCHLD, self.reap_soon)
            # A burst of exits overfills the wakeup socket: harmless here (each reap
            # collects every exited orphan), so no warning per byte (ocp_agentd/signals.py).
            signals.quiet_wakeup()
        except (RuntimeError, ValueError) as exc:  # not the main thread: reap when asked
            log.warning("no SIGCHLD handler (%s): orphans are reaped after program exits", exc)
        self.reap_soon()

    def uninstall(self) -> None:
        """Stops reaping on SIGCHLD (the subreaper attribute stays: it is harmless)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                self._loop.remove_signal_handler(signal.SIGCHLD)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._loop = None

    def reap_soon(self) -> None:
        """Reaps on the next turn of the loop (coalesces a burst of SIGCHLDs)."""
        if self._loop is None or self._scheduled or self._loop.is_closed():
            return
        self._scheduled = True
        self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._scheduled = False
        if self.reap():
            self._retry_delay = _RETRY_FIRST
            return
        # An exited child we must leave to its owner hides the ones behind it from
        # waitid: look again shortly (its owner reaps it within a loop turn or two). If it
        # stays in front, find the orphans behind it in /proc instead.
        if self._retry_delay >= _RETRY_MAX:
            self.reap_by_scan()
        if self._loop is not None and self._retry is None:
            delay = self._retry_delay
            self._retry_delay = min(delay * 2, _RETRY_MAX)

            def again() -> None:
                self._retry = None
                self.reap_soon()

            self._retry = self._loop.call_later(delay, again)

    def reap(self) -> bool:
        """Reaps every exited orphan it can see. False when an exited child that is not
        ours to reap is in front (then some orphans may wait for the next call)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is None:
                return True
            pid = info.si_pid
            if not self._reapable(pid):
                return False
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                self.reaped += 1

    def reap_by_scan(self) -> int:
        """Reaps the exited orphans found in /proc (one pass over the process table).
        Returns how many."""
        own = os.getpid()
        count = 0
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            entry = read_stat(int(name))
            if entry is None or entry.ppid != own or not entry.zombie:
                continue
            if self._reapable(entry.pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(entry.pid, os.WNOHANG)
                    count += 1
        self.reaped += count
        return count

    def orphans(self, snap: Snapshot) -> list[ProcEntry]:
        """The live processes of snap that came to this process as orphans: its children
        that nobody claimed (no program's main process, log keeper or probe) and that are
        outside its own session (not one of its own helper subprocesses)."""
        own = os.getpid()
        return [
            entry
            for entry in snap.entries.values()
            if entry.ppid == own
            and not entry.zombie
            and entry.pid not in self._claimed
            and entry.sid != self._own_sid
        ]

    def _reapable(self, pid: int) -> bool:
        if pid in self._claimed:
            return False
        entry = read_stat(pid)
        return entry is not None and entry.sid != self._own_sid


REAPER = Reaper()

__all__ = ["REAPER", "Reaper", "become_subreaper", "is_subreaper"]
