"""One program's state machine: spawn, watch, stop, adopt.

Every state change goes through Program._set_state, which accepts only the moves in
TRANSITIONS (as supervisord's Subprocess._assertInState). Commands (start, stop, restart)
and automatic restarts take the program's lock, so operations on one program never
overlap. Exits are seen through a pidfd registered with the event loop: the moment the
process ends, whether the daemon spawned it or adopted it from an earlier daemon.
The tree kill lives in tree.py, spawning in spawn.py, the probes in probes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import pwd
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

import aiohttp

from ocp_agentd import descriptors, hostcheck
from ocp_agentd.background import Tasks
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output, probes, spawn, tree
from ocp_agentd.supervision.cgroups import (
    CgroupError,
    EmptyWatch,
    Host,
    Layout,
    Limits,
    OomNews,
    OomReading,
    ProgramCgroup,
    Usage,
    format_bytes,
    oom_news,
)
from ocp_agentd.supervision.identity import (
    Handle,
    PidRecord,
    create_time,
    pin,
    read_cmdline,
)
from ocp_agentd.supervision.intent import CANCELLED_BY_STOP, Intent, ticket
from ocp_agentd.supervision.intent_records import IntentRecord, IntentRecords
from ocp_agentd.supervision.liveness import Liveness
from ocp_agentd.supervision.pid_records import PidRecords
from ocp_agentd.supervision.proctable import ProcEntry, Scanner
from ocp_agentd.supervision.records_json import RecordBase, RecordJson, encode_record, uptime
from ocp_agentd.supervision.standby import SECOND_SLOT, Standbys, make_room
from ocp_agentd.supervision.subreaper import REAPER
from ocp_agentd.supervision.treeusage import TreeUsage
from ocp_agentd.supervision.types import (
    Check,
    ExitInfo,
    IllegalTransition,
    Instance,
    OperationFailed,
    ProbeResult,
    ProcessInfo,
    StartAborted,
    State,
    VerifyResult,
)

log = logging.getLogger("ocp_agentd.program")
T = TypeVar("T")

QUICK_EXIT_FLOOR = 1.0  # an exit sooner than this after spawn counts as a quick exit
USAGE_TTL = 1.0  # seconds a usage reading is served again (status and metrics ask often)

# The legal moves of Program._set_state; staying in a state is always allowed.
TRANSITIONS: dict[State, frozenset[State]] = {
    # STOPPED -> EXITED only at boot: an exit left so before the daemon restarted stays so.
    State.STOPPED: frozenset({State.STARTING, State.RUNNING, State.EXITED}),
    State.STARTING: frozenset(
        {State.RUNNING, State.BACKOFF, State.FATAL, State.STOPPING, State.STOPPED}
    ),
    # An exit that will be restarted is BACKOFF (or FATAL after too many quick ones);
    # EXITED is an exit left so (autorestart said no), left only by a command.
    State.RUNNING: frozenset(
        {State.EXITED, State.BACKOFF, State.FATAL, State.STOPPING, State.STOPPED}
    ),
    State.BACKOFF: frozenset({State.STARTING, State.FATAL, State.STOPPING, State.STOPPED}),
    # STOPPING -> EXITED, BACKOFF, FATAL: a stop because the liveness probe failed ends
    # like an exit (left so, restarted, or too many in a row).
    State.STOPPING: frozenset(
        {State.STOPPED, State.STARTING, State.EXITED, State.BACKOFF, State.FATAL}
    ),
    State.EXITED: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
    State.FATAL: frozenset({State.STARTING, State.STOPPING, State.STOPPED}),
}


class _RecordField(Generic[T]):
    """A Program attribute shown in its status record: setting it drops the kept record
    (Program._record_changed), so the next status answer shows the new value."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}"

    @overload
    def __get__(self, program: None, owner: type) -> _RecordField[T]: ...

    @overload
    def __get__(self, program: Program, owner: type) -> T: ...

    def __get__(self, program: Program | None, owner: type) -> T | _RecordField[T]:
        if program is None:
            return self
        value: T = getattr(program, self._slot)
        return value

    def __set__(self, program: Program, value: T) -> None:
        setattr(program, self._slot, value)
        program._record_changed()


