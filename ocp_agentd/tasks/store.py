"""SQLite persistence of tasks, subtasks and subtask logs.

One connection lives in one worker thread; every call hops there, so the
event loop never waits on the disk. WAL and synchronous=FULL: a committed
state change survives a crash of the daemon or of the machine. The engine
commits each state change here before it tells anyone about it.

The host's operation lock is derived from the rows themselves: a partial
unique index allows one RUNNING task per `lock_key`, so the lock is exactly
as durable and as consistent as the task states.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from ocp_agentd.tasks.model import (
    Operation,
    SubtaskInstance,
    SubtaskStatus,
    TaskInstance,
    TaskStatus,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    template TEXT NOT NULL,
    host_id INTEGER NOT NULL,
    creator TEXT NOT NULL,
    executor TEXT NOT NULL,
    start_time TEXT NOT NULL,
    end_time TEXT,
    status TEXT NOT NULL,
    operation TEXT NOT NULL,
    context TEXT NOT NULL,
    lock_key TEXT,
    idempotency_key TEXT UNIQUE
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_one_running_per_lock
    ON tasks(lock_key) WHERE status = 'RUNNING' AND lock_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks(status);
CREATE TABLE IF NOT EXISTS subtasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    series_id INTEGER NOT NULL,
    class_name TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    timeout INTEGER NOT NULL,
    upstreams TEXT NOT NULL,
    downstreams TEXT NOT NULL,
    status TEXT NOT NULL,
    operation TEXT NOT NULL,
    run_time INTEGER NOT NULL,
    prohibit_rollback INTEGER NOT NULL,
    start_time TEXT,
    end_time TEXT
);
CREATE INDEX IF NOT EXISTS subtasks_by_task ON subtasks(task_id);
CREATE TABLE IF NOT EXISTS subtask_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subtask_id INTEGER NOT NULL,
    at TEXT NOT NULL,
    line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS subtask_logs_by_subtask ON subtask_logs(subtask_id);
"""


# PRAGMA user_version of the schema this code writes. A database made before versions
# existed reads 0 and has SCHEMA (version 1) or nothing at all.
SCHEMA_VERSION = 2
# MIGRATIONS[n] takes a database from version n to n + 1, inside one transaction.
MIGRATIONS: dict[int, str] = {
    0: SCHEMA,
    # A subtask log's last row may count the lines dropped past log_max_lines.
    1: "ALTER TABLE subtask_logs ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0;",
}
LINE_MAX_BYTES = 4096


@dataclass(frozen=True)
class Retention:
    """SPEC section 11, task retention: finished tasks older than keep_days or past the
    newest keep_max are deleted with their subtasks and logs (never a RUNNING task); a
    subtask keeps at most log_max_lines log lines of at most LINE_MAX_BYTES each."""

    keep_days: float = 30
    keep_max: int = 1000
    log_max_lines: int = 2000


def _cut(line: str) -> str:
    raw = line.encode("utf-8", "surrogateescape")
    if len(raw) <= LINE_MAX_BYTES:
        return line
    note = f" ...({len(raw) - LINE_MAX_BYTES + 64} bytes cut)"
    return raw[: LINE_MAX_BYTES - 64].decode("utf-8", "ignore") + note


class LockHeld(Exception):
    """Another RUNNING task holds the lock key."""

    def __init__(self, lock_key: str, holder: int | None) -> None:
        super().__init__(f"lock {lock_key!r} is held by task {holder}")
        self.lock_key = lock_key
        self.holder = holder


