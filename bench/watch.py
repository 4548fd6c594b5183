"""The effect watcher: what an operation did to the processes, read from /proc by the bench.

A watcher is a process of its own (forked once, before anything else runs), so that its
polling never waits for the driving process's GIL and the driving process's blocking
call never waits for the poll. The driver arms it with what to look for, then acts:

    watcher = Watcher()                       # forks the watching process
    watcher.arm(gone=old_pids, new=50, argv=PROGRAM_ARGV, mark="BENCH_RUN=...")
    begin = time.monotonic(); target.stop_all(); target.start_all(); replied = ...
    effect = watcher.result()                 # Effect(gone_at, new_at, new_pids, ...)

How each event is detected, and its resolution:

- *gone*: a pidfd (pidfd_open(2), Linux 5.3+) per old pid, waited on with poll(2); a
  pidfd turns readable when the process exits (zombie or reaped), so "all old pids gone"
  is seen within the kernel's wake-up latency (tens of microseconds), with no polling.
- *new*: there is no event for "a process now runs this command", so /proc is scanned
  in a tight loop: each pass lists /proc, reads the command line of every pid that was not
  there when the watcher was armed and is not yet known to be ours, and, once it matches
  the program's argv, its environment for the run's mark. A forked child shows its
  parent's command line until it execs, so a pid is looked at again on each pass until it
  matches. The resolution is one pass (reported as ``pass_ms``, about 0.1-2 ms here,
  growing with the host's process count) plus a 0.1 ms pause between passes.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC), comparable across the two processes.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

PASS_PAUSE = 0.0001


@dataclass
class Effect:
    """What the watcher saw; times are time.monotonic() seconds, None when not asked."""

    armed_at: float
    gone_at: float | None = None  # when the last of the old pids had exited
    new_at: float | None = None  # when the N-th new pid ran the program
    new_pids: list[int] = field(default_factory=list)
    passes: int = 0
    pass_ms: float = 0.0  # mean duration of one /proc pass (the "new" resolution)
    timed_out: bool = False


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


def _watch(
    gone: list[int], new: int, argv: bytes, mark: bytes, timeout: float,
    armed_signal: Callable[[], None],
) -> Effect:
    armed = time.monotonic()
    effect = Effect(armed)
    fds = {fd: pid for pid in gone if (fd := _pidfd(pid)) is not None}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    if not fds and gone:
        effect.gone_at = armed
    known = {int(p) for p in os.listdir("/proc") if p.isdigit()} if new else set()
    ours: list[int] = []
    settled: set[int] = set()  # new pids found to be someone else's program
    armed_signal()  # only now: every pid the operation makes is not in `known`
    pass_time = 0.0
    deadline = armed + timeout
    try:
        while True:
            waiting_gone = bool(fds)
            waiting_new = len(ours) < new
            if not waiting_gone and not waiting_new:
                break
            now = time.monotonic()
            if now > deadline:
                effect.timed_out = True
                break
            # Only "gone" left: block on the pidfds (event-driven, no polling).
            wait_ms = 0 if waiting_new else min(deadline - now, 1.0) * 1000
            for fd, _ in poller.poll(wait_ms) if waiting_gone else ():
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
            if waiting_gone and not fds:
                effect.gone_at = time.monotonic()
            if not waiting_new:
                continue
            time.sleep(PASS_PAUSE)
            begin = time.monotonic()
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                pid = int(entry)
                if pid in known or pid in settled or pid in ours:
                    continue
                cmd = _read(f"/proc/{pid}/cmdline")
                if cmd != argv:
                    continue
                env = _read(f"/proc/{pid}/environ")
                if env is None:
                    continue
                if mark in env.split(b"\0"):
                    ours.append(pid)
                else:
                    settled.add(pid)
            effect.passes += 1
            pass_time += time.monotonic() - begin
            if len(ours) >= new:
                effect.new_at = time.monotonic()
    finally:
        for fd in fds:
            os.close(fd)
    effect.new_pids = ours
    effect.pass_ms = 1000 * pass_time / effect.passes if effect.passes else 0.0
    return effect


def _serve(conn: Connection) -> None:
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        while True:
            request = conn.recv()
            if request is None:
                return
            gone, new, argv, mark, timeout = request
            effect = _watch(gone, new, argv, mark, timeout, lambda: conn.send("armed"))
            conn.send(effect)


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
        timeout: float = 120.0,
    ) -> None:
        """Starts watching: the old pids in ``gone`` exiting, ``new`` new pids running
        ``argv`` with ``mark`` (KEY=VALUE) in their environment. Returns once armed."""
        raw_argv = b"".join(part.encode() + b"\0" for part in argv or [])
        self._conn.send((list(gone or []), new, raw_argv, mark.encode(), timeout))
        assert self._conn.recv() == "armed"
        self._armed = True

    def result(self) -> Effect:
        """Waits for what arm() asked for (or its timeout) and answers it."""
        assert self._armed, "arm() first"
        self._armed = False
        return self._conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self._conn.send(None)
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
