"""/api/v2/tasks/instances: read the OCP tasks and operate on them (SPEC section 5).

Reads need TASK_VIEWER, operations TASK_MANAGER. The engine's refusals carry the codes
of SPEC section 4 (20000 unknown task or subtask, 20003 wrong state, 20004 rollback
prohibited, 2003 another agent operation running) and become the envelope's error here.
"""

from __future__ import annotations

import logging
import math
import pwd
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ocp_agentd.api.context import TaskEngineView, app_context
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.routes import Param, Route
from ocp_agentd.tasks.base import TaskError
from ocp_agentd.tasks.model import StatusChange, TaskStatus

log = logging.getLogger("ocp_agentd.api")

MAX_PAGE_SIZE = 1000

# --- shapes for the OpenAPI document ------------------------------------------------------

_INT = {"type": "integer", "format": "int64"}
_STR = {"type": "string"}
SUBTASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "className": _STR, "description": _STR,
        "downstreams": {"type": "array", "items": _INT}, "id": _INT, "name": _STR,
        "nodeType": _STR, "operation": _STR, "parallelIdx": _INT,
        "prohibitRollback": {"type": "boolean"}, "runTime": _INT, "seriesId": _INT,
        "status": {"type": "string",
                   "enum": ["PENDING", "READY", "RUNNING", "CANCELING", "FAILED", "SUCCESSFUL"]},
        "timeout": _INT, "upstreams": {"type": "array", "items": _INT},
    },
}
TASK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "context": {
            "type": "object",
            "properties": {
                "listMap": {"type": "object"}, "parallel": {"type": "boolean"},
                "parallelIdx": _INT,
                "stringMap": {"type": "object", "additionalProperties": _STR},
            },
        },
        "creator": _STR, "executor": _STR, "hostId": _INT, "id": _INT, "name": _STR,
        "operation": _STR, "startTime": {"type": "string", "format": "date-time"},
        "status": {"type": "string", "enum": ["RUNNING", "FAILED", "SUCCESSFUL"]},
        "subtasks": {"type": "array", "items": SUBTASK_SCHEMA},
        "taskDefinitionId": _INT, "type": _STR,
    },
}
PAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"number": _INT, "size": _INT, "totalElements": _INT, "totalPages": _INT},
}


def page_schema(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object",
            "properties": {"contents": {"type": "array", "items": item}, "page": PAGE_SCHEMA}}


PAGE_PARAMS = (
    Param("page", "query", "integer", description="Page number, from 1", minimum=1,
          maximum=2**31 - 1, default=1),
    Param("size", "query", "integer", description="Entries per page", minimum=1,
          maximum=MAX_PAGE_SIZE, default=10),
)


def paged(contents: list[Any], total: int, page: int, size: int) -> dict[str, Any]:
    return {
        "contents": contents,
        "page": {"number": page, "size": size, "totalElements": total,
                 "totalPages": math.ceil(total / size) if total else 0},
    }


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
    who = str(request.get("caller") or "")
    if who.startswith("token "):
        return who.removeprefix("token ")
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


async def list_tasks(request: web.Request) -> dict[str, Any]:
    page, size = request["params"]["page"], request["params"]["size"]
    tasks, total = await call(engine_of(request).page(page, size))
    return paged([t.to_json() for t in tasks], total, page, size)


async def get_task(request: web.Request) -> dict[str, Any]:
    task = await call(engine_of(request).get(request["params"]["id"]))
    return dict(task.to_json())


def _task_operation(name: str) -> Callable[[web.Request], Awaitable[dict[str, Any]]]:
    async def handler(request: web.Request) -> dict[str, Any]:
        operation = getattr(engine_of(request), name)
        task = await call(operation(request["params"]["id"]))
        return dict(task.to_json())

    return handler


def _subtask_operation(name: str) -> Callable[[web.Request], Awaitable[dict[str, Any]]]:
    async def handler(request: web.Request) -> dict[str, Any]:
        operation = getattr(engine_of(request), name)
        params = request["params"]
        task = await call(operation(params["id"], params["subtaskId"]))
        return dict(task.to_json())

    return handler


async def subtask_log(request: web.Request) -> dict[str, Any]:
    params = request["params"]
    text = await call(engine_of(request).subtask_log(params["id"], params["subtaskId"]))
    return {"log": text}


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
              params=PAGE_PARAMS, data=page_schema(TASK_SCHEMA), tags=_TAGS),
        Route("GET", f"{_BASE}/{{id}}", get_task, viewer, "One task with its subtasks",
              params=(_ID,), data=TASK_SCHEMA, errors=_NOT_FOUND, tags=_TAGS),
        Route("POST", f"{_BASE}/{{id}}/retry", _task_operation("retry"), manager,
              "Re-run a FAILED task from its FAILED subtasks",
              description="Each re-run subtask's runTime grows by one. A task whose "
              "rollback failed retries the rollback.",
              params=(_ID,), data=TASK_SCHEMA, errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("POST", f"{_BASE}/{{id}}/rollback", _task_operation("rollback"), manager,
              "Undo a FAILED task's done subtasks in reverse order",
              description="Refused with 20004 when the task's context has "
              "prohibit_rollback \"true\". The task ends SUCCESSFUL with operation "
              "ROLLBACK when every undo succeeded.",
              params=(_ID,), data=TASK_SCHEMA,
              errors=(*_OPERATION_ERRORS, ErrorCode.ROLLBACK_PROHIBITED), tags=_TAGS),
        Route("POST", f"{sub}/retry", _subtask_operation("retry_subtask"), manager,
              "Re-run one FAILED subtask of a FAILED task",
              params=(_ID, _SID), data=TASK_SCHEMA, errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("POST", f"{sub}/skip", _subtask_operation("skip_subtask"), manager,
              "Mark one FAILED subtask done (operation SKIP) and go on with the task",
              params=(_ID, _SID), data=TASK_SCHEMA, errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("POST", f"{sub}/cancel", _subtask_operation("cancel_subtask"), manager,
              "Cancel a RUNNING subtask: CANCELING now, then FAILED",
              params=(_ID, _SID), data=TASK_SCHEMA, errors=_OPERATION_ERRORS, tags=_TAGS),
        Route("GET", f"{sub}/log", subtask_log, viewer,
              "What the subtask did, one timestamped line per step",
              params=(_ID, _SID),
              data={"type": "object", "properties": {"log": _STR}},
              errors=_NOT_FOUND, tags=_TAGS),
    ]
