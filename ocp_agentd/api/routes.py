"""The route registry: every route of the control API, declared once with its metadata.

The app mounts routes from this registry and ``/api/v1/openapi.json`` is generated from it,
so a route that works is a route that is documented.

How to add routes (e.g. ``api/compute.py``, ``api/tasks.py``)::

    from ocp_agentd.api.envelope import ApiError, ErrorCode
    from ocp_agentd.api.context import app_context
    from ocp_agentd.api.routes import Param, Route

    async def get_agent(request: web.Request) -> dict:
        ctx = app_context(request)                 # the AppContext: settings, supervisor, ...
        host_id = request["params"]["hostId"]      # path/query params, parsed and validated
        body = request["body"]                     # the JSON body, validated ({} when empty)
        ...
        return {...}                               # the envelope's "data"; or raise ApiError

    def routes() -> list[Route]:
        return [
            Route("GET", "/compute/hosts/{hostId}/agent", get_agent,
                  permission="HOST_VIEWER", summary="The host's OCP agent",
                  params=(Param("hostId", "path", "integer", minimum=1, maximum=2**63 - 1),),
                  errors=(ErrorCode.HOST_NOT_FOUND,),
                  also_prefixed=True),             # also served at /api/v2/compute/...
        ]

then add the module's ``routes`` to ``ROUTE_SOURCES`` in ``api/app.py``.

- ``permission``: one of config.PERMISSIONS, or None for "any authenticated caller".
- ``params``: path and query parameters. A value that does not parse or is out of range is
  answered 1000 with the parameter in ``target`` before the handler runs. Parsed values are in
  ``request["params"]`` (absent optional query params take their ``default``).
- ``body``: a JSON schema (the subset in :func:`validate`); a body is then read, parsed and
  validated (1000 on failure) into ``request["body"]``; an empty body counts as ``{}``. Without
  ``body`` the route ignores any body.
- ``data``: a JSON schema of the envelope's ``data``, for the OpenAPI document.
- ``errors``: the codes the handler itself may answer; the app adds the ones it answers for
  every route (1000, 1003, 1004, 1005, 5000) to the document.
- ``also_prefixed``: serve the route at ``/api/v2`` + path too (SPEC section 5: every
  ``/compute/...`` route).
- ``raw``: the handler returns its own ``web.StreamResponse`` (e.g. ``/metrics``); errors are
  still enveloped.
- ``hidden``: left out of the OpenAPI document (the test-only fault route).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from ocp_agentd.api.envelope import ApiError, ErrorCode

Handler = Callable[[web.Request], Awaitable[Any]]
ParamType = Literal["integer", "number", "string", "boolean"]

V2_PREFIX = "/api/v2"
ROUTE_TABLE: web.AppKey[RouteTable] = web.AppKey("ocp_agentd_routes")


@dataclass(frozen=True)
class Param:
    name: str
    location: Literal["path", "query"]
    type: ParamType = "string"
    required: bool | None = None  # path params are always required
    description: str = ""
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[str, ...] | None = None
    default: Any = None

    @property
    def is_required(self) -> bool:
        return self.location == "path" or bool(self.required)

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.type}
        if self.type == "integer":
            schema["format"] = "int64"
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.enum is not None:
            schema["enum"] = list(self.enum)
        if self.default is not None:
            schema["default"] = self.default
        return schema

    def parse(self, raw: str) -> Any:
        """The typed value of ``raw``; ApiError 1000 naming the parameter when it is bad."""

        def bad(why: str) -> ApiError:
            return ApiError(
                ErrorCode.BAD_REQUEST,
                f"{self.location} parameter {self.name!r}: {why}, got {raw[:80]!r}",
                target=self.name,
            )

        value: Any
        if self.type == "integer":
            text = raw.strip()
            digits = text[1:] if text[:1] in ("+", "-") else text
            # ASCII only: str.isdigit() also takes fullwidth digits (int() reads them) and
            # superscripts (int() raises: an internal error).
            if not (digits.isascii() and digits.isdigit()):
                raise bad("expected an integer")
            if len(text) > 40:
                raise bad("integer too long")
            value = int(text)
        elif self.type == "number":
            try:
                value = float(raw)
            except ValueError:
                raise bad("expected a number") from None
            if not math.isfinite(value):
                raise bad("expected a finite number")
        elif self.type == "boolean":
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise bad("expected true or false")
            value = lowered in ("true", "1")
        else:
            value = raw
            if self.enum is not None and value not in self.enum:
                raise bad(f"expected one of {list(self.enum)}")
        if self.minimum is not None and value < self.minimum:
            raise bad(f"must be at least {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise bad(f"must be at most {self.maximum:g}")
        return value


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    permission: str | None
    summary: str
    description: str = ""
    params: tuple[Param, ...] = ()
    body: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    errors: tuple[ErrorCode, ...] = ()
    also_prefixed: bool = False
    tags: tuple[str, ...] = ()
    raw: bool = False
    hidden: bool = False
    content_type: str = "application/json"

    def mount_paths(self) -> list[str]:
        paths = [self.path]
        if self.also_prefixed and not self.path.startswith(V2_PREFIX + "/"):
            paths.append(V2_PREFIX + self.path)
        return paths

    def operation_id(self, path: str) -> str:
        words = [
            part.strip("{}").replace("-", "_") for part in path.strip("/").split("/") if part
        ]
        return "_".join([self.method.lower(), *words])


@dataclass
class RouteTable:
    """The routes of one app, in registration order; rejects duplicates."""

    _routes: list[Route] = field(default_factory=list)

    def add(self, route: Route) -> None:
        mounted = {(r.method, p) for r in self._routes for p in r.mount_paths()}
        for path in route.mount_paths():
            if (route.method, path) in mounted:
                raise ValueError(f"route {route.method} {path} registered twice")
        self._routes.append(route)

    def extend(self, routes: Iterable[Route]) -> None:
        for route in routes:
            self.add(route)

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def mounted(self) -> list[tuple[str, str, Route]]:
        """Every (method, path, route) the app serves, prefixed copies included."""
        return [(r.method, path, r) for r in self._routes for path in r.mount_paths()]


# --- a small JSON schema validator (the subset the routes use) ---------------------------


def validate(value: Any, schema: dict[str, Any], where: str = "body") -> None:
    """Checks ``value`` against ``schema``; raises ApiError 1000 naming the field.

    Supported: type (object, array, string, integer, number, boolean, null, or a list of
    them), properties, required, additionalProperties (bool), items, enum, minimum, maximum,
    exclusiveMinimum, exclusiveMaximum (numbers), minLength, maxLength, maxItems.
    """

    def fail(why: str) -> ApiError:
        return ApiError(ErrorCode.BAD_REQUEST, f"{where}: {why}", target=where)

    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_is_type(value, t) for t in allowed):
            raise fail(f"expected {' or '.join(allowed)}, got {_json_type(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise fail(f"expected one of {schema['enum']}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise fail(f"must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise fail(f"must be at most {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise fail(f"must be greater than {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            raise fail(f"must be less than {schema['exclusiveMaximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise fail(f"must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise fail(f"must be at most {schema['maxLength']} characters")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise fail(f"must have at most {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                validate(item, schema["items"], f"{where}[{index}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ApiError(
                    ErrorCode.BAD_REQUEST, f"{where}: {key!r} is required", target=key
                )
        properties: dict[str, Any] = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                validate(item, properties[key], key if where == "body" else f"{where}.{key}")
            elif schema.get("additionalProperties", True) is False:
                raise ApiError(
                    ErrorCode.BAD_REQUEST,
                    f"{where}: unknown field {key!r}; known: {sorted(properties)}",
                    target=key,
                )


def _is_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    raise ValueError(f"unsupported schema type {name!r}")


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name):
            return name
    return type(value).__name__
