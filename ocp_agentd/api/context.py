"""What route handlers may use: the AppContext, and the narrow views of the supervisor and
the task engine that the API calls (Protocols, so the API does not depend on their
classes and tests may hand in their own)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from ocp_agentd.api import envelope
from ocp_agentd.api.metrics import AgentMetrics
from ocp_agentd.config import Settings
from ocp_agentd.events import EventHub
from ocp_agentd.supervision import OperationFailed, ProcessInfo, VerifyResult
from ocp_agentd.tasks.model import TaskInstance


class SupervisorView(Protocol):
    """The supervisor as the API sees it (supervision.Supervisor).

    Commands raise supervision.ProgramNotFound for an unknown name and OperationFailed when
    the goal is not reached; timeout is in seconds (None: wait as long as it takes).
    """

    def info(self, name: str) -> ProcessInfo: ...
    def infos(self) -> list[ProcessInfo]: ...
    def process_records(self) -> list[dict[str, Any]]: ...
    def process_records_json(self) -> bytes: ...
    def counts(self) -> dict[str, int]: ...
    async def start(self, name: str, timeout: float | None = None) -> ProcessInfo: ...
    async def stop(self, name: str, timeout: float | None = None) -> ProcessInfo: ...
    async def restart(self, name: str, timeout: float | None = None) -> ProcessInfo: ...
    async def verify(self, name: str) -> VerifyResult: ...
    async def signal(self, name: str, signum: int) -> ProcessInfo: ...
    async def start_all(
        self, timeout: float | None = None
    ) -> dict[str, ProcessInfo | OperationFailed]: ...
    async def stop_all(
        self, timeout: float | None = None
    ) -> dict[str, ProcessInfo | OperationFailed]: ...
    async def verify_all(self) -> dict[str, VerifyResult]: ...


class TaskEngineView(Protocol):
    """The task engine as the API sees it (tasks.engine.TaskEngine).

    Refusals raise tasks.base.TaskError carrying the envelope's code.
    """

    async def submit(
        self, template_name: str, creator: str, idempotency_key: str | None = None
    ) -> tuple[TaskInstance, bool]: ...
    async def get(self, task_id: int) -> TaskInstance: ...
    async def page(self, page: int, size: int) -> tuple[list[TaskInstance], int]: ...
    async def subtask_log(self, task_id: int, subtask_id: int) -> str: ...
    async def lock_holder(self, lock_key: str) -> int | None: ...
    async def retry(self, task_id: int) -> TaskInstance: ...
    async def rollback(self, task_id: int) -> TaskInstance: ...
    async def retry_subtask(self, task_id: int, subtask_id: int) -> TaskInstance: ...
    async def skip_subtask(self, task_id: int, subtask_id: int) -> TaskInstance: ...
    async def cancel_subtask(self, task_id: int, subtask_id: int) -> TaskInstance: ...


class RequestWatch(Protocol):
    """Told when a request starts being worked on and when that work is over (the
    daemon's ticker watches its event loop closely meanwhile). A streamed answer's work is
    over once its headers are out: from there it waits on events, not on work."""

    def request_started(self) -> None: ...
    def request_ended(self) -> None: ...


@dataclass
class AppContext:
    """What handlers may use. ``state`` is the daemon's: starting, running, reloading,
    stopping (shown by GET /api/v1/status). ``started_at``: epoch seconds."""

    settings: Settings
    supervisor: SupervisorView
    started_at: float = field(default_factory=time.time)
    task_engine: TaskEngineView | None = None
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    server_address: str = field(default_factory=envelope.host_address)
    state: str = "running"
    # Told of each request's work (RequestWatch); None: nobody watches.
    requests: RequestWatch | None = None
    # What GET /api/v1/events streams (the supervisor's hub in the daemon).
    events: EventHub = field(default_factory=EventHub)
    # Re-reads the config as SIGHUP does: {added, removed, changed, unchanged}, or
    # config.ConfigError when the file is invalid (nothing changed).
    reload: Callable[[], Awaitable[dict[str, list[str]]]] | None = None


APP_CTX: web.AppKey[AppContext] = web.AppKey("ocp_agentd_context")


def app_context(request: web.Request) -> AppContext:
    """The AppContext of the app serving this request."""
    return request.app[APP_CTX]


_IN_WORK = "ocp_agentd_in_work"


def work_started(request: web.Request) -> None:
    """The request's work begins (the envelope middleware, as it arrives; the body
    reader, once a body it waited for has come)."""
    watch = app_context(request).requests
    if watch is not None:
        request[_IN_WORK] = True
        watch.request_started()


def work_ended(request: web.Request) -> None:
    """The request's work is over: its answer is made, its stream's headers are out, or
    it waits for the rest of its body from the client. Only the first call after each
    work_started counts."""
    if request.get(_IN_WORK):
        request[_IN_WORK] = False
        watch = app_context(request).requests
        if watch is not None:
            watch.request_ended()
