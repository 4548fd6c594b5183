"""SPEC section 6: the local process API over the Supervisor.

GETs need HOST_VIEWER, POSTs HOST_MANAGER. Operations take an optional body
``{"timeout": seconds, "force": bool}``: the supervisor waits at most ``timeout`` for the
program to be RUNNING (or gone); ``force`` lets a caller act on a program that is not
operable (the restart task's pos_proxy subtask). The daemon itself (``ocp_agentd``) is never
operable here. A failed operation answers 2004 (see api/envelope.py).

While a restart or stop task holds the host's operation lock, only that task's own calls
(``X-OCP-Task-ID: <its id>``) may start or stop programs; any other answers 2003 with the
task's id, so a local command cannot undo a step of a running task. The header is a claim
of cooperation, not a credential: the caller already needs HOST_MANAGER.
"""

from __future__ import annotations

import os
import time
from typing import Any

from aiohttp import web

from ocp_agentd import __version__
from ocp_agentd.api.context import app_context
from ocp_agentd.api.envelope import ApiError, ErrorCode, epoch_timestamp, raw, sub_error
from ocp_agentd.api.models import (
    AllBody,
    AllResult,
    DaemonStatus,
    OperationBody,
    ProgramVerify,
    VerifyAllResult,
)
from ocp_agentd.api.routes import Param, Route
from ocp_agentd.headers import TASK_HEADER
from ocp_agentd.supervision import OperationFailed, ProcessInfo, ProgramNotFound, VerifyResult
from ocp_agentd.tasks.templates import AGENT_LOCK

DAEMON_NAME = "ocp_agentd"

def _lookup(request: web.Request, name: str) -> ProcessInfo:
    try:
        return app_context(request).supervisor.info(name)
    except ProgramNotFound:
        raise ApiError(
            ErrorCode.PROCESS_NOT_FOUND, f"no program named {name!r}", target="name"
        ) from None


def _operable_target(request: web.Request) -> str:
    """The program named in the path, if this request may operate on it."""
    name: str = request["params"]["name"]
    if name == DAEMON_NAME:
        raise ApiError(
            ErrorCode.PROCESS_NOT_OPERABLE,
            "ocp_agentd is the daemon itself; it is operated through systemd",
            target="name",
        )
    info = _lookup(request, name)
    if not info.operable and not request["body"].force:
        verb = request.path.rsplit("/", 1)[-1]  # stop, start or restart
        raise ApiError(
            ErrorCode.PROCESS_NOT_OPERABLE,
            f"program {name!r} is not operable one by one "
            f"(override with \"force\": true, or ocp-agentctl {verb} --force {name})",
            target="name",
        )
    return name


async def refuse_during_agent_operation(request: web.Request) -> None:
    """2003 when a task other than the caller's holds the host's operation lock."""
    engine = app_context(request).task_engine
    holder = await engine.lock_holder(AGENT_LOCK) if engine is not None else None
    if holder is not None and request.headers.get(TASK_HEADER) != str(holder):
        raise ApiError(ErrorCode.OPERATION_LOCKED,
                       f"another agent operation is running on this host: task {holder}",
                       target=str(holder))


def _failed(exc: OperationFailed, action: str) -> ApiError:
    return ApiError(
        ErrorCode.PROCESS_OPERATION_FAILED,
        f"{action} {exc.program} failed: {exc.reason}",
        target=exc.program,
    )


async def get_status(request: web.Request) -> DaemonStatus:
    ctx = app_context(request)
    counts = ctx.supervisor.counts()
    return DaemonStatus(
        version=__version__,
        pid=os.getpid(),
        uptime=round(max(0.0, time.time() - ctx.started_at), 3),
        started_at=epoch_timestamp(ctx.started_at),
        host_id=ctx.settings.agent.host_id,
        state=ctx.state,
        programs=sum(counts.values()),
        counts={str(state): number for state, number in counts.items()},
    )


async def list_processes(request: web.Request) -> Any:
    # The hot path: the records as kept encoded between their changes (records_json.py),
    # not validated or encoded again.
    return raw(app_context(request).supervisor.process_records_json())


async def get_process(request: web.Request) -> ProcessInfo:
    return _lookup(request, request["params"]["name"])


async def _operate(request: web.Request, action: str) -> ProcessInfo:
    name = _operable_target(request)
    await refuse_during_agent_operation(request)
    supervisor = app_context(request).supervisor
    operation = {"start": supervisor.start, "stop": supervisor.stop,
                 "restart": supervisor.restart}[action]
    try:
        info = await operation(name, timeout=request["body"].timeout)
    except ProgramNotFound:
        raise ApiError(ErrorCode.PROCESS_NOT_FOUND, f"no program named {name!r}",
                       target="name") from None
    except OperationFailed as exc:
        raise _failed(exc, action) from None
    return info


async def start_process(request: web.Request) -> ProcessInfo:
    return await _operate(request, "start")


async def stop_process(request: web.Request) -> ProcessInfo:
    return await _operate(request, "stop")


async def restart_process(request: web.Request) -> ProcessInfo:
    return await _operate(request, "restart")


