"""AgentClient: the control API over the unix socket (default) or TCP with a bearer token.

    async with AgentClient() as client:                  # api.socket of the config
        print(await client.status())
        await client.restart("ocp_exporter", timeout=30)

Error envelopes raise :class:`AgentError`; a daemon that does not answer raises
:class:`AgentUnavailable`.
"""

from __future__ import annotations

import asyncio
import errno
import json as jsonlib
import os
import tomllib
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from ocp_agentd.config import DEFAULT_CONFIG_PATH, ENV_CONFIG_PATH
from ocp_agentd.headers import TASK_HEADER, TRACE_HEADER

DEFAULT_SOCKET = Path("/run/ocp_agentd/agentd.sock")
TOKEN_ENV = "OCP_AGENTCTL_TOKEN"


class AgentError(Exception):
    """The daemon answered with an error envelope."""

    def __init__(
        self,
        code: int,
        message: str,
        status: int,
        target: str | None = None,
        trace_id: str | None = None,
        sub_errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.status = status
        self.target = target
        self.trace_id = trace_id
        self.sub_errors = list(sub_errors or [])

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "status": self.status,
            "target": self.target,
            "traceId": self.trace_id,
            "subErrors": self.sub_errors,
        }


class AgentUnavailable(Exception):
    """The daemon does not answer (not running, socket missing, connection refused)."""


def socket_from_config(config: str | os.PathLike[str] | None = None) -> Path:
    """api.socket of the daemon's config: --config, else $OCP_AGENTD_CONFIG, else
    /etc/ocp_agentd/config.toml when readable; else the default socket path.

    Only [api] socket is read (plus OCP_AGENTD_API__SOCKET), so a client works even while
    the rest of the file is being edited.
    """
    override = os.environ.get("OCP_AGENTD_API__SOCKET")
    if override:
        return Path(override)
    if config:
        path = Path(config)
    elif os.environ.get(ENV_CONFIG_PATH):
        path = Path(os.environ[ENV_CONFIG_PATH])
    else:
        path = DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, ValueError):
        return DEFAULT_SOCKET
    api = data.get("api")
    value = api.get("socket") if isinstance(api, dict) else None
    if not isinstance(value, str) or not value:
        return DEFAULT_SOCKET
    socket_path = Path(value)
    if not socket_path.is_absolute():
        socket_path = (path.resolve().parent / socket_path).resolve()
    return socket_path


