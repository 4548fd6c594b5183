"""The value types of supervision: states, process info, exits, verify results.

Shapes follow SPEC section 6 (process info) and section 7 (verify). ProcessInfo, Check
and VerifyResult are also the /api/v1 answers: their fields, in the order declared, are
the JSON fields (``as_dict``), and the OpenAPI document is generated from the same
declarations (api/models.py). Adding a field to the process record is adding one typed
field to ProcessInfo (with a docstring, which becomes its description), and setting it
in Program.info(); a nested object is a TypedDict like LastExit.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic needs it, not typing's, before 3.12

from ocp_agentd.supervision.identity import Handle
from ocp_agentd.supervision.intent import CANCELLED_BY_STOP

# Field docstrings become the descriptions in the OpenAPI document; every field is always
# sent, so each is listed as required even when it has a default.
_DOCUMENTED = ConfigDict(use_attribute_docstrings=True,
                         json_schema_serialization_defaults_required=True)


class State(StrEnum):
    """A program's state (SPEC section 6); moves are checked by Program._set_state."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


class OperationFailed(Exception):
    """A command on a program (start, stop, restart) did not reach its goal; reason says why."""

    def __init__(self, program: str, reason: str) -> None:
        super().__init__(f"{program}: {reason}")
        self.program = program
        self.reason = reason


class StartAborted(Exception):
    """A start was cancelled by a stop requested after it (intent.py), in progress or
    still queued."""

    REASON = CANCELLED_BY_STOP


class IllegalTransition(RuntimeError):
    """A state move outside the table of legal moves: always a bug in the daemon."""


@with_config(_DOCUMENTED)
@dataclass
class Check:
    """One verify check: name ("state", "process", "port N", "health"), ok, detail."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@with_config(_DOCUMENTED)
@dataclass
class VerifyResult:
    """The answer of verify (SPEC section 7): ok when every check is ok."""

    ok: bool
    checks: list[Check]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome (SPEC section 10): ok, a one-line detail for people, when it ran
    (epoch seconds) and how long it took (seconds)."""

    ok: bool
    detail: str
    at: float
    seconds: float

    def as_dict(self) -> LastProbe:
        """The status record's shape: ``at`` as RFC 3339 UTC with milliseconds."""
        return {
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
            "ok": self.ok,
            "detail": self.detail,
            "seconds": round(self.seconds, 3),
        }


@with_config(_DOCUMENTED)
class LastProbe(TypedDict):
    """A program's last liveness probe (ProbeResult.as_dict)."""

    at: str
    """When it ran, RFC 3339 UTC with milliseconds."""
    ok: bool
    """Whether the program passed it."""
    detail: str
    """What it saw, for people (e.g. "http://127.0.0.1:62889/health answered 200")."""
    seconds: float
    """How long it took."""


@with_config(_DOCUMENTED)
class LivenessStatus(TypedDict):
    """A program's liveness probing (SPEC section 10)."""

    last_probe: LastProbe | None
    """The last probe; null before the first."""
    consecutive_failures: int
    """Failed probes in a row since the last good one (or since RUNNING)."""
    failures_total: int
    """Failed probes since the daemon started the program."""


@with_config(_DOCUMENTED)
class LastExit(TypedDict):
    """How the program's last process ended (ExitInfo.as_dict)."""

    code: int | None
    """The exit code; null when a signal ended it."""
    signal: str | None
    """The signal's name (e.g. SIGKILL) when a signal ended it."""
    at: str
    """When, RFC 3339 UTC with milliseconds."""
    reason: str
    """Why, for people."""


@with_config(_DOCUMENTED)
@dataclass
class ProcessInfo:
    """A program's status (SPEC section 6): the process record of /api/v1."""

    name: str
    """The program name from the config."""
    role: Literal["pos_proxy", "worker"]
    operable: bool
    """Whether it may be started, stopped or restarted on its own."""
    state: State
    pid: int | None
    """The main process; null when none runs."""
    create_time: float | None
    """When the main process started, epoch seconds (the kernel's start time)."""
    uptime: float | None
    """Seconds it has been running."""
    restarts: int
    """Restarts since the daemon started it."""
    last_exit: LastExit | None
    ports: list[int]
    """The TCP ports it should listen on."""
    command: list[str]
    started_at: float | None
    """When the daemon started it, epoch seconds."""
    user: str
    log_files: list[str]
    """Its stdout and stderr logs."""
    liveness: LivenessStatus | None = None
    """Its liveness probing (SPEC section 10); null when no probe is configured."""
    cgroup: str | None = None
    """Its cgroup (SPEC section 9), a path under /sys/fs/cgroup; null without one."""
    limits: dict[str, str] = field(default_factory=dict)
    """Each limit set in the config, as enforced (e.g. "512 MiB (memory.max)") or
    "not enforced: <why>"."""
    cpu_seconds: float | None = None
    """CPU time its processes used: the cgroup's, else the main process's (with the
    children it waited for); null when unknown."""
    memory_bytes: int | None = None
    """Memory its processes use now: the cgroup's, else the main process's resident set."""
    oom_kills: int = 0
    """Processes of it the OOM killer ended since the daemon started."""

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON values, one key per field in declared order."""
        record = {name: getattr(self, name) for name in _PROCESS_FIELDS}
        record["state"] = str(self.state)
        return record


_PROCESS_FIELDS = tuple(f.name for f in fields(ProcessInfo))


@dataclass
class ExitInfo:
    """How a process ended: exit code or signal name, when (epoch seconds), and a reason."""

    code: int | None
    signal: str | None
    at: float
    reason: str

    @property
    def failed(self) -> bool:
        return self.code != 0

    def as_dict(self) -> LastExit:
        return {
            "code": self.code,
            "signal": self.signal,
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds"),
            "reason": self.reason,
        }


@dataclass
class Instance:
    """A running copy of the program: the main process, pinned by its pidfd."""

    handle: Handle
    cmdline: list[str]
    run_id: str
    started_at: float
    started_mono: float
    popen: subprocess.Popen[bytes] | None  # None when adopted from an earlier daemon
    exited: asyncio.Future[ExitInfo] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def pid(self) -> int:
        return self.handle.pid