async def verify_process(request: web.Request) -> VerifyResult:
    name = request["params"]["name"]
    _lookup(request, name)
    try:
        result = await app_context(request).supervisor.verify(name)
    except ProgramNotFound:
        raise ApiError(ErrorCode.PROCESS_NOT_FOUND, f"no program named {name!r}",
                       target="name") from None
    return result


async def _all(request: web.Request, action: str) -> AllResult:
    await refuse_during_agent_operation(request)
    supervisor = app_context(request).supervisor
    operation = supervisor.start_all if action == "start" else supervisor.stop_all
    results = await operation(timeout=request["body"].timeout)
    failures = {name: r for name, r in results.items() if isinstance(r, OperationFailed)}
    if failures:
        names = ", ".join(sorted(failures))
        raise ApiError(
            ErrorCode.PROCESS_OPERATION_FAILED,
            f"{action}-all failed for {len(failures)} of {len(results)} programs: {names}",
            sub_errors=[
                sub_error(ErrorCode.PROCESS_OPERATION_FAILED, f"{action} failed: {exc.reason}",
                          target=name)
                for name, exc in failures.items()
            ],
        )
    return AllResult(ok=True, processes=list(results.values()))  # type: ignore[arg-type]


async def start_all(request: web.Request) -> AllResult:
    return await _all(request, "start")


async def stop_all(request: web.Request) -> AllResult:
    return await _all(request, "stop")


async def verify_all(request: web.Request) -> VerifyAllResult:
    results = await app_context(request).supervisor.verify_all()
    programs = [ProgramVerify(name=name, ok=result.ok, checks=result.checks)
                for name, result in results.items()]
    return VerifyAllResult(ok=all(item["ok"] for item in programs), programs=programs)


_NAME = Param("name", "path", "string", description="The program name from the config")
_HOST = ("processes",)
_NOT_FOUND = (ErrorCode.PROCESS_NOT_FOUND,)
_OPERATION_ERRORS = (
    ErrorCode.PROCESS_NOT_FOUND,
    ErrorCode.PROCESS_NOT_OPERABLE,
    ErrorCode.PROCESS_OPERATION_FAILED,
    ErrorCode.OPERATION_LOCKED,
)
_ALL_ERRORS = (ErrorCode.PROCESS_OPERATION_FAILED, ErrorCode.OPERATION_LOCKED)


def routes() -> list[Route]:
    viewer, manager = "HOST_VIEWER", "HOST_MANAGER"
    return [
        Route("GET", "/api/v1/status", get_status, viewer, "Daemon status",
              description="Version, pid, uptime, host id, daemon state and the number of "
              "programs per state.", operation_id="getDaemonStatus", data=DaemonStatus,
              tags=_HOST),
        Route("GET", "/api/v1/processes", list_processes, viewer, "Every program's record",
              operation_id="listProcesses", data=list[ProcessInfo], tags=_HOST),
        Route("GET", "/api/v1/processes/{name}", get_process, viewer, "One program's record",
              operation_id="getProcess", params=(_NAME,), data=ProcessInfo, errors=_NOT_FOUND,
              tags=_HOST),
        Route("POST", "/api/v1/processes/{name}/start", start_process, manager,
              "Start a program and wait until it is RUNNING", operation_id="startProcess",
              params=(_NAME,), body=OperationBody, data=ProcessInfo,
              errors=_OPERATION_ERRORS, tags=_HOST),
        Route("POST", "/api/v1/processes/{name}/stop", stop_process, manager,
              "Stop a program and wait until its whole process tree is gone",
              operation_id="stopProcess", params=(_NAME,), body=OperationBody,
              data=ProcessInfo, errors=_OPERATION_ERRORS, tags=_HOST),
        Route("POST", "/api/v1/processes/{name}/restart", restart_process, manager,
              "Restart a program and wait until it is RUNNING again",
              operation_id="restartProcess", params=(_NAME,), body=OperationBody,
              data=ProcessInfo, errors=_OPERATION_ERRORS, tags=_HOST),
        Route("POST", "/api/v1/processes/{name}/verify", verify_process, manager,
              "Check a program: alive, ports listening, health URL",
              operation_id="verifyProcess", params=(_NAME,), data=VerifyResult,
              errors=_NOT_FOUND, tags=_HOST),
        Route("POST", "/api/v1/agent/stop-all", stop_all, manager,
              "Stop every worker program, in parallel",
              description="On failure: 2004 with one subError per failed program; 2003 while "
              "a restart or stop task runs.",
              operation_id="stopAllProcesses", body=AllBody, data=AllResult,
              errors=_ALL_ERRORS, tags=_HOST),
        Route("POST", "/api/v1/agent/start-all", start_all, manager,
              "Start every worker program, in parallel",
              description="On failure: 2004 with one subError per failed program; 2003 while "
              "a restart or stop task runs.",
              operation_id="startAllProcesses", body=AllBody, data=AllResult,
              errors=_ALL_ERRORS, tags=_HOST),
        Route("POST", "/api/v1/agent/verify", verify_all, manager, "Check every program",
              description="Answers 200 with ok=false when a check fails.",
              operation_id="verifyAllProcesses", data=VerifyAllResult, tags=_HOST),
    ]
