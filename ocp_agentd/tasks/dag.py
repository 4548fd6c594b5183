"""The pure rules of a task's DAG: which moves are legal, which subtask may run, what a
retry, a skip and a rollback change. No I/O, no clock, no engine: the engine asks these
functions and applies the answer through its one transition method.

Forward, a subtask becomes READY when all its upstreams are SUCCESSFUL (a skipped subtask
is SUCCESSFUL with operation SKIP). Rollback undoes the done subtasks in reverse: a
subtask marked ROLLBACK becomes READY when every downstream marked ROLLBACK is undone.
A task "is in rollback" when its operation is ROLLBACK; only the subtasks of the current
mode (rollback or not) take part in a run.

The moves follow the OCP task model of SPEC section 5 (statuses of the seed's
TaskInstance and SubtaskInstance).
"""

from __future__ import annotations

from ocp_agentd.tasks.base import WRONG_STATE, TaskError
from ocp_agentd.tasks.model import (
    Operation,
    SubtaskInstance,
    SubtaskStatus,
    TaskInstance,
    TaskStatus,
)

_S = SubtaskStatus

# Every legal subtask move, and why it happens.
SUBTASK_MOVES: dict[SubtaskStatus, frozenset[SubtaskStatus]] = {
    # its predecessors are done
    _S.PENDING: frozenset({_S.READY}),
    # the engine starts it
    _S.READY: frozenset({_S.RUNNING}),
    # done, failed (or timed out), canceled by the operator, or the daemon restarted
    # while it ran (run again: subtasks are idempotent)
    _S.RUNNING: frozenset({_S.SUCCESSFUL, _S.FAILED, _S.CANCELING, _S.READY}),
    # it stopped; or it finished before the cancel reached it
    _S.CANCELING: frozenset({_S.FAILED, _S.SUCCESSFUL}),
    # retried (READY), or skipped by the operator (SUCCESSFUL)
    _S.FAILED: frozenset({_S.READY, _S.SUCCESSFUL}),
    # marked for rollback: READY when nothing after it is to be undone, else PENDING
    _S.SUCCESSFUL: frozenset({_S.READY, _S.PENDING}),
}

TASK_MOVES: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.RUNNING: frozenset({TaskStatus.SUCCESSFUL, TaskStatus.FAILED}),
    # retry, rollback, a subtask's retry or skip re-open it
    TaskStatus.FAILED: frozenset({TaskStatus.RUNNING}),
    TaskStatus.SUCCESSFUL: frozenset(),
}


class IllegalMove(RuntimeError):
    """A status move outside SUBTASK_MOVES or TASK_MOVES: always a bug in the engine."""


def check_subtask_move(old: SubtaskStatus, new: SubtaskStatus) -> None:
    """Raises IllegalMove unless ``old -> new`` is in SUBTASK_MOVES."""
    if new not in SUBTASK_MOVES[old]:
        raise IllegalMove(f"subtask move {old} -> {new} is not allowed")


def check_task_move(old: TaskStatus, new: TaskStatus) -> None:
    """Raises IllegalMove unless ``old -> new`` is in TASK_MOVES."""
    if new not in TASK_MOVES[old]:
        raise IllegalMove(f"task move {old} -> {new} is not allowed")


def in_rollback(task: TaskInstance) -> bool:
    return task.operation == Operation.ROLLBACK


def in_mode(sub: SubtaskInstance, rollback: bool) -> bool:
    """Whether the subtask takes part in a run of this mode (forward or rollback)."""
    return (sub.operation == Operation.ROLLBACK) == rollback


def runnable(task: TaskInstance, rollback: bool, running: set[int]) -> list[SubtaskInstance]:
    """READY subtasks of this mode that are not running yet (ids in ``running``)."""
    return [
        s for s in task.subtasks
        if s.status == SubtaskStatus.READY and in_mode(s, rollback) and s.id not in running
    ]


def promotable(task: TaskInstance, rollback: bool) -> list[SubtaskInstance]:
    """PENDING subtasks of this mode whose predecessors are all SUCCESSFUL: forward, the
    upstreams; in rollback, the downstreams that are undone in this rollback too."""
    by_id = {s.id: s for s in task.subtasks}
    ready = []
    for sub in task.subtasks:
        if sub.status != SubtaskStatus.PENDING or not in_mode(sub, rollback):
            continue
        if rollback:
            before = [by_id[d] for d in sub.downstreams if in_mode(by_id[d], True)]
        else:
            before = [by_id[u] for u in sub.upstreams]
        if all(b.status == SubtaskStatus.SUCCESSFUL for b in before):
            ready.append(sub)
    return ready


def outcome(task: TaskInstance, rollback: bool) -> TaskStatus:
    """A task with nothing left to run: SUCCESSFUL when every subtask of the mode is."""
    relevant = [s for s in task.subtasks if in_mode(s, rollback)]
    if all(s.status == SubtaskStatus.SUCCESSFUL for s in relevant):
        return TaskStatus.SUCCESSFUL
    return TaskStatus.FAILED


def retry_targets(task: TaskInstance) -> list[SubtaskInstance]:
    """The FAILED subtasks a task retry runs again (a failed rollback retries the undo)."""
    rollback = in_rollback(task)
    return [s for s in task.subtasks if s.status == SubtaskStatus.FAILED and in_mode(s, rollback)]


def prepare_rerun(sub: SubtaskInstance, rollback: bool) -> None:
    """The bookkeeping of one more run of a FAILED subtask (its status is the engine's
    to move to READY): run_time grows by one, operation RETRY (or ROLLBACK), no times."""
    sub.run_time += 1
    sub.operation = Operation.ROLLBACK if rollback else Operation.RETRY
    sub.start_time = sub.end_time = None


def prepare_skip(sub: SubtaskInstance) -> None:
    """A skipped forward subtask keeps operation SKIP (a skipped undo stays ROLLBACK)."""
    if sub.operation != Operation.ROLLBACK:
        sub.operation = Operation.SKIP


def rollback_prohibited(task: TaskInstance) -> bool:
    """The task's context forbids rollback, or a done subtask does."""
    return task.prohibit_rollback or any(
        s.prohibit_rollback and s.status == SubtaskStatus.SUCCESSFUL for s in task.subtasks
    )


def rollback_plan(task: TaskInstance) -> list[tuple[SubtaskInstance, SubtaskStatus]]:
    """The done subtasks to undo (skipped ones were never done), each with the status it
    starts the rollback in: READY when no downstream is to be undone first, else PENDING.
    Marks each planned subtask's operation ROLLBACK and clears its times."""
    undo = [
        s for s in task.subtasks
        if s.status == SubtaskStatus.SUCCESSFUL and s.operation != Operation.SKIP
    ]
    undo_ids = {s.id for s in undo}
    plan = []
    for sub in undo:
        sub.operation = Operation.ROLLBACK
        sub.start_time = sub.end_time = None
        first = not any(d in undo_ids for d in sub.downstreams)
        plan.append((sub, SubtaskStatus.READY if first else SubtaskStatus.PENDING))
    return plan


def require_failed(task: TaskInstance, running: bool) -> None:
    """Raises TaskError 20003 unless the task is FAILED and not being driven
    (``running``: the engine holds a live run of it)."""
    if task.status != TaskStatus.FAILED or running:
        raise TaskError(
            WRONG_STATE,
            f"task {task.id} is {task.status}; only a FAILED task allows this operation",
            "status",
        )
