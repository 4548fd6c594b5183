"""The control API's envelope, errors, trace ids, body limit and auth, on a real daemon.

One daemon (demo programs, TCP on, two tokens, the test fault route on) serves the whole
module; tests here do not change program states.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ApiClient, DaemonPool, DaemonRunner, free_port, wait_for

MANAGER_TOKEN = "manager-token-3f9d1c"
VIEWER_TOKEN = "viewer-token-81be07"
MAX_BODY = 2048
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
ENVELOPE_KEYS = {"successful", "timestamp", "duration", "status", "traceId", "server"}


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def api_overrides(tcp_port: int, socket_path: Path | None = None, mode: str = "0660") -> dict:
    api: dict = {
        "tcp": f"127.0.0.1:{tcp_port}",
        "max_body_bytes": MAX_BODY,
        "socket_mode": mode,
        "tokens": [
            {"name": "manager", "sha256": _sha(MANAGER_TOKEN),
             "permissions": ["HOST_VIEWER", "HOST_MANAGER", "TASK_VIEWER", "TASK_MANAGER"]},
            {"name": "viewer", "sha256": _sha(VIEWER_TOKEN), "permissions": ["HOST_VIEWER"]},
        ],
    }
    if socket_path is not None:
        api["socket"] = str(socket_path)
    return {"api": api}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonRunner]:
    pool = DaemonPool(tmp_path_factory.mktemp("api"))
    try:
        port = free_port()
        runner = pool.make(
            overrides=api_overrides(port), env={"OCP_AGENTD_TEST_FAULTS": "1"},
            wait_running=True,
        )
        runner.tcp_port = port  # type: ignore[attr-defined]
        yield runner
    finally:
        pool.cleanup()


def tcp(daemon: DaemonRunner, token: str | None = None) -> ApiClient:
    return ApiClient(host="127.0.0.1", port=daemon.tcp_port, token=token)  # type: ignore[attr-defined]


def assert_error(response, code: int, http: int) -> dict:
    envelope = response.envelope
    assert envelope is not None, response.text
    assert response.status == http, response.text
    assert envelope["successful"] is False
    assert envelope["status"] == http
    assert "data" not in envelope
    assert set(envelope) >= ENVELOPE_KEYS
    error = envelope["error"]
    assert error["code"] == code, response.text
    assert isinstance(error["message"], str) and error["message"]
    assert error["subErrors"] == [] or isinstance(error["subErrors"], list)
    assert "Traceback" not in response.text
    assert response.headers["X-OCP-Trace-ID"] == envelope["traceId"]
    return error


def test_success_envelope_shape(daemon: DaemonRunner) -> None:
    response = daemon.get("/api/v1/status")
    assert response.status == 200
    envelope = response.envelope
    assert envelope is not None and ENVELOPE_KEYS | {"data"} == set(envelope)
    assert envelope["successful"] is True and envelope["status"] == 200
    assert TIMESTAMP.match(envelope["timestamp"]), envelope["timestamp"]
    assert isinstance(envelope["duration"], int) and 0 <= envelope["duration"] < 5000
    assert re.fullmatch(r"[0-9a-f]{16}", envelope["traceId"])
    assert response.headers["X-OCP-Trace-ID"] == envelope["traceId"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", envelope["server"])
    assert response.headers["Content-Type"].startswith("application/json")
    data = envelope["data"]
    assert data["host_id"] == 2 and data["pid"] == daemon.pid
    assert data["counts"]["RUNNING"] == data["programs"] == 3


def test_trace_id_is_echoed_and_validated(daemon: DaemonRunner) -> None:
    given = "ocp-Trace_42"
    response = daemon.get("/api/v1/processes", headers={"X-OCP-Trace-ID": given})
    assert response.envelope["traceId"] == given
    assert response.headers["X-OCP-Trace-ID"] == given
    # An error answer echoes it too.
    response = daemon.get("/api/v1/nowhere", headers={"X-OCP-Trace-ID": given})
    assert response.envelope["traceId"] == given == response.headers["X-OCP-Trace-ID"]
    # Too long or with characters outside [A-Za-z0-9_-]: a fresh id instead.
    for bad in ("x" * 65, "a b", "id;rm"):
        response = daemon.get("/api/v1/status", headers={"X-OCP-Trace-ID": bad})
        fresh = response.envelope["traceId"]
        assert fresh != bad and re.fullmatch(r"[0-9a-f]{16}", fresh)
        assert response.headers["X-OCP-Trace-ID"] == fresh
    # Fresh ids differ per request.
    ids = {daemon.get("/api/v1/status").envelope["traceId"] for _ in range(5)}
    assert len(ids) == 5


def test_1000_malformed_requests(daemon: DaemonRunner) -> None:
    path = "/api/v1/processes/ocp_exporter/verify"
    start = "/api/v1/processes/no_such_program/start"
    cases = [
        (start, b"{not json", "body"),
        (start, b'{"timeout": NaN}', "body"),
        (start, b'{"timeout": 1}\xff', "body"),           # invalid UTF-8
        (start, b"[1, 2]", "body"),                        # not an object
        (start, b'{"timeout": -1}', "timeout"),
        (start, b'{"timeout": "soon"}', "timeout"),
        (start, b'{"force": "yes"}', "force"),
        (start, b'{"timeot": 5}', "timeot"),                # unknown field
    ]
    for route, body, target in cases:
        response = daemon.request("POST", route, body=body,
                                  headers={"Content-Type": "application/json"})
        error = assert_error(response, 1000, 400)
        assert error.get("target") == target, (body, response.text)
    # The body is checked before the program is looked up; a valid one gets to the lookup.
    assert_error(daemon.post(start, json={"timeout": 5}), 2001, 404)
    assert daemon.post(path).status == 200


def _raw_answer(daemon: DaemonRunner, request: bytes) -> bytes:
    """Sends raw bytes over the unix socket; everything the daemon answers until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _raw_exchange(daemon: DaemonRunner, request: bytes) -> tuple[str, dict]:
    head, _, body = _raw_answer(daemon, request).partition(b"\r\n\r\n")
    return head.decode("latin-1").split("\r\n", 1)[0], json.loads(body)


