"""Processes the benchmark starts, /proc probes, and cleanup that leaves nothing behind.

Every supervised program gets ``BENCH_RUN=<token>`` in its environment, so whatever
a supervisor leaves behind (even after it was SIGKILLed and its children were
re-parented) is found by a scan of /proc and killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ENV_MARK = "BENCH_RUN"
PR_SET_PDEATHSIG = 1


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.005) -> T:
    """Polls predicate() until it returns a truthy value; raises TimeoutError naming what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def pid_list() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def stat_fields(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) from /proc/PID/stat, or None if the pid is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = raw[raw.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1])


def is_running(pid: int) -> bool:
    """True while pid exists and is not a zombie (a reaped-later exit counts as gone)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def has_mark(pid: int, token: str) -> bool:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{ENV_MARK}={token}".encode() in raw.split(b"\0")


def marked_pids(token: str) -> list[int]:
    me = os.getpid()
    return [pid for pid in pid_list() if pid != me and has_mark(pid, token)]


def children(pid: int) -> list[int]:
    """pid's child processes, from /proc/PID/task/*/children (no /proc scan; [] when
    pid is gone). Raises OSError where the kernel lacks CONFIG_PROC_CHILDREN."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return found


def descendants(root: int) -> list[int]:
    """Every live descendant of root, from one scan of /proc."""
    parents: dict[int, list[int]] = {}
    for pid in pid_list():
        fields = stat_fields(pid)
        if fields is not None:
            parents.setdefault(fields[1], []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of pid, in seconds; 0.0 once it is gone.

    From each thread's schedstat (nanoseconds) where the kernel has it, since
    /proc/PID/stat counts 10 ms ticks, too coarse for an idle process.
    """
    total = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0]) / 1e9
    except FileNotFoundError:
        return total
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_uss_mib(pid: int) -> tuple[float, float]:
    """(RSS, USS) of pid in MiB, from /proc/PID/smaps_rollup (USS = private clean + dirty)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return values["Rss"] / 1024, uss / 1024


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class Launched:
    """One supervisor process started by the benchmark, in its own session: output to
    ``log``, or with ``pipes`` its stdin and stdout as pipes to the bench (stderr to log)."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str],
        token: str,
        cwd: Path | None = None,
        pipes: bool = False,
    ) -> None:
        self.token = token
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else self._log,
            stderr=self._log if pipes else subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (a supervisor stops its programs), then SIGKILL to everything left."""
        tree = descendants(self.pid) if self.alive() else []
        if self.alive():
            _kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                tree += descendants(self.pid)
                _kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for pid in set(tree) | set(marked_pids(self.token)):
            _kill(pid, signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()


class Reaper:
    """Owns every Launched; stop_all() runs from finally, on Ctrl-C and on SIGTERM."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.launched: list[Launched] = []

    def launch(
        self,
        argv: list[str],
        log: Path,
        env: dict[str, str],
        cwd: Path | None = None,
        pipes: bool = False,
    ) -> Launched:
        env = dict(env, **{ENV_MARK: self.token})
        launched = Launched(argv, log, env, self.token, cwd, pipes)
        self.launched.append(launched)
        return launched

    def stop_all(self) -> None:
        # Ctrl-C pressed again while cleaning up must not leave processes behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self.launched:
                self.launched.pop().stop()
            for pid in marked_pids(self.token):
                _kill(pid, signal.SIGKILL)
        finally:
            signal.signal(signal.SIGINT, previous)