class TaskStore:
    def __init__(self, path: Path, logger: logging.Logger | None = None,
                 retention: Retention | None = None) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self.log = logger or logging.getLogger("ocp_agentd.tasks.store")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")
        self._db: sqlite3.Connection | None = None
        # lock_key -> the RUNNING task holding it, as committed: kept by the store's thread
        # after each write that can change it, so that the question every local start and
        # stop asks (holder) is a dictionary lookup, not a trip through that thread.
        self._holders: dict[str, int] = {}

    # ---- plumbing -------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a write without waiting; it still runs in order with all others."""
        try:
            self._pool.submit(self._guarded, fn, *args)
        except RuntimeError:  # closed: the daemon is going away
            self.log.warning("task store closed; a write was dropped")

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.exception("task store write failed")

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("task store is not open")
        return self._db

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._call(self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        assert self._db is not None
        self._db.close()
        self._db = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d%H%M%S')}")
            self.log.error(
                "task database %s is unreadable (%s); moved aside to %s, starting a fresh one",
                self.path, exc, aside,
            )
            for suffix in ("", "-wal", "-shm"):
                part = Path(f"{self.path}{suffix}")
                if part.exists():
                    part.rename(Path(f"{aside}{suffix}"))
            self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {result}")
            self._migrate(db)
            self._load_holders(db)
        except sqlite3.DatabaseError:
            db.close()
            raise
        self._db = db
        try:
            self._prune()
        except sqlite3.Error as exc:  # retention must never keep the tasks from opening
            self.log.warning("task retention failed: %s", exc)
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Brings the schema to SCHEMA_VERSION, one version per transaction. Raises
        sqlite3.DatabaseError for a version newer than this code knows."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"task database schema {version} is newer than this daemon's {SCHEMA_VERSION}"
            )
        while version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self.log.info("task database %s: schema %d -> %d", self.path, version, version + 1)
            version += 1

    def _prune(self) -> int:
        """Deletes finished tasks past the retention (never a RUNNING one); their count."""
        keep = self.retention
        db = self.db
        cutoff = datetime.now(UTC) - timedelta(days=keep.keep_days)
        doomed = [
            int(row[0]) for row in db.execute(
                "SELECT id FROM tasks WHERE status != 'RUNNING' ORDER BY id DESC"
                " LIMIT -1 OFFSET ?", (keep.keep_max,))
        ]
        for row in db.execute(
            "SELECT id, end_time FROM tasks WHERE status != 'RUNNING' ORDER BY id"
        ):
            ended = _parse_time(row[1])
            if ended is None or ended >= cutoff:
                break
            doomed.append(int(row[0]))
        doomed = sorted(set(doomed))
        for start in range(0, len(doomed), 500):
            chunk = doomed[start : start + 500]
            marks = ",".join("?" * len(chunk))
            with self._transaction() as tx:
                tx.execute(
                    f"DELETE FROM subtask_logs WHERE subtask_id IN"
                    f" (SELECT id FROM subtasks WHERE task_id IN ({marks}))", chunk)
                tx.execute(f"DELETE FROM subtasks WHERE task_id IN ({marks})", chunk)
                tx.execute(f"DELETE FROM tasks WHERE id IN ({marks})", chunk)
        if doomed:
            self.log.info("task retention: deleted %d finished task(s)", len(doomed))
        return len(doomed)

    # ---- writes ---------------------------------------------------------------

    async def create(self, task: TaskInstance) -> tuple[TaskInstance, bool]:
        """Insert a new task with its subtasks (ids assigned here).

        Returns (task, created). With an idempotency key already stored, the
        stored task comes back with created=False. A held lock raises LockHeld.
        """
        return await self._call(self._create, task)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back when anything in between fails."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT (disk full) has rolled back already
                db.execute("ROLLBACK")
            raise

    def _create(self, task: TaskInstance) -> tuple[TaskInstance, bool]:
        with self._transaction() as db:
            if task.idempotency_key:
                row = db.execute(
                    "SELECT id FROM tasks WHERE idempotency_key = ?", (task.idempotency_key,)
                ).fetchone()
                if row:
                    existing = self._load(row["id"])
                    assert existing is not None
                    return existing, False
            if task.lock_key and task.status == TaskStatus.RUNNING:
                holder = self._holder(task.lock_key)
                if holder is not None:
                    raise LockHeld(task.lock_key, holder)
            cur = db.execute(
                "INSERT INTO tasks (name, template, host_id, creator, executor, start_time,"
                " end_time, status, operation, context, lock_key, idempotency_key)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (task.name, task.template, task.host_id, task.creator, task.executor,
                 task.start_time, task.end_time, str(task.status), str(task.operation),
                 json.dumps(task.context), task.lock_key, task.idempotency_key),
            )
            task.id = int(cur.lastrowid or 0)
            # Subtask ids follow the template order; up/downstreams are given
            # as template indexes until the real ids are known.
            for sub in task.subtasks:
                sub.task_id = task.id
                cur = db.execute(
                    "INSERT INTO subtasks (task_id, series_id, class_name, name, description,"
                    " timeout, upstreams, downstreams, status, operation, run_time,"
                    " prohibit_rollback) VALUES (?,?,?,?,?,?,'[]','[]',?,?,?,?)",
                    (task.id, sub.series_id, sub.class_name, sub.name, sub.description,
                     sub.timeout, str(sub.status), str(sub.operation), sub.run_time,
                     int(sub.prohibit_rollback)),
                )
                sub.id = int(cur.lastrowid or 0)
            ids = [s.id for s in task.subtasks]
            for sub in task.subtasks:
                sub.upstreams = [ids[i] for i in sub.upstreams]
                sub.downstreams = [ids[i] for i in sub.downstreams]
                db.execute(
                    "UPDATE subtasks SET upstreams = ?, downstreams = ? WHERE id = ?",
                    (json.dumps(sub.upstreams), json.dumps(sub.downstreams), sub.id),
                )
        self._note_holder(task)
        return task, True

    async def save(
        self, task: TaskInstance, subtasks: Iterable[SubtaskInstance] = ()
    ) -> None:
        """Write the task's row and the given subtasks in one transaction.

        Raises LockHeld when the task goes RUNNING while another holds its lock.
        """
        await self._call(self._save, task, list(subtasks))

    def _save(self, task: TaskInstance, subtasks: list[SubtaskInstance]) -> None:
        with self._transaction() as db:
            try:
                db.execute(
                    "UPDATE tasks SET status = ?, operation = ?, context = ?, end_time = ?,"
                    " lock_key = ? WHERE id = ?",
                    (str(task.status), str(task.operation), json.dumps(task.context),
                     task.end_time, task.lock_key, task.id),
                )
            except sqlite3.IntegrityError:
                assert task.lock_key is not None
                raise LockHeld(task.lock_key, self._holder(task.lock_key)) from None
            for sub in subtasks:
                db.execute(
                    "UPDATE subtasks SET status = ?, operation = ?, run_time = ?,"
                    " start_time = ?, end_time = ? WHERE id = ?",
                    (str(sub.status), str(sub.operation), sub.run_time, sub.start_time,
                     sub.end_time, sub.id),
                )
        self._note_holder(task)
        if task.status != TaskStatus.RUNNING:
            try:
                self._prune()  # a task ended: the oldest may go
            except sqlite3.Error as exc:
                self.log.warning("task retention failed: %s", exc)

    def append_log(self, subtask_id: int, at: str, line: str) -> None:
        """Queued in order with the state writes; no need to wait for it."""
        self.submit(self._append_log, subtask_id, at, line)

    def _append_log(self, subtask_id: int, at: str, line: str) -> None:
        db = self.db
        limit = self.retention.log_max_lines
        count = int(db.execute(
            "SELECT COUNT(*) FROM subtask_logs WHERE subtask_id = ?", (subtask_id,)
        ).fetchone()[0])
        if count < limit - 1:
            db.execute("INSERT INTO subtask_logs (subtask_id, at, line) VALUES (?,?,?)",
                       (subtask_id, at, _cut(line)))
            return
        # The last line counts what did not fit.
        last = db.execute(
            "SELECT id, dropped FROM subtask_logs WHERE subtask_id = ? ORDER BY id DESC LIMIT 1",
            (subtask_id,),
        ).fetchone()
        dropped = int(last["dropped"]) + 1 if last is not None and last["dropped"] else 1
        note = f"{dropped} more line(s) dropped: a subtask log keeps {limit} lines"
        if dropped == 1:
            db.execute("INSERT INTO subtask_logs (subtask_id, at, line, dropped)"
                       " VALUES (?,?,?,?)", (subtask_id, at, note, dropped))
        else:
            db.execute("UPDATE subtask_logs SET at = ?, line = ?, dropped = ? WHERE id = ?",
                       (at, note, dropped, last["id"]))

    # ---- reads ----------------------------------------------------------------

    async def load(self, task_id: int) -> TaskInstance | None:
        return await self._call(self._load, task_id)

    async def page(self, offset: int, limit: int) -> tuple[list[TaskInstance], int]:
        return await self._call(self._page, offset, limit)

    async def running(self) -> list[TaskInstance]:
        return await self._call(self._running)

    async def holder(self, lock_key: str) -> int | None:
        """The id of the RUNNING task that holds lock_key, or None (as last committed)."""
        if self._db is not None:
            return self._holders.get(lock_key)
        return await self._call(self._holder, lock_key)

    def _note_holder(self, task: TaskInstance) -> None:
        """After a committed write of task: the locks it holds, in _holders."""
        for key, holder in list(self._holders.items()):
            if holder == task.id:
                del self._holders[key]
        if task.lock_key and task.status == TaskStatus.RUNNING:
            self._holders[task.lock_key] = task.id

    def _load_holders(self, db: sqlite3.Connection) -> None:
        rows = db.execute(
            "SELECT lock_key, id FROM tasks WHERE status = 'RUNNING' AND lock_key IS NOT NULL"
        ).fetchall()
        self._holders = {row["lock_key"]: int(row["id"]) for row in rows}

    async def read_log(self, subtask_id: int) -> list[tuple[str, str]]:
        return await self._call(self._read_log, subtask_id)

    def _holder(self, lock_key: str) -> int | None:
        row = self.db.execute(
            "SELECT id FROM tasks WHERE lock_key = ? AND status = 'RUNNING'", (lock_key,)
        ).fetchone()
        return int(row["id"]) if row else None

    def _read_log(self, subtask_id: int) -> list[tuple[str, str]]:
        rows = self.db.execute(
            "SELECT at, line FROM subtask_logs WHERE subtask_id = ? ORDER BY id", (subtask_id,)
        ).fetchall()
        return [(r["at"], r["line"]) for r in rows]

    def _running(self) -> list[TaskInstance]:
        rows = self.db.execute(
            "SELECT * FROM tasks WHERE status = 'RUNNING' ORDER BY id"
        ).fetchall()
        return [self._hydrate(r) for r in rows]

    def _page(self, offset: int, limit: int) -> tuple[list[TaskInstance], int]:
        total = int(self.db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
        rows = self.db.execute(
            "SELECT * FROM tasks ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset)
        ).fetchall()
        return [self._hydrate(r) for r in rows], total

    def _load(self, task_id: int) -> TaskInstance | None:
        row = self.db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return self._hydrate(row) if row else None

    def _hydrate(self, row: sqlite3.Row) -> TaskInstance:
        task = TaskInstance(
            id=row["id"], name=row["name"], template=row["template"], host_id=row["host_id"],
            creator=row["creator"], executor=row["executor"], start_time=row["start_time"],
            end_time=row["end_time"], status=TaskStatus(row["status"]),
            operation=Operation(row["operation"]), context=json.loads(row["context"]),
            lock_key=row["lock_key"], idempotency_key=row["idempotency_key"],
        )
        subs = self.db.execute(
            "SELECT * FROM subtasks WHERE task_id = ? ORDER BY id", (task.id,)
        ).fetchall()
        task.subtasks = [
            SubtaskInstance(
                id=s["id"], task_id=s["task_id"], class_name=s["class_name"], name=s["name"],
                description=s["description"], timeout=s["timeout"], series_id=s["series_id"],
                upstreams=json.loads(s["upstreams"]), downstreams=json.loads(s["downstreams"]),
                status=SubtaskStatus(s["status"]), operation=Operation(s["operation"]),
                run_time=s["run_time"], prohibit_rollback=bool(s["prohibit_rollback"]),
                start_time=s["start_time"], end_time=s["end_time"],
            )
            for s in subs
        ]
        return task


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.astimezone()
