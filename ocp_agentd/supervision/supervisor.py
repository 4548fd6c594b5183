"""The set of programs: boot (adopt or start), start_all, stop_all, reload, lookup."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp

from ocp_agentd.config import ProgramSpec, Settings
from ocp_agentd.events import EventHub
from ocp_agentd.repeats import Once
from ocp_agentd.supervision import cgroups, output, tree
from ocp_agentd.supervision.intent import CANCELLED_BY_STOP, ticket
from ocp_agentd.supervision.intent_records import IntentRecords
from ocp_agentd.supervision.logwatch import LogWatch
from ocp_agentd.supervision.pid_records import PidRecords
from ocp_agentd.supervision.proctable import ProcEntry, Scanner, Snapshot
from ocp_agentd.supervision.program import (
    OperationFailed,
    ProcessInfo,
    Program,
    State,
    VerifyResult,
)
from ocp_agentd.supervision.records_json import RecordsJson
from ocp_agentd.supervision.standby import SECOND_SLOT
from ocp_agentd.supervision.subreaper import REAPER
from ocp_agentd.supervision.treeusage import TreeUsage
from ocp_agentd.supervision.types import Instance

log = logging.getLogger("ocp_agentd.supervisor")
T = TypeVar("T")
Listener = Callable[[str, State, State], None]


@dataclass
class BootPlan:
    start: list[str]
    restart: list[str]
    # Adopted, but stopped on request before the daemon restarted (the stop was cut short).
    stop: list[str] = field(default_factory=list)


class ProgramNotFound(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no program named {self.name!r}"


class Supervisor:
    """The programs of one config. ``events`` receives every state change (with its
    reason) and is where the other parts of supervision publish (e.g. probe failures:
    ``supervisor.events.probe_failed(name, probe, reason)``)."""

    def __init__(self, settings: Settings, events: EventHub | None = None) -> None:
        self.settings = settings
        self.events = events if events is not None else EventHub()
        self.state_dir = settings.agent.state_dir
        self.records = PidRecords(self.state_dir / "pids")
        self.intents = IntentRecords(self.state_dir / "intent")
        self.scanner = Scanner()
        # Raises CgroupError for cgroup = "required" on a host without usable cgroups.
        self.host = cgroups.choose(settings.agent.cgroup, self.state_dir)
        self.watch = cgroups.EmptyWatch()
        # Usage and lineage of the programs without a cgroup (SPEC section 9), sampled.
        self.tree_usage = TreeUsage(self.scanner, self._bare_instances)
        self._listeners: list[Listener] = []
        self._http: aiohttp.ClientSession | None = None
        self.programs: dict[str, Program] = {}
        self._records_json = RecordsJson()
        # Housekeeping meets a planted FIFO or a missing user every pass: said once.
        self._rotate_problems = Once(log)
        # Which log files changed since housekeeping looked; its on_change is called when
        # one did, or a reload may have named new ones (the daemon schedules a round).
        self.log_watch = LogWatch()
        for spec in _ordered(settings.programs.values()):
            self.programs[spec.name] = self._make(spec)

    # ---- wiring -----------------------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        self._listeners.append(callback)

    def _notify(self, name: str, old: State, new: State, reason: str) -> None:
        self.events.state_changed(name, old, new, reason)
        for callback in self._listeners:
            try:
                callback(name, old, new)
            except Exception:  # a listener must never break a transition
                log.exception("state listener failed")

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    def _make(self, spec: ProgramSpec) -> Program:
        program = Program(
            spec,
            self.state_dir,
            self.records,
            self.scanner,
            self._session,
            self._notify,
            self.host,
            self.watch,
            self.events.probe_failed,
            self.intents,
            self.tree_usage,
        )
        for key, how in program.info().limits.items():
            if how.startswith("not enforced"):
                log.warning("%s: %s %s", spec.name, key, how)
        return program

    # ---- lookup -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.programs)

    def workers(self) -> list[str]:
        return [name for name, p in self.programs.items() if p.spec.is_worker]

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise ProgramNotFound(name) from None

    def info(self, name: str) -> ProcessInfo:
        return self.program(name).info()

    def infos(self) -> list[ProcessInfo]:
        return [p.info() for p in self.programs.values()]

    def process_records(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every program's info as the JSON values of SPEC section 6, uptimes as at `now`
        (time.monotonic())."""
        now = time.monotonic() if now is None else now
        return [p.record(now) for p in self.programs.values()]

    def process_records_json(self, now: float | None = None) -> bytes:
        """process_records() encoded as one JSON array (UTF-8), the status answers' hot
        path: each record is encoded when it changes, not at every answer
        (records_json.py)."""
        now = time.monotonic() if now is None else now
        return self._records_json.encode(self.programs.values(), now)

    def _bare_instances(self) -> list[Instance]:
        """The live instances of programs without a cgroup (their trees come from /proc)."""
        return [
            p.instance for p in self.programs.values()
            if p.cgroup is None and p.instance is not None and p.alive()
        ]

    def counts(self) -> dict[str, int]:
        counted = Counter(str(p.state) for p in self.programs.values())
        return {str(state): counted.get(str(state), 0) for state in State}

    # ---- commands ---------------------------------------------------------------------------

    async def start(self, name: str, timeout: float | None = None) -> ProcessInfo:
        return await _within(self.program(name).start(), timeout, name, "start")

    async def stop(self, name: str, timeout: float | None = None) -> ProcessInfo:
        return await _within(self.program(name).stop(), timeout, name, "stop")

    async def restart(self, name: str, timeout: float | None = None) -> ProcessInfo:
        return await _within(self.program(name).restart(), timeout, name, "restart")

    async def verify(self, name: str) -> VerifyResult:
        return await self.program(name).verify()

    async def signal(self, name: str, signum: int) -> ProcessInfo:
        """signum to the program's process tree; OperationFailed when it is not running."""
        return await self.program(name).send_signal(signum)

    async def start_all(
        self, timeout: float | None = None
    ) -> dict[str, ProcessInfo | OperationFailed]:
        return await self._each(self.workers(), lambda n: self.start(n, timeout))

    async def stop_all(
        self, timeout: float | None = None
    ) -> dict[str, ProcessInfo | OperationFailed]:
        """Stops every worker; then ends the orphans no running program owns.

        The stop signals go out in one pass before any program's bookkeeping (its state
        change, log line, event and records), so the last program is signalled within
        microseconds per program of the first, as a single loop over kill(2) would."""
        names = self.workers()
        signalled = [p for p in (self.programs[n] for n in names) if p.signal_stop_ahead()]
        if signalled:
            # The signalled programs now want a CPU to exit on, and what follows here is
            # bookkeeping: let them have this one first (sched_yield(2); under CFS and
            # EEVDF it puts the caller behind the runnable tasks of its CPU for once).
            os.sched_yield()
        for program in signalled:
            program.mark_stopping()
        results = await self._each(names, lambda n: self.stop(n, timeout))
        await self._end_orphans()
        return results

    async def _end_orphans(self) -> None:
        """Ends the orphans the daemon inherited that belong to no running program (a
        setsid grandchild without its environment escapes the process table's trees;
        SPEC section 9, "where no cgroup can be had"). None are looked for while every
        descendant of the daemon ran in a program cgroup (Reaper.note_uncontained): its
        program's stop emptied that cgroup."""
        def running() -> list[tuple[Instance, cgroups.ProgramCgroup | None]]:
            return [
                (p.instance, p.cgroup) for p in self.programs.values()
                if p.instance is not None and p.alive()
            ]

        if not REAPER.uncontained:
            return
        try:
            await tree.end_orphans(self.scanner, running)
        except OSError as exc:
            # The programs' own stops are done; a look that fails (out of descriptors)
            # must not fail them. The next stop-all or shutdown looks again.
            log.error("cannot look for orphaned processes now: %s", exc)

    async def verify_all(self) -> dict[str, VerifyResult]:
        names = self.names()
        results = await asyncio.gather(*(self.verify(n) for n in names))
        return dict(zip(names, results, strict=True))

    async def _each(
        self, names: list[str], action: Callable[[str], Awaitable[ProcessInfo]]
    ) -> dict[str, ProcessInfo | OperationFailed]:
        results = await asyncio.gather(*(action(n) for n in names), return_exceptions=True)
        out: dict[str, ProcessInfo | OperationFailed] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, OperationFailed | ProcessInfo):
                out[name] = result
            elif isinstance(result, BaseException):
                log.error("%s: %s", name, result, exc_info=result)
                out[name] = OperationFailed(name, f"internal error: {result!r}")
        return out

    # ---- life cycle ---------------------------------------------------------------------------

    async def adopt(self) -> BootPlan:
        """Takes over what still runs (quick: nothing is started here)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        REAPER.install()
        self.tree_usage.start()
        snap = await self.scanner.snapshot()
        plan = BootPlan([], [], [])
        for name, program in self.programs.items():
            left = self.intents.load(name)
            spec_fingerprint = program.spec.fingerprint()
            record = self.records.load(name)
            adopted = record is not None and program.adopt(record)
            if not adopted:
                adopted = self._adopt_by_marker(snap, name, program)
            await self._end_strays(snap, name, program)
            if left is not None and (left.state == "STOPPED" or not adopted):
                # Operator intent wins (SPEC section 12): stopped on request, or an exit
                # autorestart left so, stays so under the next daemon of this boot.
                program.left_so(left)
                if adopted:
                    plan.stop.append(name)
            elif adopted and record is not None and record.fingerprint != spec_fingerprint:
                plan.restart.append(name)
            elif not adopted:
                plan.start.append(name)
            if left is not None and left.state == "EXITED" and adopted:
                self.intents.remove(name)  # it runs: the record is older than its start
        await self._stop_unknown()
        return plan

    def _adopt_by_marker(self, snap: Snapshot, name: str, program: Program) -> bool:
        """Adopts a marked main process of name when no usable pid record names one."""
        adopted = False
        for entry in snap.marked_mains(str(self.state_dir), name):
            marker = snap.markers[entry.pid]
            if not program.alive() and program.adopt_unrecorded(entry, marker.run_id):
                adopted = True
                log.warning(
                    "%s: adopted pid %d found by its marker (no usable record)", name, entry.pid
                )
        return adopted

    async def _end_strays(self, snap: Snapshot, name: str, program: Program) -> None:
        """Ends what of name runs outside its adopted instance, in the table or its cgroup."""
        strays = self._strays(snap, name, program)
        if strays:
            log.warning(
                "%s: ending %d process(es) of no watched instance (left by an instance "
                "that died unwatched, or a second instance): %s",
                name,
                len(strays),
                [e.pid for e in strays],
            )
            await program.end_strays(strays)
        await program.end_cgroup_strays()

    async def start_pending(self, plan: BootPlan, since: int | None = None) -> None:
        """Starts what was not adopted; restarts what was adopted with an older config.
        Requested at ticket `since` (default: now): a caller's stop after it wins."""
        since = ticket() if since is None else since
        await asyncio.gather(
            *(self._quietly(n, "start", since) for n in plan.start),
            *(self._quietly(n, "restart", since) for n in plan.restart),
            *(self._finish_stop(n) for n in plan.stop),
        )

    async def _finish_stop(self, name: str) -> None:
        """Ends a stop requested of the daemon before, which it did not live to finish."""
        program = self.programs.get(name)
        if program is None or program.intent.desired != "STOPPED":
            return  # removed by a reload, or started by a caller since
        log.info("%s: finishing the stop requested before the daemon restarted", name)
        try:
            await program.stop(remember=False)
        except OperationFailed as exc:
            log.error("%s", exc)

    def _strays(self, snap: Snapshot, name: str, program: Program) -> list[ProcEntry]:
        """Marked processes of this program outside the adopted instance's run."""
        keep = program.instance.run_id if program.alive() and program.instance else None
        return [entry for entry, mark in snap.marked(str(self.state_dir), name)
                if mark.run_id != keep]

    async def _stop_unknown(self) -> None:
        """Programs recorded by an earlier daemon but gone from the config are stopped,
        and so is whatever is left in the cgroup of a program gone from the config."""
        for name in self.records.names():
            if name not in self.programs:
                await self._stop_recorded_ghost(name)
        for name in self.intents.names():
            if name not in self.programs:
                self.intents.remove(name)
        for name in self._cgroup_names():
            if name not in self.programs:
                ghost = self._make(ProgramSpec(name=name, command=["/"]))
                await ghost.end_cgroup_strays()
                ghost.remove_cgroup()

    async def _stop_recorded_ghost(self, name: str) -> None:
        """Stops the recorded process of a program gone from the config; drops its record."""
        record = self.records.load(name)
        if record is None:
            return
        ghost = self._make(ProgramSpec(name=name, command=record.cmdline or ["/"]))
        if ghost.adopt(record):
            log.warning("%s: no longer configured, stopping pid %d", name, record.pid)
            try:
                await ghost.stop(remember=False)
            except OperationFailed as exc:
                log.error("%s", exc)
        ghost.discard_record()

    def _cgroup_names(self) -> list[str]:
        """The programs that have a cgroup of this daemon's instance on the host."""
        if not self.host.usable or self.host.membership is None:
            return []
        try:
            names = {p.name.removesuffix(SECOND_SLOT)
                     for p in self.host.membership.iterdir() if p.is_dir()}
        except OSError:
            return []
        return sorted(names)

    async def _quietly(self, name: str, verb: Literal["start", "restart"], since: int) -> None:
        """The daemon's own start or restart of name (boot, reload), requested at ticket
        `since`: a failure is the program's (its state and log), raised to no caller."""
        program = self.programs.get(name)
        if program is None:
            return  # removed by a later reload
        if verb == "restart":
            log.info("%s: configuration changed since it was started, restarting", name)
        try:
            await (
                program.restart_planned(since) if verb == "restart"
                else program.start_planned(since)
            )
        except OperationFailed as exc:
            if exc.reason == CANCELLED_BY_STOP:
                log.info("%s", exc)
            else:
                log.error("%s", exc)

    async def shutdown(self) -> None:
        """Stops every program: workers in parallel first, pos_proxy and the rest last."""
        first = self.workers()
        last = [n for n in self.names() if n not in first]
        for group in (first, last):
            # The daemon's own stop: what a caller stopped before stays recorded so.
            results = await self._each(group, lambda n: self.program(n).stop(remember=False))
            for result in results.values():
                if isinstance(result, OperationFailed):
                    log.error("%s", result)
        # Before the log keepers: an orphan may hold a program's output pipe open.
        await self._end_orphans()
        # The log keepers end with their programs' last writers (the daemon's copies of
        # the pipes, closed here, included): wait so that a stopped daemon leaves no
        # process of its own behind.
        output.close_all_streams()
        left = await asyncio.to_thread(output.wait_keepers, 10.0, self.state_dir)
        if left:
            log.warning("%d log keeper(s) still draining a program's output", left)
        for program in self.programs.values():
            program.remove_cgroup()
        await self.close()

    async def close(self) -> None:
        """Stops watching; the programs go on running for the next daemon to adopt."""
        for program in self.programs.values():
            program.release()
        output.close_all_streams()  # a running program keeps its keeper through its pipes
        if not await asyncio.to_thread(self.records.flush):
            log.error("pid records not all written within 10 s")
        await self.intents.flush()
        self.watch.close()
        self.log_watch.close()
        await self.tree_usage.stop()
        REAPER.uninstall()
        if self.host.usable:
            self.host.remove()  # only what is empty: running programs keep theirs
        if self._http is not None:
            await self._http.close()

    async def reload(self, settings: Settings, since: int | None = None) -> dict[str, list[str]]:
        """Starts added programs, stops removed ones, restarts changed ones. `since` is the
        ticket of the reload's request: a program a caller stopped after it stays stopped."""
        since = ticket() if since is None else since
        new_specs = {s.name: s for s in _ordered(settings.programs.values())}
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unchanged": []}
        removed = [n for n in self.programs if n not in new_specs]
        for name in removed:
            try:
                await self.program(name).stop(remember=False)
            except OperationFailed as exc:
                log.error("%s", exc)
            self.intents.remove_soon(name)
            gone = self.programs.pop(name)
            gone.release()
            gone.remove_cgroup()
            output.close_streams(name, self.state_dir)  # its log keeper ends with it
            report["removed"].append(name)
        restart: list[str] = []
        for name, spec in new_specs.items():
            current = self.programs.get(name)
            if current is None:
                self.programs[name] = self._make(spec)
                report["added"].append(name)
            elif current.spec != spec:
                needs_restart = current.spec.fingerprint() != spec.fingerprint()
                current.replace_spec(spec)
                current.apply_limits()
                report["changed"].append(name)
                # A start under way spawns from the spec it was given: its process may
                # run while the state still says STOPPED or EXITED.
                if (
                    needs_restart
                    and (current.state not in (State.STOPPED, State.EXITED)
                         or current.start_under_way())
                    and not current.intent.overridden(since)
                ):
                    restart.append(name)
            else:
                report["unchanged"].append(name)
        self.programs = {n: self.programs[n] for n in new_specs}
        self.settings = settings
        await asyncio.gather(
            *(self._quietly(n, "start", since) for n in report["added"]),
            *(self._quietly(n, "restart", since) for n in restart),
        )
        if self.log_watch.on_change is not None:
            self.log_watch.on_change()  # log paths may be new: housekeeping looks at them
        return report

    async def housekeep(self) -> bool:
        """Rotates program log files that grew past their limit; True when the next round
        is due in any case (a file that cannot be watched or has a standing problem),
        False when it need only come after ``log_watch.on_change``.

        A log keeper never lets its file pass the limit: this rotates files a program
        appends to itself (one an older daemon started and this one adopted, or a
        program on this daemon's keeper that also appends to its log by name, such as a
        wrapper's `exec >>log`: the keeper counts only the bytes it pumps). A kept log
        within its limit gets one stat. Only files that changed since the last look are
        looked at (logwatch.py): an idle host costs nothing.
        """
        logs = self._log_files()
        self._rotate_problems.forget_all_but(set(logs))
        self.log_watch.forget(set(logs))
        due = self.log_watch.to_look_at(logs)
        if not due:
            return False  # nothing to look at: no thread woken
        watches, troubled = await asyncio.to_thread(self._look_at_logs, due, logs)
        self.log_watch.armed(watches)
        self.log_watch.look_again(troubled)
        return bool(troubled) or any(wds is None for _, wds in watches)

    def _log_files(self) -> dict[Path, tuple[ProgramSpec, bool]]:
        """Each program log file: the spec of its program and whether it runs on this
        daemon's keeper (Program.logs_kept)."""
        logs: dict[Path, tuple[ProgramSpec, bool]] = {}
        for program in self.programs.values():
            spec = program.spec
            if spec.log_target != "file":
                continue
            kept = program.logs_kept()
            for path in (spec.stdout_log, spec.stderr_log):
                if path is not None and path not in logs:
                    logs[path] = (spec, kept)
        return logs

    def _look_at_logs(
        self, due: list[Path], logs: dict[Path, tuple[ProgramSpec, bool]]
    ) -> tuple[list[tuple[Path, tuple[int, ...] | None]], list[Path]]:
        """Housekeeping's look (a worker thread): each path armed, then rotated when past
        its limit. (path, watch descriptors or None) pairs, and the paths with a problem."""
        watches: list[tuple[Path, tuple[int, ...] | None]] = []
        troubled: list[Path] = []
        for path in due:
            spec, kept = logs[path]
            # Armed before the look: a write after it fires the watch.
            watches.append((path, self.log_watch.arm(path)))
            if kept and not _past(path, spec.log_max_bytes):
                self._rotate_problems.solved(path, f"rotating {path} again")
                continue
            try:
                uid, gid = output.owner_of(spec)
                rotated = output.rotate_if_needed(
                    path, spec.log_max_bytes, spec.log_backups, uid, gid
                )
            except (KeyError, OSError) as exc:
                self._rotate_problems.problem(path, f"cannot rotate {path}: {exc}")
                troubled.append(path)
                continue
            self._rotate_problems.solved(path, f"rotating {path} again")
            if rotated:  # a new live file: the watch above follows the old one
                watches.append((path, self.log_watch.arm(path)))
        return watches, troubled


