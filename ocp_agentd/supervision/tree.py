"""Ending a program's process tree: signal, wait, escalate to SIGKILL.

With a cgroup (SPEC section 9) the tree is exactly the cgroup's members: the stop signal
goes to each, the final kill is the cgroup's (cgroups.ProgramCgroup.kill) and "gone" is
the cgroup becoming empty, as an event. Without one (the fallback of SPEC section 3) the
tree of an instance is its main process, its process group and every process that carries
its run marker (proctable.Snapshot.tree), found by a scan of the process table. Either
way each process is pinned by a pidfd before it is signalled, so a recycled pid of a
stranger is never hit (pidfd_open(2)).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from ocp_agentd.supervision.cgroups import CgroupError, EmptyWatch, ProgramCgroup
from ocp_agentd.supervision.identity import Handle, pin
from ocp_agentd.supervision.proctable import ProcEntry, Scanner, take_snapshot
from ocp_agentd.supervision.subreaper import REAPER
from ocp_agentd.supervision.types import Instance, OperationFailed

log = logging.getLogger("ocp_agentd.program")

KILL_GRACE = 5.0  # how long SIGKILLed processes get to vanish before a stop is reported failed


def signal_group(inst: Instance, signum: int, cont: bool = True) -> bool:
    """signum, then SIGCONT (a stopped process must see it; `cont` False: the caller sends
    it later), to the main's process group (killpg(2): the main and what stayed in its
    group), and to the main alone (its pidfd) if it has left that group. Each process gets
    it once. The group's id is the main's pid, which no other process can take while the
    main is not reaped, so nothing is sent once the main's exit is seen (it is reaped
    then). True when the group had the signal."""
    if inst.exited.done():
        return False
    signals = (signum, signal.SIGCONT) if cont else (signum,)
    try:
        in_group = os.getpgid(inst.pid) == inst.pid
    except OSError:
        in_group = False
    sent = False
    for signo in signals:
        try:
            os.killpg(inst.pid, signo)
            sent = True
        except OSError:
            pass  # nobody is left in the group
        if not in_group:
            inst.handle.send(signo)
    return sent


async def terminate(
    name: str,
    inst: Instance,
    scanner: Scanner,
    signum: int,
    stop_timeout: float,
    signalled: bool = False,
) -> None:
    """signum to the group and the tree (each process once), stop_timeout seconds for
    all of them to end, then SIGKILL to what is left. `signalled`: the group has had
    signum and SIGCONT already (stop-all's passes), so only the tree outside it gets them.

    Raises OperationFailed when processes survive SIGKILL for KILL_GRACE seconds.
    """
    snap = await scanner.snapshot()
    members = snap.tree(inst.pid, inst.run_id)
    handles = pin_all(members, skip=inst.pid)
    grouped: set[int] = set()
    if signalled or signal_group(inst, signum):
        # What is in the main's group had the signal with the group.
        grouped = {member.pid for member in members if member.pgid == inst.pid}
    for handle in handles:
        if handle.pid not in grouped:
            handle.send(signum)
            handle.send(signal.SIGCONT)
    gone = await wait_gone(inst, handles, stop_timeout)
    if not gone:
        snap = await scanner.snapshot()
        handles += pin_all(
            snap.tree(inst.pid, inst.run_id), skip=inst.pid, known={h.pid for h in handles}
        )
        left = [h.pid for h in handles if h.alive()]
        log.warning(
            "%s: still running after %gs, sending SIGKILL to %s",
            name,
            stop_timeout,
            left or [inst.pid],
            extra={"PROGRAM": name},
        )
        if not inst.exited.done():
            with contextlib.suppress(OSError):
                os.killpg(inst.pid, signal.SIGKILL)
            inst.handle.send(signal.SIGKILL)
        for handle in handles:
            handle.send(signal.SIGKILL)
        gone = await wait_gone(inst, handles, KILL_GRACE)
    for handle in handles:
        handle.close()
    if not gone:
        raise OperationFailed(name, "processes survived SIGKILL")
    # Late children forked while stopping are found by their run marker.
    snap = await scanner.snapshot()
    late = snap.tree(inst.pid, inst.run_id)
    if late:
        await end_processes(late, signal.SIGKILL, KILL_GRACE)


def signal_main(inst: Instance, signum: int, cont: bool = True) -> None:
    """signum, then SIGCONT (a stopped process must see it; `cont` False: the caller
    sends it later), to the main alone, through its pidfd (so never to a reused pid);
    nothing once its exit is seen."""
    if not inst.exited.done():
        inst.handle.send(signum)
        if cont:
            inst.handle.send(signal.SIGCONT)


def signal_cgroup(
    inst: Instance, cgroup: ProgramCgroup, signum: int, main_done: bool = False
) -> None:
    """signum, then SIGCONT, to the main (even if it left the cgroup: root can), then to
    every other member of the cgroup. `main_done`: signal_main has been sent already."""
    if not main_done:
        signal_main(inst, signum)
    cgroup.signal_all(signum, signal.SIGCONT, skip=inst.pid)


async def terminate_cgroup(
    name: str,
    inst: Instance,
    cgroup: ProgramCgroup,
    watch: EmptyWatch,
    signum: int,
    stop_timeout: float,
    signalled: bool = False,
) -> None:
    """signum to every member of the cgroup (signal_cgroup; not again when `signalled`),
    stop_timeout seconds for it to empty, then the cgroup's kill. Returns once the cgroup
    is empty and the main's exit is seen.

    Raises OperationFailed when members are left KILL_GRACE seconds after the kill.
    """
    if not signalled:
        signal_cgroup(inst, cgroup, signum)
    if not await watch.wait_empty(cgroup, stop_timeout):
        log.warning(
            "%s: still running after %gs, killing every process in %s: %s",
            name,
            stop_timeout,
            cgroup.path,
            cgroup.members(),
            extra={"PROGRAM": name},
        )
        await end_cgroup(name, cgroup, watch)
    await _seen_exit(name, inst)


async def end_cgroup(
    name: str,
    cgroup: ProgramCgroup,
    watch: EmptyWatch,
    signum: int | None = None,
    stop_timeout: float = 0.0,
    signalled: bool = False,
) -> None:
    """Ends every process in cgroup: signum first and up to stop_timeout seconds when
    signum is given, then the cgroup's kill. `signalled`: every member has had signum
    already (signal_cgroup), so only the wait and the kill are left; a second stop signal
    is "abort now" to many programs. Raises OperationFailed if members are left
    KILL_GRACE seconds after the kill."""
    if signum is not None:
        if not signalled:
            cgroup.signal_all(signum, signal.SIGCONT)
        if await watch.wait_empty(cgroup, stop_timeout):
            return
    cgroup.kill()
    if not await watch.wait_empty(cgroup, KILL_GRACE):
        raise OperationFailed(name, f"processes survived SIGKILL: {cgroup.members()}")


async def _seen_exit(name: str, inst: Instance) -> None:
    # The cgroup empties when the main has exited; its pidfd callback may run a moment
    # later. A main that moved itself out of the cgroup (root can) is killed by its pidfd.
    for attempt in range(2):
        if not inst.exited.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(inst.exited), KILL_GRACE / 2)
        if inst.exited.done():
            return
        if attempt == 0:
            log.warning("%s: pid %d left its cgroup, killing it", name, inst.pid)
            inst.handle.send(signal.SIGKILL)
    raise OperationFailed(name, f"pid {inst.pid} left its cgroup and survived SIGKILL")


async def sweep(name: str, inst: Instance, scanner: Scanner) -> None:
    """After an unexpected exit, SIGKILLs what is left of that instance's tree."""
    snap = await scanner.snapshot()
    members = snap.tree(inst.pid, inst.run_id)
    if members:
        log.warning(
            "%s: ending %d leftover process(es) of pid %d: %s",
            name,
            len(members),
            inst.pid,
            [m.pid for m in members],
            extra={"PROGRAM": name},
        )
        await end_processes(members, signal.SIGKILL, KILL_GRACE)


async def end_strays(strays: list[ProcEntry], signum: int, stop_timeout: float) -> None:
    """Ends processes of a program that no watched instance owns.

    What is left of an instance whose main died is killed at once (as after an unexpected
    exit); a second live instance (a group leader among strays) gets signum first and
    SIGKILL after stop_timeout seconds.
    """
    if any(entry.pgid == entry.pid for entry in strays):
        await end_processes(strays, signum, stop_timeout)
    await end_processes(strays, signal.SIGKILL, KILL_GRACE)


async def end_processes(members: list[ProcEntry], signum: int, grace: float) -> None:
    """Sends signum to each member (pinned first) and waits up to grace seconds."""
    handles = pin_all(members)
    for handle in handles:
        handle.send(signum)
    await wait_handles(handles, grace)
    for handle in handles:
        handle.close()


def pin_all(
    members: list[ProcEntry], skip: int = 0, known: set[int] | None = None
) -> list[Handle]:
    """Pidfd handles for members still alive as listed, except pid skip and pids in known."""
    handles = []
    for member in members:
        if member.pid == skip or (known and member.pid in known):
            continue
        handle = pin(member.pid, member.starttime)
        if handle is not None:
            handles.append(handle)
    return handles


async def wait_handles(handles: list[Handle], timeout: float) -> bool:
    """Waits until every pinned process has exited (its pidfd turns readable).

    True when all are gone within timeout seconds.
    """
    loop = asyncio.get_running_loop()
    pending = [h for h in handles if h.alive()]
    if not pending:
        return True
    futures = []
    for handle in pending:
        fut: asyncio.Future[None] = loop.create_future()

        def done(fut: asyncio.Future[None] = fut, fd: int = handle.pidfd) -> None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(fd)
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(handle.pidfd, done)
        futures.append((fut, handle.pidfd))
    try:
        _, still = await asyncio.wait([f for f, _ in futures], timeout=timeout)
        return not still
    finally:
        for fut, fd in futures:
            if not fut.done():
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(fd)
                fut.cancel()


async def wait_gone(inst: Instance, handles: list[Handle], timeout: float) -> bool:
    """Waits up to timeout seconds for the instance's main and every handle to end."""
    deadline = time.monotonic() + timeout
    if not inst.exited.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(inst.exited), timeout)
        if not inst.exited.done():
            return False
    return await wait_handles(handles, max(0.0, deadline - time.monotonic()))


