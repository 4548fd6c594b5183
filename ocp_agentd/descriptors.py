"""File descriptors: the daemon's limit, the programs' limit, a reserve for the API.

SPEC section 11, "Descriptors". At start the daemon raises its soft RLIMIT_NOFILE to the
hard limit (getrlimit(2)); programs get back the limits the daemon was started with, so
raising ours changes nothing for them. A reserve of descriptors is kept for the API: a
spawn that would eat into it fails that start with an error naming the numbers, and a
listener that still runs out (too many clients) accepts on a spare descriptor or pauses,
instead of asyncio's retry loop spinning the CPU and writing one log line per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ocp_agentd.descriptors")

RESERVE_MIN = 16
RESERVE_MAX = 256
# Descriptors one spawn holds at its peak: two log files and two pipes for a new log
# keeper, /dev/null, an exec-error pipe (2) and the pidfd; afterwards the pidfd stays, and
# the pipes' write ends while the program is configured, until a start of it fails for
# want of descriptors (output.open_streams; README, Reliability).
SPAWN_COST = 10
ACCEPT_PAUSE = 1.0  # asyncio's own retry delay after a failed accept (ACCEPT_RETRY_DELAY)
REPORT_INTERVAL = 60.0  # a descriptor shortage is logged at most once per this many seconds
ASYNCIO_ACCEPT_MESSAGE = "socket.accept() out of system resource"
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


@dataclass(frozen=True)
class NofileLimits:
    """RLIMIT_NOFILE as the daemon found it (`inherited`, (soft, hard)) and as it runs
    (`soft`), with `reserve` descriptors kept for the API."""

    inherited: tuple[int, int]
    soft: int
    reserve: int

    @property
    def raised(self) -> bool:
        return self.soft != self.inherited[0]

    def program_command(self, command: list[str]) -> list[str]:
        """argv that runs `command` with the inherited soft limit (the hard limit never
        changed): the shell's `ulimit -S -n`, then exec, so the program is the same
        process. Unchanged when the daemon runs with the inherited limit anyway.

        Not Popen's preexec_fn: that runs Python in the forked child of a daemon with
        worker threads, which can deadlock on a lock another thread held at fork time.
        """
        if not self.raised:
            return command
        return ["/bin/sh", "-c", f'ulimit -S -n {int(self.inherited[0])}; exec "$0" "$@"',
                *command]


def reserve_for(soft: int) -> int:
    """Descriptors kept for the API under a soft limit: an eighth, 16 to 256."""
    return max(RESERVE_MIN, min(RESERVE_MAX, soft // 8))


def raise_nofile_limit() -> NofileLimits:
    """Raises the soft RLIMIT_NOFILE to the hard limit (capped at fs.nr_open, which the
    kernel enforces for an unlimited hard limit); on failure keeps the current one. Programs
    spawned afterwards get the limits found here (program_command)."""
    global _raised
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
            target = soft
    else:
        target = soft
    _raised = NofileLimits(inherited=(soft, hard), soft=target, reserve=reserve_for(target))
    return _raised


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 1048576  # the kernel's default


def open_count() -> int:
    """How many descriptors this process has open now (entries of /proc/self/fd)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself holds
    except OSError:
        return 0


def table_size() -> int | None:
    """The size of this process's descriptor table (proc(5), /proc/self/status FDSize):
    every open descriptor's number is below it, so it bounds open_count() from above. One
    small read, where open_count() lists every descriptor (1.5 ms at 5,000 of them, and a
    start asks for each program); None when it cannot be read."""
    try:
        with open("/proc/self/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"FDSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def shortfall(need: int = SPAWN_COST) -> str | None:
    """None if `need` more descriptors leave the API's reserve intact, else why not (a
    sentence with the numbers, for a program's last_exit and the caller's error). Asked
    before a spawn and before the daemon keeps a descriptor per program (log watches)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return None
    reserve = reserve_for(soft)
    bound = table_size()
    if bound is not None and bound + need <= soft - reserve:
        return None  # even a full descriptor table leaves the reserve intact
    used = open_count()
    if used + need <= soft - reserve:
        return None
    return (
        f"too few file descriptors: {used} of the daemon's limit {soft} are open and "
        f"{reserve} are kept for its API (raise LimitNOFILE)"
    )


_raised: NofileLimits | None = None


def program_command(command: list[str]) -> list[str]:
    """`command` as spawned, so that the program gets the descriptor limit the daemon was
    started with (NofileLimits.program_command; unchanged unless it was raised)."""
    return _raised.program_command(command) if _raised is not None else command


class OncePerInterval:
    """Lets a recurring condition through once per `interval` seconds, counting the rest."""

    def __init__(self, interval: float = REPORT_INTERVAL) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def due(self) -> int | None:
        """The number of occurrences suppressed since the last one let through, or None
        when this one is to be suppressed too."""
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


class GuardedListener(socket.socket):
    """A listening socket whose accept() survives running out of descriptors.

    On EMFILE/ENFILE it closes a spare descriptor kept for this moment and accepts on it,
    so one more client is served (the libuv "EMFILE trick"). With no spare it raises the
    error once, which makes asyncio stop watching the socket and retry after a second
    (selector_events, ACCEPT_RETRY_DELAY), and answers EAGAIN to asyncio's further
    attempts in the same burst: without that, each of up to `backlog` attempts scheduled
    a retry of its own and the retries multiplied into a busy loop.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._spare: int | None = None
        self._quiet_until = 0.0
        self._take_spare()

    def _take_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._spare = None

    def _drop_spare(self) -> bool:
        if self._spare is None:
            return False
        os.close(self._spare)
        self._spare = None
        return True

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self._quiet_until:
            raise BlockingIOError(errno.EAGAIN, "accepting paused: out of descriptors")
        try:
            conn = super().accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS or not self._drop_spare():
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._quiet_until = time.monotonic() + ACCEPT_PAUSE / 2
                raise
            conn = super().accept()  # on the spare's number; raises EAGAIN if none waits
        self._take_spare()
        return conn

    def close(self) -> None:
        self._drop_spare()
        super().close()


def guard_listener(sock: socket.socket) -> GuardedListener:
    """The same listening socket (its descriptor moves over), with GuardedListener's accept."""
    return GuardedListener(sock)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = REPORT_INTERVAL) -> None:
    """Logs asyncio's "out of system resource" accept failures once per `interval` with the
    count of the others; every other exception context goes to the handler set before."""
    limiter = OncePerInterval(interval)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ASYNCIO_ACCEPT_MESSAGE:
            suppressed = limiter.due()
            if suppressed is not None:
                log.error(
                    "the API cannot accept connections: %s (daemon descriptor limit %d; "
                    "%d more such failure(s) since the last report; retrying every %gs)",
                    context.get("exception"),
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    suppressed,
                    ACCEPT_PAUSE,
                )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
