"""The pure DAG rules (tasks/dag.py) on hand-built tasks, and the engine's transition
point as its listeners see it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_task_engine import BLOCK, DIAMOND, FAILS, TEMPLATES, started_engine

from ocp_agentd.tasks import dag
from ocp_agentd.tasks.base import TaskError
from ocp_agentd.tasks.model import (
    Operation,
    StatusChange,
    SubtaskInstance,
    SubtaskStatus,
    TaskInstance,
    TaskStatus,
)

S = SubtaskStatus


def diamond(*statuses: SubtaskStatus, operation: Operation = Operation.EXECUTE) -> TaskInstance:
    """A(1) -> B(2), C(3) -> D(4), with the given statuses in that order."""
    task = TaskInstance(id=9, name="diamond", template="diamond", host_id=1, creator="t",
                        executor="x", start_time="now", status=TaskStatus.FAILED,
                        operation=operation, context=TaskInstance.new_context(1, False))
    links = {1: ([], [2, 3]), 2: ([1], [4]), 3: ([1], [4]), 4: ([2, 3], [])}
    for (sid, (ups, downs)), status in zip(links.items(), statuses, strict=True):
        task.subtasks.append(SubtaskInstance(
            id=sid, task_id=9, class_name=f"c{sid}", name="ABCD"[sid - 1], description="",
            timeout=5, series_id=sid - 1, upstreams=ups, downstreams=downs, status=status,
            start_time="t0", end_time="t1"))
    return task


def names(subs: list[SubtaskInstance]) -> list[str]:
    return [s.name for s in subs]


def test_the_move_tables_allow_what_the_engine_does_and_nothing_else() -> None:
    dag.check_subtask_move(S.RUNNING, S.CANCELING)
    dag.check_subtask_move(S.FAILED, S.SUCCESSFUL)  # skip
    dag.check_subtask_move(S.SUCCESSFUL, S.PENDING)  # rollback marking
    for old, new in [(S.PENDING, S.RUNNING), (S.SUCCESSFUL, S.FAILED), (S.READY, S.FAILED),
                     (S.CANCELING, S.RUNNING), (S.FAILED, S.FAILED)]:
        with pytest.raises(dag.IllegalMove, match=f"{old} -> {new}"):
            dag.check_subtask_move(old, new)
    dag.check_task_move(TaskStatus.FAILED, TaskStatus.RUNNING)
    with pytest.raises(dag.IllegalMove):
        dag.check_task_move(TaskStatus.SUCCESSFUL, TaskStatus.RUNNING)
    assert set(dag.SUBTASK_MOVES) == set(SubtaskStatus)
    assert set(dag.TASK_MOVES) == set(TaskStatus)


def test_promotion_waits_for_every_upstream() -> None:
    task = diamond(S.SUCCESSFUL, S.SUCCESSFUL, S.RUNNING, S.PENDING)
    assert dag.promotable(task, rollback=False) == []
    task.subtasks[2].status = S.SUCCESSFUL
    assert names(dag.promotable(task, rollback=False)) == ["D"]
    assert dag.promotable(task, rollback=True) == []  # D is not part of a rollback


def test_runnable_skips_running_and_other_mode() -> None:
    task = diamond(S.SUCCESSFUL, S.READY, S.READY, S.PENDING)
    assert names(dag.runnable(task, False, running={2})) == ["C"]
    assert dag.runnable(task, True, running=set()) == []


def test_rollback_plan_undoes_in_reverse_and_leaves_skipped_alone() -> None:
    task = diamond(S.SUCCESSFUL, S.SUCCESSFUL, S.SUCCESSFUL, S.FAILED)
    task.subtasks[2].operation = Operation.SKIP
    plan = {sub.name: status for sub, status in dag.rollback_plan(task)}
    # B has no done downstream: first. A waits for B (C was skipped, so it is not undone).
    assert plan == {"A": S.PENDING, "B": S.READY}
    a, b = task.subtasks[0], task.subtasks[1]
    assert a.operation == b.operation == Operation.ROLLBACK
    assert a.start_time is None and a.end_time is None
    assert task.subtasks[2].operation == Operation.SKIP
    # Apply the plan: A becomes promotable in rollback once B is undone.
    a.status, b.status = S.PENDING, S.SUCCESSFUL
    assert names(dag.promotable(task, rollback=True)) == ["A"]


def test_outcome_counts_only_the_current_mode() -> None:
    task = diamond(S.SUCCESSFUL, S.SUCCESSFUL, S.SUCCESSFUL, S.SUCCESSFUL)
    assert dag.outcome(task, rollback=False) == TaskStatus.SUCCESSFUL
    task.subtasks[3].status = S.FAILED
    assert dag.outcome(task, rollback=False) == TaskStatus.FAILED
    for sub in task.subtasks[:3]:
        sub.operation = Operation.ROLLBACK
    assert dag.outcome(task, rollback=True) == TaskStatus.SUCCESSFUL


def test_retry_targets_and_rerun_bookkeeping() -> None:
    task = diamond(S.SUCCESSFUL, S.FAILED, S.FAILED, S.PENDING)
    task.subtasks[2].operation = Operation.ROLLBACK
    assert names(dag.retry_targets(task)) == ["B"]
    task.operation = Operation.ROLLBACK
    assert names(dag.retry_targets(task)) == ["C"]
    b = task.subtasks[1]
    dag.prepare_rerun(b, rollback=False)
    assert (b.run_time, b.operation, b.start_time, b.end_time) == (2, Operation.RETRY, None, None)
    dag.prepare_skip(b)
    assert b.operation == Operation.SKIP
    c = task.subtasks[2]
    dag.prepare_skip(c)
    assert c.operation == Operation.ROLLBACK  # a skipped undo stays an undo


def test_rollback_prohibited_and_require_failed() -> None:
    task = diamond(S.SUCCESSFUL, S.FAILED, S.PENDING, S.PENDING)
    assert not dag.rollback_prohibited(task)
    task.subtasks[0].prohibit_rollback = True
    assert dag.rollback_prohibited(task)
    dag.require_failed(task, running=False)
    with pytest.raises(TaskError) as caught:
        dag.require_failed(task, running=True)
    assert caught.value.code == 20003
    task.status = TaskStatus.SUCCESSFUL
    with pytest.raises(TaskError):
        dag.require_failed(task, running=False)


def test_listeners_get_every_move_with_its_reason(tmp_path: Path) -> None:
    """The one hook at the transition point: each move once, in order, with old and why."""

    async def body() -> list[StatusChange]:
        changes: list[StatusChange] = []
        async with started_engine(tmp_path, TEMPLATES) as engine:
            engine.add_listener(changes.append)
            FAILS.clear()
            BLOCK.clear()
            FAILS["B"] = 1
            task, _ = await engine.submit(DIAMOND.name, "admin")
            assert (await engine.wait(task.id, 10)).status == TaskStatus.FAILED
            await engine.retry(task.id)
            assert (await engine.wait(task.id, 10)).status == TaskStatus.SUCCESSFUL
        return changes

    changes = asyncio.run(asyncio.wait_for(body(), 30))
    tasks = [(str(c.old), str(c.new), c.why) for c in changes if c.subtask is None]
    assert tasks == [("None", "RUNNING", "created"), ("RUNNING", "FAILED", "a subtask failed"),
                     ("FAILED", "RUNNING", "retry"),
                     ("RUNNING", "SUCCESSFUL", "every subtask succeeded")]
    b = [(str(c.old), str(c.new)) for c in changes if c.subtask and c.subtask.name == "B"]
    assert b == [("PENDING", "READY"), ("READY", "RUNNING"), ("RUNNING", "FAILED"),
                 ("FAILED", "READY"), ("READY", "RUNNING"), ("RUNNING", "SUCCESSFUL")]
    failed = next(c for c in changes if c.subtask and c.new == S.FAILED)
    assert failed.why == "B was told to fail"
    for change in changes:  # every move is one the tables allow
        if change.subtask is not None and change.old is not None:
            assert change.new in dag.SUBTASK_MOVES[S(change.old)]
