"""The task engine on a real SQLite store with real asyncio subtasks (toy classes below)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

from ocp_agentd.tasks.base import Step, Subtask, SubtaskContext, SubtaskFailed, TaskError, Template
from ocp_agentd.tasks.engine import TaskEngine
from ocp_agentd.tasks.model import Operation, StatusChange, SubtaskStatus, TaskStatus

# ---- toy subtasks ------------------------------------------------------------------------
# EVENTS records ("run"|"undo", name) in the order things happen; FAILS[name] is how many
# more runs of that toy fail; BLOCK[name] is an Event a run waits for before finishing.

EVENTS: list[tuple[str, str]] = []
FAILS: dict[str, int] = {}
BLOCK: dict[str, asyncio.Event] = {}
STARTED: dict[str, asyncio.Event] = {}


class Toy(Subtask):
    timeout: ClassVar[int] = 30

    async def run(self, ctx: SubtaskContext) -> None:
        EVENTS.append(("run", self.name))
        STARTED.setdefault(self.name, asyncio.Event()).set()
        ctx.log(f"{self.name} working")
        ctx.string_map[f"ran_{self.name}"] = "yes"
        await ctx.save_context()
        if self.name in BLOCK:
            await BLOCK[self.name].wait()
        if FAILS.get(self.name, 0) > 0:
            FAILS[self.name] -= 1
            raise SubtaskFailed(f"{self.name} was told to fail")
        EVENTS.append(("done", self.name))

    async def rollback(self, ctx: SubtaskContext) -> None:
        EVENTS.append(("undo", self.name))
        ctx.log(f"{self.name} undone")


def toy(name: str, timeout: int = 30) -> type[Subtask]:
    return type(name, (Toy,), {"class_name": f"test.toy.{name}", "name": name,
                               "timeout": timeout})


A, B, C, D = toy("A"), toy("B"), toy("C"), toy("D")
SLOW = toy("Slow", timeout=1)

CHAIN = Template.chain("chain", [A, B, C], lock_key="toy-lock")
DIAMOND = Template("diamond", (Step(A), Step(B, (0,)), Step(C, (0,)), Step(D, (1, 2))))
TIMED = Template.chain("timed", [A, SLOW, C])
NO_ROLLBACK = Template.chain("no-rollback", [A, B], prohibit_rollback=True)
SOLO = Template.chain("solo", [D])
TEMPLATES = [CHAIN, DIAMOND, TIMED, NO_ROLLBACK, SOLO]


@pytest.fixture(autouse=True)
def _reset() -> None:
    EVENTS.clear()
    FAILS.clear()
    BLOCK.clear()
    STARTED.clear()


class NoClient:
    """The client a toy subtask gets. A stand-in: the toys never call the control API (the
    subtasks that do are tested against a real daemon in test_task_restart.py)."""

    def __init__(self, task_id: int) -> None:
        self.task_id = task_id

    async def __aenter__(self) -> NoClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


@asynccontextmanager
async def started_engine(
    path: Path, templates: list[Template] = TEMPLATES,
) -> AsyncIterator[TaskEngine]:
    engine = TaskEngine(path / "tasks.db", NoClient, 7, "10.0.0.7", templates=templates)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 30))


async def refusal(call: Awaitable[Any]) -> TaskError:
    """The TaskError that awaiting `call` raises."""
    with pytest.raises(TaskError) as caught:
        await call
    return caught.value


async def wait_status(engine: TaskEngine, task_id: int, sub_name: str, status: str) -> None:
    async with asyncio.timeout(10):
        while True:
            task = await engine.get(task_id)
            if next(s for s in task.subtasks if s.name == sub_name).status == status:
                return
            await asyncio.sleep(0.01)


def statuses(task: Any) -> dict[str, str]:
    return {s.name: str(s.status) for s in task.subtasks}


# ---- tests -------------------------------------------------------------------------------


def test_chain_runs_in_order_and_answers_the_created_shape(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            task, created = await engine.submit("chain", "admin")
            assert created
            assert task.status == TaskStatus.RUNNING
            assert statuses(task) == {"A": "READY", "B": "PENDING", "C": "PENDING"}
            ids = [s.id for s in task.subtasks]
            assert ids == sorted(ids) and len(set(ids)) == 3
            assert task.subtasks[1].upstreams == [ids[0]]
            assert task.subtasks[1].downstreams == [ids[2]]
            body = task.to_json()
            assert body["context"]["stringMap"] == {"prohibit_rollback": "false", "host_id": "7"}
            assert body["hostId"] == 7 and body["executor"] == "10.0.0.7"
            assert body["taskDefinitionId"] == -1 and body["type"] == "MANUAL"
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert [e for e in EVENTS if e[0] == "run"] == [("run", "A"), ("run", "B"),
                                                           ("run", "C")]
            assert all(s.run_time == 1 for s in done.subtasks)
            assert done.string_map["ran_C"] == "yes"  # context saved by the subtask
            log = await engine.subtask_log(task.id, ids[1])
            assert "B working" in log and "SUCCESSFUL" in log
            assert log.splitlines()[0][:4].isdigit()  # each line starts with its timestamp
            second, _ = await engine.submit("chain", "admin")
            assert second.id > task.id

    run(body)


def test_diamond_runs_branches_in_parallel_and_joins(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            BLOCK["B"] = asyncio.Event()  # B finishes only once C has started
            task, _ = await engine.submit("diamond", "admin")
            await wait_status(engine, task.id, "C", "SUCCESSFUL")
            current = await engine.get(task.id)
            assert statuses(current) == {"A": "SUCCESSFUL", "B": "RUNNING", "C": "SUCCESSFUL",
                                         "D": "PENDING"}
            BLOCK["B"].set()
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert EVENTS.index(("run", "D")) > EVENTS.index(("done", "B"))
            assert EVENTS.index(("run", "D")) > EVENTS.index(("done", "C"))

    run(body)


def test_timeout_fails_the_subtask_with_the_reason(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            BLOCK["Slow"] = asyncio.Event()  # never set
            task, _ = await engine.submit("timed", "admin")
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.FAILED
            assert statuses(done) == {"A": "SUCCESSFUL", "Slow": "FAILED", "C": "PENDING"}
            log = await engine.subtask_log(task.id, done.subtasks[1].id)
            assert "timed out after 1 s" in log
            assert ("run", "C") not in EVENTS

    run(body)


def test_task_retry_reruns_failed_subtasks_and_counts_run_time(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            FAILS["B"] = 1
            task, _ = await engine.submit("chain", "admin")
            failed = await engine.wait(task.id, 10)
            assert failed.status == TaskStatus.FAILED
            assert statuses(failed) == {"A": "SUCCESSFUL", "B": "FAILED", "C": "PENDING"}
            assert "B was told to fail" in await engine.subtask_log(task.id,
                                                                     failed.subtasks[1].id)
            wrong = await refusal(engine.retry_subtask(task.id, failed.subtasks[0].id))
            assert wrong.code == 20003
            retried = await engine.retry(task.id)
            assert retried.status == TaskStatus.RUNNING and retried.operation == Operation.RETRY
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert [s.run_time for s in done.subtasks] == [1, 2, 1]
            assert EVENTS.count(("run", "A")) == 1  # done subtasks are not run again
            assert (await refusal(engine.retry(task.id))).code == 20003

    run(body)


def test_subtask_retry_and_skip(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            FAILS["B"] = 2
            task, _ = await engine.submit("chain", "admin")
            failed = await engine.wait(task.id, 10)
            sid = failed.subtasks[1].id
            await engine.retry_subtask(task.id, sid)
            failed = await engine.wait(task.id, 10)
            assert failed.status == TaskStatus.FAILED and failed.subtasks[1].run_time == 2
            pending = failed.subtasks[2].id
            assert (await refusal(engine.skip_subtask(task.id, pending))).code == 20003
            await engine.skip_subtask(task.id, sid)
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert done.subtasks[1].operation == Operation.SKIP
            assert done.subtasks[1].status == SubtaskStatus.SUCCESSFUL
            assert ("run", "C") in EVENTS
            assert "skipped by the operator" in await engine.subtask_log(task.id, sid)

    run(body)


def test_cancel_goes_through_canceling_to_failed(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            BLOCK["B"] = asyncio.Event()
            seen: list[str] = []
            engine.add_listener(lambda c: seen.append(str(c.new))
                                if c.subtask and c.subtask.name == "B" else None)
            task, _ = await engine.submit("chain", "admin")
            await wait_status(engine, task.id, "B", "RUNNING")
            sid = task.subtasks[1].id
            wrong = await refusal(engine.cancel_subtask(task.id, task.subtasks[2].id))
            assert wrong.code == 20003
            answer = await engine.cancel_subtask(task.id, sid)
            assert answer.subtasks[1].status == SubtaskStatus.CANCELING
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.FAILED
            assert done.subtasks[1].status == SubtaskStatus.FAILED
            assert seen[-3:] == ["RUNNING", "CANCELING", "FAILED"]
            assert "canceled by the operator" in await engine.subtask_log(task.id, sid)

    run(body)


def test_rollback_undoes_done_subtasks_in_reverse(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            FAILS["C"] = 1
            task, _ = await engine.submit("chain", "admin")
            assert (await refusal(engine.rollback(task.id))).code == 20003  # still running
            await engine.wait(task.id, 10)
            answer = await engine.rollback(task.id)
            assert answer.operation == Operation.ROLLBACK
            assert statuses(answer) == {"A": "PENDING", "B": "READY", "C": "FAILED"}
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert [e for e in EVENTS if e[0] == "undo"] == [("undo", "B"), ("undo", "A")]
            assert [s.operation for s in done.subtasks[:2]] == [Operation.ROLLBACK] * 2
            assert (await refusal(engine.rollback(task.id))).code == 20003  # twice

            FAILS["B"] = 1
            prohibited, _ = await engine.submit("no-rollback", "admin")
            await engine.wait(prohibited.id, 10)
            assert (await refusal(engine.rollback(prohibited.id))).code == 20004

    run(body)


def test_resume_after_reopening_the_store(tmp_path: Path) -> None:
    async def first() -> tuple[int, int]:
        async with started_engine(tmp_path) as engine:
            BLOCK["B"] = asyncio.Event()
            task, _ = await engine.submit("chain", "admin")
            await wait_status(engine, task.id, "B", "RUNNING")
        # The engine is closed mid-subtask, like a daemon that goes away.
        return task.id, task.subtasks[1].id

    task_id, sid = run(first)
    EVENTS.clear()
    BLOCK.clear()

    async def second() -> None:
        async with started_engine(tmp_path) as engine:
            done = await engine.wait(task_id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert EVENTS == [("run", "B"), ("done", "B"), ("run", "C"), ("done", "C")]
            assert [s.run_time for s in done.subtasks] == [1, 2, 1]
            assert "running it again" in await engine.subtask_log(task_id, sid)
            listed, total = await engine.page(1, 10)
            assert total == 1 and listed[0].id == task_id

    run(second)


def test_resume_of_an_unknown_task_kind_fails_it_with_the_reason(tmp_path: Path) -> None:
    async def first() -> int:
        async with started_engine(tmp_path) as engine:
            BLOCK["B"] = asyncio.Event()
            task, _ = await engine.submit("chain", "admin")
            await wait_status(engine, task.id, "B", "RUNNING")
        return task.id

    task_id = run(first)

    async def second() -> None:
        # this daemon no longer knows "chain"
        async with started_engine(tmp_path, [DIAMOND]) as engine:
            task = await engine.get(task_id)
            assert task.status == TaskStatus.FAILED
            assert task.subtasks[1].status == SubtaskStatus.FAILED
            assert "does not know" in await engine.subtask_log(task_id, task.subtasks[1].id)

    run(second)


def test_lock_allows_one_running_task_and_survives_reopen(tmp_path: Path) -> None:
    async def first() -> int:
        async with started_engine(tmp_path) as engine:
            BLOCK["A"] = asyncio.Event()
            task, _ = await engine.submit("chain", "admin")
            held = await refusal(engine.submit("chain", "admin"))
            assert held.code == 2003 and held.target == str(task.id)
            assert await engine.lock_holder("toy-lock") == task.id
            unlocked, _ = await engine.submit("solo", "admin")  # no lock key: runs alongside
            await engine.wait(unlocked.id, 10)
        return task.id

    task_id = run(first)

    async def second() -> None:
        BLOCK["A"] = asyncio.Event()
        async with started_engine(tmp_path) as engine:  # resumes the task: it holds the lock again
            assert await engine.lock_holder("toy-lock") == task_id  # read back at open
            assert (await refusal(engine.submit("chain", "admin"))).target == str(task_id)
            BLOCK["A"].set()
            await engine.wait(task_id, 10)
            assert await engine.lock_holder("toy-lock") is None
            after, created = await engine.submit("chain", "admin")
            assert created and after.id > task_id
            await engine.wait(after.id, 10)

    run(second)


def test_idempotency_key_returns_the_same_task(tmp_path: Path) -> None:
    async def first() -> int:
        async with started_engine(tmp_path) as engine:
            task, created = await engine.submit("chain", "admin", idempotency_key="k-1")
            again, again_created = await engine.submit("chain", "admin", idempotency_key="k-1")
            assert created and not again_created and again.id == task.id
            await engine.wait(task.id, 10)
        return task.id

    task_id = run(first)

    async def second() -> None:
        async with started_engine(tmp_path) as engine:
            same, created = await engine.submit("chain", "admin", idempotency_key="k-1")
            assert not created and same.id == task_id
            assert same.status == TaskStatus.SUCCESSFUL

    run(second)


def test_unknown_ids_answer_20000(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            task, _ = await engine.submit("chain", "admin")
            await engine.wait(task.id, 10)
            calls = [engine.get(999), engine.retry(999), engine.rollback(999),
                     engine.retry_subtask(task.id, 999), engine.skip_subtask(999, 1),
                     engine.cancel_subtask(task.id, 999), engine.subtask_log(task.id, 999)]
            for call in calls:
                assert (await refusal(call)).code == 20000

    run(body)


def test_each_change_is_committed_before_it_is_announced(tmp_path: Path) -> None:
    """At each announcement the store already holds that status, or one the same task or
    subtask reached after it (a parallel branch may commit again before this listener
    runs); it never holds one that was not announced."""

    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            reader = sqlite3.connect(tmp_path / "tasks.db")
            seen: dict[tuple[str, int], list[tuple[str, str]]] = {}

            def check(change: StatusChange) -> None:
                task, sub = change.task, change.subtask
                if sub is None:
                    key = ("task", task.id)
                    row = reader.execute("SELECT status FROM tasks WHERE id=?", (task.id,))
                else:
                    key = ("subtask", sub.id)
                    row = reader.execute("SELECT status FROM subtasks WHERE id=?", (sub.id,))
                seen.setdefault(key, []).append((str(change.new), row.fetchone()[0]))

            engine.add_listener(check)
            try:
                task, _ = await engine.submit("diamond", "admin")
                await engine.wait(task.id, 10)
            finally:
                reader.close()
            mismatches = []
            for key, moves in seen.items():
                announced = [new for new, _ in moves]
                for index, (new, stored) in enumerate(moves):
                    if stored not in announced[index:]:
                        mismatches.append(f"{key}: {new} announced, {stored} stored")
            assert seen and mismatches == []

    run(body)


def test_a_corrupted_database_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "tasks.db").write_bytes(b"this is not a database" * 100)

    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            task, _ = await engine.submit("chain", "admin")
            assert (await engine.wait(task.id, 10)).status == TaskStatus.SUCCESSFUL

    run(body)
    aside = list(tmp_path.glob("tasks.db.corrupt-*"))
    assert aside and aside[0].read_bytes().startswith(b"this is not a database")


def test_two_operations_at_once_on_one_task_start_one_run(tmp_path: Path) -> None:
    async def body() -> None:
        async with started_engine(tmp_path) as engine:
            FAILS["B"] = 1
            task, _ = await engine.submit("chain", "admin")
            await engine.wait(task.id, 10)
            results = await asyncio.gather(engine.retry(task.id), engine.retry(task.id),
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, TaskError)]
            assert len(refused) == 1 and refused[0].code == 20003
            done = await engine.wait(task.id, 10)
            assert done.status == TaskStatus.SUCCESSFUL
            assert EVENTS.count(("run", "B")) == 2 and EVENTS.count(("run", "C")) == 1

    run(body)
