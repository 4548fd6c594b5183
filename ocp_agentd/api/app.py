"""The control API app: the app factory, the handler wrapper and the middlewares.

Daemon wiring::

    ctx = AppContext(settings=settings, supervisor=supervisor, task_engine=engine)  # context.py
    app = create_app(ctx)
    server = await start_api(app, settings)      # listeners.py: unix socket (+ TCP)
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
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ocp_agentd.api import envelope
from ocp_agentd.api.auth import AUTH, Authenticator, describe_peer
from ocp_agentd.api.compute import routes as compute_routes
from ocp_agentd.api.context import APP_CTX, AppContext, app_context, work_ended, work_started
from ocp_agentd.api.control import routes as control_routes
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.metrics import METRICS
from ocp_agentd.api.metrics import routes as metrics_routes
from ocp_agentd.api.models import parse_body
from ocp_agentd.api.openapi import routes as openapi_routes
from ocp_agentd.api.processes import routes as processes_routes
from ocp_agentd.api.routes import ROUTE_TABLE, Route, RouteTable
from ocp_agentd.api.streams import routes as streams_routes
from ocp_agentd.api.tasks import routes as tasks_routes
from ocp_agentd.headers import TRACE_HEADER
from ocp_agentd.logsafe import escape

log = logging.getLogger("ocp_agentd.api")

# Every module's routes, in the order they are mounted.
ROUTE_SOURCES: tuple[Callable[[], list[Route]], ...] = (
    processes_routes,
    control_routes,
    streams_routes,
    compute_routes,
    tasks_routes,
    metrics_routes,
    openapi_routes,
)
FAULTS_ENV = "OCP_AGENTD_TEST_FAULTS"
FAULT_PATH = "/api/v1/test/fault"

# Metric labels stay bounded whatever a client sends.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.ROUTE_NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.BODY_TOO_LARGE,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
}


def collect_routes() -> RouteTable:
    """Every route of ROUTE_SOURCES (and the fault route when FAULTS_ENV is "1")."""
    table = RouteTable()
    for source in ROUTE_SOURCES:
        table.extend(source())
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
    app[AUTH] = Authenticator(ctx.settings.api)
    app[METRICS] = ctx.metrics
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
        request["body"] = await _read_body(request, route) if route.body is not None else None
        result = await route.handler(request)
        if isinstance(result, web.StreamResponse):
            return result
        return envelope.response(envelope.ok(
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
    """The body parsed as JSON (empty: ``{}``) and validated as ``route.body``; 1000 when
    it is not UTF-8, not JSON (NaN and Infinity included) or not the model."""
    if request.content.is_eof():
        raw = await request.read()
    else:
        # The rest of the body is the client's to send: waiting for it is not work (the
        # loop's probes would go on for as long as a client stops mid-body).
        work_ended(request)
        try:
            raw = await request.read()
        finally:
            work_started(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            ErrorCode.BAD_REQUEST, f"body is not valid UTF-8 (byte {exc.start})", target="body"
        ) from None
    if not text.strip():
        text = "{}"
    else:
        # The standard parser first, for its messages and because pydantic's takes NaN
        # (answered for the field, where this is a body that is not JSON at all).
        try:
            json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(
                ErrorCode.BAD_REQUEST, f"body is not valid JSON: {exc}", target="body"
            ) from None
    assert route.body is not None
    return parse_body(route.body, text)


def _elapsed_ms(request: web.Request) -> int:
    return int((time.monotonic() - request["started"]) * 1000)


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
    work_started(request)
    try:
        return await _answer(request, handler, ctx, trace_id)
    finally:
        work_ended(request)


async def _answer(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ctx: AppContext,
    trace_id: str,
) -> web.StreamResponse:
    """The envelope middleware's work: the handler's answer, or the envelope of its error;
    the trace header, the request's metrics and its audit line."""
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
            "internal error answering %s %s (trace %s)", escape(request.method),
            escape(request.path), trace_id, extra={"TRACE_ID": trace_id},
        )
        error = ApiError(
            ErrorCode.INTERNAL, f"internal error; the daemon log has the details (trace {trace_id})"
        )
    if error is not None:
        response = envelope.response(envelope.error(
            error, trace_id=trace_id, server=ctx.server_address,
            duration_ms=_elapsed_ms(request),
        ))
        if error.code == ErrorCode.METHOD_NOT_ALLOWED and "allow" in request:
            response.headers["Allow"] = request["allow"]
        if error.code == ErrorCode.UNAUTHENTICATED:
            # A caller without credentials keeps no connection (and no TCP slot) open.
            response.force_close()
    response.headers[TRACE_HEADER] = trace_id
    seconds = time.monotonic() - request["started"]
    method = request.method if request.method in _KNOWN_METHODS else "other"
    ctx.metrics.observe_request(_route_label(request), method, response.status, seconds)
    _audit(request, response, error, seconds)
    return response


def _audit(
    request: web.Request, response: web.StreamResponse, error: ApiError | None, seconds: float
) -> None:
    """The audit line (SPEC section 11): every action and every refused credential at INFO
    (who, what, traceId, outcome); reads that went through at DEBUG. Caller-controlled
    values are escaped: no request can start a line of the log."""
    refused = error is not None and error.code in (ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN)
    action = request.method not in ("GET", "HEAD", "OPTIONS")
    level = logging.INFO if action or refused else logging.DEBUG
    if not log.isEnabledFor(level):
        return  # a read at INFO: nothing to write, so nothing to format
    outcome = f"{response.status}" if error is None else f"{response.status} code {error.code}"
    trace_id = request["trace_id"]
    log.log(
        level,
        "audit: %s %s -> %s in %.1f ms by %s (trace %s)%s",
        escape(request.method, 16), escape(request.path), outcome, seconds * 1000,
        request.get("caller") or describe_peer(request), trace_id,
        ": credential refused" if refused else "",
        extra={"TRACE_ID": trace_id},
    )


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
        log.error("unexpected HTTP %s answering %s %s (trace %s)", exc.status,
                  escape(request.method, 16), escape(request.path), request["trace_id"])
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
    auth = request.app[AUTH]
    try:
        caller = auth.authenticate(request)
    except Exception:
        # The audit line names who was refused.
        request["caller"] = f"unauthenticated {describe_peer(request)}"
        raise
    request["caller"] = caller.who
    request["token_name"] = caller.token
    route = _route_of(request)
    if route is None:
        # Unknown route or method: aiohttp's own handler raises 404 or 405.
        return await handler(request)
    auth.authorize(caller, route.permission)
    return await handler(request)
