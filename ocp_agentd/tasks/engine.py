"""The task engine: runs a task's subtasks as a DAG and keeps the store truthful.

The rules of the DAG (what may run, what a retry, skip or rollback changes, which status
moves are legal) are in dag.py; the engine applies them, runs each READY subtask under
its timeout and records what happened.

Every status move goes through one pair of methods: ``_set_status`` (a subtask) and
``_set_task_status`` check the move against dag's tables and hold it; ``_commit`` saves
the task with the moved subtasks in one transaction, then logs each move and gives it to
the listeners as a StatusChange (daemon wiring connects the metrics and the event hub
with ``add_listener``). Nothing is announced that the store does not hold.

A daemon that dies mid-task finds the task RUNNING in the store at the next start and
resumes it: a subtask that was RUNNING runs again (subtasks are idempotent), a CANCELING
one becomes FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocp_agentd.background import Tasks
from ocp_agentd.tasks import dag
from ocp_agentd.tasks.base import (
    OPERATION_RUNNING,
    ROLLBACK_PROHIBITED,
    TASK_NOT_FOUND,
    WRONG_STATE,
    Subtask,
    SubtaskFailed,
    TaskError,
    Template,
)
from ocp_agentd.tasks.model import (
    Operation,
    StatusChange,
    SubtaskInstance,
    SubtaskStatus,
    TaskInstance,
    TaskStatus,
    iso_now,
)
from ocp_agentd.tasks.store import LockHeld, Retention, TaskStore
from ocp_agentd.tasks.templates import TEMPLATES

Listener = Callable[[StatusChange], None]
ClientFactory = Callable[[int], Any]  # task id -> an async context manager giving the client
# A move made but not committed yet: (the subtask, or None for the task), old, new, why.
_Move = tuple[SubtaskInstance | None, TaskStatus | SubtaskStatus, TaskStatus | SubtaskStatus, str]
STORE_RETRY_SECONDS = 2.0  # after a failed state write, how often the store is tried again


@dataclass
class _Run:
    """The live state of one RUNNING task: its committed copy and its workers."""

    task: TaskInstance
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    workers: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    halted: bool = False  # a subtask failed during this run: start nothing new
    driver: asyncio.Task[None] | None = None


class _Context:
    """What a subtask sees while it runs (see base.SubtaskContext).

    It holds only what it needs: the task and subtask, the client, the deadline, the store
    (to save the context and take the host lock), the template's lock key and a function
    that writes one line to the subtask's log.
    """

    def __init__(
        self, task: TaskInstance, sub: SubtaskInstance, client: Any, deadline: float, *,
        store: TaskStore, lock_key: str | None, log: Callable[[str], None],
    ) -> None:
        self._task = task
        self._client = client
        self._deadline = deadline
        self._store = store
        self._lock_key = lock_key
        self.log = log
        self.task_id = task.id
        self.subtask_id = sub.id
        self.host_id = task.host_id

    @property
    def client(self) -> Any:
        return self._client

    @property
    def string_map(self) -> dict[str, str]:
        return self._task.string_map

    @property
    def list_map(self) -> dict[str, list[str]]:
        return self._task.list_map

    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    async def save_context(self) -> None:
        await self._store.save(self._task)

    async def hold_lock(self) -> None:
        task, wanted = self._task, self._lock_key
        if wanted and task.lock_key != wanted:
            task.lock_key = wanted
            try:
                await self._store.save(task)
            except LockHeld as exc:
                task.lock_key = None
                raise SubtaskFailed(
                    f"another agent operation is running on this host: task {exc.holder}"
                ) from None
        self.log(f"holding the host operation lock {wanted!r}")

    async def release_lock(self) -> None:
        task = self._task
        if task.lock_key is not None:
            task.lock_key = None
            await self._store.save(task)
        self.log("released the host operation lock")


class TaskEngine:
    """Runs tasks of ``templates`` (default: templates.TEMPLATES) stored at ``store_path``.

    ``client_factory(task_id)`` gives each running subtask its AgentClient as an async
    context manager; ``timeouts`` overrides subtask timeouts (seconds) by class name.
    Operations raise TaskError with the codes of SPEC section 4.
    """

    def __init__(
        self,
        store_path: Path,
        client_factory: ClientFactory,
        host_id: int,
        executor: str,
        logger: logging.Logger | None = None,
        *,
        templates: Iterable[Template] | None = None,
        timeouts: dict[str, float] | None = None,
        retention: Retention | None = None,
    ) -> None:
        if templates is None:
            templates = TEMPLATES
        self.host_id = host_id
        self.executor = executor
        self.log = logger or logging.getLogger("ocp_agentd.tasks")
        self.templates: dict[str, Template] = {t.name: t for t in templates}
        self._classes: dict[str, type[Subtask]] = {
            step.subtask.class_name: step.subtask
            for t in self.templates.values()
            for step in t.steps
        }
        self._timeouts = dict(timeouts or {})
        self._client_factory = client_factory
        self._store = TaskStore(Path(store_path), self.log, retention)
        self._runs: dict[int, _Run] = {}
        self._reopening: set[int] = set()
        self._listeners: list[Listener] = []
        # Status moves made but not yet committed, by task id (see _set_status, _commit).
        self._unsaved: dict[int, list[_Move]] = {}
        self._closing = False
        self._opened = asyncio.Event()
        self._retries = Tasks(self.log)

    # ---- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and resume every task it holds as RUNNING."""
        await self._store.open()
        self._opened.set()
        for task in await self._store.running():
            await self._resume(task)

    async def close(self) -> None:
        """Stop the workers without recording anything: RUNNING tasks stay
        RUNNING in the store and are resumed by the next start()."""
        self._closing = True
        await self._retries.close()
        pending: list[asyncio.Task[None]] = []
        for run in self._runs.values():
            pending.extend(run.workers.values())
            if run.driver:
                pending.append(run.driver)
        for job in pending:
            job.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._runs.clear()
        await self._store.close()

    def add_listener(self, listener: Listener) -> None:
        """``listener(change)`` is called for each status move once the store holds it,
        in order, on the event loop; a listener that raises is logged and skipped."""
        self._listeners.append(listener)

    # ---- reads ----------------------------------------------------------------

    async def _ready(self) -> None:
        """Requests that come in while the daemon is still starting wait for the store."""
        if not self._opened.is_set():
            async with asyncio.timeout(30):
                await self._opened.wait()

    async def get(self, task_id: int) -> TaskInstance:
        await self._ready()
        task = await self._store.load(task_id)
        if task is None:
            raise TaskError(TASK_NOT_FOUND, f"task {task_id} not found", "id")
        return task

    async def page(self, page: int, size: int) -> tuple[list[TaskInstance], int]:
        """Tasks newest first; page counts from 1."""
        await self._ready()
        return await self._store.page((page - 1) * size, size)

    async def subtask_log(self, task_id: int, subtask_id: int) -> str:
        task = await self.get(task_id)
        self._subtask(task, subtask_id)
        lines = await self._store.read_log(subtask_id)
        return "".join(f"{at} {line}\n" for at, line in lines)

    async def lock_holder(self, lock_key: str) -> int | None:
        await self._ready()
        return await self._store.holder(lock_key)

    async def wait(self, task_id: int, timeout: float | None = None) -> TaskInstance:
        """Wait until the task is no longer being driven; answers its state."""
        run = self._runs.get(task_id)
        if run and run.driver:
            async with asyncio.timeout(timeout):
                await asyncio.shield(run.driver)
        return await self.get(task_id)

    # ---- operations -----------------------------------------------------------

    async def submit(
        self, template_name: str, creator: str, idempotency_key: str | None = None
    ) -> tuple[TaskInstance, bool]:
        """Create a task from a template and start it without waiting for it.

        Answers (task as created, created?); an idempotency key seen before
        answers the stored task with created=False.
        """
        await self._ready()
        template = self.templates[template_name]
        task = self._instantiate(template, creator, idempotency_key)
        try:
            task, created = await self._store.create(task)
        except LockHeld as exc:
            raise self._lock_error(exc) from None
        if created:
            snapshot = task.copy()
            self._announce(StatusChange(task, None, None, task.status, "created"))
            self._drive(task)
            return snapshot, True
        return task, False

    async def retry(self, task_id: int) -> TaskInstance:
        """Re-run a FAILED task from its FAILED subtasks (a failed rollback
        is retried as a rollback)."""
        task = await self._failed_task(task_id)
        rollback = dag.in_rollback(task)
        for sub in dag.retry_targets(task):
            self._run_again(sub, rollback, "retry of the task")
        if not rollback:
            task.operation = Operation.RETRY
        return await self._reopen(task, "retry")

    async def rollback(self, task_id: int) -> TaskInstance:
        """Undo a FAILED task's done subtasks in reverse (dag.rollback_plan); a task whose
        rollback failed retries it. TaskError 20004 when the task or a done subtask
        prohibits rollback, 20003 unless the task is FAILED."""
        task = await self.get(task_id)
        if dag.rollback_prohibited(task):
            raise TaskError(ROLLBACK_PROHIBITED, f"rollback is prohibited for task {task_id}")
        if dag.in_rollback(task):
            return await self.retry(task_id)
        task = await self._failed_task(task_id)
        for sub, status in dag.rollback_plan(task):
            self._set_status(sub, status, "rollback")
        task.operation = Operation.ROLLBACK
        return await self._reopen(task, "rollback")

    async def retry_subtask(self, task_id: int, subtask_id: int) -> TaskInstance:
        """Run one FAILED subtask of a FAILED task again (its runTime grows by one)."""
        task = await self.get(task_id)
        sub = self._subtask(task, subtask_id)
        self._require_failed(task)
        if sub.status != SubtaskStatus.FAILED:
            raise self._state_error(sub, "retry")
        self._run_again(sub, dag.in_mode(sub, rollback=True), "retry by the operator")
        return await self._reopen(task, f"retry of subtask {sub.id}")

    async def skip_subtask(self, task_id: int, subtask_id: int) -> TaskInstance:
        """Count one FAILED subtask of a FAILED task as done (operation SKIP) and go on."""
        task = await self.get(task_id)
        sub = self._subtask(task, subtask_id)
        self._require_failed(task)
        if sub.status != SubtaskStatus.FAILED:
            raise self._state_error(sub, "skip")
        rollback = dag.in_mode(sub, rollback=True)
        self._set_status(sub, SubtaskStatus.SUCCESSFUL, "skipped by the operator")
        dag.prepare_skip(sub)
        sub.end_time = iso_now()
        self._promote(task, rollback)
        answer = await self._reopen(task, f"skip of subtask {sub.id}")
        self._log_line(task, sub, "skipped by the operator")
        return answer

    async def cancel_subtask(self, task_id: int, subtask_id: int) -> TaskInstance:
        """RUNNING -> CANCELING now; FAILED once the subtask has stopped."""
        task = await self.get(task_id)
        sub = self._subtask(task, subtask_id)
        run = self._runs.get(task_id)
        worker = run.workers.get(subtask_id) if run else None
        live = run.task.subtask(subtask_id) if run else None
        if run is None or worker is None or live is None or live.status != SubtaskStatus.RUNNING:
            raise self._state_error(sub, "cancel")
        self._set_status(live, SubtaskStatus.CANCELING, "cancel by the operator")
        await self._commit(run.task)
        worker.cancel()
        return run.task.copy()

    # ---- internals: building and reopening ------------------------------------

    def _instantiate(
        self, template: Template, creator: str, idempotency_key: str | None
    ) -> TaskInstance:
        task = TaskInstance(
            id=0, name=template.name, template=template.name, host_id=self.host_id,
            creator=creator, executor=self.executor, start_time=iso_now(),
            context=TaskInstance.new_context(self.host_id, template.prohibit_rollback),
            lock_key=template.lock_key, idempotency_key=idempotency_key,
        )
        downstreams: list[list[int]] = [[] for _ in template.steps]
        for index, step in enumerate(template.steps):
            for up in step.upstreams:
                downstreams[up].append(index)
        for index, step in enumerate(template.steps):
            cls = step.subtask
            timeout = self._timeouts.get(cls.class_name.rsplit(".", 1)[-1], cls.timeout)
            task.subtasks.append(SubtaskInstance(
                id=0, task_id=0, class_name=cls.class_name, name=cls.name,
                description=cls.description or cls.name, timeout=int(timeout),
                series_id=index, upstreams=list(step.upstreams),
                downstreams=downstreams[index],
                status=SubtaskStatus.PENDING if step.upstreams else SubtaskStatus.READY,
                prohibit_rollback=cls.prohibit_rollback,
            ))
        return task

    async def _failed_task(self, task_id: int) -> TaskInstance:
        task = await self.get(task_id)
        self._require_failed(task)
        return task

    def _require_failed(self, task: TaskInstance) -> None:
        """The task is FAILED, not being driven and runnable by this daemon (else 20003)."""
        dag.require_failed(task, running=task.id in self._runs)
        self._require_reopenable(task)

    def _require_reopenable(self, task: TaskInstance) -> None:
        if task.id in self._runs or task.id in self._reopening:
            raise TaskError(WRONG_STATE, f"task {task.id} is already running", "status")
        unknown = sorted({s.class_name for s in task.subtasks} - set(self._classes))
        if task.template not in self.templates or unknown:
            raise TaskError(WRONG_STATE, f"this daemon cannot run task {task.id} "
                            f"({task.template!r}) any more", "status")

    async def _reopen(self, task: TaskInstance, what: str) -> TaskInstance:
        """Commits the moves made on the FAILED ``task`` with the task RUNNING again, and
        drives it. Callers check with _failed_task first; nothing awaits in between, so
        the check still holds."""
        self._set_task_status(task, TaskStatus.RUNNING, what)
        task.end_time = None
        task.lock_key = self._lock_key(task)
        self._reopening.add(task.id)  # two operations at once: the second one is refused
        try:
            await self._commit(task)
        except LockHeld as exc:
            raise self._lock_error(exc) from None
        finally:
            self._reopening.discard(task.id)
        snapshot = task.copy()
        self._drive(task)
        return snapshot

    def _lock_key(self, task: TaskInstance) -> str | None:
        template = self.templates.get(task.template)
        return template.lock_key if template else None

    def _lock_error(self, exc: LockHeld) -> TaskError:
        return TaskError(
            OPERATION_RUNNING,
            f"another agent operation is running on this host: task {exc.holder}",
            str(exc.holder),
        )

    @staticmethod
    def _subtask(task: TaskInstance, subtask_id: int) -> SubtaskInstance:
        sub = task.subtask(subtask_id)
        if sub is None:
            raise TaskError(
                TASK_NOT_FOUND, f"subtask {subtask_id} not found in task {task.id}", "subtaskId"
            )
        return sub

    @staticmethod
    def _state_error(sub: SubtaskInstance, what: str) -> TaskError:
        need = "RUNNING" if what == "cancel" else "FAILED (in a FAILED task)"
        return TaskError(
            WRONG_STATE, f"subtask {sub.id} is {sub.status}; {what} needs it {need}", "status"
        )

    def _run_again(self, sub: SubtaskInstance, rollback: bool, why: str) -> None:
        """A FAILED subtask made READY for one more run (a retry, or a retried undo)."""
        self._set_status(sub, SubtaskStatus.READY, why)
        dag.prepare_rerun(sub, rollback)

    def _promote(self, task: TaskInstance, rollback: bool) -> None:
        """PENDING subtasks whose predecessors are all done become READY."""
        for sub in dag.promotable(task, rollback):
            self._set_status(sub, SubtaskStatus.READY, "its predecessors are done")

    async def _resume(self, task: TaskInstance) -> None:
        missing = [s.class_name for s in task.subtasks if s.class_name not in self._classes]
        if task.template not in self.templates:
            missing.insert(0, f"task kind {task.template!r}")
        for sub in task.subtasks:
            if sub.status == SubtaskStatus.RUNNING and not missing:
                self._set_status(sub, SubtaskStatus.READY, "the daemon restarted while it ran")
                sub.run_time += 1
                self._log_line(task, sub, "the daemon restarted while this subtask ran; "
                               "running it again")
            elif sub.status in (SubtaskStatus.RUNNING, SubtaskStatus.CANCELING):
                reason = (f"this daemon does not know {missing}" if missing
                          else "the daemon restarted while it was being canceled")
                self._set_status(sub, SubtaskStatus.FAILED, reason)
                sub.end_time = iso_now()
                self._log_line(task, sub, f"FAILED: {reason}")
        if missing:
            self._set_task_status(task, TaskStatus.FAILED, f"unknown on resume: {missing}")
            task.end_time = iso_now()
            await self._commit(task)
            self.log.error("task %s cannot resume: unknown subtask classes %s", task.id, missing,
                           extra={"TASK_ID": str(task.id)})
            return
        await self._commit(task)
        self.log.info("task %s %r: resumed", task.id, task.name, extra={"TASK_ID": str(task.id)})
        self._drive(task)

    # ---- internals: running ---------------------------------------------------

    def _drive(self, task: TaskInstance) -> None:
        run = _Run(task=task)
        self._runs[task.id] = run
        run.driver = asyncio.create_task(self._driver(run), name=f"task-{task.id}")

    async def _driver(self, run: _Run) -> None:
        task = run.task
        try:
            while True:
                rollback = dag.in_rollback(task)
                if not run.halted:
                    ready = dag.runnable(task, rollback, set(run.workers))
                    if ready:
                        now = iso_now()
                        for sub in ready:
                            self._set_status(sub, SubtaskStatus.RUNNING, "started")
                            sub.start_time, sub.end_time = now, None
                        await self._commit(task)
                        for sub in ready:
                            run.workers[sub.id] = asyncio.create_task(
                                self._worker(run, sub, rollback), name=f"subtask-{sub.id}"
                            )
                if not run.workers:
                    await self._finish(run, rollback)
                    return
                run.wake.clear()
                await run.wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("task %s: the engine failed", task.id,
                               extra={"TASK_ID": str(task.id)})
            for job in run.workers.values():
                job.cancel()
            self._resume_later(task.id)
        finally:
            self._forget(run)

    def _resume_later(self, task_id: int) -> None:
        """A state write failed (disk full, I/O error) and the run stopped; the store still
        holds the task as RUNNING. Pick it up from there once the store takes writes again,
        as a restarted daemon would, rather than leave it RUNNING (and the host's operation
        lock held) until the next daemon start."""

        async def later() -> None:
            while not self._closing:
                await asyncio.sleep(STORE_RETRY_SECONDS)
                if task_id in self._runs:
                    return
                try:
                    task = await self._store.load(task_id)
                    if task is not None and task.status == TaskStatus.RUNNING:
                        await self._resume(task)
                    return
                except Exception as exc:
                    self.log.warning("task %s: the task store still fails (%s); trying "
                                     "again in %g s", task_id, exc, STORE_RETRY_SECONDS,
                                     extra={"TASK_ID": str(task_id)})

        self._retries.spawn(later(), name=f"task-{task_id}-retry")

    def _forget(self, run: _Run) -> None:
        if not self._closing and self._runs.get(run.task.id) is run:
            del self._runs[run.task.id]

    async def _finish(self, run: _Run, rollback: bool) -> None:
        task = run.task
        status = dag.outcome(task, rollback)
        if status == TaskStatus.FAILED and not any(
            s.status == SubtaskStatus.FAILED for s in task.subtasks
        ):
            self.log.error("task %s: nothing left to run but not done", task.id,
                           extra={"TASK_ID": str(task.id)})
        why = "every subtask succeeded" if status == TaskStatus.SUCCESSFUL else "a subtask failed"
        self._set_task_status(task, status, why)
        task.end_time = iso_now()
        self._forget(run)  # from here on the task may be retried at once
        await self._commit(task)

    async def _worker(self, run: _Run, sub: SubtaskInstance, rollback: bool) -> None:
        task = run.task
        cls = self._classes[sub.class_name]  # checked before the task was (re)opened
        verb = "rollback" if rollback else "run"
        self._log_line(task, sub, f"attempt {sub.run_time}: {verb} of {cls.__name__} "
                                  f"(timeout {sub.timeout} s)")
        started = time.monotonic()
        reason: str | None = None
        try:
            async with self._client_factory(task.id) as client:
                ctx = _Context(task, sub, client, started + sub.timeout, store=self._store,
                               lock_key=self._lock_key(task),
                               log=lambda line: self._log_line(task, sub, line))
                async with asyncio.timeout(sub.timeout):
                    instance = cls()
                    await (instance.rollback(ctx) if rollback else instance.run(ctx))
        except TimeoutError:
            reason = f"timed out after {sub.timeout} s"
        except asyncio.CancelledError:
            if self._closing or sub.status != SubtaskStatus.CANCELING:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = "canceled by the operator"
        except SubtaskFailed as exc:
            reason = str(exc) or "failed"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - started
        sub.end_time = iso_now()
        if reason is None:
            self._set_status(sub, SubtaskStatus.SUCCESSFUL, f"done in {took:.3f} s")
            self._log_line(task, sub, f"SUCCESSFUL in {took:.3f} s")
            self._promote(task, rollback)
        else:
            self._set_status(sub, SubtaskStatus.FAILED, reason)
            run.halted = True
            self._log_line(task, sub, f"FAILED after {took:.3f} s: {reason}")
        try:
            await self._commit(task)
        except Exception:
            # The driver stops; the store still says RUNNING, so the next start resumes.
            self.log.exception("task %s: cannot record subtask %s", task.id, sub.id,
                               extra={"TASK_ID": str(task.id)})
            run.halted = True
        finally:
            run.workers.pop(sub.id, None)
            run.wake.set()

    # ---- internals: the transition point ----------------------------------------

    def _set_status(self, sub: SubtaskInstance, new: SubtaskStatus, why: str) -> None:
        """The one place a subtask's status moves: checked against dag.SUBTASK_MOVES (an
        illegal move raises dag.IllegalMove), then held until ``_commit`` of its task."""
        old = sub.status
        dag.check_subtask_move(old, new)
        sub.status = new
        self._unsaved.setdefault(sub.task_id, []).append((sub, old, new, why))

    def _set_task_status(self, task: TaskInstance, new: TaskStatus, why: str) -> None:
        """The one place a task's status moves (dag.TASK_MOVES); held until ``_commit``."""
        old = task.status
        dag.check_task_move(old, new)
        task.status = new
        self._unsaved.setdefault(task.id, []).append((None, old, new, why))

    async def _commit(self, task: TaskInstance) -> None:
        """Saves ``task`` with every subtask moved since its last commit, in one
        transaction; then logs and announces each move in the order it was made. When the
        save raises, the moves are dropped unannounced (the store keeps what it had)."""
        moves = self._unsaved.pop(task.id, [])
        moved = list({id(sub): sub for sub, *_ in moves if sub is not None}.values())
        await self._store.save(task, moved)
        for sub, old, new, why in moves:
            self._announce(StatusChange(task, sub, old, new, why))

    # ---- internals: telling ---------------------------------------------------

    def _log_line(self, task: TaskInstance, sub: SubtaskInstance, line: str) -> None:
        self._store.append_log(sub.id, iso_now(), line)
        self.log.info("task %s subtask %s %s: %s", task.id, sub.id, sub.name, line,
                      extra={"TASK_ID": str(task.id)})

    def _announce(self, change: StatusChange) -> None:
        task, sub = change.task, change.subtask
        if sub is None:
            self.log.info("task %s %r: %s -> %s (%s)", task.id, task.name, change.old or "new",
                          change.new, change.why, extra={"TASK_ID": str(task.id)})
        else:
            self.log.debug("task %s subtask %s %s: %s -> %s (%s)", task.id, sub.id, sub.name,
                           change.old, change.new, change.why, extra={"TASK_ID": str(task.id)})
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                self.log.exception("task listener failed")
