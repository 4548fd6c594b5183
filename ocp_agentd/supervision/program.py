"""One program's state machine: spawn, watch, stop, adopt.

Every state change goes through Program._set_state. Commands (start, stop, restart) and
automatic restarts take the program's lock, so operations on one program never overlap.
Exits are seen through a pidfd registered with the event loop: the moment the process
ends, whether the daemon spawned it or adopted it from an earlier daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import checks, output
from ocp_agentd.supervision.identity import (
    Handle,
    PidRecord,
    PidRecords,
    create_time,
    pin,
    read_cmdline,
)
from ocp_agentd.supervision.proctable import (
    MARK_PROGRAM,
    MARK_RUN_ID,
    MARK_STATE_DIR,
    ProcEntry,
    Scanner,
    read_stat,
    take_snapshot,
)

log = logging.getLogger("ocp_agentd.program")

# Variables of the daemon's own service manager that a child must not inherit.
_PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "OCP_AGENTD_CONFIG",
)
KILL_GRACE = 5.0  # how long SIGKILLed processes get to vanish before a stop is reported failed
START_ABORTED = "start interrupted by a stop"
QUICK_EXIT_FLOOR = 1.0  # an exit sooner than this after spawn counts as a quick exit


class State(StrEnum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


class OperationFailed(Exception):
    def __init__(self, program: str, reason: str) -> None:
        super().__init__(f"{program}: {reason}")
        self.program = program
        self.reason = reason


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerifyResult:
    ok: bool
    checks: list[Check]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}


@dataclass
class ProcessInfo:
    name: str
    role: str
    operable: bool
    state: State
    pid: int | None
    create_time: float | None
    uptime: float | None
    restarts: int
    last_exit: dict[str, Any] | None
    ports: list[int]
    command: list[str]
    started_at: float | None
    user: str
    log_files: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "operable": self.operable,
            "state": str(self.state),
            "pid": self.pid,
            "create_time": self.create_time,
            "uptime": self.uptime,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "ports": self.ports,
            "command": self.command,
            "started_at": self.started_at,
            "user": self.user,
            "log_files": self.log_files,
        }


@dataclass
class ExitInfo:
    code: int | None
    signal: str | None
    at: float
    reason: str

    @property
    def failed(self) -> bool:
        return self.code != 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "signal": self.signal,
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
            "reason": self.reason,
        }


@dataclass
class Instance:
    """A running copy of the program: the main process, pinned by its pidfd."""

    handle: Handle
    cmdline: list[str]
    run_id: str
    started_at: float
    started_mono: float
    popen: subprocess.Popen[bytes] | None  # None when adopted from an earlier daemon
    exited: asyncio.Future[ExitInfo] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def pid(self) -> int:
        return self.handle.pid


class Program:
    def __init__(
        self,
        spec: ProgramSpec,
        state_dir: Path,
        records: PidRecords,
        scanner: Scanner,
        http: Callable[[], aiohttp.ClientSession],
        on_transition: Callable[[str, State, State], None],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.state = State.STOPPED
        self.instance: Instance | None = None
        self.restarts = 0
        self.quick_exits = 0
        self.last_exit: ExitInfo | None = None
        self.lock = asyncio.Lock()
        self._state_dir = state_dir
        self._records = records
        self._scanner = scanner
        self._http = http
        self._on_transition = on_transition
        self._timer: asyncio.TimerHandle | None = None
        # record()'s dict between state changes: (spec, started_mono or None, dict).
        self._record_cache: tuple[Any, float | None, dict[str, Any]] | None = None
        self._restart_pending = False
        self._background: set[asyncio.Task[Any]] = set()
        self._not_ready_reason = "waiting"
        self._abort_start: asyncio.Event | None = None

    # ---- the one place where state changes ------------------------------------------------

    def _set_state(self, new: State, reason: str = "") -> None:
        old = self.state
        if old == new:
            return
        self.state = new
        self._record_cache = None
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
        self._on_transition(self.name, old, new)

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
        )

    def record(self) -> dict[str, Any]:
        """info().as_dict(), kept between state changes: only the uptime moves.

        Every field but the uptime changes together with the state (a restart count or
        last exit is always followed by a transition), or with the spec on reload.
        """
        cached = self._record_cache
        if cached is None or cached[0] is not self.spec:
            inst = self.instance
            started = inst.started_mono if inst is not None and not inst.exited.done() else None
            cached = self._record_cache = (self.spec, started, self.info().as_dict())
        record = dict(cached[2])
        if cached[1] is not None:
            record["uptime"] = int((time.monotonic() - cached[1]) * 1000) / 1000
        return record

    def alive(self) -> bool:
        return self.instance is not None and not self.instance.exited.done()

    # ---- commands -------------------------------------------------------------------------

    async def start(self) -> ProcessInfo:
        async with self.lock:
            return await self._start_locked()

    def _interrupt_start(self) -> None:
        """A stop must not wait out a start that may never become ready."""
        if self._abort_start is not None:
            self._abort_start.set()

    async def stop(self) -> ProcessInfo:
        self._interrupt_start()
        async with self.lock:
            await self._stop_locked()
            return self.info()

    async def restart(self) -> ProcessInfo:
        self._interrupt_start()
        async with self.lock:
            await self._stop_locked()
            return await self._start_locked()

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
            listening = await self._tree_ports() if alive else set()
            for port in self.spec.ports:
                ok = port in listening
                results.append(Check(f"port {port}", ok, "listening" if ok else "not listening"))
        if self.spec.health_url:
            why = (
                await checks.health_ok(self._http(), self.spec.health_url)
                if alive
                else "not running"
            )
            results.append(
                Check("health", why is None, why or f"{self.spec.health_url} answered 2xx")
            )
        return VerifyResult(ok=all(c.ok for c in results), checks=results)

    # ---- adoption ---------------------------------------------------------------------------

    def adopt(self, record: PidRecord) -> bool:
        """Takes over a process an earlier daemon started, if it is still exactly that one."""
        handle = pin(record.pid, record.starttime, record.cmdline)
        if handle is None:
            self._records.remove(self.name)
            return False
        started_mono = time.monotonic() - max(0.0, time.time() - record.started_at)
        self.instance = Instance(
            handle, record.cmdline, record.run_id, record.started_at, started_mono, popen=None
        )
        self.restarts = record.restarts
        self._watch(self.instance)
        self._set_state(State.RUNNING, f"adopted pid {record.pid}")
        return True

    def adopt_unrecorded(self, entry: ProcEntry, run_id: str) -> bool:
        """Takes over a marked process for which no readable record exists."""
        cmdline = read_cmdline(entry.pid)
        if cmdline is None:
            return False
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
        self._cancel_timer()
        self._restart_pending = False
        for task in list(self._background):
            task.cancel()
        if self.instance is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.instance.handle.pidfd)
            self.instance.handle.close()

    def discard_record(self) -> None:
        self._records.remove(self.name)

    # ---- internals: starting ----------------------------------------------------------------

    async def _start_locked(self) -> ProcessInfo:
        self._cancel_timer()
        self._restart_pending = False
        if self.alive() and self.state == State.RUNNING:
            return self.info()
        if self.alive():
            # A live process in any other state is not trusted to become ready: replace it.
            await self._stop_locked()
        self.quick_exits = 0
        reason = await self._attempt()
        if reason is None:
            return self.info()
        if reason != START_ABORTED:
            self._after_failed_start(reason)
        raise OperationFailed(self.name, reason)

    async def _attempt(self) -> str | None:
        """One try at STARTING -> RUNNING. None on success, else why it failed."""
        try:
            inst = self._spawn()
        except OSError as exc:
            reason = f"cannot spawn {self.spec.command[0]}: {exc.strerror or exc}"
            self.last_exit = ExitInfo(None, None, time.time(), reason)
            self._set_state(State.STARTING, "spawning")
            return reason
        self.instance = inst
        self._set_state(State.STARTING, f"spawned pid {inst.pid}")
        waiter = asyncio.ensure_future(self._wait_ready(inst))
        abort = self._abort_start = asyncio.Event()
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
        if abort.is_set() and not inst.exited.done() and waiter not in done:
            await self._terminate(inst)
            return START_ABORTED
        if inst.exited.done():
            info = inst.exited.result()
            self.last_exit = info
            return f"exited during start: {info.reason}"
        if waiter in done:
            self._set_state(State.RUNNING, "ready")
            return None
        why = self._not_ready_reason
        await self._terminate(inst)
        return f"not ready within start_timeout {self.spec.start_timeout:g}s ({why})"

    async def _wait_ready(self, inst: Instance) -> None:
        if self.spec.start_seconds > 0:
            await asyncio.sleep(self.spec.start_seconds)
        if not self.spec.ports and not self.spec.health_url:
            return
        delay = 0.01
        while True:
            missing = []
            if self.spec.ports:
                listening = await self._tree_ports()
                missing = [p for p in self.spec.ports if p not in listening]
            if missing:
                self._not_ready_reason = f"port(s) {missing} not listening"
            elif self.spec.health_url:
                why = await checks.health_ok(self._http(), self.spec.health_url)
                if why is None:
                    return
                self._not_ready_reason = why
            else:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _tree_ports(self) -> set[int]:
        inst = self.instance
        if inst is None:
            return set()
        return await asyncio.to_thread(_ports_of_tree, inst.pid, inst.run_id)

    def _spawn(self) -> Instance:
        spec = self.spec
        run_id = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        env.update(spec.env)
        env[MARK_PROGRAM] = self.name
        env[MARK_STATE_DIR] = str(self._state_dir)
        env[MARK_RUN_ID] = run_id
        kwargs: dict[str, Any] = {}
        if spec.user:
            account = pwd.getpwnam(spec.user)
            kwargs.update(
                user=account.pw_uid,
                group=account.pw_gid,
                extra_groups=os.getgrouplist(spec.user, account.pw_gid),
            )
            env.update(HOME=account.pw_dir, USER=spec.user, LOGNAME=spec.user)
        assert spec.stdout_log is not None and spec.stderr_log is not None
        out = output.open_log(spec.stdout_log)
        err = out if spec.stderr_log == spec.stdout_log else output.open_log(spec.stderr_log)
        try:
            popen = subprocess.Popen(
                spec.command,
                cwd=spec.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                close_fds=True,
                **kwargs,
            )
        finally:
            os.close(out)
            if err != out:
                os.close(err)
        entry = read_stat(popen.pid)
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            # Unwatchable (out of file descriptors): better no process than a lost one.
            popen.kill()
            popen.wait()
            raise
        handle = Handle(popen.pid, entry.starttime if entry else 0, pidfd)
        cmdline = read_cmdline(popen.pid) or list(spec.command)
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
        if inst.popen is not None and self.state != State.STOPPING:
            # Still a zombie: its pid, and so its process group id, cannot be reused yet.
            # Whatever it left in its group goes with it, so no orphan outlives the program.
            with contextlib.suppress(OSError):
                os.killpg(inst.pid, signal.SIGKILL)
        if inst.popen is not None:
            rc = inst.popen.poll()
            if rc is not None and rc < 0:
                signame = _signal_name(-rc)
            else:
                code = rc
            reason = f"killed by {signame}" if signame else f"exit code {code}"
        else:
            reason = "exited (adopted, exit status unknown)"
        inst.handle.close()
        info = ExitInfo(code, signame, time.time(), reason)
        inst.exited.set_result(info)
        if self.state == State.RUNNING and self.instance is inst:
            self._on_unexpected_exit(inst, info)

    def _on_unexpected_exit(self, inst: Instance, info: ExitInfo) -> None:
        self.last_exit = info
        self._sweep_later(inst)
        spec = self.spec
        wanted = spec.autorestart == "always" or (spec.autorestart == "on-failure" and info.failed)
        if not wanted:
            self._records.remove(self.name)
            self._set_state(State.EXITED, info.reason)
            return
        ran = time.monotonic() - inst.started_mono
        if ran < max(spec.start_seconds, QUICK_EXIT_FLOOR):
            self._set_state(State.EXITED, info.reason)
            self._after_failed_start(f"{info.reason} after {ran:.2f}s")
            return
        self.quick_exits = 0
        self._restart_pending = True
        self._set_state(State.EXITED, info.reason)
        self._spawn_background(self._auto_start())

    def _after_failed_start(self, reason: str) -> None:
        self.quick_exits += 1
        self._records.remove(self.name)
        if self.quick_exits >= self.spec.max_quick_exits:
            self._set_state(State.FATAL, f"{reason}; {self.quick_exits} quick exits in a row")
            return
        delay = min(self.spec.backoff_initial * 2 ** (self.quick_exits - 1), self.spec.backoff_max)
        self._restart_pending = True
        self._set_state(State.BACKOFF, f"{reason}; next try in {delay:g}s")
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, lambda: self._spawn_background(self._auto_start()))

    async def _auto_start(self) -> None:
        async with self.lock:
            self._timer = None
            if not self._restart_pending:
                return  # a command acted in the meantime
            self._restart_pending = False
            self.restarts += 1
            reason = await self._attempt()
            if reason is not None and reason != START_ABORTED:
                self._after_failed_start(reason)

    def _spawn_background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _sweep_later(self, inst: Instance) -> None:
        """After an unexpected exit, ends what is left of that instance's tree."""

        async def sweep() -> None:
            snap = await self._scanner.snapshot()
            members = snap.tree(inst.pid, inst.run_id)
            if members:
                log.warning(
                    "%s: ending %d leftover process(es) of pid %d: %s",
                    self.name,
                    len(members),
                    inst.pid,
                    [m.pid for m in members],
                    extra={"PROGRAM": self.name},
                )
                await self._end_processes(members, signal.SIGKILL, KILL_GRACE)

        self._spawn_background(sweep())

    # ---- internals: stopping ----------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _stop_locked(self) -> None:
        self._cancel_timer()
        self._restart_pending = False
        inst = self.instance
        if inst is None or inst.exited.done():
            self._records.remove(self.name)
            self._set_state(State.STOPPED, "stopped")
            return
        self._set_state(State.STOPPING, f"sending SIG{self.spec.stop_signal}")
        await self._terminate(inst)
        self._records.remove(self.name)
        self._set_state(State.STOPPED, "stopped")

    async def _terminate(self, inst: Instance) -> None:
        """stop_signal to the group and the tree, stop_timeout, then SIGKILL to what is left."""
        snap = await self._scanner.snapshot()
        members = snap.tree(inst.pid, inst.run_id)
        handles = _pin_all(members, skip=inst.pid)
        signum = self.spec.signal_number
        if not inst.exited.done():
            with contextlib.suppress(OSError):
                os.killpg(inst.pid, signum)
                os.killpg(inst.pid, signal.SIGCONT)  # a stopped process must see the signal
            inst.handle.send(signum)
            inst.handle.send(signal.SIGCONT)
        for handle in handles:
            handle.send(signum)
            handle.send(signal.SIGCONT)
        gone = await _wait_gone(inst, handles, self.spec.stop_timeout)
        if not gone:
            snap = await self._scanner.snapshot()
            handles += _pin_all(
                snap.tree(inst.pid, inst.run_id), skip=inst.pid, known={h.pid for h in handles}
            )
            left = [h.pid for h in handles if h.alive()]
            log.warning(
                "%s: still running after %gs, sending SIGKILL to %s",
                self.name,
                self.spec.stop_timeout,
                left or [inst.pid],
                extra={"PROGRAM": self.name},
            )
            if not inst.exited.done():
                with contextlib.suppress(OSError):
                    os.killpg(inst.pid, signal.SIGKILL)
                inst.handle.send(signal.SIGKILL)
            for handle in handles:
                handle.send(signal.SIGKILL)
            gone = await _wait_gone(inst, handles, KILL_GRACE)
        for handle in handles:
            handle.close()
        if not gone:
            raise OperationFailed(self.name, "processes survived SIGKILL")
        # Late children forked while stopping are found by their run marker.
        snap = await self._scanner.snapshot()
        late = snap.tree(inst.pid, inst.run_id)
        if late:
            await self._end_processes(late, signal.SIGKILL, KILL_GRACE)

    async def _end_processes(self, members: list[ProcEntry], signum: int, grace: float) -> None:
        handles = _pin_all(members)
        for handle in handles:
            handle.send(signum)
        await _wait_handles(handles, grace)
        for handle in handles:
            handle.close()

    async def end_strays(self, strays: list[ProcEntry]) -> None:
        """Ends processes of this program that no watched instance owns. What is left of an
        instance whose main died is killed at once (as after an unexpected exit); a second
        live instance gets stop_signal first and SIGKILL after stop_timeout."""
        if any(entry.pgid == entry.pid for entry in strays):
            await self._end_processes(strays, self.spec.signal_number, self.spec.stop_timeout)
        await self._end_processes(strays, signal.SIGKILL, KILL_GRACE)


def _pin_all(
    members: list[ProcEntry], skip: int = 0, known: set[int] | None = None
) -> list[Handle]:
    handles = []
    for member in members:
        if member.pid == skip or (known and member.pid in known):
            continue
        handle = pin(member.pid, member.starttime)
        if handle is not None:
            handles.append(handle)
    return handles


async def _wait_handles(handles: list[Handle], timeout: float) -> bool:
    """Waits until every pinned process has exited (its pidfd turns readable)."""
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


async def _wait_gone(inst: Instance, handles: list[Handle], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    if not inst.exited.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(inst.exited), timeout)
        if not inst.exited.done():
            return False
    return await _wait_handles(handles, max(0.0, deadline - time.monotonic()))


def _ports_of_tree(pid: int, run_id: str) -> set[int]:
    # Readiness polls often: descendants and group suffice, the marker scan is not needed.
    pids = [e.pid for e in take_snapshot(with_markers=False).tree(pid, run_id)] or [pid]
    return checks.listening_ports(pids)


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
