"""The route registry: every route of the control API, declared once with its metadata.

The app mounts routes from this registry and ``/api/v1/openapi.json`` is generated from it,
so a route that works is a route that is documented.

How to add routes (e.g. ``api/compute.py``, ``api/tasks.py``)::

    from ocp_agentd.api.context import app_context
    from ocp_agentd.api.envelope import ApiError, ErrorCode
    from ocp_agentd.api.models import HostAgent, OperationBody
    from ocp_agentd.api.routes import Param, Route

    async def get_agent(request: web.Request) -> HostAgent:
        ctx = app_context(request)                 # the AppContext: settings, supervisor, ...
        host_id = request["params"]["hostId"]      # path/query params, parsed and validated
        body = request["body"]                     # the body as its model (see ``body``)
        ...
        return HostAgent(...)                      # the envelope's "data"; or raise ApiError

    def routes() -> list[Route]:
        return [
            Route("GET", "/compute/hosts/{hostId}/agent", get_agent,
                  permission="HOST_VIEWER", summary="The host's OCP agent",
                  operation_id="getHostAgent", data=HostAgent,
                  params=(Param("hostId", "path", "integer", minimum=1, maximum=2**63 - 1),),
                  errors=(ErrorCode.HOST_NOT_FOUND,),
                  also_prefixed=True),             # also served at /api/v2/compute/...
        ]

then add the module's ``routes`` to ``ROUTE_SOURCES`` in ``api/app.py``.

- ``permission``: one of config.PERMISSIONS, or None for "any authenticated caller".
- ``operation_id``: the OpenAPI operationId, a verb and a noun in camelCase
  (``restartHostAgent``); default: the handler's name in camelCase. The ``/api/v2`` copy
  of an ``also_prefixed`` route gets ``V2`` appended. Unique in the registry.
- ``params``: path and query parameters. A value that does not parse or is out of range is
  answered 1000 with the parameter in ``target`` before the handler runs. Parsed values are in
  ``request["params"]`` (absent optional query params take their ``default``).
- ``body``: a request model (api/models.RequestModel); the body is then read, parsed and
  validated (1000 on failure, see models.parse_body) into ``request["body"]`` as that model;
  an empty body counts as ``{}``. Without ``body`` the route ignores any body.
- ``data``: the shape of the envelope's ``data`` (a model, dataclass, TypedDict or
  ``list[...]`` of one; see api/models.py), for the OpenAPI document. The handler returns
  it: a pydantic model is written by alias, a dataclass through its ``as_dict()``; a hot
  path may return the equivalent plain dict (it is not validated again).
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
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.models import RequestModel

Handler = Callable[[web.Request], Awaitable[Any]]
ParamType = Literal["integer", "number", "string", "boolean"]

V2_PREFIX = "/api/v2"
_OPERATION_ID = re.compile(r"[a-z][A-Za-z0-9]*")
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
        try:
            value = _PARSERS[self.type](raw)
            if self.enum is not None and value not in self.enum:
                raise ValueError(f"expected one of {list(self.enum)}")
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"must be at least {self.minimum:g}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"must be at most {self.maximum:g}")
        except ValueError as why:
            raise ApiError(
                ErrorCode.BAD_REQUEST,
                f"{self.location} parameter {self.name!r}: {why}, got {raw[:80]!r}",
                target=self.name,
            ) from None
        return value


def _integer(raw: str) -> int:
    text = raw.strip()
    digits = text[1:] if text[:1] in ("+", "-") else text
    # ASCII only: str.isdigit() also takes fullwidth digits (int() reads them) and
    # superscripts (int() raises: an internal error).
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError("expected an integer")
    if len(text) > 40:
        raise ValueError("integer too long")
    return int(text)


def _number(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise ValueError("expected true or false")
    return lowered in ("true", "1")


_PARSERS: dict[str, Callable[[str], Any]] = {
    "integer": _integer, "number": _number, "boolean": _boolean, "string": str,
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    permission: str | None
    summary: str
    description: str = ""
    params: tuple[Param, ...] = ()
    body: type[RequestModel] | None = None
    data: Any = None  # a type pydantic can describe; None: no documented data
    operation_id: str | None = None
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

    def operation_ids(self) -> list[str]:
        """The OpenAPI operationId of each mounted path, in mount_paths() order."""
        first = self.operation_id or _camel(getattr(self.handler, "__name__", "handler"))
        return [first] + [first + "V2" for _ in self.mount_paths()[1:]]


@dataclass
class RouteTable:
    """The routes of one app, in registration order; rejects duplicates."""

    _routes: list[Route] = field(default_factory=list)
    document: dict[str, Any] | None = None  # the OpenAPI document, once built (openapi.py)

    def add(self, route: Route) -> None:
        mounted = {(r.method, p) for r in self._routes for p in r.mount_paths()}
        for path in route.mount_paths():
            if (route.method, path) in mounted:
                raise ValueError(f"route {route.method} {path} registered twice")
        if not route.hidden:
            taken = {i for r in self._routes if not r.hidden for i in r.operation_ids()}
            for operation_id in route.operation_ids():
                if operation_id in taken or not _OPERATION_ID.fullmatch(operation_id):
                    raise ValueError(f"operationId {operation_id!r} of {route.method} "
                                     f"{route.path} is taken or not camelCase")
        self._routes.append(route)
        self.document = None

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


def _camel(name: str) -> str:
    first, *rest = name.strip("_").split("_")
    return first + "".join(word.capitalize() for word in rest)
