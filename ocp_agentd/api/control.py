"""SPEC section 12's control routes: reload the configuration, signal a program.

- ``POST /api/v1/agent/reload``: the daemon re-reads its config as on SIGHUP and answers
  ``{added, removed, changed, unchanged}``; an invalid file answers 1006 (HTTP 400) with
  one sub-error per bad key (its path in ``target``) and nothing changed.
- ``POST /api/v1/processes/{name}/signal`` with ``{"signal": "HUP"}``: the signal goes to
  the program's process tree (its group and every member, pinned by pid and start time);
  409/2004 when the program is not running.
"""

from __future__ import annotations

import signal as signals

from aiohttp import web

from ocp_agentd.api.context import app_context
from ocp_agentd.api.envelope import ApiError, ErrorCode, sub_error
from ocp_agentd.api.models import ReloadReport, SignalBody
from ocp_agentd.api.routes import Param, Route
from ocp_agentd.config import ConfigError
from ocp_agentd.supervision import OperationFailed, ProcessInfo, ProgramNotFound


def config_problems(error: ConfigError) -> list[tuple[str | None, str]]:
    """Each bad key of a refused config as ``(key path, why)``; the key is None for a
    problem with the whole file. Reads the message's indented ``key: why`` lines (the
    shape config._describe writes)."""
    lines = str(error).splitlines()
    problems: list[tuple[str | None, str]] = []
    for line in lines[1:]:
        if line.startswith("  ") and ": " in line:
            key, _, why = line.strip().partition(": ")
            problems.append((key, why))
    return problems or [(None, str(error))]


async def reload_config(request: web.Request) -> ReloadReport:
    ctx = app_context(request)
    try:
        report: ReloadReport = await ctx.reload()  # type: ignore[assignment]
    except ConfigError as exc:
        problems = config_problems(exc)
        keys = ", ".join(key for key, _ in problems if key) or "the file"
        raise ApiError(
            ErrorCode.INVALID_CONFIG,
            f"invalid configuration, nothing changed: {keys}",
            sub_errors=[sub_error(ErrorCode.INVALID_CONFIG, why, target=key)
                        for key, why in problems],
        ) from None
    return report


async def signal_process(request: web.Request) -> ProcessInfo:
    name: str = request["params"]["name"]
    signame = str(request["body"].signal)
    supervisor = app_context(request).supervisor
    try:
        info = await supervisor.signal(name, getattr(signals, f"SIG{signame}"))
    except ProgramNotFound:
        raise ApiError(ErrorCode.PROCESS_NOT_FOUND, f"no program named {name!r}",
                       target="name") from None
    except OperationFailed as exc:
        raise ApiError(ErrorCode.PROCESS_OPERATION_FAILED,
                       f"signal {signame} to {name} failed: {exc.reason}",
                       target=name) from None
    return info


def routes() -> list[Route]:
    return [
        Route("POST", "/api/v1/agent/reload", reload_config, "HOST_MANAGER",
              "Re-read the configuration, as SIGHUP does",
              description="Added programs start, removed ones stop, and a changed one "
              "restarts only when how it runs changed (command, cwd, env, user, its logs); "
              "other changes (limits, liveness, timeouts, backoff) apply in place and keep "
              "its pid. An invalid file answers 1006 with one subError per bad key (the key path "
              "in target) and changes nothing.",
              operation_id="reloadConfig", data=ReloadReport,
              errors=(ErrorCode.INVALID_CONFIG,), tags=("processes",)),
        Route("POST", "/api/v1/processes/{name}/signal", signal_process, "HOST_MANAGER",
              "Send a signal to a running program's process tree",
              description="409/2004 when the program is not running.",
              params=(Param("name", "path", "string",
                            description="The program name from the config"),),
              operation_id="signalProcess", body=SignalBody, data=ProcessInfo,
              errors=(ErrorCode.PROCESS_NOT_FOUND, ErrorCode.PROCESS_OPERATION_FAILED),
              tags=("processes",)),
    ]