class Program:
    """One configured program and its running instance (at most one).

    Raises OperationFailed from start/stop/restart when the goal is not reached, and
    IllegalTransition when the daemon tries a state move outside TRANSITIONS (a bug).
    """

    def __init__(
        self,
        spec: ProgramSpec,
        state_dir: Path,
        records: PidRecords,
        scanner: Scanner,
        http: Callable[[], aiohttp.ClientSession],
        on_transition: Callable[[str, State, State, str], None],
        host: Host | None = None,
        watch: EmptyWatch | None = None,
        on_probe_failed: Callable[[str, str, str], None] | None = None,
        intents: IntentRecords | None = None,
        tree_usage: TreeUsage | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.state = State.STOPPED
        self.instance = None
        self.restarts = 0
        self.quick_exits = 0
        self.last_exit = None
        self.lock = asyncio.Lock()
        self._state_dir = state_dir
        self._records = records
        self._scanner = scanner
        self._http = http
        self._on_transition = on_transition
        self._on_probe_failed = on_probe_failed
        self._timer: asyncio.TimerHandle | None = None
        # The instance a stop-all's first pass has signalled (signal_stop_ahead), and
        # whether the rest of its cgroup has had the signal too (mark_stopping).
        self._signalled: Instance | None = None
        self._members_signalled = False
        # The record between its changes (record_base), and as JSON (record_json); None
        # once it changed. RecordsJson reads cached_json to tell whether a record moved.
        self.cached_record: RecordBase | None = None
        self.cached_json: RecordJson | None = None
        self._restart_pending = False
        self._background = Tasks(log)
        self._not_ready_reason = "waiting"
        self._abort_start: asyncio.Event | None = None
        self.liveness = Liveness(self.name, self._on_probe, self._on_liveness_failed)
        self.intent = Intent()
        # What the caller wants, kept for the next daemon of this boot (None: memory only).
        self._intents = intents
        # SPEC section 9: with a cgroup the tree is its members; else the process table.
        self.host = host or Host(Layout.NONE, why="not configured")
        self.watch = watch or EmptyWatch()
        self.cgroup: ProgramCgroup | None = (
            self.host.open(spec.name) if self.host.usable else None
        )
        # The next main, waiting in the other cgroup slot (standby.py).
        self.standbys: Standbys | None = (
            Standbys(self.name, self.host.open(spec.name + SECOND_SLOT), self.watch)
            if self.cgroup is not None
            else None
        )
        self.oom_kills = 0
        self._oom_seen = OomReading(None)
        self._usage: tuple[float, Usage] | None = None
        # Without a cgroup, the figures summed over the tree by the supervisor's sampler.
        self._tree_usage = tree_usage

    # ---- the one place where state changes ------------------------------------------------

    def _set_state(self, new: State, reason: str = "") -> None:
        old = self.state
        if old == new:
            return
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{self.name}: {old} -> {new} ({reason})")
        self.state = new
        self._record_changed()
        pid = self.instance.pid if self.instance else None
        level = logging.WARNING if new in (State.FATAL, State.BACKOFF) else logging.INFO
        log.log(
            level,
            "%s: %s -> %s%s%s",
            self.name,
            old,
            new,
            f" (pid {pid})" if pid else "",
            f": {reason}" if reason else "",
            extra={"PROGRAM": self.name},
        )
        if new == State.RUNNING:
            self._follow_liveness()
        elif old == State.RUNNING:
            self.liveness.stop()
        self._on_transition(self.name, old, new, reason)

    # ---- what others read -----------------------------------------------------------------

    def info(self) -> ProcessInfo:
        spec = self.spec
        inst = self.instance
        if inst is not None and not inst.exited.done():
            pid: int | None = inst.pid
            created: float | None = create_time(inst.handle.starttime)
            # Milliseconds, truncated (round(x, 3) costs more than the rest of this line).
            uptime: float | None = int((time.monotonic() - inst.started_mono) * 1000) / 1000
            started_at: float | None = inst.started_at
        else:
            pid = created = uptime = started_at = None
        last_exit = self.last_exit
        return ProcessInfo(
            name=self.name,
            role=spec.role,
            operable=bool(spec.operable),
            state=self.state,
            pid=pid,
            create_time=created,
            uptime=uptime,
            restarts=self.restarts,
            last_exit=last_exit.as_dict() if last_exit else None,
            ports=list(spec.ports),
            command=list(spec.command),
            started_at=started_at,
            user=spec.user or _current_user(),
            log_files=[str(spec.stdout_log), str(spec.stderr_log)],
            liveness=self.liveness.as_dict() if spec.liveness else None,
            cgroup=self.cgroup.path if self.cgroup is not None else None,
            limits=self.host.enforcement(self.limits),
            oom_kills=self.oom_kills,
            **self._usage_fields(),
        )

    def start_under_way(self) -> bool:
        """Whether a start is trying now (spawning, or waiting for readiness): its state
        may still be the one before it (STOPPED, EXITED) while its process runs."""
        return self._abort_start is not None

    def logs_kept(self) -> bool:
        """Whether the program runs an instance this daemon started (not adopted), whose
        output therefore goes through this daemon's log keeper (output.open_streams),
        which rotates the files itself."""
        inst = self.instance
        return inst is not None and inst.popen is not None and not inst.exited.done()

    def _record_changed(self) -> None:
        self.cached_record = None
        self.cached_json = None

    # The record's fields kept on the program besides the state: setting one drops the
    # kept record, whether or not a state change follows at once.
    instance: _RecordField[Instance | None] = _RecordField()  # running (or last) copy
    restarts: _RecordField[int] = _RecordField()  # since the daemon started the program
    last_exit: _RecordField[ExitInfo | None] = _RecordField()
    oom_kills: _RecordField[int] = _RecordField()  # processes the OOM killer ended

    def record_base(self) -> RecordBase:
        """info().as_dict() and the main's start, kept between the record's changes: only
        the uptime and the usage move in between.

        Every other field changes with the state, with a field kept on the program
        (instance, restarts, last_exit, oom_kills: their setters), with a liveness probe's
        outcome, or with the spec on reload; each of these drops what is kept."""
        base = self.cached_record
        if base is None or base.spec is not self.spec:
            inst = self.instance
            started = inst.started_mono if inst is not None and not inst.exited.done() else None
            base = self.cached_record = RecordBase(self.spec, started, self.info().as_dict())
        return base

    def record(self, now: float | None = None) -> dict[str, Any]:
        """info().as_dict() from record_base() with the uptime and usage as at `now`
        (time.monotonic(), when the caller asks for many at once)."""
        base = self.record_base()
        now = time.monotonic() if now is None else now
        record = base.fields.copy()
        if base.started is not None:
            record["uptime"] = uptime(now, base.started)
        usage = self.usage(now)
        record["cpu_seconds"] = None if usage.cpu_seconds is None else round(usage.cpu_seconds, 3)
        record["memory_bytes"] = usage.memory_bytes
        return record

    def record_json(self, now: float, fresh: bool = False) -> RecordJson:
        """record() as JSON around its uptime (records_json.py), kept until the record
        changes or its usage is read again. `now`: time.monotonic(); `fresh`: read the
        usage now even when the last reading is not USAGE_TTL old."""
        base = self.record_base()
        cached = self.cached_json
        if base.started is None:
            # No process when the record was made: no usage until the next change.
            if cached is None or cached.base is not base:
                cached = encode_record(base, Usage(None, None), now, math.inf)
        else:
            usage = self.usage(now, max_age=0.0 if fresh else USAGE_TTL)
            assert self._usage is not None
            read_at = self._usage[0]
            if cached is None or cached.base is not base or cached.read_at != read_at:
                cached = encode_record(base, usage, read_at, read_at + USAGE_TTL)
        self.cached_json = cached
        return cached

    @property
    def limits(self) -> Limits:
        """The spec's resource limits (SPEC section 9)."""
        return limits_of(self.spec)

    def usage(self, now: float | None = None, max_age: float = USAGE_TTL) -> Usage:
        """CPU seconds and memory bytes: the cgroup's counters when the program has one,
        else the process tree's, summed by the sampler (treeusage.py; never a /proc read
        here); None where there is neither, and when the program has no process (stopped,
        exited: nothing is in use, and a stop-all's answer reads no cgroup file). Read
        again once the last reading is `max_age` s old (`now`: time.monotonic(), when the
        caller has it)."""
        now = time.monotonic() if now is None else now
        inst = self.instance
        if inst is None or inst.exited.done():
            self._usage = (now, Usage(None, None))
            return self._usage[1]
        if self._usage is not None and now - self._usage[0] < max_age:
            return self._usage[1]
        if self.cgroup is not None and self.cgroup.membership.exists():
            usage = self.cgroup.usage()
        elif self._tree_usage is not None:
            usage = self._tree_usage.usage(inst)
        else:
            usage = Usage(None, None)
        self._usage = (now, usage)
        return usage

    def _usage_fields(self) -> dict[str, Any]:
        usage = self.usage()
        cpu = None if usage.cpu_seconds is None else round(usage.cpu_seconds, 3)
        return {"cpu_seconds": cpu, "memory_bytes": usage.memory_bytes}

    def alive(self) -> bool:
        return self.instance is not None and not self.instance.exited.done()

    # ---- commands -------------------------------------------------------------------------

    # Operator intent (intent.py): each command records what the caller wants before it
    # waits for the lock; every start re-checks it when its turn comes.

    async def start(self) -> ProcessInfo:
        """A caller's start: RUNNING, or OperationFailed (CANCELLED_BY_STOP when a stop was
        requested while it waited or ran)."""
        since = self.intent.start_requested()
        forgotten = self._forget_left_so()
        log.debug("%s: start requested", self.name, extra={"PROGRAM": self.name})
        async with self.lock:
            info = await self._contained("start", self._start_locked(since))
        await forgotten
        return info

    def _interrupt_start(self) -> None:
        """A stop must not wait out a start that may never become ready."""
        if self._abort_start is not None:
            self._abort_start.set()

    def signal_stop_ahead(self) -> bool:
        """A stop-all's first pass (Supervisor.stop_all): records the stop's intent and
        sends the stop signal to the main (its pidfd), and nothing else, so that every
        program's main has its signal before any program's bookkeeping (without a cgroup:
        the main's process group). Only for a RUNNING program with no operation in
        progress; True when it signalled.
        mark_stopping() must follow before the event loop runs again, and stop() then
        waits for the end without signalling twice."""
        inst = self.instance
        if self.lock.locked() or self.state != State.RUNNING or inst is None or (
            inst.exited.done()
        ):
            return False
        if self.cgroup is not None and not self.cgroup.membership.exists():
            return False
        self.intent.stop_requested()  # before the signal: the exit it causes is a stop's
        self._cancel_timer()
        self._restart_pending = False
        # SIGCONT (for a stopped main) follows in mark_stopping: one syscall per program
        # here, where every program waits for the others' signals. Without a cgroup the
        # main's process group has it (the rest of the tree, from /proc, in the stop).
        if self.cgroup is not None:
            tree.signal_main(inst, self.spec.signal_number, cont=False)
        else:
            tree.signal_group(inst, self.spec.signal_number, cont=False)
        self._signalled = inst
        self._members_signalled = False
        return True

    def mark_stopping(self) -> None:
        """The second pass after signal_stop_ahead: SIGCONT to the main, the signal to the
        cgroup's other members, then the STOPPING state (logged, an event). Raises nothing: when the
        members cannot be listed (CgroupError, logged) the stop signals them itself."""
        inst = self._signalled
        if inst is None or self.state != State.RUNNING:
            return
        if self.cgroup is None:
            tree.signal_group(inst, signal.SIGCONT, cont=False)  # a stopped group sees it
            self._set_state(State.STOPPING, f"sending SIG{self.spec.stop_signal}")
            return
        if not inst.exited.done():
            inst.handle.send(signal.SIGCONT)  # a stopped main sees its signal now
        try:
            tree.signal_cgroup(inst, self.cgroup, self.spec.signal_number, main_done=True)
            self._members_signalled = True
        except CgroupError as exc:
            log.error("%s: %s", self.name, exc, extra={"PROGRAM": self.name})
        # The main has its signal either way: its exit is the stop's.
        self._set_state(State.STOPPING, f"sending SIG{self.spec.stop_signal}")

    async def stop(self, remember: bool = True) -> ProcessInfo:
        """A caller's stop, served at once whatever is queued: the start in progress is
        interrupted and each queued start ends as cancelled when its turn comes. With
        `remember` (a caller's stop) the next daemon of this boot leaves it stopped too;
        the daemon's own stops (shutdown, a program gone from the config) pass False."""
        self.intent.stop_requested()
        recorded = (
            self._intents.save_soon(self.name, "STOPPED", "stopped on request")
            if remember and self._intents is not None
            else None
        )
        log.debug("%s: stop requested", self.name, extra={"PROGRAM": self.name})
        self._cancel_timer()
        self._restart_pending = False
        self._interrupt_start()
        async with self.lock:
            await self._contained("stop", self._stop_locked())
            if self.standbys is not None and not remember:
                # The daemon's own stops (shutdown, a program gone from the config) end
                # it; a caller's stop keeps it for the start that follows (start-all
                # after stop-all: the restart task).
                self.standbys.discard()
            info = self.info()
        if recorded is not None:
            await recorded  # answered only once the next daemon would see it
        return info

    async def restart(self) -> ProcessInfo:
        self.intent.stop_requested()
        since = self.intent.start_requested()
        forgotten = self._forget_left_so()
        log.debug("%s: restart requested", self.name, extra={"PROGRAM": self.name})
        self._interrupt_start()
        async with self.lock:
            await self._contained("restart", self._stop_locked())
            info = await self._contained("restart", self._start_locked(since))
        await forgotten
        return info

    def _forget_left_so(self) -> asyncio.Future[None]:
        """A start or restart removes the record (intent_records.py); done once on disk."""
        if self._intents is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._intents.remove_soon(self.name)

    def _remember_exit(self, reason: str) -> None:
        """An exit left so (autorestart) stays so for the next daemon of this boot."""
        if self._intents is not None:
            self._intents.save_soon(self.name, "EXITED", reason)

    def left_so(self, record: IntentRecord) -> None:
        """At boot, before anything is started: the program stays as a caller or its exit
        left it under the daemon before (intent_records.py). STOPPED: desired STOPPED, so
        no start of the daemon's own goes ahead; EXITED: the state EXITED, as it was."""
        when = datetime.fromtimestamp(record.at, UTC).isoformat(timespec="seconds")
        if record.state == "STOPPED":
            self.intent.stop_requested()
            log.info(
                "%s: left stopped, as requested at %s before the daemon restarted",
                self.name, when, extra={"PROGRAM": self.name},
            )
            return
        self.last_exit = ExitInfo(None, None, record.at, record.reason)
        self._set_state(State.EXITED, f"left exited at {when} before the daemon restarted")

    async def start_planned(self, since: int) -> ProcessInfo:
        """The daemon's own start (boot, reload), requested at ticket `since`."""
        log.debug("%s: planned start requested", self.name, extra={"PROGRAM": self.name})
        async with self.lock:
            return await self._contained("start", self._start_locked(since))

    async def restart_planned(self, since: int) -> ProcessInfo:
        """A reload's restart of a changed program, requested at ticket `since`: nothing
        happens if a caller stopped the program after that."""
        log.debug("%s: planned restart requested", self.name, extra={"PROGRAM": self.name})
        async with self.lock:
            if self.intent.overridden(since):
                raise OperationFailed(self.name, CANCELLED_BY_STOP)
            await self._contained("restart", self._stop_locked())
            return await self._contained("restart", self._start_locked(since))

    async def _contained(self, verb: str, operation: Awaitable[T]) -> T:
        """Runs one operation; an unexpected exception becomes this program's failure
        (OperationFailed), logged with its traceback, instead of escaping to the daemon."""
        try:
            return await operation
        except (OperationFailed, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("%s: %s failed unexpectedly", self.name, verb,
                          extra={"PROGRAM": self.name})
            raise OperationFailed(self.name, f"{verb} failed: internal error: {exc!r}") from exc

    async def send_signal(self, signum: int) -> ProcessInfo:
        """Sends signum to the running instance's tree (SPEC section 12); OperationFailed
        when the program is not running. The state machine does not move: an exit the
        signal causes is seen and handled as any other exit."""
        inst = self.instance
        if self.state != State.RUNNING or inst is None or inst.exited.done():
            raise OperationFailed(self.name, f"not running (state {self.state})")
        if self.cgroup is not None and self.cgroup.membership.exists():
            # The tree is the cgroup's members (the main is one of them).
            reached = len(self.cgroup.signal_all(signum)) or int(inst.handle.send(signum))
        else:
            reached = await tree.signal_tree(inst, self._scanner, signum)
        if reached == 0:
            raise OperationFailed(self.name, "not running (its process is gone)")
        log.info("%s: sent %s to its process tree (pid %d)", self.name,
                 signal.Signals(signum).name, inst.pid, extra={"PROGRAM": self.name})
        return self.info()

    async def verify(self) -> VerifyResult:
        results: list[Check] = []
        inst = self.instance
        alive = inst is not None and not inst.exited.done() and inst.handle.alive()
        results.append(Check("state", self.state == State.RUNNING, f"state is {self.state}"))
        results.append(
            Check(
                "process",
                alive,
                f"pid {inst.pid} is alive" if alive and inst else "no live process",
            )
        )
        if self.spec.ports:
            missing = (
                await probes.missing_ports(inst.pid, inst.run_id, self.spec.ports)
                if alive and inst
                else list(self.spec.ports)
            )
            for port in self.spec.ports:
                ok = port not in missing
                results.append(Check(f"port {port}", ok, "listening" if ok else "not listening"))
        if self.spec.health_url:
            why = (
                await probes.health_ok(self._http(), self.spec.health_url)
                if alive
                else "not running"
            )
            results.append(
                Check("health", why is None, why or f"{self.spec.health_url} answered 2xx")
            )
        if self.spec.liveness:
            probe = probes.liveness_probe(self.spec, self._http)
            result = await probe() if alive else None
            results.append(
                Check("liveness", result.ok, result.detail)
                if result
                else Check("liveness", False, "not running")
            )
        return VerifyResult(ok=all(c.ok for c in results), checks=results)

    # ---- adoption ---------------------------------------------------------------------------

    def adopt(self, record: PidRecord) -> bool:
        """Takes over a process an earlier daemon started, if it is still exactly that one:
        the recorded pid and start time, and (with a cgroup) a member of the program's
        cgroup; a program may rewrite its title and environment (SPEC section 3)."""
        if self.cgroup is not None:
            handle = pin(record.pid, record.starttime)
            if handle is not None and not self._in_a_slot(record.pid):
                handle.close()
                handle = None
        else:
            handle = pin(record.pid, record.starttime, record.cmdline)
        if handle is None:
            self._records.remove(self.name)
            return False
        started_mono = time.monotonic() - max(0.0, time.time() - record.started_at)
        self.instance = Instance(
            handle, record.cmdline, record.run_id, record.started_at, started_mono, popen=None
        )
        self.restarts = record.restarts
        self.apply_limits()  # the config may have changed while no daemon ran
        self._watch(self.instance)
        if self.cgroup is None and self._tree_usage is not None:
            self._tree_usage.note_started()
        self._set_state(State.RUNNING, f"adopted pid {record.pid}")
        return True

    def _in_a_slot(self, pid: int) -> bool:
        """Whether pid is in one of the program's cgroup slots; the one it is in becomes
        the current slot (the other the spare)."""
        assert self.cgroup is not None
        if self.cgroup.contains(pid):
            return True
        if self.standbys is not None and self.standbys.spare.contains(pid):
            self.cgroup, self.standbys.spare = self.standbys.spare, self.cgroup
            return True
        return False

    def adopt_unrecorded(self, entry: ProcEntry, run_id: str) -> bool:
        """Takes over a marked process for which no readable record exists."""
        cmdline = read_cmdline(entry.pid)
        if cmdline is None or spawn.is_held(cmdline):
            return False  # gone, or an earlier daemon's standby: a stray, not a main
        record = PidRecord(
            self.name,
            entry.pid,
            entry.starttime,
            cmdline,
            run_id,
            self.spec.fingerprint(),
            create_time(entry.starttime),
            self.restarts,
        )
        if not self.adopt(record):
            return False
        self._records.save(record)
        return True

    def release(self) -> None:
        """Stops watching without touching the process (handover to the next daemon)."""
        self.liveness.stop()
        self._cancel_timer()
        self._restart_pending = False
        self._background.cancel()
        if self.standbys is not None:
            self.standbys.discard()
        if self.instance is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.instance.handle.pidfd)
            self.instance.handle.close()

    def discard_record(self) -> None:
        self._records.remove(self.name)

    def replace_spec(self, spec: ProgramSpec) -> None:
        """Reload without a restart: spec applies from now on; liveness probing follows it at
        once (starts, changes or stops) while the program runs."""
        before = self.spec.liveness
        self.spec = spec
        self._record_changed()
        if self.standbys is not None:
            self.standbys.discard()  # made from the old spec (limits included)
            if self.state == State.RUNNING:
                self._prepare_standby()
        if spec.liveness != before and self.state == State.RUNNING:
            self._follow_liveness()

    # ---- liveness (SPEC section 10) ---------------------------------------------------------

    def _follow_liveness(self) -> None:
        """Probes while RUNNING when the spec asks for it; nothing at all otherwise."""
        if self.spec.liveness is None:
            self.liveness.stop()
        else:
            self.liveness.start(self.spec.liveness, probes.liveness_probe(self.spec, self._http))

    def _on_probe(self, result: ProbeResult) -> None:
        self._record_changed()  # the status record shows the last probe
        check = self.spec.liveness
        if not result.ok and check is not None and self._on_probe_failed is not None:
            if check.http_get:
                probe = f"http_get {check.http_get}"
            elif check.tcp_connect:
                probe = f"tcp_connect {check.tcp_connect}"
            else:
                probe = "exec " + " ".join(check.exec or [])
            self._on_probe_failed(self.name, probe, result.detail)

    def _on_liveness_failed(self, detail: str, was_healthy: bool) -> None:
        inst = self.instance
        if inst is not None and self.state == State.RUNNING:
            self._spawn_background(self._restart_unhealthy(inst, detail, was_healthy))

    async def _restart_unhealthy(self, inst: Instance, detail: str, was_healthy: bool) -> None:
        """Stops a program that failed its liveness probe (stop_signal, then SIGKILL), then
        restarts it like an exit: at once after a good probe, else as a quick exit (backoff,
        FATAL after max_quick_exits). autorestart = "never" leaves it EXITED."""
        async with self.lock:
            if self.instance is not inst or self.state != State.RUNNING:
                return  # a command or an exit came first: it decided
            reason = f"liveness failed: {detail}"
            self._set_state(State.STOPPING, f"{reason}; sending SIG{self.spec.stop_signal}")
            await self._terminate(inst)
            ended = inst.exited.result() if inst.exited.done() else None
            self.last_exit = ExitInfo(
                ended.code if ended else None, ended.signal if ended else None, time.time(), reason
            )
            self._records.remove(self.name)
            if self.spec.autorestart == "never":
                self._remember_exit(reason)
                self._set_state(State.EXITED, reason)
                return
            since = ticket()
            if not was_healthy:
                self._after_failed_start(reason, since)
                return
            self.quick_exits = 0
            self._restart_pending = True
            self._set_state(State.BACKOFF, f"{reason}; restarting now")
        await self._auto_start(since)

    # ---- internals: starting ----------------------------------------------------------------

    async def _start_locked(self, since: int) -> ProcessInfo:
        if self.intent.overridden(since):
            raise OperationFailed(self.name, CANCELLED_BY_STOP)
        self._cancel_timer()
        self._restart_pending = False
        if self.alive() and self.state == State.RUNNING:
            return self.info()
        if self.alive():
            # A live process in any other state is not trusted to become ready: replace it.
            await self._stop_locked()
        self.quick_exits = 0
        try:
            reason = await self._attempt(since)
        except StartAborted:
            raise OperationFailed(self.name, StartAborted.REASON) from None
        if reason is None:
            return self.info()
        self._after_failed_start(reason, since)
        raise OperationFailed(self.name, reason)

    async def _spawn_or_why(self, since: int) -> Instance | str:
        """Spawns the program (its standby when there is one), or says why not: a host
        problem (naming the key), too few descriptors, the cgroup, or the spawn's own
        error (naming the file it concerns). Raises StartAborted when a stop came after
        `since` while the cgroup was prepared."""
        problems = hostcheck.program_problems(self.spec)
        if problems:
            return "; ".join(str(problem) for problem in problems)
        standby = self._take_standby()
        if standby is not None:
            return standby
        why = await self._prepare_cgroup_or_why()
        if self.intent.overridden(since):
            raise StartAborted
        if why is not None:
            return why
        # Spawns waiting for their cgroup move hold descriptors too (spawn.in_flight), and
        # other programs' standbys give theirs up before a start fails for want of them.
        need = descriptors.SPAWN_COST + spawn.IN_FLIGHT_COST * spawn.in_flight()
        short = descriptors.shortfall(need)
        if short and make_room(self.standbys):
            short = descriptors.shortfall(need)
        if short:
            # Its log keeper's pipes go too: a program that cannot start must not keep
            # descriptors that another program's start needs (after a stop-all, each
            # start-all would otherwise leave fewer programs running than the last).
            output.close_streams(self.name, self._state_dir)
            return short
        try:
            return await self._spawn()
        except spawn.SpawnRefused as exc:
            return str(exc)
        except OSError as exc:
            what = exc.filename if exc.filename is not None else self.spec.command[0]
            return f"cannot spawn {self.spec.command[0]}: {what}: {exc.strerror or exc}"
        except Exception as exc:
            log.exception("%s: spawn failed unexpectedly", self.name, extra={"PROGRAM": self.name})
            return f"cannot spawn {self.spec.command[0]}: internal error: {exc!r}"

    async def _attempt(self, since: int) -> str | None:
        """One try at STARTING -> RUNNING on behalf of the request at ticket `since`. None
        on success, else why it failed.

        Raises StartAborted when a stop came after `since` (the instance, if any, is ended).
        """
        if self.intent.overridden(since):
            raise StartAborted
        abort = self._abort_start = asyncio.Event()
        try:
            inst = await self._spawn_or_why(since)
        except StartAborted:
            self._abort_start = None
            raise
        if isinstance(inst, str):
            self._abort_start = None
            self.last_exit = ExitInfo(None, None, time.time(), inst)
            self._set_state(State.STARTING, "spawning")
            return inst
        self.instance = inst
        # The process runs (a standby's GO is one write); its bookkeeping (state, log
        # line, event, readiness wait) costs more. Yielding here, programs started
        # together (start-all, a restart task) are each released before any does its
        # bookkeeping: the last runs a release, not a whole start, per program after the
        # first. An exit meanwhile is seen below, as in STARTING; a stop waits for the
        # lock and interrupts the start as usual.
        await asyncio.sleep(0)
        self._set_state(State.STARTING, f"spawned pid {inst.pid}")
        waiter = asyncio.ensure_future(self._wait_ready(inst))
        aborted = asyncio.ensure_future(abort.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, inst.exited, aborted},
                timeout=self.spec.start_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            self._abort_start = None
            for pending in (waiter, aborted):
                if not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pending
        if waiter in done and waiter.exception() is not None:
            error = waiter.exception()
            log.error("%s: readiness check failed unexpectedly", self.name,
                      exc_info=error, extra={"PROGRAM": self.name})
            await self._terminate(inst)
            return f"readiness check failed: internal error: {error!r}"
        if abort.is_set() and not inst.exited.done() and waiter not in done:
            await self._terminate(inst)
            raise StartAborted
        if inst.exited.done():
            info = inst.exited.result()
            self.last_exit = info
            return f"exited during start: {info.reason}"
        if waiter in done:
            self._set_state(State.RUNNING, "ready")
            self._prepare_standby()
            return None
        why = self._not_ready_reason
        await self._terminate(inst)
        return f"not ready within start_timeout {self.spec.start_timeout:g}s ({why})"

    async def _wait_ready(self, inst: Instance) -> None:
        """Returns once the ports listen and the health URL answers 2xx (spec.start_seconds
        first); self._not_ready_reason says what is still missing."""
        if self.spec.start_seconds > 0:
            await asyncio.sleep(self.spec.start_seconds)
        if not self.spec.ports and not self.spec.health_url:
            return
        delay = 0.01
        while True:
            missing = []
            if self.spec.ports:
                missing = await probes.missing_ports(inst.pid, inst.run_id, self.spec.ports)
            if missing:
                self._not_ready_reason = f"port(s) {missing} not listening"
            elif self.spec.health_url:
                why = await probes.health_ok(self._http(), self.spec.health_url)
                if why is None:
                    return
                self._not_ready_reason = why
            else:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _prepare_cgroup_or_why(self) -> str | None:
        """_prepare_cgroup, or why it failed."""
        try:
            await self._prepare_cgroup()
        except (CgroupError, OperationFailed) as exc:
            why = exc.strerror if isinstance(exc, CgroupError) else exc.reason
            return f"cannot prepare the cgroup: {why}"
        return None

    async def _prepare_cgroup(self) -> None:
        """Makes the cgroup with the spec's limits; what is still in it (left by an
        instance an earlier daemon ran) is ended first, so it holds one instance only."""
        cgroup = self.cgroup
        if cgroup is None:
            return
        if cgroup.membership.exists() and cgroup.populated():
            log.warning(
                "%s: ending %d process(es) left in %s before starting",
                self.name,
                len(cgroup.members()),
                cgroup.path,
                extra={"PROGRAM": self.name},
            )
            await tree.end_cgroup(
                self.name, cgroup, self.watch, self.spec.signal_number, self.spec.stop_timeout
            )
        cgroup.create(self.limits)
        self._oom_seen = cgroup.oom_reading()

    def apply_limits(self) -> None:
        """Writes the spec's limits to the live cgroup (a reload that changed only them)."""
        if self.standbys is not None and self.standbys.waiting is not None:
            self.standbys.discard()  # its slot has the old limits
            if self.state == State.RUNNING:
                self._prepare_standby()
        if self.cgroup is not None and self.cgroup.membership.exists():
            try:
                self.cgroup.apply(self.limits)
            except CgroupError as exc:
                log.error("%s: cannot apply limits: %s", self.name, exc)

    def remove_cgroup(self) -> None:
        """Removes the (empty) cgroup: the program is stopped and leaves the config or
        the daemon shuts down."""
        if self.standbys is not None:
            self.standbys.discard()
            self.standbys.spare.remove()
        if self.cgroup is not None:
            self.cgroup.remove()

    async def _spawn(self) -> Instance:
        spec = self.spec
        run_id = uuid.uuid4().hex
        with spawn.counted():
            popen = spawn.start_process(
                spec, self._state_dir, run_id, held=self.cgroup is not None
            )
            REAPER.claim(popen.pid)
            try:
                if self.cgroup is not None:
                    await spawn.finish_in_thread(spawn.release_into, popen, self.cgroup)
                handle = spawn.pin(popen)
            except BaseException:
                spawn.end_child(popen)
                REAPER.release(popen.pid)
                raise
        return self._begin(popen, handle, run_id)

    def _take_standby(self) -> Instance | None:
        """The program's standby, released into the program, as the new instance (the
        cgroup slots swap: standby.py); None when there is none fit to use."""
        if self.standbys is None or self.cgroup is None:
            return None
        standby = self.standbys.take(self.spec, self._state_dir, self.cgroup)
        if standby is None:
            return None
        self.cgroup = standby.cgroup
        self._oom_seen = self.cgroup.oom_reading()
        return self._begin(standby.popen, standby.handle, standby.run_id)

    def _prepare_standby(self) -> None:
        """Makes the next standby in the background (standby.py), with cgroups only."""
        if self.standbys is not None and self.standbys.waiting is None:
            self._spawn_background(
                self.standbys.prepare(
                    self.spec,
                    self._state_dir,
                    uuid.uuid4().hex,
                    self.limits,
                    lambda: self.state == State.RUNNING,
                )
            )

    def _drop_standby(self) -> None:
        """Ends the standby of a program left EXITED or FATAL: none waits for it."""
        if self.standbys is not None:
            self.standbys.discard()

    def _begin(self, popen: subprocess.Popen[bytes], handle: Handle, run_id: str) -> Instance:
        """The instance of a main just released: recorded (pid record) and watched."""
        spec = self.spec
        # What was started, for people (spawn may exec it through a shell that holds it
        # until it is in its cgroup or sets its descriptor limit, whose argv a read this
        # early could still show).
        cmdline = list(spec.command)
        now = time.time()
        inst = Instance(handle, cmdline, run_id, now, time.monotonic(), popen)
        self._records.save(
            PidRecord(
                self.name,
                popen.pid,
                handle.starttime,
                cmdline,
                run_id,
                spec.fingerprint(),
                now,
                self.restarts,
            )
        )
        self._watch(inst)
        if self.cgroup is None and self._tree_usage is not None:
            self._tree_usage.note_started()
        return inst

    # ---- internals: exits -------------------------------------------------------------------

    def _watch(self, inst: Instance) -> None:
        asyncio.get_running_loop().add_reader(inst.handle.pidfd, self._on_exit, inst)

    def _on_exit(self, inst: Instance) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(inst.handle.pidfd)
        if inst.exited.done():
            return
        code: int | None = None
        signame: str | None = None
        ending = self.state != State.STOPPING and self.instance is inst
        if inst.popen is not None and ending:
            # Still a zombie: its pid, and so its process group id, cannot be reused yet.
            # Whatever it left in its group goes with it, so no orphan outlives the program.
            with contextlib.suppress(OSError):
                os.killpg(inst.pid, signal.SIGKILL)
        if ending and self.cgroup is not None:
            # Every exit ends the whole tree, in STARTING too: all that is left in the
            # cgroup (setsid grandchildren included) dies with the main.
            try:
                self.cgroup.kill()
            except CgroupError as exc:
                log.error("%s: %s", self.name, exc, extra={"PROGRAM": self.name})
        if inst.popen is not None:
            rc = inst.popen.poll()
            REAPER.release(inst.pid)
            if rc is not None and rc < 0:
                signame = _signal_name(-rc)
            else:
                code = rc
            reason = f"killed by {signame}" if signame else f"exit code {code}"
        else:
            reason = "exited (adopted, exit status unknown)"
        reason = self._oom_reason(signame) or reason
        inst.handle.close()
        info = ExitInfo(code, signame, time.time(), reason)
        inst.exited.set_result(info)
        if ending and self.cgroup is None:
            self._sweep_later(inst)
        if self.state == State.RUNNING and self.instance is inst:
            self._on_unexpected_exit(inst, info)

    def _oom_reason(self, signame: str | None) -> str | None:
        """The exit's reason when the OOM killer ended it (counted), else None. Where the
        kernel keeps no OOM count the verdict is an inference and says so (SPEC 9)."""
        oom = self._count_oom_kills(signame == "SIGKILL")
        if not oom.count or signame != "SIGKILL":
            return None
        limit = self.spec.memory_max
        notes = [f"memory_max {format_bytes(limit)}"] if limit is not None else []
        if not oom.exact:
            notes.append(oom.evidence)
        text = "killed by the OOM killer" if oom.exact else (
            "killed by SIGKILL, likely by the OOM killer"
        )
        return text + (f" ({'; '.join(notes)})" if notes else "")

    def _count_oom_kills(self, sigkilled: bool) -> OomNews:
        """OOM kills in the cgroup since the last look (added to self.oom_kills); inferred
        where the kernel keeps no count (cgroups.oom_news)."""
        if self.cgroup is None:
            return OomNews(0)
        seen = self.cgroup.oom_reading()
        news = oom_news(self._oom_seen, seen, sigkilled)
        self._oom_seen = seen
        self.oom_kills += news.count
        return news

    def _on_unexpected_exit(self, inst: Instance, info: ExitInfo) -> None:
        self.last_exit = info
        spec = self.spec
        wanted = spec.autorestart == "always" or (spec.autorestart == "on-failure" and info.failed)
        if not wanted:
            self._records.remove(self.name)
            self._remember_exit(info.reason)
            self._set_state(State.EXITED, info.reason)
            self._drop_standby()
            return
        ran = time.monotonic() - inst.started_mono
        if ran < max(spec.start_seconds, QUICK_EXIT_FLOOR):
            self._after_failed_start(f"{info.reason} after {ran:.2f}s", ticket())
            return
        # It will be started again (at once: it had run long enough), so BACKOFF, not
        # EXITED, which means "exited and left so".
        self.quick_exits = 0
        self._restart_pending = True
        self._set_state(State.BACKOFF, f"{info.reason}; restarting now")
        self._spawn_background(self._auto_start(ticket()))

    def _after_failed_start(self, reason: str, since: int) -> None:
        self.quick_exits += 1
        self._records.remove(self.name)
        if self.quick_exits >= self.spec.max_quick_exits:
            self._set_state(State.FATAL, f"{reason}; {self.quick_exits} quick exits in a row")
            self._drop_standby()
            return
        delay = min(self.spec.backoff_initial * 2 ** (self.quick_exits - 1), self.spec.backoff_max)
        self._restart_pending = True
        self._set_state(State.BACKOFF, f"{reason}; next try in {delay:g}s")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            delay, lambda: self._spawn_background(self._auto_start(since))
        )

    async def _auto_start(self, since: int) -> None:
        """An automatic restart (after an exit or a failed start) on behalf of the request
        at ticket `since`: a stop requested after that cancels it."""
        async with self.lock:
            self._timer = None
            if not self._restart_pending or self.intent.overridden(since):
                return  # a command acted in the meantime
            self._restart_pending = False
            self.restarts += 1
            try:
                reason = await self._attempt(since)
            except StartAborted:
                return
            if reason is not None:
                self._after_failed_start(reason, since)

    def _spawn_background(self, coro: Any) -> None:
        self._background.spawn(coro, name=f"{self.name}-background")

    def _sweep_later(self, inst: Instance) -> None:
        """After an exit (without a cgroup), ends what is left of that instance's tree."""
        self._spawn_background(tree.sweep(self.name, inst, self._scanner))

    # ---- internals: stopping ----------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _stop_locked(self) -> None:
        self._cancel_timer()
        self._restart_pending = False
        inst = self.instance
        signalled = inst is not None and self._signalled is inst
        # After stop-all's passes (STOPPING) the whole cgroup may have had the signal.
        ahead = signalled and self._members_signalled and self.state == State.STOPPING
        self._signalled = None
        if inst is not None and self.cgroup is None and signalled and (
            self.state == State.STOPPING
        ):
            # No cgroup, after stop-all's passes: the group has had the signal; the rest
            # of the tree gets it now, and all of it stop_timeout to end, main or not.
            await self._terminate(inst, signalled=True)
            if inst.exited.done():
                self._stopped_by_request(inst)
            self._records.remove(self.name)
            self._set_state(State.STOPPED, "stopped")
            return
        if inst is None or inst.exited.done():
            # The main is gone, but what it started may not be (a daemonizing program).
            await self._end_leftovers(inst, ahead)
            if signalled and inst is not None:
                self._stopped_by_request(inst)  # it ended at stop-all's signal
            self._records.remove(self.name)
            self._set_state(State.STOPPED, "stopped")
            return
        if self.cgroup is not None and self.cgroup.membership.exists():
            if not ahead:
                # The signal first, the bookkeeping after: no exit callback runs between.
                tree.signal_cgroup(
                    inst, self.cgroup, self.spec.signal_number, main_done=signalled
                )
                self._set_state(State.STOPPING, f"sending SIG{self.spec.stop_signal}")
            await self._terminate(inst, signalled=True)
        else:
            self._set_state(State.STOPPING, f"sending SIG{self.spec.stop_signal}")
            await self._terminate(inst)
        if inst.exited.done():
            self._stopped_by_request(inst)
        self._records.remove(self.name)
        self._set_state(State.STOPPED, "stopped")

    def _stopped_by_request(self, inst: Instance) -> None:
        """The last exit is the stop's: an older crash shown beside STOPPED misleads."""
        ended = inst.exited.result()
        self.last_exit = ExitInfo(
            ended.code, ended.signal, ended.at, f"stopped on request ({ended.reason})"
        )

    async def _terminate(self, inst: Instance, signalled: bool = False) -> None:
        """Ends inst's tree (tree.terminate_cgroup, else tree.terminate); `signalled`:
        its cgroup (without one: its process group) has had the stop signal already."""
        if self.cgroup is not None and self.cgroup.membership.exists():
            await tree.terminate_cgroup(
                self.name,
                inst,
                self.cgroup,
                self.watch,
                self.spec.signal_number,
                self.spec.stop_timeout,
                signalled,
            )
            return
        await tree.terminate(
            self.name, inst, self._scanner, self.spec.signal_number, self.spec.stop_timeout,
            signalled,
        )

    async def _end_leftovers(self, inst: Instance | None, signalled: bool = False) -> None:
        """Ends what is left of a program whose main has exited: the cgroup's members, or
        (without one) the last instance's tree from the process table. `signalled`: the
        cgroup's members have had the stop signal (stop-all's first pass)."""
        if self.cgroup is not None:
            if self.cgroup.membership.exists() and self.cgroup.populated():
                await tree.end_cgroup(
                    self.name,
                    self.cgroup,
                    self.watch,
                    self.spec.signal_number,
                    self.spec.stop_timeout,
                    signalled,
                )
        elif inst is not None:
            await tree.sweep(self.name, inst, self._scanner)

    async def end_cgroup_strays(self) -> None:
        """Ends what is in the program's cgroup slots outside its watched instance and its
        standby (left by an instance that died while no daemon ran, or a standby of an
        earlier daemon): stop_signal, stop_timeout, then the kill."""
        if self.cgroup is None:
            return
        slots = [] if self.alive() else [self.cgroup]
        if self.standbys is not None and not self.standbys.busy:
            slots.append(self.standbys.spare)
        for slot in slots:
            if slot.membership.exists() and slot.populated():
                log.warning(
                    "%s: ending %s left in %s by an instance no daemon watched",
                    self.name,
                    slot.members(),
                    slot.path,
                    extra={"PROGRAM": self.name},
                )
                await tree.end_cgroup(
                    self.name, slot, self.watch, self.spec.signal_number,
                    self.spec.stop_timeout,
                )

    async def end_strays(self, strays: list[ProcEntry]) -> None:
        """Ends processes of this program that no watched instance owns (tree.end_strays)."""
        await tree.end_strays(strays, self.spec.signal_number, self.spec.stop_timeout)


def limits_of(spec: ProgramSpec) -> Limits:
    """A program spec's resource limits (SPEC section 9) for the cgroup layer."""
    return Limits(spec.cpu_quota, spec.memory_max, spec.memory_high, spec.pids_max)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@functools.cache
def _current_user() -> str:
    # Cached: every status answer asks once per program, and each getpwuid reads
    # /etc/passwd (a quarter of the daemon's time for GET /api/v1/processes at N=50).
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


__all__ = ["Check", "OperationFailed", "ProcessInfo", "Program", "State", "VerifyResult"]
