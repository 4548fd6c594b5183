"""The control API app: route registry, middlewares, and the listeners.

Daemon wiring::

    ctx = AppContext(settings=settings, supervisor=supervisor, task_engine=engine)
    app = create_app(ctx)
    server = await start_api(app, settings)      # unix socket (+ TCP when api.tcp is set)
    ...
    await server.close()

Middlewares, outermost first:

1. envelope: trace id (X-OCP-Trace-ID, validated, echoed), timing, the envelope on every
   error answer including aiohttp's own 404/405/413/400, 5000 for anything unexpected
   (logged with the trace id and stack, never sent), request metrics and a debug log line;
2. body limit: a Content-Length above api.max_body_bytes is 1003 before anything is read
   (a chunked body is cut at the same size by aiohttp's client_max_size);
3. auth: the caller (unix peer credentials or bearer token, else 1004), then 1001/1002 for
   unknown routes and methods, then the route's permission (else 1005).

Each route's handler is wrapped to parse its declared params and body (1000 when bad) and
to put the handler's return value in the success envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ocp_agentd.api import envelope
from ocp_agentd.api.auth import Authenticator
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.metrics import AgentMetrics
from ocp_agentd.api.routes import (
    APP_CTX,
    ROUTE_TABLE,
    Route,
    RouteTable,
    app_context,
    validate,
)
from ocp_agentd.config import Settings
from ocp_agentd.headers import TRACE_HEADER

log = logging.getLogger("ocp_agentd.api")

# Modules under ocp_agentd.api that expose `routes() -> list[Route]`. A module that is not
# there (yet) is skipped; any other import error is raised.
ROUTE_MODULES = ("processes", "compute", "tasks", "metrics", "openapi")
FAULTS_ENV = "OCP_AGENTD_TEST_FAULTS"
FAULT_PATH = "/api/v1/test/fault"

# Metric labels stay bounded whatever a client sends.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_AUTH: web.AppKey[Authenticator] = web.AppKey("ocp_agentd_auth")
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.ROUTE_NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.BODY_TOO_LARGE,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
}


@dataclass
class AppContext:
    """What handlers may use. ``state`` is the daemon's: starting, running, reloading,
    stopping (shown by GET /api/v1/status)."""

    settings: Settings
    supervisor: Any
    started_at: float = field(default_factory=time.time)
    task_engine: Any = None
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    server_address: str = field(default_factory=envelope.host_address)
    state: str = "running"
    # Called as each request arrives (the daemon watches its loop closely while busy).
    on_request: Callable[[], None] | None = None


def collect_routes() -> RouteTable:
    table = RouteTable()
    for module_name in ROUTE_MODULES:
        full_name = f"ocp_agentd.api.{module_name}"
        try:
            module = importlib.import_module(full_name)
        except ModuleNotFoundError as exc:
            if exc.name == full_name:
                continue
            raise
        table.extend(module.routes())
    if os.environ.get(FAULTS_ENV) == "1":
        table.add(_fault_route())
    return table


def _fault_route() -> Route:
    async def fault(request: web.Request) -> Any:
        raise RuntimeError("deliberate fault for tests: secret-detail-7f3a")

    return Route("GET", FAULT_PATH, fault, permission=None,
                 summary="Raises an unexpected exception (tests only)", hidden=True)


def create_app(ctx: AppContext, table: RouteTable | None = None) -> web.Application:
    table = table if table is not None else collect_routes()
    app = web.Application(
        client_max_size=ctx.settings.api.max_body_bytes,
        middlewares=[_envelope_middleware, _body_limit_middleware, _auth_middleware],
    )
    app[APP_CTX] = ctx
    app[ROUTE_TABLE] = table
    app[_AUTH] = Authenticator(ctx.settings.api)
    ctx.metrics.bind_supervisor(lambda: ctx.supervisor)
    for method, path, route in table.mounted():
        app.router.add_route(method, path, _wrap(route))
    return app


# --- the handler wrapper ------------------------------------------------------------------


def _wrap(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        params: dict[str, Any] = {}
        for param in route.params:
            if param.location == "path":
                params[param.name] = param.parse(request.match_info[param.name])
            elif param.name in request.query:
                params[param.name] = param.parse(request.query[param.name])
            elif param.is_required:
                raise ApiError(
                    ErrorCode.BAD_REQUEST,
                    f"query parameter {param.name!r} is required",
                    target=param.name,
                )
            else:
                params[param.name] = param.default
        request["params"] = params
        request["body"] = await _read_body(request, route) if route.body is not None else {}
        result = await route.handler(request)
        if isinstance(result, web.StreamResponse):
            return result
        return _answer(envelope.ok(
            result,
            trace_id=request["trace_id"],
            server=app_context(request).server_address,
            duration_ms=_elapsed_ms(request),
        ))

    handler.ocp_route = route  # type: ignore[attr-defined]
    return handler


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_body(request: web.Request, route: Route) -> Any:
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            ErrorCode.BAD_REQUEST, f"body is not valid UTF-8 (byte {exc.start})", target="body"
        ) from None
    if not text.strip():
        value: Any = {}
    else:
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(
                ErrorCode.BAD_REQUEST, f"body is not valid JSON: {exc}", target="body"
            ) from None
    assert route.body is not None
    validate(value, route.body)
    return value


def _elapsed_ms(request: web.Request) -> int:
    return int((time.monotonic() - request["started"]) * 1000)


def _answer(body: dict[str, Any], status: int | None = None) -> web.Response:
    """The envelope as the response; its HTTP status is the envelope's unless given."""
    return web.Response(
        body=envelope.dumps(body),
        status=body["status"] if status is None else status,
        content_type="application/json",
        charset="utf-8",
    )


