"""The value types of supervision: states, process info, exits, verify results.

Shapes follow SPEC section 6 (process info) and section 7 (verify).
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ocp_agentd.supervision.identity import Handle


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
    """A start was interrupted by a stop or restart before the program became ready."""

    REASON = "start interrupted by a stop"


class IllegalTransition(RuntimeError):
    """A state move outside the table of legal moves: always a bug in the daemon."""


@dataclass
class Check:
    """One verify check: name ("state", "process", "port N", "health"), ok, detail."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerifyResult:
    """The answer of verify (SPEC section 7): ok when every check is ok."""

    ok: bool
    checks: list[Check]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}


@dataclass
class ProcessInfo:
    """A program's status (SPEC section 6). Times: epoch seconds; uptime: seconds."""

    name: str
    role: str
    operable: bool
    state: State
    pid: int | None
    create_time: float | None
    uptime: float | None
    restarts: int
    last_exit: dict[str, Any] | None
    ports: list[int]
    command: list[str]
    started_at: float | None
    user: str
    log_files: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "operable": self.operable,
            "state": str(self.state),
            "pid": self.pid,
            "create_time": self.create_time,
            "uptime": self.uptime,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "ports": self.ports,
            "command": self.command,
            "started_at": self.started_at,
            "user": self.user,
            "log_files": self.log_files,
        }


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

    def as_dict(self) -> dict[str, Any]:
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
