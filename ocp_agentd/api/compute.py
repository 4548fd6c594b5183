"""/compute/hosts/{hostId}/agent...: the OCP server's view of this host's agent (SPEC 5).

Also served under /api/v2. ``hostId`` must be a positive 64-bit integer (else 1000) and
this daemon's host (else 2000). Restart and stop answer at once with the created task
(the seed's shape); the task runs in the background and is read at
/api/v2/tasks/instances/{id}. ``X-OCP-Idempotency-Key`` makes a retried POST answer the
task the first one created.

HostAgentProcess ids are derived from the program name, so they stay the same across
daemon restarts and config edits; the daemon itself is listed first as ``ocp_agentd``.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import sys
import time
from datetime import datetime

from aiohttp import web

from ocp_agentd import __version__
from ocp_agentd.api.context import app_context
from ocp_agentd.api.envelope import ApiError, ErrorCode, epoch_timestamp
from ocp_agentd.api.models import AgentStatus, HostAgent, HostAgentProcess, HostAgentProcessPage
from ocp_agentd.api.processes import DAEMON_NAME, refuse_during_agent_operation
from ocp_agentd.api.routes import Param, Route
from ocp_agentd.api.tasks import PAGE_PARAMS, call, creator_of, engine_of
from ocp_agentd.supervision import OperationFailed, ProcessInfo, ProgramNotFound
from ocp_agentd.tasks.model import TaskInstance
from ocp_agentd.tasks.templates import RESTART_AGENT, STOP_AGENT

IDEMPOTENCY_HEADER = "X-OCP-Idempotency-Key"
MAX_KEY_LENGTH = 128


def process_id(name: str) -> int:
    """A stable positive id per program name (48 bits: safe in JSON numbers everywhere)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:6], "big") + 1


def _host_id(request: web.Request) -> int:
    host_id: int = request["params"]["hostId"]
    ours = app_context(request).settings.agent.host_id
    if host_id != ours:
        raise ApiError(ErrorCode.HOST_NOT_FOUND,
                       f"host {host_id} not found: this agent serves host {ours}",
                       target="hostId")
    return host_id


def _daemon_process(request: web.Request, host_id: int) -> HostAgentProcess:
    ctx = app_context(request)
    settings = ctx.settings
    tcp = settings.api.tcp_host_port
    now = time.time()
    return HostAgentProcess(
        id=process_id(DAEMON_NAME), host_id=host_id, alias=DAEMON_NAME,
        pid=os.getpid(), user=getpass.getuser(),
        start_command=shlex.join([sys.executable, *sys.argv]),
        ports=str(tcp[1]) if tcp else "", elapsed_time=int(now - ctx.started_at),
        last_active_time=epoch_timestamp(now), status=AgentStatus.STARTED, operable=False,
        log_file_pattern=str(settings.agent.log_dir / "ocp_agentd.log*"),
        create_time=epoch_timestamp(ctx.started_at),
        update_time=epoch_timestamp(ctx.started_at),
    )


def _process(info: ProcessInfo, host_id: int, started_at: float) -> HostAgentProcess:
    running = str(info.state) == "RUNNING"
    last_exit_at = None
    if info.last_exit and info.last_exit.get("at"):
        last_exit_at = datetime.fromisoformat(info.last_exit["at"]).timestamp()
    changed = max(filter(None, (info.create_time, last_exit_at, started_at)))
    return HostAgentProcess(
        id=process_id(info.name), host_id=host_id, alias=info.name,
        pid=info.pid if running else None, user=info.user or getpass.getuser(),
        start_command=shlex.join(info.command),
        ports=",".join(str(p) for p in info.ports),
        elapsed_time=int(info.uptime or 0) if running else 0,
        last_active_time=epoch_timestamp(time.time() if running else last_exit_at),
        status=AgentStatus.STARTED if running else AgentStatus.STOPPED,
        operable=bool(info.operable),
        log_file_pattern=",".join(info.log_files),
        create_time=epoch_timestamp(info.create_time or started_at),
        update_time=epoch_timestamp(changed),
    )


def _processes(request: web.Request, host_id: int) -> list[HostAgentProcess]:
    ctx = app_context(request)
    return [_daemon_process(request, host_id)] + [
        _process(info, host_id, ctx.started_at) for info in ctx.supervisor.infos()
    ]


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ApiError(ErrorCode.BAD_REQUEST,
                       f"{IDEMPOTENCY_HEADER} must be 1-{MAX_KEY_LENGTH} printable characters",
                       target=IDEMPOTENCY_HEADER)
    return key


# --- handlers -----------------------------------------------------------------------------


async def _submit(request: web.Request, template: str) -> TaskInstance:
    _host_id(request)
    key = _idempotency_key(request)
    task, _ = await call(engine_of(request).submit(template, creator_of(request), key))
    if task.template != template:
        raise ApiError(ErrorCode.BAD_REQUEST,
                       f"{IDEMPOTENCY_HEADER} {key!r} was already used for task {task.id} "
                       f"({task.name})", target=IDEMPOTENCY_HEADER)
    return task


async def restart_agent(request: web.Request) -> TaskInstance:
    return await _submit(request, RESTART_AGENT)


async def stop_agent(request: web.Request) -> TaskInstance:
    return await _submit(request, STOP_AGENT)