# --- middlewares --------------------------------------------------------------------------


def _route_of(request: web.Request) -> Route | None:
    return getattr(request.match_info.handler, "ocp_route", None)


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None or _route_of(request) is None:
        return "unmatched"
    return resource.canonical


@web.middleware
async def _envelope_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request["started"] = time.monotonic()
    trace_id = envelope.trace_id_from(request.headers.get(TRACE_HEADER))
    request["trace_id"] = trace_id
    ctx = app_context(request)
    if ctx.on_request is not None:
        ctx.on_request()
    error: ApiError | None = None
    try:
        response = await handler(request)
    except ApiError as exc:
        error = exc
    except web.HTTPException as exc:
        error = _from_http(exc, request)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception(
            "internal error answering %s %s (trace %s)", request.method, request.path, trace_id,
            extra={"TRACE_ID": trace_id},
        )
        error = ApiError(
            ErrorCode.INTERNAL, f"internal error; the daemon log has the details (trace {trace_id})"
        )
    if error is not None:
        response = _answer(envelope.error(
            error, trace_id=trace_id, server=ctx.server_address,
            duration_ms=_elapsed_ms(request),
        ))
        if error.code == ErrorCode.METHOD_NOT_ALLOWED and "allow" in request:
            response.headers["Allow"] = request["allow"]
    response.headers[TRACE_HEADER] = trace_id
    seconds = time.monotonic() - request["started"]
    method = request.method if request.method in _KNOWN_METHODS else "other"
    ctx.metrics.observe_request(_route_label(request), method, response.status, seconds)
    # Actions are an operator's audit trail (journald: TRACE_ID); reads stay at debug.
    level = logging.DEBUG if request.method in ("GET", "HEAD") else logging.INFO
    log.log(
        level,
        "%s %s -> %s in %.1f ms by %s (trace %s)", request.method, request.path, response.status,
        seconds * 1000, request.get("caller", "-"), trace_id, extra={"TRACE_ID": trace_id},
    )
    return response


