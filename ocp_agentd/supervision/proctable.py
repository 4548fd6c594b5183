"""One read of /proc: who is whose parent, group and session, and which processes carry
the markers the daemon puts into every program's environment.

A program's tree is its descendants, the members of its process group and session, and
every process that still carries its run marker (a grandchild that called setsid and was
reparented to init keeps its environment, so it is found too). Each stat line also gives a
process's CPU time and resident memory, so the same read serves the usage of programs
without a cgroup (treeusage.py).

A Scanner also keeps the Lineage: the pid and start time of every process it has seen in
each instance's tree. A grandchild that calls setsid and empties its environment carries
nothing that ties it to its program once its parent has exited (it is then a child of the
daemon, the subreaper); if any snapshot saw it in the tree before that, the lineage still
names its instance, and Snapshot.tree includes it for as long as that same process lives.
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
    # proc(5) stat utime + stime + cutime + cstime: CPU time of the process and of the
    # children it has waited for, in clock ticks.
    cpu_ticks: int = 0
    rss_pages: int = 0  # proc(5) stat rss: resident pages

    @property
    def identity(self) -> tuple[int, int]:
        """(pid, start time): names one process for its whole life (a reused pid has a
        later start time)."""
        return (self.pid, self.starttime)


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
    # The Scanner's lineage (None for a snapshot taken outside a Scanner): tree() adds the
    # processes it remembers of the instance and remembers what it finds.
    lineage: Lineage | None = field(default=None, repr=False, compare=False)
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
        """Every live process that belongs to the instance rooted at `root` (pid) with run
        marker `run_id`: descendants, group and session members, marked processes and,
        with a lineage, processes seen in this instance's tree before (same pid and start
        time). Sorted by pid; zombies left out."""
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
        if self.lineage is not None:
            found.update(self.lineage.survivors(run_id, self))
        members = [
            self.entries[pid]
            for pid in sorted(found)
            if pid in self.entries and not self.entries[pid].zombie
        ]
        if self.lineage is not None:
            self.lineage.remember(run_id, members)
        return members

    def alive(self, pid: int, starttime: int) -> bool:
        """Whether this snapshot lists the process pid with that start time, not a zombie."""
        entry = self.entries.get(pid)
        return entry is not None and entry.starttime == starttime and not entry.zombie

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
            cpu_ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
            rss_pages=int(fields[21]),
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


def take_snapshot(
    with_markers: bool = True, marker_parents: frozenset[int] | None = None
) -> Snapshot:
    """Every process's stat line and, with_markers, its run markers: of every process, or
    only of the children of the pids in marker_parents when given (see Scanner.sample).

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
        if (
            with_markers
            and pid != own
            and entry.ppid != 2
            and pid != 2
            and (marker_parents is None or entry.ppid in marker_parents)
        ):
            mark = read_marker(pid)
            if mark is not None:
                snap.markers[pid] = mark
    return snap


class Lineage:
    """The pid and start time of every process seen in each instance's tree, kept while
    that process lives.

    Identity is (pid, start time), never the pid alone: a pid the kernel gave to another
    process since has a later start time and is not matched, so a stranger is never
    attributed (and tree.py pins every process by a pidfd, checking the start time again,
    before it signals). The record lives in the daemon's memory only: a daemon that
    restarts starts with an empty one.
    """

    def __init__(self) -> None:
        self._seen: dict[str, dict[int, int]] = {}  # run_id -> pid -> starttime

    def remember(self, run_id: str, members: list[ProcEntry]) -> None:
        """Notes members as seen in run_id's tree."""
        if not members:
            return
        seen = self._seen.setdefault(run_id, {})
        for entry in members:
            seen[entry.pid] = entry.starttime

    def survivors(self, run_id: str, snap: Snapshot) -> list[int]:
        """The pids of run_id's remembered processes that snap shows alive, same start time."""
        seen = self._seen.get(run_id)
        if not seen:
            return []
        return [pid for pid, start in seen.items() if snap.alive(pid, start)]

    def owner(self, entry: ProcEntry) -> str | None:
        """The run_id in whose tree this very process (pid and start time) was seen."""
        for run_id, seen in self._seen.items():
            if seen.get(entry.pid) == entry.starttime:
                return run_id
        return None

    def prune(self, snap: Snapshot) -> None:
        """Forgets every process snap does not show alive (ended, or its pid reused)."""
        for run_id in list(self._seen):
            seen = self._seen[run_id]
            for pid in [p for p, start in seen.items() if not snap.alive(p, start)]:
                del seen[pid]
            if not seen:
                del self._seen[run_id]

    def __len__(self) -> int:
        return sum(len(seen) for seen in self._seen.values())


class Scanner:
    """Shares one /proc read among everyone who asks while it runs.

    A caller always gets a snapshot taken after it asked; stop-all over fifty programs
    then costs one or two scans instead of fifty. Every snapshot it hands out carries its
    lineage (pruned to what that snapshot shows alive).
    """

    def __init__(self) -> None:
        self._next: asyncio.Future[Snapshot] | None = None
        self._running = False
        self.lineage = Lineage()

    async def snapshot(self) -> Snapshot:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if not self._running:
                asyncio.get_running_loop().create_task(self._run())
        return await asyncio.shield(self._next)

    async def sample(self) -> Snapshot:
        """A snapshot for the periodic usage sample: every stat line, but the environment
        (run markers) only of the children of this daemon and of init, where a marked
        process that left its tree goes (the daemon is a child subreaper); the rest of a
        tree is found by parents, groups and sessions. With 1,380 processes on the host
        it took 24 ms here against 38 ms for snapshot(). Not shared with stops."""
        snap = await asyncio.to_thread(take_snapshot, True, frozenset({os.getpid(), 1}))
        self.lineage.prune(snap)
        snap.lineage = self.lineage
        return snap

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
                    self.lineage.prune(snap)
                    snap.lineage = self.lineage
                    waiter.set_result(snap)
        finally:
            self._running = False