def test_1000_requests_http_cannot_parse(daemon: DaemonRunner) -> None:
    for request in (
        b"GARBAGE\r\n\r\n",
        b"GET /api/v1/processes/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /api/v1/agent/verify HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    ):
        status_line, envelope = _raw_exchange(daemon, request)
        assert " 400 " in status_line, (request[:40], status_line)
        assert envelope["successful"] is False and envelope["status"] == 400
        assert envelope["error"]["code"] == 1000
        assert envelope["error"]["message"].startswith("malformed HTTP request")
        assert re.fullmatch(r"[0-9a-f]{16}", envelope["traceId"])
    assert daemon.get("/api/v1/status").status == 200


def test_1001_1002_unknown_route_and_method(daemon: DaemonRunner) -> None:
    error = assert_error(daemon.get("/api/v1/no/such/route"), 1001, 404)
    assert "/api/v1/no/such/route" in error["message"]
    assert_error(daemon.post("/"), 1001, 404)
    response = daemon.request("DELETE", "/api/v1/status")
    assert_error(response, 1002, 405)
    assert "GET" in response.headers["Allow"]
    assert_error(daemon.get("/api/v1/processes/ocp_exporter/start"), 1002, 405)


def test_1003_body_limit(daemon: DaemonRunner) -> None:
    big = b'{"timeout": 5, "pad": "' + b"x" * (MAX_BODY * 2) + b'"}'
    route = "/api/v1/processes/ocp_exporter/verify"
    error = assert_error(daemon.request("POST", route, body=big), 1003, 413)
    assert str(MAX_BODY) in error["message"]
    # Without Content-Length (chunked), the limit holds while reading.
    head = (b"POST /api/v1/processes/no_such/start HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunk = b"x" * 1024
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    answer = _raw_answer(daemon, head + body)
    assert b" 413 " in answer.split(b"\r\n", 1)[0], answer[:200]
    assert b'"code":1003' in answer.replace(b" ", b"")
    # A body just under the limit is read normally.
    ok = b'{"timeout": 5}' + b" " * (MAX_BODY - 100)
    response = daemon.request("POST", "/api/v1/processes/no_such/start", body=ok)
    assert_error(response, 2001, 404)


def test_tcp_needs_a_token_with_the_permission(daemon: DaemonRunner) -> None:
    error = assert_error(tcp(daemon).get("/api/v1/status"), 1004, 401)
    assert "Bearer" in error["message"]
    assert_error(tcp(daemon, "not-a-known-token").get("/api/v1/status"), 1004, 401)
    assert_error(
        tcp(daemon).get("/api/v1/status", headers={"Authorization": f"Basic {VIEWER_TOKEN}"}),
        1004, 401,
    )
    # Unknown routes do not answer before the caller is known.
    assert_error(tcp(daemon).get("/api/v1/nowhere"), 1004, 401)
    assert tcp(daemon, VIEWER_TOKEN).get("/api/v1/status").status == 200
    assert tcp(daemon, VIEWER_TOKEN).get("/api/v1/processes/ocp_exporter").status == 200
    error = assert_error(
        tcp(daemon, VIEWER_TOKEN).post("/api/v1/processes/ocp_exporter/verify"), 1005, 403
    )
    assert "HOST_MANAGER" in error["message"]
    response = tcp(daemon, MANAGER_TOKEN).post("/api/v1/processes/ocp_exporter/verify")
    assert response.status == 200 and response.data["ok"] is True
    assert_error(tcp(daemon, MANAGER_TOKEN).get("/api/v1/nowhere"), 1001, 404)


def test_2001_2002_process_errors(daemon: DaemonRunner) -> None:
    error = assert_error(daemon.get("/api/v1/processes/no_such_program"), 2001, 404)
    assert "no_such_program" in error["message"]
    assert_error(daemon.post("/api/v1/processes/no_such_program/stop"), 2001, 404)
    before = daemon.process("pos_proxy")
    error = assert_error(daemon.post("/api/v1/processes/pos_proxy/stop"), 2002, 400)
    assert "pos_proxy" in error["message"]
    assert "ocp-agentctl stop --force pos_proxy" in error["message"]  # a command that works
    for action in ("start", "stop", "restart"):
        assert_error(daemon.post(f"/api/v1/processes/ocp_agentd/{action}"), 2002, 400)
        assert_error(
            daemon.post(f"/api/v1/processes/ocp_agentd/{action}", json={"force": True}),
            2002, 400,
        )
    after = daemon.process("pos_proxy")
    assert after["state"] == "RUNNING" and after["pid"] == before["pid"]


def test_5000_internal_error_is_logged_not_sent(daemon: DaemonRunner) -> None:
    response = daemon.get("/api/v1/test/fault", headers={"X-OCP-Trace-ID": "fault-trace-1"})
    error = assert_error(response, 5000, 500)
    assert "secret-detail" not in response.text
    assert "RuntimeError" not in response.text
    assert "fault-trace-1" in error["message"]
    log = wait_for(
        lambda: daemon.log() if "secret-detail-7f3a" in daemon.log() else None,
        10, "the fault's stack in the daemon log",
    )
    assert "fault-trace-1" in log and "Traceback" in log
    # The fault route exists only when the test switch is on: not in the document.
    doc = daemon.get("/api/v1/openapi.json").envelope
    assert "/api/v1/test/fault" not in doc["paths"]


def test_socket_mode_and_identity(daemon: DaemonRunner) -> None:
    mode = os.stat(daemon.socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


_PEER_SCRIPT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    token = sys.argv[2] if len(sys.argv) > 2 else ""
    auth = f"Authorization: Bearer {token}\\r\\n" if token else ""
    s.sendall(("GET /api/v1/status HTTP/1.1\\r\\nHost: x\\r\\n" + auth +
               "Connection: close\\r\\n\\r\\n").encode())
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    print(out.split(b"\\r\\n", 1)[0].decode())
    print(out.split(b"\\r\\n\\r\\n", 1)[1].decode())
""")


def _as_user(uid: int, gid: int, socket_path: Path, token: str = "") -> str:
    result = subprocess.run(
        ["/usr/bin/python3", "-c", _PEER_SCRIPT, str(socket_path), *([token] if token else [])],
        user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=30,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as other users")
def test_unix_socket_peer_credentials(daemon_factory, tmp_path: Path) -> None:
    # A socket folder other users can reach, and a mode that lets them connect: then only
    # the peer credentials decide.
    folder = Path(os.path.realpath("/tmp")) / f"agentd-peer-{os.getpid()}-{free_port()}"
    folder.mkdir(mode=0o755)
    try:
        sock = folder / "agentd.sock"
        runner = daemon_factory(overrides=api_overrides(free_port(), sock, mode="0666"))
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o666
        nobody = 65534
        # Another user outside the socket's group: 1004 without a token.
        out = _as_user(nobody, nobody, sock)
        assert " 401 " in out.splitlines()[0] and '"code":1004' in out.replace(" ", ""), out
        # The same user with a token.
        out = _as_user(nobody, nobody, sock, VIEWER_TOKEN)
        assert " 200 " in out.splitlines()[0], out
        # A member of the socket file's group (here: its primary group) is trusted.
        group = os.stat(sock).st_gid
        out = _as_user(nobody, group, sock)
        assert " 200 " in out.splitlines()[0], out
        runner.stop()
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


def test_stale_socket_is_replaced(daemon_factory) -> None:
    runner = daemon_factory(start=False)
    runner.socket.parent.mkdir(parents=True, exist_ok=True)
    # A socket file nobody listens on (what a daemon killed with -9 leaves behind).
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(runner.socket))
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        ApiClient(socket_path=runner.socket).get("/api/v1/status")
    runner.start()
    assert runner.get("/api/v1/status").status == 200
    assert stat.S_IMODE(os.stat(runner.socket).st_mode) == 0o660