def _from_http(exc: web.HTTPException, request: web.Request) -> ApiError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        request["allow"] = ", ".join(sorted(exc.allowed_methods))
        return ApiError(
            ErrorCode.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.path}; "
            f"allowed: {request['allow']}",
        )
    if isinstance(exc, web.HTTPNotFound):
        return ApiError(ErrorCode.ROUTE_NOT_FOUND, f"no route {request.method} {request.path}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _too_large(request)
    code = _HTTP_CODES.get(exc.status)
    if code is not None:
        return ApiError(code, exc.reason or code.meaning)
    if exc.status >= 500 or exc.status < 400:
        log.error("unexpected HTTP %s answering %s %s (trace %s)", exc.status, request.method,
                  request.path, request["trace_id"])
        return ApiError(ErrorCode.INTERNAL, "internal error; the daemon log has the details")
    return ApiError(ErrorCode.BAD_REQUEST, exc.reason or "bad request", http_status=exc.status)


def _too_large(request: web.Request) -> ApiError:
    limit = app_context(request).settings.api.max_body_bytes
    return ApiError(ErrorCode.BODY_TOO_LARGE, f"body larger than {limit} bytes")


@web.middleware
async def _body_limit_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    length = request.content_length
    if length is not None and length > app_context(request).settings.api.max_body_bytes:
        raise _too_large(request)
    return await handler(request)


@web.middleware
async def _auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    auth = request.app[_AUTH]
    caller = auth.authenticate(request)
    request["caller"] = caller.who
    route = _route_of(request)
    if route is None:
        # Unknown route or method: aiohttp's own handler raises 404 or 405.
        return await handler(request)
    auth.authorize(caller, route.permission)
    return await handler(request)


# --- protocol errors ----------------------------------------------------------------------


class _EnvelopeRequestHandler(RequestHandler):  # type: ignore[type-arg]
    """Answers what aiohttp rejects before any route or middleware runs (a request line or
    header that does not parse, a bad Content-Length) with the envelope too."""

    server_address = "127.0.0.1"

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was already partly sent")
        trace_id = envelope.new_trace_id()
        if status >= 500:
            log.error("internal error in the HTTP layer (trace %s)", trace_id, exc_info=exc,
                      extra={"TRACE_ID": trace_id})
            error = ApiError(ErrorCode.INTERNAL,
                             f"internal error; the daemon log has the details (trace {trace_id})")
        else:
            first_line = (message or "").strip().splitlines()[0:1]
            reason = first_line[0][:200] if first_line else "unreadable"
            log.debug("rejected a malformed request: %s (trace %s)", reason, trace_id)
            code = ErrorCode.BODY_TOO_LARGE if status == 413 else ErrorCode.BAD_REQUEST
            error = ApiError(code, f"malformed HTTP request: {reason}", http_status=status)
        body = envelope.error(error, trace_id=trace_id, server=self.server_address, duration_ms=0)
        response = _answer(body, status)
        response.headers[TRACE_HEADER] = trace_id
        response.force_close()
        return response


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:  # type: ignore[type-arg]
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


def _envelope_protocol_errors(runner: web.AppRunner, server_address: str) -> None:
    # aiohttp has no setting for the class of its per-connection handler; the server object
    # it built is switched to the subclass above, which only changes that class.
    server = runner.server
    if type(server) is web.Server:
        server.__class__ = _EnvelopeServer
        _EnvelopeRequestHandler.server_address = server_address


# --- listeners ----------------------------------------------------------------------------


class ApiStartError(Exception):
    """The API cannot listen (socket in use, bad path, port taken)."""


@dataclass
class ApiServer:
    runner: web.AppRunner
    socket_path: Path
    tcp_address: tuple[str, int] | None
    _socket_identity: tuple[int, int] | None = None

    async def close(self) -> None:
        """Stops listening and removes the socket file (when it is still ours)."""
        await self.runner.cleanup()
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_identity:
                os.unlink(self.socket_path)


async def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiStartError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed stale API socket %s", path)
        return
    except (OSError, TimeoutError) as exc:
        raise ApiStartError(f"cannot check the existing socket {path}: {exc}") from exc
    writer.close()
    raise ApiStartError(f"another process already answers on {path}")


def _bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` that already has ``mode`` when it appears there.

    It is bound under a temporary name in the same folder, chmod-ed, then renamed into
    place, so no one can connect through a looser mode in between.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{os.getpid()}.sock"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, mode)
        os.rename(temporary, path)
        sock.listen(128)
    except OSError:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    sock.setblocking(False)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


# TCP connections held at once. Past it new ones are closed on arrival: clients that
# connect and send nothing cannot use up the daemon's file descriptors (programs could no
# longer be spawned or watched, and the unix socket would stop answering).
MAX_TCP_CONNECTIONS = 256
# A TCP client has this long to send its first request's headers, so slow clients (a byte
# a second) cannot keep those connections, and so every other TCP caller, out for long.
HEADER_SECONDS = 10.0
# An idle keep-alive connection is closed after this long (aiohttp's default is 75 s), so
# clients that make one request and then sit on the connection hold a slot briefly.
KEEPALIVE_SECONDS = 15.0


def _tcp_connection_limit() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_TCP_CONNECTIONS
    return max(8, min(MAX_TCP_CONNECTIONS, soft // 4))


class _Counted(asyncio.Protocol):
    """Passes everything to aiohttp's handler; tells the site when the connection ends and
    drops it when its first request's headers are not complete within HEADER_SECONDS."""

    def __init__(self, inner: asyncio.Protocol, site: _CappedSite) -> None:
        self._inner = inner
        self._site = site
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._timer = asyncio.get_running_loop().call_later(
            HEADER_SECONDS, transport.abort  # type: ignore[attr-defined]
        )
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._timer.cancel()
                self._timer = None
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._site.live -= 1
        self._inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _CappedSite(web.SockSite):
    """A listening socket site that holds at most ``limit`` connections at once."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, limit: int) -> None:
        super().__init__(runner, sock)
        self.limit = limit
        self.live = 0
        self._warned = False

    def _protocol(self) -> asyncio.Protocol:
        if self.live >= self.limit:
            if not self._warned:
                log.warning("API: %d TCP connections open, refusing more", self.live)
            self._warned = True
            return _Refused()
        self._warned = False
        server = self._runner.server
        assert server is not None
        self.live += 1
        return _Counted(server(), self)

    async def start(self) -> None:
        await web.BaseSite.start(self)
        # The loop accepts up to `backlog` connections per wake-up before any is refused:
        # a small one keeps that burst of descriptors small too.
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, sock=self._sock, backlog=32
        )


async def start_api(app: web.Application, settings: Settings) -> ApiServer:
    """Serves ``app`` on the unix socket (always) and on api.tcp (when set)."""
    api = settings.api
    path = Path(api.socket)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0,
                           keepalive_timeout=KEEPALIVE_SECONDS)
    await runner.setup()
    _envelope_protocol_errors(runner, app[APP_CTX].server_address)
    server: ApiServer | None = None
    try:
        await _remove_stale_socket(path)
        try:
            unix_sock = _bind_unix(path, api.socket_mode_int)
        except OSError as exc:
            raise ApiStartError(f"cannot listen on {path}: {exc}") from exc
        st = os.stat(path)
        app[_AUTH].socket_gid = st.st_gid
        server = ApiServer(runner, path, None, (st.st_dev, st.st_ino))
        await web.SockSite(runner, unix_sock).start()
        log.info("API listening on %s (mode %s)", path, api.socket_mode)
        if api.tcp_host_port is not None:
            host, port = api.tcp_host_port
            try:
                tcp_sock = _bind_tcp(host, port)
            except OSError as exc:
                raise ApiStartError(f"cannot listen on {api.tcp}: {exc}") from exc
            server.tcp_address = tcp_sock.getsockname()[:2]
            limit = _tcp_connection_limit()
            await _CappedSite(runner, tcp_sock, limit).start()
            log.info("API listening on %s:%s (at most %d connections)", *server.tcp_address,
                     limit)
    except BaseException:
        if server is not None:
            await server.close()
        else:
            await runner.cleanup()
        raise
    return server
