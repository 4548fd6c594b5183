"""The route registry and /api/v1/openapi.json: every mounted route is documented, and every
documented route is served with its documented permission."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from harness import ApiClient, DaemonRunner, free_port
from pydantic import Field

from ocp_agentd.api.app import FAULT_PATH, collect_routes, create_app
from ocp_agentd.api.context import AppContext
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.listeners import ApiStartError
from ocp_agentd.api.listeners import start_api as start_api_server
from ocp_agentd.api.models import RequestModel, parse_body
from ocp_agentd.api.openapi import build_document
from ocp_agentd.api.routes import Param, Route, RouteTable
from ocp_agentd.config import Settings
from ocp_agentd.supervision import Supervisor

NO_PERMISSION_TOKEN = "token-without-permissions-5e2a"
SAMPLE_VALUES = {"hostId": "2", "name": "ocp_exporter", "id": "987654", "sid": "1",
                 "agentProcessId": "987654"}


@pytest.fixture
def daemon(daemon_factory) -> DaemonRunner:
    port = free_port()
    runner = daemon_factory(overrides={"api": {
        "tcp": f"127.0.0.1:{port}",
        "tokens": [{"name": "nothing", "permissions": [],
                    "sha256": hashlib.sha256(NO_PERMISSION_TOKEN.encode()).hexdigest()}],
    }})
    runner.tcp_port = port  # type: ignore[attr-defined]
    return runner


def test_document_lists_every_route(daemon: DaemonRunner) -> None:
    response = daemon.get("/api/v1/openapi.json")
    assert response.status == 200
    doc = response.envelope
    assert doc is not None and doc["openapi"].startswith("3.0")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    expected = {(m, p) for m, p, r in collect_routes().mounted() if not r.hidden}
    assert documented == expected
    for method, path in [
        ("GET", "/api/v1/status"), ("GET", "/api/v1/processes"),
        ("GET", "/api/v1/processes/{name}"), ("POST", "/api/v1/processes/{name}/start"),
        ("POST", "/api/v1/processes/{name}/stop"), ("POST", "/api/v1/processes/{name}/restart"),
        ("POST", "/api/v1/processes/{name}/verify"), ("POST", "/api/v1/agent/stop-all"),
        ("POST", "/api/v1/agent/start-all"), ("POST", "/api/v1/agent/verify"),
        ("GET", "/metrics"), ("GET", "/api/v1/openapi.json"),
    ]:
        assert (method, path) in documented
    # Every /compute route is served under /api/v2 too.
    compute = {(m, p) for m, p in documented if p.startswith("/compute/")}
    assert compute, "no /compute routes registered"
    assert all((m, "/api/v2" + p) in documented for m, p in compute)
    assert FAULT_PATH not in doc["paths"]
    codes = {item["code"]: item for item in doc["info"]["x-error-codes"]}
    assert codes[2004]["http"] == 409 and set(codes) >= {
        1000, 1001, 1002, 1003, 1004, 1005, 2000, 2001, 2002, 2003, 20000, 20003, 20004, 5000
    }


def test_operations_describe_params_permissions_and_errors(daemon: DaemonRunner) -> None:
    doc = daemon.get("/api/v1/openapi.json").envelope
    assert doc is not None
    for path, operations in doc["paths"].items():
        in_path = set(re.findall(r"{(\w+)}", path))
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            params = {p["name"]: p for p in operation.get("parameters", [])}
            assert in_path <= set(params), where
            for name in in_path:
                assert params[name]["in"] == "path" and params[name]["required"], where
                assert params[name]["schema"]["type"] in ("integer", "string"), where
            assert operation["summary"], where
            assert "200" in operation["responses"], where
            assert "401" in operation["responses"], where  # 1004 applies everywhere
            assert "500" in operation["responses"], where
            if operation["x-permission"]:
                assert "403" in operation["responses"], where
    start = doc["paths"]["/api/v1/processes/{name}/start"]["post"]
    assert start["x-permission"] == "HOST_MANAGER"
    body = resolve(doc, start["requestBody"]["content"]["application/json"]["schema"])
    assert set(body["properties"]) == {"timeout", "force"}
    assert 2004 in start["responses"]["409"]["x-error-codes"]
    assert 2002 in start["responses"]["400"]["x-error-codes"]
    assert 2001 in start["responses"]["404"]["x-error-codes"]
    envelope = doc["components"]["schemas"]["Envelope"]["properties"]
    assert {"data", "successful", "timestamp", "duration", "status", "traceId",
            "server"} <= set(envelope)
    status = doc["paths"]["/api/v1/status"]["get"]
    assert status["x-permission"] == "HOST_VIEWER"


def test_every_documented_route_is_served_with_its_permission(daemon: DaemonRunner) -> None:
    """A token without permissions gets 1005 from each route that needs one (so the route
    exists and checks what the document says, and no handler runs), 200 from the others."""
    doc = daemon.get("/api/v1/openapi.json").envelope
    assert doc is not None
    client = ApiClient(host="127.0.0.1", port=daemon.tcp_port,  # type: ignore[attr-defined]
                       token=NO_PERMISSION_TOKEN)
    for path, operations in doc["paths"].items():
        concrete = re.sub(r"{(\w+)}", lambda m: SAMPLE_VALUES.get(m.group(1), "1"), path)
        for method, operation in operations.items():
            response = client.request(method.upper(), concrete)
            permission = operation["x-permission"]
            if permission:
                assert response.code == 1005, (method, concrete, response.text)
                assert permission in response.error["message"]
            else:
                assert response.status == 200, (method, concrete, response.text)


# --- the registry on its own ------------------------------------------------------------


async def _nothing(request):  # pragma: no cover - never called
    return None


def test_registry_rejects_duplicates_and_prefixes_once() -> None:
    table = RouteTable()
    table.add(Route("GET", "/compute/x", _nothing, None, "x", also_prefixed=True))
    assert [p for _, p, _ in table.mounted()] == ["/compute/x", "/api/v2/compute/x"]
    with pytest.raises(ValueError, match="twice"):
        table.add(Route("GET", "/api/v2/compute/x", _nothing, None, "dup"))
    table.add(Route("GET", "/api/v2/tasks/y", _nothing, None, "y", also_prefixed=True,
                    operation_id="getY"))
    assert [p for _, p, _ in table.mounted()][-1] == "/api/v2/tasks/y"
    assert len(table.mounted()) == 3


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "1.5", "", "9223372036854775808", "1" * 50])
def test_host_id_must_be_a_positive_64_bit_integer(raw: str) -> None:
    host = Param("hostId", "path", "integer", minimum=1, maximum=2**63 - 1)
    with pytest.raises(ApiError) as caught:
        host.parse(raw)
    assert caught.value.code == ErrorCode.BAD_REQUEST and caught.value.target == "hostId"
    assert host.parse("9223372036854775807") == 2**63 - 1


class _Body(RequestModel):
    a: int = Field(ge=1)
    b: list[str] = []


def test_body_validation_names_the_field() -> None:
    assert parse_body(_Body, '{"a": 1, "b": ["x"]}') == _Body(a=1, b=["x"])
    for bad, target in [({}, "a"), ({"a": 0}, "a"), ({"a": True}, "a"), ({"a": 1, "c": 1}, "c"),
                        ({"a": 1, "b": [1]}, "b[0]"), ([], "body"), ({"a": "1"}, "a")]:
        with pytest.raises(ApiError) as caught:
            parse_body(_Body, json.dumps(bad))
        assert caught.value.code == 1000 and caught.value.target == target, bad
    with pytest.raises(ApiError, match="unknown field 'c'; known: \\['a', 'b'\\]"):
        parse_body(_Body, '{"a": 1, "c": 1}')


# --- the document's shapes ----------------------------------------------------------------


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a ``$ref`` names (or the schema itself)."""
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _inline_shapes(node: Any, where: str, found: dict[str, list[str]]) -> None:
    """Every inline object-with-properties and enum under ``node``, by its canonical JSON."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            _inline_shapes(item, f"{where}[{index}]", found)
        return
    if not isinstance(node, dict):
        return
    if "properties" in node or "enum" in node:
        shape = {k: v for k, v in node.items() if k not in ("description", "default")}
        found.setdefault(json.dumps(shape, sort_keys=True), []).append(where)
    for key, value in node.items():
        _inline_shapes(value, f"{where}/{key}", found)


def test_each_shape_is_named_once_and_referred_to() -> None:
    """Success data and request bodies refer to components; no object or enum is written
    out twice anywhere (openapi-python-client would generate one class per copy)."""
    doc = build_document(collect_routes())
    schemas = doc["components"]["schemas"]
    assert {"ProcessInfo", "LastExit", "State", "TaskInstance", "SubtaskInstance",
            "SubtaskStatus", "HostAgent", "HostAgentProcess", "OperationBody"} <= set(schemas)
    found: dict[str, list[str]] = {}
    for name, schema in schemas.items():
        _inline_shapes({k: v for k, v in schema.items()}, f"#/components/schemas/{name}", found)
        if schema.get("type") == "object" and name not in ("Envelope", "ErrorEnvelope"):
            assert "properties" not in schema or "required" in schema or \
                schema.get("additionalProperties") is False, name
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            _inline_shapes(operation.get("requestBody", {}), where, found)
            ok = operation["responses"]["200"]["content"]
            if "allOf" not in ok.get("application/json", {}).get("schema", {}):
                continue  # a raw answer: /metrics, this document
            data = ok["application/json"]["schema"]["allOf"][1]["properties"]["data"]
            assert "$ref" in data or "$ref" in data.get("items", {}), (where, data)
            _inline_shapes(data, where, found)
            if "requestBody" in operation:
                assert "$ref" in operation["requestBody"]["content"]["application/json"][
                    "schema"], where
    copies = {shape: places for shape, places in found.items()
              if len(places) > 1}
    assert copies == {}, copies
    # Each component's own top level counts as its one declaration: the process state enum
    # and the last exit object are declared exactly once.
    record = schemas["ProcessInfo"]["properties"]
    assert record["state"] == {"$ref": "#/components/schemas/State"}
    assert record["last_exit"]["allOf"] == [{"$ref": "#/components/schemas/LastExit"}]
    assert set(schemas["ProcessInfo"]["required"]) >= {"name", "state", "pid", "create_time"}


def test_operation_ids_read_as_verbs_and_nouns() -> None:
    doc = build_document(collect_routes())
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+[A-Z][A-Za-z0-9]*", i) for i in ids), ids
    paths = doc["paths"]
    assert paths["/compute/hosts/{hostId}/agent/restart"]["post"]["operationId"] == \
        "restartHostAgent"
    assert paths["/api/v2/compute/hosts/{hostId}/agent/restart"]["post"]["operationId"] == \
        "restartHostAgentV2"
    assert paths["/api/v1/processes/{name}"]["get"]["operationId"] == "getProcess"
    table = RouteTable()
    table.add(Route("GET", "/a", _nothing, None, "a", operation_id="getThing"))
    with pytest.raises(ValueError, match="getThing"):
        table.add(Route("GET", "/b", _nothing, None, "b", operation_id="getThing"))
    with pytest.raises(ValueError, match="camelCase"):
        table.add(Route("GET", "/c", _nothing, None, "c", operation_id="get_c"))


def test_start_api_refuses_a_live_socket_and_a_non_socket(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "run" / "a.sock"
        settings = Settings(api={"socket": str(sock)},
                            agent={"state_dir": str(tmp_path / "state"),
                                   "log_dir": str(tmp_path / "log")})
        supervisor = Supervisor(settings)
        first = await start_api_server(create_app(AppContext(settings, supervisor)), settings)
        try:
            with pytest.raises(ApiStartError, match="already answers"):
                await start_api_server(create_app(AppContext(settings, supervisor)), settings)
            assert sock.exists()
        finally:
            await first.close()
        assert not sock.exists()  # close() removes its own socket file
        sock.write_text("not a socket")
        with pytest.raises(ApiStartError, match="not a socket"):
            await start_api_server(create_app(AppContext(settings, supervisor)), settings)
        assert sock.read_text() == "not a socket"
        await supervisor.close()

    asyncio.run(scenario())