class AgentClient:
    """One connection pool to the daemon; use as ``async with``.

    ``timeout`` bounds a whole request (operations wait for programs; stop-all may take
    minutes), ``None`` for no bound. Connecting is bounded by ``connect_timeout``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float | None = 660.0,
        connect_timeout: float = 5.0,
        trace_id: str | None = None,
        task_id: int | None = None,
    ) -> None:
        self.url = url.rstrip("/") if url else None
        self.socket_path = None if url else Path(socket_path or socket_from_config())
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.trace_id = trace_id
        self.task_id = task_id
        self.last_trace_id: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return self.url or str(self.socket_path)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector
            if self.socket_path is not None:
                connector = aiohttp.UnixConnector(path=str(self.socket_path))
            else:
                connector = aiohttp.TCPConnector()
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout, sock_connect=self.connect_timeout
                ),
            )
        return self._session

    def _base(self) -> str:
        return self.url or "http://ocp-agentd"

    def _unavailable(self, exc: BaseException) -> AgentUnavailable:
        if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
            exc.os_error, PermissionError
        ):
            return AgentUnavailable(
                f"cannot connect to ocp-agentd on {self.where}: permission denied "
                "(root or the socket's group may use it; or pass --url and --token)"
            )
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return AgentUnavailable(f"ocp-agentd closed the connection on {self.where}")
        if isinstance(exc, TimeoutError):
            return AgentUnavailable(f"ocp-agentd did not answer in time on {self.where}")
        return AgentUnavailable(f"ocp-agentd is not running (no answer on {self.where})")

    async def _send(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, str, bytes, dict[str, str]]:
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.trace_id:
            headers[TRACE_HEADER] = self.trace_id
        if self.task_id is not None:
            headers[TASK_HEADER] = str(self.task_id)
        extra: dict[str, Any] = {}
        if timeout is not None and self.timeout is not None:
            # An operation that waits up to `timeout` gets that long plus a margin.
            extra["timeout"] = aiohttp.ClientTimeout(
                total=max(self.timeout, timeout + 30), sock_connect=self.connect_timeout
            )
        session = self._session_for()
        deadline = asyncio.get_running_loop().time() + self.connect_timeout
        pause = 0.002
        while True:
            try:
                async with session.request(
                    method, self._base() + path, json=json, params=params, headers=headers,
                    **extra,
                ) as response:
                    body = await response.read()
                    return response.status, response.content_type, body, dict(response.headers)
            except aiohttp.ClientOSError as exc:
                left = deadline - asyncio.get_running_loop().time()
                if not self._never_connected(exc) or left <= 0:
                    raise self._unavailable(exc) from None
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise self._unavailable(exc) from None

    def _never_connected(self, exc: aiohttp.ClientOSError) -> bool:
        """True when ``exc`` says the unix socket was never connected, so the request
        reached no one and may be sent again.

        While the daemon's listen queue is full, a non-blocking unix connect fails with
        EAGAIN (connect(2)); asyncio takes that for a connect in progress
        (CPython gh-117208) and the first write then fails with ENOTCONN.
        """
        return self.socket_path is not None and exc.errno == errno.ENOTCONN

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """The envelope's ``data``; AgentError for an error envelope."""
        status, _, body, headers = await self._send(method, path, json, params, timeout)
        return self._data(status, body, headers)

    def _data(self, status: int, body: bytes, headers: dict[str, str]) -> Any:
        self.last_trace_id = headers.get(TRACE_HEADER)
        try:
            envelope = jsonlib.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise AgentError(
                5000, f"the daemon answered HTTP {status} without an envelope", status,
                trace_id=self.last_trace_id,
            ) from None
        if not isinstance(envelope, dict) or "successful" not in envelope:
            # An unwrapped document (e.g. the OpenAPI description).
            if 200 <= status < 300:
                return envelope
            raise AgentError(5000, f"the daemon answered HTTP {status}", status)
        if envelope.get("successful"):
            return envelope.get("data")
        error = envelope.get("error") or {}
        raise AgentError(
            int(error.get("code", 5000)),
            str(error.get("message", f"HTTP {status}")),
            int(envelope.get("status", status)),
            target=error.get("target"),
            trace_id=envelope.get("traceId", self.last_trace_id),
            sub_errors=error.get("subErrors"),
        )

    async def raw(self, method: str, path: str) -> str:
        """A non-envelope answer as text (e.g. /metrics); AgentError for an error envelope."""
        status, content_type, body, headers = await self._send(method, path)
        if status >= 400 or content_type == "application/json":
            return str(self._data(status, body, headers))
        self.last_trace_id = headers.get(TRACE_HEADER)
        return body.decode("utf-8", "replace")

    # --- convenience -----------------------------------------------------------------

    @staticmethod
    def _op_body(timeout: float | None, force: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = timeout
        if force:
            body["force"] = True
        return body

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("GET", "/api/v1/status")
        return data

    async def processes(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = await self.request("GET", "/api/v1/processes")
        return data

    async def process(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("GET", f"/api/v1/processes/{_quote(name)}")
        return data

    async def _operate(
        self, action: str, name: str, timeout: float | None, force: bool
    ) -> dict[str, Any]:
        data: dict[str, Any] = await self.request(
            "POST", f"/api/v1/processes/{_quote(name)}/{action}",
            json=self._op_body(timeout, force), timeout=timeout,
        )
        return data

    async def start(
        self, name: str, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        return await self._operate("start", name, timeout, force)

    async def stop(
        self, name: str, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        return await self._operate("stop", name, timeout, force)

    async def restart(
        self, name: str, timeout: float | None = None, force: bool = False
    ) -> dict[str, Any]:
        return await self._operate("restart", name, timeout, force)

    async def verify(self, name: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.request(
            "POST", f"/api/v1/processes/{_quote(name)}/verify"
        )
        return data

    async def start_all(self, timeout: float | None = None) -> dict[str, Any]:
        data: dict[str, Any] = await self.request(
            "POST", "/api/v1/agent/start-all", json=self._op_body(timeout), timeout=timeout
        )
        return data

    async def stop_all(self, timeout: float | None = None) -> dict[str, Any]:
        data: dict[str, Any] = await self.request(
            "POST", "/api/v1/agent/stop-all", json=self._op_body(timeout), timeout=timeout
        )
        return data

    async def verify_all(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("POST", "/api/v1/agent/verify")
        return data

    async def openapi(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.request("GET", "/api/v1/openapi.json")
        return data

    async def metrics(self) -> str:
        return await self.raw("GET", "/metrics")


def _quote(name: str) -> str:
    return quote(name, safe="")
