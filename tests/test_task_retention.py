"""Task retention and the schema version of the task database (SPEC section 11).

tests/data/tasks-schema0.sqlite3 was made by the task store as it was before schema
versions (user_version 0): tasks 1-3 ended in 2020, task 4 "ends" in 2099, task 5 is
RUNNING; each has one subtask with three log lines.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

from ocp_agentd.tasks.model import SubtaskInstance, TaskInstance, TaskStatus, iso_now
from ocp_agentd.tasks.store import LINE_MAX_BYTES, SCHEMA_VERSION, Retention, TaskStore

FIXTURE = Path(__file__).parent / "data" / "tasks-schema0.sqlite3"


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_a_database_of_the_first_schema_is_upgraded_and_pruned_at_start(tmp_path):
    path = tmp_path / "tasks.sqlite3"
    shutil.copy(FIXTURE, path)
    assert user_version(path) == 0

    async def body() -> None:
        store = TaskStore(path, retention=Retention(keep_days=30, keep_max=1000))
        await store.open()
        try:
            tasks, total = await store.page(0, 100)
            # The 2020 tasks are past keep_days; the RUNNING one stays whatever its age.
            assert sorted(t.id for t in tasks) == [4, 5] and total == 2
            running = await store.running()
            assert [t.id for t in running] == [5]
            lines = await store.read_log(running[0].subtasks[0].id)
            assert [line for _, line in lines] == [f"line {n} of task4" for n in range(3)]
        finally:
            await store.close()

    asyncio.run(body())
    assert user_version(path) == SCHEMA_VERSION
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM subtasks WHERE task_id <= 3").fetchone()[0] == 0
        columns = [row[1] for row in db.execute("PRAGMA table_info(subtask_logs)")]
        assert "dropped" in columns


def _task(index: int) -> TaskInstance:
    sub = SubtaskInstance(id=0, task_id=0, class_name="X", name="s", description="d",
                          timeout=60, series_id=1)
    return TaskInstance(id=0, name=f"t{index}", template="t", host_id=2, creator="c",
                        executor="e", start_time=iso_now(), subtasks=[sub],
                        context=TaskInstance.new_context(2, False))


def test_keep_max_prunes_when_a_task_ends_and_never_a_running_one(tmp_path):
    async def body() -> None:
        store = TaskStore(tmp_path / "t.sqlite3", retention=Retention(keep_max=3))
        await store.open()
        try:
            running, _ = await store.create(_task(0))
            for index in range(1, 7):
                task, _ = await store.create(_task(index))
                task.status = TaskStatus.SUCCESSFUL
                task.end_time = iso_now()
                await store.save(task)
            tasks, total = await store.page(0, 100)
            ids = sorted(t.id for t in tasks)
            assert ids == [running.id, 5, 6, 7] and total == 4
        finally:
            await store.close()

    asyncio.run(body())


def test_a_subtask_log_keeps_its_lines_bounded_and_says_what_it_dropped(tmp_path):
    async def body() -> None:
        store = TaskStore(tmp_path / "t.sqlite3", retention=Retention(log_max_lines=10))
        await store.open()
        try:
            task, _ = await store.create(_task(0))
            sub = task.subtasks[0].id
            for n in range(25):
                store.append_log(sub, iso_now(), f"line {n}")
            store.append_log(sub, iso_now(), "x" * 10000)
            lines = [line for _, line in await store.read_log(sub)]
            assert len(lines) == 10
            assert lines[:9] == [f"line {n}" for n in range(9)]
            assert lines[9].startswith("17 more line(s) dropped")

            other = (await store.create(_task(1)))[0].subtasks[0].id
            store.append_log(other, iso_now(), "é" * 5000 + "\n" * 3)
            (_, long_line), = await store.read_log(other)
            assert len(long_line.encode()) <= LINE_MAX_BYTES and "bytes cut" in long_line
        finally:
            await store.close()

    asyncio.run(body())
