"""GET /api/v1/openapi.json: the OpenAPI 3.0 document, generated from the route registry.

Each route's request body and answer are shapes of api/models.py; one pydantic schema
generator turns all of them into ``components.schemas`` at once, so every object and enum
is named there once and operations refer to it (``$ref``). Pydantic writes JSON Schema
2020-12; :func:`_as_openapi30` turns the few constructs OpenAPI 3.0 spells differently
(``anyOf`` with null, numeric exclusive bounds, ``const``) into 3.0's. The document is
built on the first request and kept with the route table.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode

from ocp_agentd import __version__
from ocp_agentd.api.envelope import ErrorCode
from ocp_agentd.api.routes import ROUTE_TABLE, Route, RouteTable

OPENAPI_PATH = "/api/v1/openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"

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


class _SchemaGenerator(GenerateJsonSchema):
    """Pydantic's generator without the per-field titles it derives from field names
    ("Createtime"): the property name already says it."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def _shapes(table: RouteTable) -> tuple[dict[tuple[int, str], Any], dict[str, Any]]:
    """The schema of each route's body and data by (route index, "body"|"data"), and the
    named schemas they refer to."""
    inputs: list[tuple[tuple[int, str], JsonSchemaMode, Any]] = []
    for index, route in enumerate(table):
        if route.hidden:
            continue
        if route.body is not None:
            inputs.append(((index, "body"), "validation", TypeAdapter(route.body).core_schema))
        if route.data is not None:
            inputs.append(
                ((index, "data"), "serialization", TypeAdapter(route.data).core_schema)
            )
    generator = _SchemaGenerator(ref_template=REF_TEMPLATE)
    refs, definitions = generator.generate_definitions(inputs)
    return {key: schema for (key, _mode), schema in refs.items()}, definitions


def _responses(route: Route, data: Any) -> dict[str, Any]:
    if route.raw:
        ok: dict[str, Any] = {
            "description": route.summary,
            "content": {route.content_type: {"schema": {"type": "string"}}},
        }
    else:
        ok = {
            "description": "Success envelope",
            "content": {
                "application/json": {
                    "schema": {
                        "allOf": [
                            {"$ref": "#/components/schemas/Envelope"},
                            {"type": "object", "required": ["data"],
                             "properties": {"data": data if data is not None else {}}},
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


def _operation(
    route: Route, operation_id: str, shapes: dict[str, Any]
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "summary": route.summary,
        "responses": _responses(route, shapes.get("data")),
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
    if "body" in shapes and route.body is not None:
        # An empty body counts as {}: a body is needed only when a field is.
        needed = any(field.is_required() for field in route.body.model_fields.values())
        operation["requestBody"] = {
            "required": needed,
            "content": {"application/json": {"schema": shapes["body"]}},
        }
    return operation


def _as_openapi30(schema: Any) -> Any:
    """A JSON Schema 2020-12 schema (pydantic's) as OpenAPI 3.0 spells it: ``anyOf`` a
    type and null becomes that type with ``nullable`` (a ``$ref`` is wrapped in
    ``allOf``, as 3.0 ignores siblings of ``$ref``); numeric exclusiveMinimum and
    exclusiveMaximum become minimum/maximum with a boolean; ``const`` becomes a
    one-value ``enum``."""
    if isinstance(schema, list):
        return [_as_openapi30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _as_openapi30(value) for key, value in schema.items()}
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**rest[0], **out}
        else:
            out["allOf" if len(rest) == 1 else "anyOf"] = rest
        out["nullable"] = True
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[limit] = value
            out[bound] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


def build_document(table: RouteTable) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of every route of ``table`` not marked hidden."""
    shapes, definitions = _shapes(table)
    paths: dict[str, dict[str, Any]] = {}
    for index, route in enumerate(table):
        if route.hidden:
            continue
        mine = {part: shapes[(index, part)] for part in ("body", "data")
                if (index, part) in shapes}
        for path, operation_id in zip(route.mount_paths(), route.operation_ids(), strict=True):
            paths.setdefault(path, {})[route.method.lower()] = _as_openapi30(
                _operation(route, operation_id, mine)
            )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "ocp-agentd control API",
            "version": __version__,
            "description": (
                "The OCP Agent daemon's API. Every answer is the OCP envelope; errors carry "
                "error.code (see x-error-codes). On the unix socket, root, the daemon's user "
                "and members of the socket's group hold every permission; other callers, and "
                "every TCP caller, send Authorization: Bearer <token>. Field names follow "
                "each family's callers: /api/v1 (the local process API) is snake_case, the "
                "OCP server's routes (/compute, /api/v2) are camelCase as OCP sends them."
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
                **_as_openapi30(definitions),
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
    table = request.app[ROUTE_TABLE]
    if table.document is None:
        table.document = build_document(table)
    return web.json_response(table.document)


def routes() -> list[Route]:
    return [
        Route(
            "GET", OPENAPI_PATH, get_openapi, permission=None,
            summary="This OpenAPI document", operation_id="getOpenApiDocument",
            description="Every route of this daemon, generated from its route registry. "
            "Answered as the bare document (no envelope) so that OpenAPI tools can read it.",
            raw=True, tags=("meta",),
        )
    ]