async def get_agent(request: web.Request) -> HostAgent:
    host_id = _host_id(request)
    ctx = app_context(request)
    processes = _processes(request, host_id)
    workers_up = all(p.status == AgentStatus.STARTED for p in processes)
    return HostAgent(
        id=host_id, version=__version__,
        install_home=str(ctx.settings.agent.install_home),
        log_home=str(ctx.settings.agent.log_dir),
        last_available_time=epoch_timestamp(time.time()), host_id=host_id,
        host_inner_ip_address=ctx.server_address,
        status=AgentStatus.STARTED if workers_up else AgentStatus.STOPPED,
        processes=processes,
        create_time=epoch_timestamp(ctx.started_at), update_time=epoch_timestamp(time.time()),
    )


async def list_agent_processes(request: web.Request) -> HostAgentProcessPage:
    host_id = _host_id(request)
    page, size = request["params"]["page"], request["params"]["size"]
    processes = _processes(request, host_id)
    start = (page - 1) * size
    return HostAgentProcessPage.of(processes[start:start + size], len(processes), page, size)


async def restart_agent_process(request: web.Request) -> HostAgentProcess:
    host_id = _host_id(request)
    ctx = app_context(request)
    wanted = request["params"]["agentProcessId"]
    if wanted == process_id(DAEMON_NAME):
        raise ApiError(ErrorCode.PROCESS_NOT_OPERABLE,
                       "ocp_agentd is the daemon itself; it is operated through systemd",
                       target="agentProcessId")
    info = next((i for i in ctx.supervisor.infos() if process_id(i.name) == wanted), None)
    if info is None:
        raise ApiError(ErrorCode.PROCESS_NOT_FOUND, f"no agent process with id {wanted}",
                       target="agentProcessId")
    if not info.operable:
        raise ApiError(ErrorCode.PROCESS_NOT_OPERABLE,
                       f"{info.name} is not operable one by one; restart the whole agent",
                       target="agentProcessId")
    await refuse_during_agent_operation(request)
    try:
        info = await ctx.supervisor.restart(info.name)
    except ProgramNotFound:
        raise ApiError(ErrorCode.PROCESS_NOT_FOUND, f"no agent process with id {wanted}",
                       target="agentProcessId") from None
    except OperationFailed as exc:
        raise ApiError(ErrorCode.PROCESS_OPERATION_FAILED,
                       f"restart {exc.program} failed: {exc.reason}", target=exc.program) from None
    return _process(info, host_id, ctx.started_at)


# --- routes -------------------------------------------------------------------------------

_HOST = Param("hostId", "path", "integer", description="The OCP host id of this host",
              minimum=1, maximum=2**63 - 1)
_PROCESS = Param("agentProcessId", "path", "integer",
                 description="HostAgentProcess id (stable per program)", minimum=1,
                 maximum=2**63 - 1)
_TAGS = ("compute",)
_HOST_ERRORS = (ErrorCode.HOST_NOT_FOUND,)
_TASK_ERRORS = (ErrorCode.HOST_NOT_FOUND, ErrorCode.OPERATION_LOCKED)
_KEY_DOC = (f" Send {IDEMPOTENCY_HEADER} to make a retried request answer the same task. "
            "A second agent operation while one runs answers 2003 with the running "
            "task's id in target.")


def routes() -> list[Route]:
    base = "/compute/hosts/{hostId}/agent"
    return [
        Route("POST", f"{base}/restart", restart_agent, "HOST_MANAGER",
              "Restart the basic OCP Agent processes (task \"Restart OCP agent\")",
              description="Answers at once with the created task: Prepare restart OCP agent "
              "-> Restart pos proxy -> Stop all OCP agent processes -> Start all OCP agent "
              "processes -> Finish OCP agent operation." + _KEY_DOC,
              operation_id="restartHostAgent", params=(_HOST,), data=TaskInstance,
              errors=_TASK_ERRORS, also_prefixed=True, tags=_TAGS),
        Route("POST", f"{base}/stop", stop_agent, "HOST_MANAGER",
              "Stop the OCP Agent worker processes (task \"Stop OCP agent\")",
              description="Answers at once with the created task: Prepare stop OCP agent -> "
              "Stop all OCP agent processes -> Finish OCP agent operation. pos_proxy keeps "
              "running." + _KEY_DOC,
              operation_id="stopHostAgent", params=(_HOST,), data=TaskInstance,
              errors=_TASK_ERRORS, also_prefixed=True, tags=_TAGS),
        Route("GET", base, get_agent, "HOST_VIEWER", "The host's OCP Agent (HostAgent)",
              operation_id="getHostAgent", params=(_HOST,), data=HostAgent,
              errors=_HOST_ERRORS, also_prefixed=True, tags=_TAGS),
        Route("GET", f"{base}/processes", list_agent_processes, "HOST_VIEWER",
              "The OCP Agent processes, the daemon itself first",
              operation_id="listHostAgentProcesses", params=(_HOST, *PAGE_PARAMS),
              data=HostAgentProcessPage, errors=_HOST_ERRORS, also_prefixed=True, tags=_TAGS),
        Route("POST", f"{base}/processes/{{agentProcessId}}/restart", restart_agent_process,
              "HOST_MANAGER", "Restart one operable agent process and wait until it runs",
              description="pos_proxy and ocp_agentd are not operable (2002).",
              operation_id="restartHostAgentProcess", params=(_HOST, _PROCESS),
              data=HostAgentProcess,
              errors=(ErrorCode.HOST_NOT_FOUND, ErrorCode.PROCESS_NOT_FOUND,
                      ErrorCode.PROCESS_NOT_OPERABLE, ErrorCode.OPERATION_LOCKED,
                      ErrorCode.PROCESS_OPERATION_FAILED),
              also_prefixed=True, tags=_TAGS),
    ]
