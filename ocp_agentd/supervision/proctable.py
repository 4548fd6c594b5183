"""One read of /proc: who is whose parent, group and session, and which processes carry
the markers the daemon puts into every program's environment.

A program's tree is its descendants, the members of its process group and session, and
every process that still carries its run marker (a grandchild that called setsid and was
reparented to init keeps its environment, so it is found too).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from dataclasses import dataclass, field

MARK_PROGRAM = "OCP_AGENTD_PROGRAM"
MARK_STATE_DIR = "OCP_AGENTD_STATE_DIR"
MARK_RUN_ID = "OCP_AGENTD_RUN_ID"
_PROC = "/proc"


@dataclass(frozen=True)
class ProcEntry:
    pid: int
    ppid: int
    pgid: int
    sid: int
    starttime: int  # clock ticks since boot: with pid, the identity of a process
    zombie: bool


@dataclass(frozen=True)
class Marker:
    state_dir: str
    program: str
    run_id: str


@dataclass
class _Index:
    children: dict[int, list[int]]
    by_group: dict[int, list[int]]  # pgid or sid -> members
    by_run: dict[str, list[int]]  # run marker -> pids


@dataclass
class Snapshot:
    entries: dict[int, ProcEntry] = field(default_factory=dict)
    markers: dict[int, Marker] = field(default_factory=dict)
    # Built on the first tree(): stop-all over 50 programs asks 100 trees of one snapshot,
    # and three passes over every process of the host for each were a quarter of its time.
    _index: _Index | None = field(default=None, repr=False, compare=False)

    def children_map(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = defaultdict(list)
        for entry in self.entries.values():
            children[entry.ppid].append(entry.pid)
        return children

    def _indexed(self) -> _Index:
        if self._index is None:
            by_group: dict[int, list[int]] = defaultdict(list)
            for entry in self.entries.values():
                by_group[entry.pgid].append(entry.pid)
                if entry.sid != entry.pgid:
                    by_group[entry.sid].append(entry.pid)
            by_run: dict[str, list[int]] = defaultdict(list)
            for pid, mark in self.markers.items():
                by_run[mark.run_id].append(pid)
            self._index = _Index(self.children_map(), by_group, by_run)
        return self._index

    def tree(self, root: int, run_id: str) -> list[ProcEntry]:
        """Every live process that belongs to the instance rooted at `root`."""
        found: set[int] = set()
        index = self._indexed()
        root_entry = self.entries.get(root)
        if root_entry is not None:
            stack = [root]
            children = index.children
            while stack:
                pid = stack.pop()
                if pid in found:
                    continue
                found.add(pid)
                stack.extend(children.get(pid, ()))
            found.update(index.by_group.get(root, ()))
        found.update(index.by_run.get(run_id, ()))
        return [
            self.entries[pid]
            for pid in sorted(found)
            if pid in self.entries and not self.entries[pid].zombie
        ]

    def marked(self, state_dir: str, program: str) -> list[tuple[ProcEntry, Marker]]:
        """The live processes marked as `program` of the daemon of `state_dir`."""
        found = []
        for pid, mark in self.markers.items():
            if mark.state_dir != state_dir or mark.program != program:
                continue
            entry = self.entries.get(pid)
            if entry is not None and not entry.zombie:
                found.append((entry, mark))
        return found

    def marked_mains(self, state_dir: str, program: str) -> list[ProcEntry]:
        """Processes marked as `program` of this daemon whose parent is not of the same run:
        the main processes of instances the daemon has no record of."""
        mains = []
        for entry, mark in self.marked(state_dir, program):
            if entry.pgid != entry.pid:
                # A main was spawned in a session of its own; this is a child whose main died.
                continue
            parent_mark = self.markers.get(entry.ppid)
            if parent_mark is None or parent_mark.run_id != mark.run_id:
                mains.append(entry)
        return mains


def read_stat(pid: int) -> ProcEntry | None:
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcEntry(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            starttime=int(fields[19]),
            zombie=fields[0] in (b"Z", b"X"),
        )
    except (IndexError, ValueError):
        return None


def read_marker(pid: int) -> Marker | None:
    try:
        with open(f"{_PROC}/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    if MARK_RUN_ID.encode() not in raw:
        return None
    values: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"OCP_AGENTD_"):
            values[key.decode(errors="replace")] = value.decode(errors="replace")
    if MARK_RUN_ID not in values:
        return None
    return Marker(
        state_dir=values.get(MARK_STATE_DIR, ""),
        program=values.get(MARK_PROGRAM, ""),
        run_id=values[MARK_RUN_ID],
    )


def take_snapshot(with_markers: bool = True) -> Snapshot:
    """Every process's stat line and, with_markers, its run markers.

    Only the fallback for hosts without a usable cgroup (SPEC section 9). It reads /proc
    itself rather than through psutil because psutil is the bottleneck here: with 1,096
    processes on the host one snapshot took 26-34 ms this way and 62-109 ms with
    psutil.process_iter(["ppid", "status", "environ", "create_time"]) plus getpgid and
    getsid (psutil has no pgid/sid attribute), and this scan was already 40 % of
    restart-all's time at 200 programs.
    """
    snap = Snapshot()
    own = os.getpid()
    for name in os.listdir(_PROC):
        if not name.isdigit():
            continue
        pid = int(name)
        entry = read_stat(pid)
        if entry is None:
            continue
        snap.entries[pid] = entry
        if with_markers and pid != own and entry.ppid != 2 and pid != 2:
            mark = read_marker(pid)
            if mark is not None:
                snap.markers[pid] = mark
    return snap


class Scanner:
    """Shares one /proc read among everyone who asks while it runs.

    A caller always gets a snapshot taken after it asked; stop-all over fifty programs
    then costs one or two scans instead of fifty.
    """

    def __init__(self) -> None:
        self._next: asyncio.Future[Snapshot] | None = None
        self._running = False

    async def snapshot(self) -> Snapshot:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._running:
                asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(self._next)

    async def _run(self) -> None:
        self._running = True
        try:
            while self._next is not None:
                waiter, self._next = self._next, None
                try:
                    snap = await asyncio.to_thread(take_snapshot)
                except Exception as exc:  # pragma: no cover - /proc unreadable
                    waiter.set_exception(exc)
                else:
                    waiter.set_result(snap)
        finally:
            self._running = False
