"""A program's next main process, started ahead and waiting in the program's other
cgroup slot, so that a restart does not wait for a move between cgroups.

Moving a process into a cgroup waits for an RCU grace period (the kernel's
cgroup_threadgroup_rwsem; about 10 ms here, more on a busy host; see "favordynmods" in
Documentation/admin-guide/cgroup-v2.rst). A program's new main joins its cgroup before
its first instruction (spawn.hold), so every start would pay that wait. Instead, while a
program runs in one of its two cgroup slots (``<name>`` and ``<name>.b``), a held shell
already waits in the other one, with the program's environment, user, directory and
logs. A restart (a crash, a liveness failure, an operator's restart) writes GO to it and
it execs the program at once; the slots swap, and the next standby is made in the
background, off the restart's path.

A standby is only a shell blocked in read(2) on a pipe from the daemon: it runs none of
the program's code, and the program's command is not in its argv (spawn.hold), so ps and
``pgrep -f`` do not mistake it for the program. It is discarded when the program is
stopped, when its spec changes, when its log keeper was replaced, and at shutdown; if
the daemon dies, the shell reads end of file and exits without running anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ocp_agentd import descriptors
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output, spawn, tree
from ocp_agentd.supervision.cgroups import CgroupError, EmptyWatch, Limits, ProgramCgroup
from ocp_agentd.supervision.identity import Handle
from ocp_agentd.supervision.subreaper import REAPER

log = logging.getLogger("ocp_agentd.program")

# The programs whose standby waits now (make_room).
_WAITING: set[Standbys] = set()

# Seconds between a start and the making of the next standby: programs started together
# (start-all, a restart task) get theirs once the starts are done, not in their way; a
# program that exits sooner than this restarts after a backoff anyway.
PREPARE_DELAY = 0.5

# Descriptors beyond the API's reserve that must be free for a standby to be made, on
# top of what the waiting standbys hold (STANDBY_COST each: its GO pipe and its pidfd).
HEADROOM = 64
STANDBY_COST = 2

# The second slot of a program's cgroup: "<name>" and "<name>.b" (program names hold no
# dot, config.py, so no program's slot can be another's).
SECOND_SLOT = ".b"


@dataclass
class Standby:
    """A held shell waiting in `cgroup` for GO: its Popen (stdin is the GO pipe), the
    Handle pinning it, the run id in its environment, the spec fingerprint it was made
    from and the log keeper its stdout and stderr go to (output.keeper_of)."""

    popen: subprocess.Popen[bytes]
    handle: Handle
    run_id: str
    fingerprint: str
    cgroup: ProgramCgroup
    keeper: object | None
    host: tuple[object, ...] | None  # host_state() when it was made


class Standbys:
    """One program's standby and its spare cgroup slot (the one the program is not in).

    `prepare` makes a standby in the spare slot; `take` hands it over (GO written) and
    swaps the slots; `discard` ends it. At most one exists at a time.
    """

    def __init__(self, name: str, spare: ProgramCgroup, watch: EmptyWatch) -> None:
        self.name = name
        self.spare = spare
        self._watch = watch
        self.waiting: Standby | None = None
        # Bumped by discard(): a prepare that sees another generation gives up its work.
        self._generation = 0
        self._preparing = False

    @property
    def busy(self) -> bool:
        """Whether a standby waits or is being made (the spare slot is in use)."""
        return self.waiting is not None or self._preparing

    async def prepare(
        self,
        spec: ProgramSpec,
        state_dir: Path,
        run_id: str,
        limits: Limits,
        wanted: Callable[[], bool],
    ) -> None:
        """After PREPARE_DELAY seconds, if `wanted()` still says so (the program runs),
        makes a standby for spec in the spare slot (emptying it first: what is left there
        is an ended instance or a stale standby), only while descriptors are plentiful
        (HEADROOM). Failures are logged at debug level and leave no standby: starts then
        take the ordinary path. A discard() meanwhile cancels it."""
        if self.waiting is not None or self._preparing:
            return
        generation = self._generation
        self._preparing = True
        popen: subprocess.Popen[bytes] | None = None
        try:
            await asyncio.sleep(PREPARE_DELAY)
            if generation != self._generation or not wanted():
                return
            slot = self.spare
            if slot.membership.exists() and slot.populated():
                await tree.end_cgroup(self.name, slot, self._watch)
            if generation != self._generation:
                return
            slot.create(limits)
            # Checked here, with nothing awaited before the spawn takes its descriptors:
            # a program's start must never fail for a standby's sake.
            short = descriptors.shortfall(
                HEADROOM + STANDBY_COST * len(_WAITING) + spawn.IN_FLIGHT_COST * spawn.in_flight()
            )
            if short is not None or generation != self._generation:
                return
            host = host_state(spec)
            popen = spawn.start_process(spec, state_dir, run_id, held=True)
            REAPER.claim(popen.pid)
            keeper = output.keeper_of(spec, state_dir)
            await spawn.finish_in_thread(spawn.release_into, popen, slot, False)
            handle = spawn.pin(popen)
            if generation != self._generation or self.spare is not slot:
                _end(popen, handle)
                return
            self.waiting = Standby(
                popen, handle, run_id, spec.fingerprint(), slot, keeper, host
            )
            _WAITING.add(self)
            asyncio.get_running_loop().add_reader(handle.pidfd, self._on_exit, self.waiting)
            popen = None
        except (OSError, CgroupError, spawn.SpawnRefused) as exc:
            log.debug("%s: no standby: %s", self.name, exc, extra={"PROGRAM": self.name})
        finally:
            self._preparing = False
            if popen is not None:
                _end(popen, None)

    def take(self, spec: ProgramSpec, state_dir: Path, current: ProgramCgroup) -> Standby | None:
        """The standby, released (it execs the program now), if it was made from this
        spec and still writes where a new process would; `current` becomes the spare
        slot. None (the standby discarded) otherwise."""
        standby = self.waiting
        if standby is None:
            return None
        if (
            standby.fingerprint != spec.fingerprint()
            or standby.host is None
            or standby.host != host_state(spec)
            or not standby.handle.alive()
            or (spec.log_target != "journal"
                and output.current_keeper(spec, state_dir) is not standby.keeper)
        ):
            self.discard()
            return None
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(standby.handle.pidfd)
        self.waiting = None
        _WAITING.discard(self)
        try:
            spawn.release(standby.popen)
        except OSError:
            _end(standby.popen, standby.handle)
            return None
        self.spare = current
        return standby

    def discard(self) -> None:
        """Ends the standby, if any (killed and reaped), and any prepare in progress."""
        self._generation += 1
        standby, self.waiting = self.waiting, None
        _WAITING.discard(self)
        if standby is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(standby.handle.pidfd)
            _end(standby.popen, standby.handle)

    def _on_exit(self, standby: Standby) -> None:
        # Someone killed the waiting shell (or it read end of file): nothing is lost.
        if self.waiting is standby:
            log.info("%s: standby pid %d exited", self.name, standby.popen.pid,
                     extra={"PROGRAM": self.name})
            self.discard()


def make_room(keep: Standbys | None = None) -> int:
    """Ends every waiting standby but `keep`'s, for a start that is short of descriptors:
    a program's start must never fail for a standby's sake. Returns how many ended."""
    others = [standbys for standbys in list(_WAITING) if standbys is not keep]
    for standbys in others:
        standbys.discard()
    return len(others)


def _end(popen: subprocess.Popen[bytes], handle: Handle | None) -> None:
    """Kills a held shell (it ran none of the program's code) and reaps it: at once when
    it is already gone, else when its pidfd says it exited (the loop does not wait)."""
    if popen.stdin is not None:
        with contextlib.suppress(OSError):
            popen.stdin.close()
        popen.stdin = None
    if popen.returncode is None:
        with contextlib.suppress(OSError):
            popen.kill()
    if handle is None or popen.poll() is not None:
        if popen.returncode is None:
            popen.wait()
        _forget(popen, handle)
        return
    loop = asyncio.get_running_loop()

    def reap() -> None:
        loop.remove_reader(handle.pidfd)
        popen.wait()  # its pidfd is readable: it has exited, so this does not block
        _forget(popen, handle)

    loop.add_reader(handle.pidfd, reap)


def _forget(popen: subprocess.Popen[bytes], handle: Handle | None) -> None:
    REAPER.release(popen.pid)
    if handle is not None:
        handle.close()


def host_state(spec: ProgramSpec) -> tuple[object, ...] | None:
    """What of the host a standby took on when it was made and a new main must see as it
    is now: the user's uid, gid, groups and home directory, and the directory spec.cwd
    names (device and inode, so a symlink switched to another release or a directory
    made anew differs).
    None when it cannot be read (the start's own checks will say why)."""
    try:
        ids: tuple[object, ...] = ()
        if spec.user:
            account = pwd.getpwnam(spec.user)
            groups = tuple(os.getgrouplist(spec.user, account.pw_gid))
            ids = (account.pw_uid, account.pw_gid, groups, account.pw_dir)
        where = os.stat(spec.cwd) if spec.cwd else None
        return (*ids, (where.st_dev, where.st_ino) if where else None)
    except (KeyError, OSError):
        return None