def _past(path: Path, max_bytes: int) -> bool:
    """Whether the file at path (links followed: only a hint, rotate_if_needed looks
    safely) holds more than max_bytes; True when it cannot be told (a problem for
    rotate_if_needed to say)."""
    try:
        return max_bytes > 0 and os.stat(path).st_size > max_bytes
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _ordered(specs: Any) -> list[ProgramSpec]:
    specs = list(specs)
    return [s for s in specs if s.role == "pos_proxy"] + [s for s in specs if s.role != "pos_proxy"]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Takes the outcome of an operation whose caller may have stopped waiting: a failure
    then is the program's own (already in its state and log), never an unretrieved one."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None and not isinstance(error, OperationFailed | ProgramNotFound):
        log.error("operation failed unexpectedly: %r", error, exc_info=error)


async def _within(action: Awaitable[T], timeout: float | None, name: str, verb: str) -> T:
    # The operation itself is never cancelled half-way (a stop that sent SIGTERM must finish
    # its job); the caller only stops waiting for it.
    task = asyncio.ensure_future(action)
    task.add_done_callback(_retrieve)
    if timeout is None:
        return await task
    started = time.monotonic()
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout)
    except TimeoutError:
        raise OperationFailed(
            name,
            f"{verb} did not finish within {timeout:g}s "
            f"(gave up after {time.monotonic() - started:.1f}s)",
        ) from None