async def end_orphans(
    scanner: Scanner,
    running: Callable[[], list[tuple[Instance, ProgramCgroup | None]]],
    grace: float = KILL_GRACE,
) -> list[int]:
    """Ends the orphans the daemon inherited (subreaper.Reaper.orphans) that belong to no
    running instance: SIGTERM, up to grace seconds, then SIGKILL. For stop-all and the
    daemon's shutdown, after the programs' own stops.

    running() answers each instance still running with its cgroup (None: none); it is
    asked after the orphans are listed, so a program started meanwhile counts as running.
    An orphan in such a cgroup, or (without one) in such an instance's tree (descendant,
    group or session member, run marker, or seen in that tree before: proctable.Lineage),
    is left alone. Every orphan is pinned by a pidfd with its start time before it is
    signalled. Returns the pids signalled.
    """
    # First the parents alone (no environments read); the trees only if there are orphans.
    orphans = REAPER.orphans(await asyncio.to_thread(take_snapshot, False))
    if not orphans:
        return []
    keep: set[int] = set()
    alive = running()
    snap = await scanner.snapshot() if any(cg is None for _, cg in alive) else None
    for inst, cgroup in alive:
        if cgroup is not None:
            with contextlib.suppress(CgroupError):
                keep.update(cgroup.members())
        elif snap is not None:
            keep.update(entry.pid for entry in snap.tree(inst.pid, inst.run_id))
    strays = [entry for entry in orphans if entry.pid not in keep]
    if not strays:
        return []
    log.warning(
        "ending %d orphaned process(es) of no running program: %s",
        len(strays),
        [entry.pid for entry in strays],
    )
    handles = pin_all(strays)
    for handle in handles:
        handle.send(signal.SIGTERM)
        handle.send(signal.SIGCONT)
    if not await wait_handles(handles, grace):
        for handle in handles:
            handle.send(signal.SIGKILL)
        await wait_handles(handles, KILL_GRACE)
    for handle in handles:
        handle.close()
    return [handle.pid for handle in handles]


async def signal_tree(inst: Instance, scanner: Scanner, signum: int) -> int:
    """Sends signum to the instance's main process and every other member of its tree, each
    pinned by its pidfd first; answers how many processes it reached (SPEC section 12)."""
    snap = await scanner.snapshot()
    handles = pin_all(snap.tree(inst.pid, inst.run_id), skip=inst.pid)
    reached = int(inst.handle.send(signum))
    for handle in handles:
        reached += int(handle.send(signum))
        handle.close()
    return reached
