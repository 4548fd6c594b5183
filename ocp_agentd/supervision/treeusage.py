"""CPU seconds and memory bytes of programs without a cgroup, summed over each program's
process tree (SPEC section 9: "from the cgroup when there is one, else from the process
tree").

Status is the daemon's fastest answer, so a status never reads /proc: it reads the figures
kept here (a dictionary lookup). They come from one process-table read
(proctable.Scanner.sample: every stat line, few environments) every SAMPLE_SECONDS while a
program without a cgroup runs, and sooner, at most once per MIN_GAP_SECONDS, when a status
asks about an instance that has no figure yet. A figure is thus at most SAMPLE_SECONDS
old. The same reads keep the lineage of every tree fresh (proctable.Lineage), so a process
that escapes its tree later is still attributed to its program if it lived through one
sample inside it.

What the sum means: CPU is utime + stime + cutime + cstime (proc(5) stat) of every member,
so the time of children a member has waited for is counted once, in that member; a member
that ended without a member waiting for it (an orphan reaped by the daemon or init) keeps
the time it had at the last sample. The CPU figure of an instance never decreases. Memory
is the resident set summed over the members (pages shared between them counted once per
process, as ps(1) counts them; a cgroup counts them once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ocp_agentd.supervision.cgroups import Usage
from ocp_agentd.supervision.proctable import Scanner, Snapshot
from ocp_agentd.supervision.types import Instance

log = logging.getLogger("ocp_agentd.treeusage")

SAMPLE_SECONDS = 5.0
MIN_GAP_SECONDS = 1.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class _Tally:
    """One instance's running figures: what each member (pid -> (start time, parent,
    ticks)) had at the last sample, the ticks of members that ended unwaited, and the
    figures last reported."""

    members: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    retired_ticks: int = 0
    cpu_ticks: int = 0
    usage: Usage = field(default_factory=lambda: Usage(None, None))


class TreeUsage:
    """Keeps CPU and memory figures per instance (by run id) of programs without a cgroup.

    roots() answers the instances to sample: the live main process of every program that
    has no cgroup. start() runs the sampler on the event loop until stop().
    """

    def __init__(self, scanner: Scanner, roots: Callable[[], list[Instance]]) -> None:
        self._scanner = scanner
        self._roots = roots
        self._tallies: dict[str, _Tally] = {}
        self._wake = asyncio.Event()  # a status read found an instance without figures
        self._resume = asyncio.Event()  # note_started()
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0  # monotonic time of the last sample
        self.samples = 0

    def usage(self, inst: Instance) -> Usage:
        """The instance's last figures: Usage(None, None) until its first sample, which
        this asks for (the next sample then comes within MIN_GAP_SECONDS)."""
        tally = self._tallies.get(inst.run_id)
        if tally is None:
            self._wake.set()
            return Usage(None, None)
        return tally.usage

    def start(self) -> None:
        """Starts sampling on the running event loop (again after stop())."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="treeusage")

    async def stop(self) -> None:
        """Stops sampling and waits until the sampler has ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def note_started(self) -> None:
        """An instance without a cgroup began: sampling resumes on its usual timer (the
        sampler waits without one while there is no such instance)."""
        self._resume.set()

    async def _run(self) -> None:
        while True:
            if not self._roots():
                # Every program in a cgroup (or none running): no timer, so an idle daemon
                # does not wake every SAMPLE_SECONDS for nothing; note_started() resumes.
                self._tallies.clear()
                self._resume.clear()
                await self._resume.wait()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAMPLE_SECONDS):
                    await self._wake.wait()
            self._wake.clear()
            if not self._roots():
                continue
            gap = self._last + MIN_GAP_SECONDS - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            try:
                self.sample(await self._scanner.sample())
            except Exception:  # a failed sample must not end sampling (nor go unretrieved)
                log.exception("cannot sample the programs' process trees")

    def sample(self, snap: Snapshot) -> None:
        """Recomputes every root's figures from snap (and drops those of ended roots)."""
        self._last = time.monotonic()
        self.samples += 1
        tallies: dict[str, _Tally] = {}
        for inst in self._roots():
            if not snap.alive(inst.pid, inst.handle.starttime):
                continue
            tally = self._tallies.get(inst.run_id) or _Tally()
            tallies[inst.run_id] = tally
            members = snap.tree(inst.pid, inst.run_id)
            now = {e.pid: (e.starttime, e.ppid, e.cpu_ticks) for e in members}
            for pid, (start, ppid, ticks) in tally.members.items():
                ended = now.get(pid, (None,))[0] != start
                if ended and ppid not in now:  # no member waited for it: its time is lost
                    tally.retired_ticks += ticks
            tally.members = now
            ticks = tally.retired_ticks + sum(e.cpu_ticks for e in members)
            tally.cpu_ticks = max(tally.cpu_ticks, ticks)
            tally.usage = Usage(
                tally.cpu_ticks / CLOCK_TICKS, sum(e.rss_pages for e in members) * PAGE_SIZE
            )
        self._tallies = tallies


__all__ = ["MIN_GAP_SECONDS", "SAMPLE_SECONDS", "TreeUsage"]
