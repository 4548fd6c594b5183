"""/api/v2/tasks/instances: read the OCP tasks and operate on them (SPEC section 5).

Reads need TASK_VIEWER, operations TASK_MANAGER. The engine's refusals carry the codes
of SPEC section 4 (20000 unknown task or subtask, 20003 wrong state, 20004 rollback
prohibited, 2003 another agent operation running) and become the envelope's error here.
"""

from __future__ import annotations

import logging
import pwd
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ocp_agentd.api.context import TaskEngineView, app_context
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.models import SubtaskLog, TaskPage
from ocp_agentd.api.routes import Param, Route
from ocp_agentd.tasks.base import TaskError
from ocp_agentd.tasks.model import StatusChange, TaskInstance, TaskStatus

log = logging.getLogger("ocp_agentd.api")

MAX_PAGE_SIZE = 1000

PAGE_PARAMS = (
    Param("page", "query", "integer", description="Page number, from 1", minimum=1,
          maximum=2**31 - 1, default=1),
    Param("size", "query", "integer", description="Entries per page", minimum=1,
          maximum=MAX_PAGE_SIZE, default=10),
)


# --- shared with compute.py ---------------------------------------------------------------


def engine_of(request: web.Request) -> TaskEngineView:
    engine = app_context(request).task_engine
    if engine is None:
        raise ApiError(ErrorCode.INTERNAL, "the task engine is not running")
    return engine


def api_error(exc: TaskError) -> ApiError:
    return ApiError(ErrorCode(exc.code), exc.message, target=exc.target)


async def call(work: Awaitable[Any]) -> Any:
    """Await an engine call, turning its refusal into the envelope's error."""
    try:
        return await work
    except TaskError as exc:
        raise api_error(exc) from None
    except (sqlite3.Error, OSError) as exc:
        # Disk full, I/O error, read-only state_dir: the cause is the operator's to fix.
        log.error("the task store under state_dir failed: %s", exc)
        raise ApiError(ErrorCode.INTERNAL,
                       f"the task store under state_dir cannot be written: {exc}") from None


def creator_of(request: web.Request) -> str:
    """Who asked: the token's name on TCP, the user name of a unix socket peer."""
    if request.get("token_name"):
        return str(request["token_name"])
    who = str(request.get("caller") or "")
    if who.startswith("uid "):
        uid = who.split()[1]
        try:
            return pwd.getpwuid(int(uid)).pw_name
        except (KeyError, ValueError):
            return f"uid {uid}"
    return who or "admin"


def count_outcomes(engine: Any, metrics: Any) -> None:
    """Count each task that reaches a final status in the metrics (daemon wiring)."""

    def listener(change: StatusChange) -> None:
        if change.subtask is None and change.new != TaskStatus.RUNNING:
            metrics.task_finished(change.task.name, str(change.new))

    engine.add_listener(listener)


# --- handlers -----------------------------------------------------------------------------


async def list_tasks(request: web.Request) -> TaskPage:
    page, size = request["params"]["page"], request["params"]["size"]
    tasks, total = await call(engine_of(request).page(page, size))
    return TaskPage.of(tasks, total, page, size)


async def get_task(request: web.Request) -> TaskInstance:
    task: TaskInstance = await call(engine_of(request).get(request["params"]["id"]))
    return task


def _task_operation(name: str) -> Callable[[web.Request], Awaitable[TaskInstance]]:
    async def handler(request: web.Request) -> TaskInstance:
        operation = getattr(engine_of(request), name)
        task: TaskInstance = await call(operation(request["params"]["id"]))
        return task

    return handler


def _subtask_operation(name: str) -> Callable[[web.Request], Awaitable[TaskInstance]]:
    async def handler(request: web.Request) -> TaskInstance:
        operation = getattr(engine_of(request), name)
        params = request["params"]
        task: TaskInstance = await call(operation(params["id"], params["subtaskId"]))
        return task

    return handler


async def subtask_log(request: web.Request) -> SubtaskLog:
    params = request["params"]
    text = await call(engine_of(request).subtask_log(params["id"], params["subtaskId"]))
    return SubtaskLog(log=text)


_ID = Param("id", "path", "integer", description="The task id", minimum=1,
            maximum=2**63 - 1)
_SID = Param("subtaskId", "path", "integer", description="The subtask id", minimum=1,
             maximum=2**63 - 1)
_BASE = "/api/v2/tasks/instances"
_TAGS = ("tasks",)
_NOT_FOUND = (ErrorCode.TASK_NOT_FOUND,)
_OPERATION_ERRORS = (ErrorCode.TASK_NOT_FOUND, ErrorCode.TASK_STATE_CONFLICT,
                     ErrorCode.OPERATION_LOCKED)


def routes() -> list[Route]:
    viewer, manager = "TASK_VIEWER", "TASK_MANAGER"
    sub = f"{_BASE}/{{id}}/subtasks/{{subtaskId}}"
    return [
        Route("GET", _BASE, list_tasks, viewer, "Tasks, newest first",
              operation_id="listTasks", params=PAGE_PARAMS, data=TaskPage, tags=_TAGS),
        Route("GET", f"{_BASE}/{{id}}", get_task, viewer, "One task with its subtasks",
              operation_id="getTask", params=(_ID,), data=TaskInstance, errors=_NOT_FOUND,
              tags=_TAGS),
        Route("POST", f"{_BASE}/{{id}}/retry", _task_operation("retry"), manager,
              "Re-run a FAILED task from its FAILED subtasks",
              description="Each re-run subtask's runTime grows by one. A task whose "
              "rollback failed retries the rollback.",
              operation_id="retryTask", params=(_ID,), data=TaskInstance,
              errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("POST", f"{_BASE}/{{id}}/rollback", _task_operation("rollback"), manager,
              "Undo a FAILED task's done subtasks in reverse order",
              description="Refused with 20004 when the task's context has "
              "prohibit_rollback \"true\". The task ends SUCCESSFUL with operation "
              "ROLLBACK when every undo succeeded.",
              operation_id="rollbackTask", params=(_ID,), data=TaskInstance,
              errors=(*_OPERATION_ERRORS, ErrorCode.ROLLBACK_PROHIBITED), tags=_TAGS),
        Route("POST", f"{sub}/retry", _subtask_operation("retry_subtask"), manager,
              "Re-run one FAILED subtask of a FAILED task", operation_id="retrySubtask",
              params=(_ID, _SID), data=TaskInstance, errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("POST", f"{sub}/skip", _subtask_operation("skip_subtask"), manager,
              "Mark one FAILED subtask done (operation SKIP) and go on with the task",
              operation_id="skipSubtask", params=(_ID, _SID), data=TaskInstance,
              errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("POST", f"{sub}/cancel", _subtask_operation("cancel_subtask"), manager,
              "Cancel a RUNNING subtask: CANCELING now, then FAILED",
              operation_id="cancelSubtask", params=(_ID, _SID), data=TaskInstance,
              errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("GET", f"{sub}/log", subtask_log, viewer,
              "What the subtask did, one timestamped line per step",
              operation_id="getSubtaskLog", params=(_ID, _SID), data=SubtaskLog,
              errors=_NOT_FOUND, tags=_TAGS),
    ]
