"""The OCP response envelope (SPEC section 4) and the error codes every answer may carry.

Every answer of the control API, success or error, is one JSON object::

    {"data": ..., "successful": true, "timestamp": "2021-09-03T14:17:06.342+08:00",
     "duration": 3, "status": 200, "traceId": "deca90b54a244106", "server": "192.168.0.1"}

An error has ``successful: false``, no ``data`` and an ``error`` object
``{"code", "message", "target", "subErrors"}``; the HTTP status equals ``status``.

Handlers raise :class:`ApiError`; the app's middleware turns it into the envelope.

One code is ours, not the SPEC table's: **2004 "process operation failed" (HTTP 409)**.
A start, stop or restart that the daemon carried out correctly but whose program did not
reach the asked state (it exited while starting, its port never listened, the tree did not
go away) is neither a malformed request nor an internal error of the daemon: 5000 is kept
for daemon bugs (operators alert on it) and 2003 for the operation lock. 409 Conflict says
"the program's state did not allow the request to succeed"; the message carries the
supervisor's reason and ``target`` the program name. stop-all and start-all answer 2004
with one ``subErrors`` entry per failed program.

A second is ours too: **1007 "too many streams" (HTTP 429)**. The daemon serves at most
64 event streams and 64 log followers at once (``events.MAX_SUBSCRIBERS``,
``events.MAX_FOLLOWERS``); one more is refused rather than letting callers that never read
grow the daemon's memory without bound. 429 Too Many Requests (RFC 6585 section 4) is what
the Kubernetes API server answers when its concurrency limits are reached: the request was
well formed and may succeed later, which none of the table's codes says (2003 is the
operation lock, whose task id clients read from ``target``; 5000 is a daemon bug).
"""

from __future__ import annotations

import json
import re
import secrets
import socket
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web
from pydantic import BaseModel

try:
    import orjson
except ImportError:  # pragma: no cover - a declared dependency; json is the fallback
    orjson = None  # type: ignore[assignment]


class ErrorCode(IntEnum):
    BAD_REQUEST = 1000
    ROUTE_NOT_FOUND = 1001
    METHOD_NOT_ALLOWED = 1002
    BODY_TOO_LARGE = 1003
    UNAUTHENTICATED = 1004
    FORBIDDEN = 1005
    INVALID_CONFIG = 1006
    TOO_MANY_STREAMS = 1007
    HOST_NOT_FOUND = 2000
    PROCESS_NOT_FOUND = 2001
    PROCESS_NOT_OPERABLE = 2002
    OPERATION_LOCKED = 2003
    PROCESS_OPERATION_FAILED = 2004
    TASK_NOT_FOUND = 20000
    TASK_STATE_CONFLICT = 20003
    ROLLBACK_PROHIBITED = 20004
    INTERNAL = 5000

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.ROUTE_NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.INVALID_CONFIG: 400,
    ErrorCode.TOO_MANY_STREAMS: 429,
    ErrorCode.HOST_NOT_FOUND: 404,
    ErrorCode.PROCESS_NOT_FOUND: 404,
    ErrorCode.PROCESS_NOT_OPERABLE: 400,
    ErrorCode.OPERATION_LOCKED: 409,
    ErrorCode.PROCESS_OPERATION_FAILED: 409,
    ErrorCode.TASK_NOT_FOUND: 404,
    ErrorCode.TASK_STATE_CONFLICT: 400,
    ErrorCode.ROLLBACK_PROHIBITED: 400,
    ErrorCode.INTERNAL: 500,
}

_MEANING: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "malformed request: bad JSON, bad path, query or body value",
    ErrorCode.ROUTE_NOT_FOUND: "no such route",
    ErrorCode.METHOD_NOT_ALLOWED: "method not allowed",
    ErrorCode.BODY_TOO_LARGE: "body larger than api.max_body_bytes",
    ErrorCode.UNAUTHENTICATED: "no or unknown credentials",
    ErrorCode.FORBIDDEN: "credentials lack the permission",
    ErrorCode.INVALID_CONFIG: "invalid configuration (reload): each bad key named, nothing "
    "changed",
    ErrorCode.TOO_MANY_STREAMS: "too many event streams or log followers open at once; "
    "close one or retry later",
    ErrorCode.HOST_NOT_FOUND: "host not found (hostId is not this host)",
    ErrorCode.PROCESS_NOT_FOUND: "process not found",
    ErrorCode.PROCESS_NOT_OPERABLE: "process not operable",
    ErrorCode.OPERATION_LOCKED: "another agent operation is running on this host "
    "(its task id in target)",
    ErrorCode.PROCESS_OPERATION_FAILED: "process operation failed: the program did not reach "
    "the asked state (the reason in message, the program in target)",
    ErrorCode.TASK_NOT_FOUND: "task or subtask not found",
    ErrorCode.TASK_STATE_CONFLICT: "task or subtask state does not allow this operation",
    ErrorCode.ROLLBACK_PROHIBITED: "rollback prohibited for this task",
    ErrorCode.INTERNAL: "internal error (logged with the traceId)",
}


