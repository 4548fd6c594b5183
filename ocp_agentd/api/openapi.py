"""GET /api/v1/openapi.json: the OpenAPI 3.0 document, generated from the route registry."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ocp_agentd import __version__
from ocp_agentd.api.envelope import ErrorCode
from ocp_agentd.api.routes import ROUTE_TABLE, Route, RouteTable

OPENAPI_PATH = "/api/v1/openapi.json"

ENVELOPE_FIELDS: dict[str, Any] = {
    "successful": {"type": "boolean"},
    "timestamp": {"type": "string", "example": "2021-09-03T14:17:06.342+08:00"},
    "duration": {"type": "integer", "description": "Milliseconds spent on the request"},
    "status": {"type": "integer", "description": "The HTTP status"},
    "traceId": {"type": "string", "description": "X-OCP-Trace-ID of the request, or a new one"},
    "server": {"type": "string", "description": "The address of the answering host"},
}


def _common_errors(route: Route) -> list[ErrorCode]:
    """The codes the app itself may answer for this route, whatever its handler does."""
    codes = [ErrorCode.UNAUTHENTICATED]
    if route.params or route.body is not None:
        codes.insert(0, ErrorCode.BAD_REQUEST)
    if route.body is not None:
        codes.append(ErrorCode.BODY_TOO_LARGE)
    if route.permission is not None:
        codes.append(ErrorCode.FORBIDDEN)
    codes.append(ErrorCode.INTERNAL)
    return codes


def _responses(route: Route) -> dict[str, Any]:
    if route.raw:
        ok: dict[str, Any] = {
            "description": route.summary,
            "content": {route.content_type: {"schema": {"type": "string"}}},
        }
    else:
        data = route.data or {}
        ok = {
            "description": "Success envelope",
            "content": {
                "application/json": {
                    "schema": {
                        "allOf": [
                            {"$ref": "#/components/schemas/Envelope"},
                            {"type": "object", "properties": {"data": data}},
                        ]
                    }
                }
            },
        }
    responses: dict[str, Any] = {"200": ok}
    codes = sorted(set(_common_errors(route)) | set(route.errors))
    by_status: dict[int, list[ErrorCode]] = {}
    for code in codes:
        by_status.setdefault(code.http_status, []).append(code)
    for status, group in sorted(by_status.items()):
        responses[str(status)] = {
            "description": "; ".join(f"{int(c)}: {c.meaning}" for c in group),
            "x-error-codes": [int(c) for c in group],
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}
            },
        }
    return responses


def _operation(route: Route, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.operation_id(path),
        "summary": route.summary,
        "responses": _responses(route),
        "security": [{"bearerToken": []}, {"unixSocketPeer": []}],
        "x-permission": route.permission,
    }
    permission = route.permission or "any authenticated caller"
    description = route.description.strip()
    operation["description"] = (description + "\n\n" if description else "") + (
        f"Permission: {permission}."
    )
    if route.tags:
        operation["tags"] = list(route.tags)
    if route.params:
        operation["parameters"] = [
            {
                "name": p.name,
                "in": p.location,
                "required": p.is_required,
                "description": p.description,
                "schema": p.schema(),
            }
            for p in route.params
        ]
    if route.body is not None:
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": route.body}},
        }
    return operation


def _as_openapi30(schema: Any) -> Any:
    """The registry's schemas use JSON Schema's numeric exclusiveMinimum/exclusiveMaximum
    (what routes.validate reads); OpenAPI 3.0 wants minimum/maximum plus a boolean."""
    if isinstance(schema, list):
        return [_as_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _as_openapi30(value) for key, value in schema.items()}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[limit] = value
            out[bound] = True
    return out


def build_document(table: RouteTable) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, route in table.mounted():
        if route.hidden:
            continue
        paths.setdefault(path, {})[method.lower()] = _as_openapi30(_operation(route, path))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "ocp-agentd control API",
            "version": __version__,
            "description": (
                "The OCP Agent daemon's API. Every answer is the OCP envelope; errors carry "
                "error.code (see x-error-codes). On the unix socket, root, the daemon's user "
                "and members of the socket's group hold every permission; other callers, and "
                "every TCP caller, send Authorization: Bearer <token>."
            ),
            "x-error-codes": [
                {"code": int(c), "http": c.http_status, "meaning": c.meaning} for c in ErrorCode
            ],
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerToken": {"type": "http", "scheme": "bearer"},
                "unixSocketPeer": {
                    "type": "apiKey", "in": "header", "name": "X-Unix-Peer-Credentials",
                    "description": "Not a header: the kernel's SO_PEERCRED of a unix "
                    "socket caller; root, the daemon's user and the socket group are trusted.",
                },
            },
            "schemas": {
                "Envelope": {
                    "type": "object",
                    "required": ["successful", "timestamp", "duration", "status", "traceId"],
                    "properties": {"data": {}, **ENVELOPE_FIELDS},
                },
                "Error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "integer", "enum": [int(c) for c in ErrorCode]},
                        "message": {"type": "string"},
                        "target": {"type": "string"},
                        "subErrors": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Error"},
                        },
                    },
                },
                "ErrorEnvelope": {
                    "type": "object",
                    "required": ["successful", "error", "status", "traceId"],
                    "properties": {
                        **ENVELOPE_FIELDS,
                        "error": {"$ref": "#/components/schemas/Error"},
                    },
                },
            },
        },
    }


async def get_openapi(request: web.Request) -> web.Response:
    # The document itself, not wrapped in the envelope: OpenAPI tools read it as it is
    # (like /metrics, the one other unwrapped answer; errors are still enveloped).
    return web.json_response(build_document(request.app[ROUTE_TABLE]))


def routes() -> list[Route]:
    return [
        Route(
            "GET", OPENAPI_PATH, get_openapi, permission=None,
            summary="This OpenAPI document",
            description="Every route of this daemon, generated from its route registry. "
            "Answered as the bare document (no envelope) so that OpenAPI tools can read it.",
            raw=True, tags=("meta",),
        )
    ]
