"""The effect watcher: what an operation did to the processes, seen by the bench itself.

A watcher is a process of its own (forked once, before anything else runs), so that its
waiting never waits for the driving process's GIL and the driving process's blocking
call never waits for it. The driver arms it with what to look for, then acts:

    watcher = Watcher()                       # forks the watching process
    watcher.arm(gone=old_pids, new=50, argv=PROGRAM_ARGV, mark="BENCH_RUN=...")
    begin = time.monotonic(); target.stop_all(); target.start_all(); replied = ...
    effect = watcher.result()                 # Effect(gone_at, new_at, new_pids, ...)

How each event is detected, and its resolution:

- *gone*: a pidfd (pidfd_open(2)) per old pid, waited on with poll(2); a pidfd turns
  readable when its process exits (zombie or reaped), so "all old pids gone" is seen
  within the kernel's wake-up latency (microseconds), without polling.
- *new*: a pid counts once its command line is the program's argv and its environment
  carries the run's mark. Where the kernel's process events connector is open to us
  (netlink ``NETLINK_CONNECTOR``/``CN_IDX_PROC``, root in the host's network namespace;
  kernel doc Documentation/driver-api/connector.rst), each ``PROC_EVENT_EXEC`` wakes the
  watcher and the exec'd pid is read at once: event-driven, microseconds, no CPU spent
  between events. Elsewhere (a container with its own network namespace) /proc is
  scanned in a loop: each pass lists /proc and reads the command line of every pid not
  there when the watcher was armed (a forked child shows its parent's command line until
  it execs, so it is read again each pass until it matches); the resolution is one pass
  (``pass_ms``, 0.1-2 ms, growing with the host's process count) plus a 0.1 ms pause.
  A lost event (the socket's buffer overflowed: ENOBUFS) falls back to one /proc scan.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC), comparable across the two processes.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

PASS_PAUSE = 0.0001
# linux/connector.h, linux/cn_proc.h
NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x2
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
EXEC_EVENT = struct.Struct("=II")  # process_pid, process_tgid
NLMSG_DONE = 3


@dataclass
class Effect:
    """What the watcher saw; times are time.monotonic() seconds, None when not asked."""

    armed_at: float
    gone_at: float | None = None  # when the last of the old pids had exited
    new_at: float | None = None  # when the N-th new pid ran the program
    new_pids: list[int] = field(default_factory=list)
    mode: str = ""  # "exec events" or "proc scan"
    passes: int = 0  # /proc scans made
    pass_ms: float = 0.0  # mean duration of one /proc scan
    timed_out: bool = False


def open_exec_events() -> socket.socket | None:
    """A netlink socket subscribed to the kernel's process events, or None where the
    connector is not open to us."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind((os.getpid(), CN_IDX_PROC))
        body = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, 4, 0) + struct.pack(
            "=I", PROC_CN_MCAST_LISTEN
        )
        sock.send(NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NLMSG_DONE, 0, 0, os.getpid())
                  + body)
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def _exec_pids(data: bytes) -> list[int]:
    """The tgids of the PROC_EVENT_EXEC events in one netlink datagram."""
    pids = []
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length = NLMSG_HDR.unpack_from(data, offset)[0]
        event = offset + NLMSG_HDR.size + CN_MSG.size
        if length < NLMSG_HDR.size or event + EVENT_HEAD.size > len(data):
            break
        if EVENT_HEAD.unpack_from(data, event)[0] == PROC_EVENT_EXEC:
            pids.append(EXEC_EVENT.unpack_from(data, event + EVENT_HEAD.size)[1])
        offset += (length + 3) & ~3
    return pids


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _settled_pids() -> set[int]:
    """The pids that exist now and will not become a new program: all but the shells.

    A new program is a pid that runs the program's argv now and did not at arming. It is
    usually a pid forked after the arming, but a shell that exists already may exec the
    program later (ocp-agentd keeps a program's next main waiting as a held /bin/sh, a
    standby), so shells stay candidates.
    """
    settled = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv0 = (_read(f"/proc/{entry}/cmdline") or b"").split(b"\0", 1)[0]
        if os.path.basename(argv0) not in _SHELLS:
            settled.add(int(entry))
    return settled


_SHELLS = {b"sh", b"dash", b"bash"}