class ApiError(Exception):
    """Raised by handlers; answered as an error envelope.

    ``http_status`` overrides the code's usual status (rarely needed).
    ``sub_errors`` is a list of ``{"code", "message", "target"}`` dicts.
    """

    def __init__(
        self,
        code: ErrorCode | int,
        message: str,
        target: str | None = None,
        http_status: int | None = None,
        sub_errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.target = target
        self.http_status = http_status or self.code.http_status
        self.sub_errors = list(sub_errors or [])

    def error_object(self) -> dict[str, Any]:
        error = sub_error(self.code, self.message, self.target)
        error["subErrors"] = self.sub_errors
        return error


def sub_error(code: ErrorCode | int, message: str, target: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"code": int(code), "message": message}
    if target is not None:
        item["target"] = target
    return item


# --- trace ids, timestamps, server address ------------------------------------------

_TRACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_trace_id() -> str:
    return secrets.token_hex(8)


def trace_id_from(header_value: str | None) -> str:
    """The caller's trace id when it is 1-64 characters of [A-Za-z0-9_-], else a fresh one."""
    if header_value and _TRACE_RE.match(header_value):
        return header_value
    return new_trace_id()


def timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 with milliseconds and the local offset: 2021-09-03T14:17:06.342+08:00."""
    moment = moment or datetime.now()
    return moment.astimezone().isoformat(timespec="milliseconds")


def epoch_timestamp(epoch: float | None) -> str | None:
    """timestamp() of a moment given in epoch seconds; None stays None."""
    return timestamp(datetime.fromtimestamp(epoch)) if epoch else None


def host_address() -> str:
    """The host's first non-loopback IPv4 address of an interface that is up.

    Read from the kernel's interface table only: no DNS lookup, no packet sent.
    Falls back to 127.0.0.1. Call once at start-up.
    """
    try:
        stats = psutil.net_if_stats()
        for name, addresses in sorted(psutil.net_if_addrs().items()):
            if name in stats and not stats[name].isup:
                continue
            for address in addresses:
                if address.family == socket.AF_INET and not address.address.startswith("127."):
                    return address.address
    except (OSError, RuntimeError):
        pass
    return "127.0.0.1"


# --- building envelopes -----------------------------------------------------------------


def _base(status: int, trace_id: str, server: str, duration_ms: int) -> dict[str, Any]:
    return {
        "timestamp": timestamp(),
        "duration": max(0, int(duration_ms)),
        "status": status,
        "traceId": trace_id,
        "server": server,
    }


def ok(
    data: Any, *, trace_id: str, server: str, duration_ms: int, status: int = 200
) -> dict[str, Any]:
    """The envelope of a successful answer."""
    envelope: dict[str, Any] = {"data": data, "successful": True}
    envelope.update(_base(status, trace_id, server, duration_ms))
    return envelope


def error(error: ApiError, *, trace_id: str, server: str, duration_ms: int) -> dict[str, Any]:
    """The envelope of an error answer (no ``data``)."""
    envelope: dict[str, Any] = {"successful": False}
    envelope.update(_base(error.http_status, trace_id, server, duration_ms))
    envelope["error"] = error.error_object()
    return envelope


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return timestamp(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return as_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# orjson encodes a status answer for 50 programs ten times faster than json (40 us
# against 400 us here): a third of the daemon's time per GET /api/v1/processes.
# Dataclasses and datetimes still go through _default, so the shapes stay ours.
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS
    if orjson is not None
    else 0
)


def dumps(envelope: dict[str, Any]) -> bytes:
    """The envelope as UTF-8 JSON, ready to send (no str round trip)."""
    if orjson is not None:
        return orjson.dumps(envelope, default=_default, option=_ORJSON_OPTIONS)
    return json.dumps(envelope, ensure_ascii=False, default=_default, allow_nan=False).encode()


def raw(data: bytes) -> Any:
    """JSON already encoded (UTF-8), as a value dumps() writes out as it is: for an answer
    kept encoded between its changes (the status records)."""
    if orjson is not None:
        return orjson.Fragment(data)
    return json.loads(data)  # pragma: no cover - without orjson, parsed and written again


def response(body: dict[str, Any], status: int | None = None) -> web.Response:
    """The envelope as the response; its HTTP status is the envelope's unless given."""
    return web.Response(
        body=dumps(body),
        status=body["status"] if status is None else status,
        content_type="application/json",
        charset="utf-8",
    )