def _drain(events: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            try:
                events.recv(1 << 16)
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise


class _Watch:
    """One armed watch: the pidfds of ``gone``, the search for ``new`` programs."""

    def __init__(self, gone: list[int], new: int, argv: bytes, mark: bytes, timeout: float,
                 events: socket.socket | None) -> None:
        self.effect = Effect(time.monotonic(), mode="exec events" if events else "proc scan")
        self.new, self.argv, self.mark, self.events = new, argv, mark, events
        self.deadline = self.effect.armed_at + timeout
        self.fds = {fd: pid for pid in gone if (fd := _pidfd(pid)) is not None}
        if gone and not self.fds:
            self.effect.gone_at = self.effect.armed_at
        self.poller = select.poll()
        for fd in self.fds:
            self.poller.register(fd, select.POLLIN)
        if events is not None and new:
            _drain(events)
            self.poller.register(events.fileno(), select.POLLIN)
        self.known = _settled_pids() if new else set()
        self.ours: list[int] = []
        self.settled: set[int] = set()  # new pids that run the program for someone else
        self.scan_time = 0.0

    def consider(self, pid: int) -> bool:
        """Looks at a pid once: True when it is a new program of ours (recorded)."""
        if pid in self.known or pid in self.settled or pid in self.ours:
            return False
        if _read(f"/proc/{pid}/cmdline") != self.argv:
            return False  # not (yet) exec'd into the program: looked at again later
        env = _read(f"/proc/{pid}/environ")
        if env is None:
            return False
        if self.mark in env.split(b"\0"):
            self.ours.append(pid)
            return True
        self.settled.add(pid)
        return False

    def scan(self) -> None:
        begin = time.monotonic()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                self.consider(int(entry))
        self.effect.passes += 1
        self.scan_time += time.monotonic() - begin

    def read_events(self) -> None:
        assert self.events is not None
        while True:
            try:
                data = self.events.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                self.scan()  # events were lost: catch up from /proc
                continue
            for pid in _exec_pids(data):
                self.consider(pid)

    def run(self) -> Effect:
        events_fd = self.events.fileno() if self.events is not None and self.new else None
        try:
            while self.fds or len(self.ours) < self.new:
                now = time.monotonic()
                if now > self.deadline:
                    self.effect.timed_out = True
                    break
                scanning = len(self.ours) < self.new and events_fd is None
                wait_ms = 0 if scanning else min(self.deadline - now, 1.0) * 1000
                for fd, _ in self.poller.poll(wait_ms):
                    if fd == events_fd:
                        self.read_events()
                        continue
                    self.poller.unregister(fd)
                    os.close(fd)
                    del self.fds[fd]
                    if not self.fds:
                        self.effect.gone_at = time.monotonic()
                if scanning:
                    time.sleep(PASS_PAUSE)
                    self.scan()
                if self.new and self.effect.new_at is None and len(self.ours) >= self.new:
                    self.effect.new_at = time.monotonic()
        finally:
            for fd in self.fds:
                os.close(fd)
        self.effect.new_pids = self.ours
        if self.effect.passes:
            self.effect.pass_ms = 1000 * self.scan_time / self.effect.passes
        return self.effect


def _serve(conn: Connection) -> None:
    events = open_exec_events()
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        while True:
            request = conn.recv()
            if request is None:
                return
            gone, new, argv, mark, timeout = request
            watch = _Watch(gone, new, argv, mark, timeout, events)
            conn.send("armed")  # only now: every pid the operation makes is not `known`
            conn.send(watch.run())


class Watcher:
    """The watching process and the pipe to it. Fork it before starting threads."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._armed = False

    def arm(
        self,
        gone: list[int] | None = None,
        new: int = 0,
        argv: list[str] | None = None,
        mark: str = "",
        timeout: float = 300.0,
    ) -> None:
        """Starts watching: the old pids in ``gone`` exiting, ``new`` new pids running
        ``argv`` with ``mark`` (KEY=VALUE) in their environment. Returns once armed."""
        raw_argv = b"".join(part.encode() + b"\0" for part in argv or [])
        self._conn.send((list(gone or []), new, raw_argv, mark.encode(), timeout))
        if self._conn.recv() != "armed":
            raise RuntimeError("the watcher did not arm")
        self._armed = True

    def result(self) -> Effect:
        """Waits for what arm() asked for (or its timeout) and answers it."""
        if not self._armed:
            raise RuntimeError("arm() first")
        self._armed = False
        return self._conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

