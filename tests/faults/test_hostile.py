"""Hostile input, by hand: oversized and malformed bodies, deep JSON, path traversal, bad
ids, slow clients, bad or weak credentials, a stranger on the unix socket. Every answer is
an envelope with a documented code, never a 5xx, and nobody gets in who should not."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from faultlib import envelope_problem, host_id, kill_and_wait_restart, token_entry
from harness import ApiClient, DaemonPool, DaemonRunner, free_port, wait_for

pytestmark = pytest.mark.faults

FULL = secrets.token_hex(16)
VIEWER = secrets.token_hex(16)
TASKS_ONLY = secrets.token_hex(16)
LIMIT = 4096


class Target:
    def __init__(self, runner: DaemonRunner, port: int) -> None:
        self.runner = runner
        self.port = port
        self.host_id = host_id(runner)

    def client(self, token: str | None = FULL) -> ApiClient:
        return ApiClient(host="127.0.0.1", port=self.port, token=token, timeout=30)

    def raw(self, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, Any] | None]:
        """Sends bytes as they are over TCP; the status and the decoded body of the answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            chunks = []
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        raw = b"".join(chunks)
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            decoded = None
        return status, decoded if isinstance(decoded, dict) else None


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    pool = DaemonPool(tmp_path_factory.mktemp("hostile"))
    port = free_port()
    tokens = [
        token_entry("full", FULL, ["HOST_VIEWER", "HOST_MANAGER", "TASK_VIEWER", "TASK_MANAGER"]),
        token_entry("viewer", VIEWER, ["HOST_VIEWER"]),
        token_entry("tasks", TASKS_ONLY, ["TASK_VIEWER"]),
    ]
    overrides = {"api": {"tcp": f"127.0.0.1:{port}", "tokens": tokens,
                         "max_body_bytes": LIMIT}}
    try:
        runner = pool.make(overrides=overrides, wait_running=True)
        yield Target(runner, port)
        assert runner.running, "the daemon died of hostile input"
        runner.wait_all_running()
    finally:
        pool.cleanup()


def expect(response: Any, code: int | None, status: int | None = None) -> None:
    """An envelope answer with this error code (None: a success)."""
    got_status = response.status if hasattr(response, "status") else response[0]
    envelope = response.envelope if hasattr(response, "envelope") else response[1]
    problem = envelope_problem(got_status, envelope)
    assert problem is None, problem
    assert envelope is not None
    got = (envelope.get("error") or {}).get("code")
    assert got == code, f"expected code {code}, got HTTP {got_status}: {envelope}"
    if status is not None:
        assert got_status == status


# --- bodies ------------------------------------------------------------------------------------

def test_body_over_the_limit(target):
    response = target.client().post("/api/v1/processes/ob_logtailer/start",
                                    body=b"{" + b" " * LIMIT + b"}",
                                    headers={"Content-Type": "application/json"})
    expect(response, 1003, 413)


def test_chunked_body_over_the_limit(target):
    chunk = b" " * 1024
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // 1024 + 2))
    request = (
        b"POST /api/v1/processes/ob_logtailer/start HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + FULL.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + body + b"0\r\n\r\n"
    )
    expect(target.raw(request), 1003, 413)


@pytest.mark.parametrize("body", [
    b'{"timeout": "\xff\xfe"}',
    b"\xc3\x28",
    b'{"timeout": 1',
    b"[1, 2",
    b"NaN",
    b'{"timeout": Infinity}',
    b'{"timeout": -1}',
    b'{"timeout": 1e999}',
    b'{"unknown": true}',
    b'"just a string"',
    b"\x00\x00\x00",
], ids=lambda b: b[:12].decode(errors="replace"))
def test_malformed_bodies(target, body):
    response = target.client().post("/api/v1/processes/ob_logtailer/start", body=body,
                                    headers={"Content-Type": "application/json"})
    expect(response, 1000, 400)


@pytest.mark.parametrize("opening,closing", [(b"[", b"]"), (b'{"a":', b"}")])
def test_deep_json(target, opening, closing):
    depth = (LIMIT - 8) // (len(opening) + len(closing))
    body = opening * depth + b"1" + closing * depth
    assert len(body) <= LIMIT
    response = target.client().post("/api/v1/processes/ob_logtailer/start", body=body,
                                    headers={"Content-Type": "application/json"})
    expect(response, 1000, 400)


def test_deep_json_at_the_default_limit(daemon_factory):
    """64 KiB of nesting (the default max_body_bytes) is far past the parser's recursion."""
    runner = daemon_factory(wait_running=True)
    depth = 65536 // 2 - 4
    body = b"[" * depth + b"]" * depth
    response = runner.post("/api/v1/processes/ob_logtailer/start", body=body,
                           headers={"Content-Type": "application/json"})
    expect(response, 1000, 400)
    assert runner.running


# --- paths and ids -------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/api/v1/processes/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/v1/processes/%2e%2e/%2e%2e/etc/passwd",
    "/api/v1/processes/../../../../etc/passwd",
    "/api/v1/processes/ob_logtailer%00.json",
    "/api/v1/processes/" + "a" * 4000,
    "/api/v1/processes/%ff%fe",
    "/api/v1/processes/%E2%80%AE",
    "/api/v1/processes/pids%2Fob_logtailer.json",
    "/api/v1/../../etc/passwd",
    "//etc/passwd",
    "/api/v1/processes/ocp_agentd/stop",
])
def test_path_traversal_in_names(target, path):
    response = target.client().get(path) if not path.endswith("/stop") else \
        target.client().post(path)
    problem = envelope_problem(response.status, response.envelope)
    assert problem is None, problem
    assert not response.successful
    assert response.code in (1000, 1001, 1002, 2001, 2002), response.text
    assert b"root:" not in response.body


@pytest.mark.parametrize("host", ["-1", "0", "abc", "1.5", "2e3", "99999999999999999999999",
                                  "9223372036854775808", "0x2", "%EF%BC%92", "%C2%B2",
                                  "%D9%A2", "2%00"])
def test_bad_host_ids(target, host):
    expect(target.client().get(f"/compute/hosts/{host}/agent"), 1000, 400)


def test_other_host_id(target):
    expect(target.client().get(f"/compute/hosts/{target.host_id + 1}/agent"), 2000, 404)


@pytest.mark.parametrize("task", ["-5", "0", "abc", "1e9", "9223372036854775808",
                                  "99999999999999999999999999999", "NaN",
                                  "1%3BDROP%20TABLE%20x", "%C2%B2", "%EF%BC%92"])
def test_bad_task_ids(target, task):
    response = target.client().get(f"/api/v2/tasks/instances/{task}")
    problem = envelope_problem(response.status, response.envelope)
    assert problem is None, problem
    assert response.code in (1000, 20000), response.text


@pytest.mark.parametrize("query", ["page=-1", "page=0", "size=0", "size=-3", "size=abc",
                                   "size=99999999999999999999", "page=1&size=1000000"])
def test_bad_pages(target, query):
    for path in (f"/compute/hosts/{target.host_id}/agent/processes", "/api/v2/tasks/instances"):
        response = target.client().get(f"{path}?{query}")
        problem = envelope_problem(response.status, response.envelope)
        assert problem is None, problem
        assert response.code in (None, 1000), response.text


@pytest.mark.parametrize("request_bytes", [
    b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"BREW /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/v1/status HTTP/9.9\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
])
def test_malformed_http(target, request_bytes):
    """Even what the HTTP parser rejects is answered with the envelope: a 4xx, 1000."""
    status, envelope = target.raw(request_bytes)
    assert 400 <= status < 500, (status, envelope)
    assert envelope_problem(status, envelope) is None, (status, envelope)
    assert target.client().get("/api/v1/status").successful


# --- slow clients -------------------------------------------------------------------------------

def test_slow_clients_do_not_block_others(target, figures):
    """Twenty clients send their headers one byte a second; others are served meanwhile."""
    stop = threading.Event()
    request = b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + \
        FULL.encode() + b"\r\n\r\n"
    sent = [0]

    def slow() -> None:
        with socket.create_connection(("127.0.0.1", target.port), timeout=30) as sock:
            for byte in request:
                if stop.wait(1.0):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return
                sent[0] += 1

    slowpokes = [threading.Thread(target=slow, daemon=True) for _ in range(20)]
    for thread in slowpokes:
        thread.start()
    latencies = []
    try:
        started = time.monotonic()
        while time.monotonic() - started < 6.0:
            for client in (target.client(), target.runner.client):
                before = time.monotonic()
                response = client.get("/api/v1/processes")
                latencies.append(time.monotonic() - before)
                assert response.successful, response.text
    finally:
        stop.set()
        for thread in slowpokes:
            thread.join(10)
    # Each sends a byte a second until the 3 s header deadline drops it.
    assert sent[0] >= 20 * 2, "the slow clients did not get going"
    latencies.sort()
    figures["slow clients"] = 20
    figures["requests served meanwhile"] = len(latencies)
    figures["their worst latency (ms)"] = round(latencies[-1] * 1000, 1)
    assert latencies[-1] < 2.0


# --- credentials ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer wrong", f"Bearer {FULL}x",
    f"Bearer {FULL[:-1]}", f"Token {FULL}", "Bearer " + "A" * 4000, "Bearer \u00e9\u00e8",
])
def test_missing_or_wrong_token(target, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/api/v1/status"), ("POST", "/api/v1/agent/stop-all"),
                         ("GET", "/metrics"), ("GET", "/api/v2/tasks/instances")):
        client = target.client(token=None)
        response = client.request(method, path, headers=headers)
        expect(response, 1004, 401)
    target.runner.wait_all_running()


def test_token_with_too_few_permissions(target):
    viewer, tasks = target.client(VIEWER), target.client(TASKS_ONLY)
    assert viewer.get("/api/v1/status").successful
    for path in ("/api/v1/agent/stop-all", "/api/v1/processes/ocp_exporter/stop",
                 f"/compute/hosts/{target.host_id}/agent/restart",
                 f"/compute/hosts/{target.host_id}/agent/stop"):
        expect(viewer.post(path), 1005, 403)
    expect(viewer.get("/api/v2/tasks/instances"), 1005, 403)
    expect(tasks.get("/api/v1/status"), 1005, 403)
    expect(tasks.post("/api/v2/tasks/instances/1/retry"), 1005, 403)
    target.runner.wait_all_running()
    assert all(r["restarts"] == 0 for r in target.runner.processes())


# --- the unix socket and a stranger ---------------------------------------------------------------

_PEER = r"""
import json, os, socket, sys
uid, gid, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(path)
except OSError as exc:
    print(json.dumps({"refused": exc.errno}))
    sys.exit(0)
sock.sendall(b"POST /api/v1/agent/stop-all HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
data = b""
while chunk := sock.recv(65536):
    data += chunk
print(json.dumps({"answer": data.decode(errors="replace")}))
"""


@pytest.fixture
def stranger() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.skip("creating a user and dropping privileges needs root")
    name = f"agf{secrets.token_hex(4)}"
    done = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                           "--user-group", name], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"useradd failed: {done.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def _as_user(user: pwd.struct_passwd, socket_path: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _PEER, str(user.pw_uid), str(user.pw_gid), socket_path],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def reachable_dir() -> Iterator[str]:
    """A folder everyone may enter, so only the socket file's own mode decides."""
    path = tempfile.mkdtemp(prefix="agentd-faults-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_stranger_refused_by_the_socket_mode(daemon_factory, stranger, reachable_dir):
    runner = daemon_factory(overrides={"api": {"socket": f"{reachable_dir}/agentd.sock"}},
                            wait_running=True)
    mode = os.stat(runner.socket).st_mode & 0o777
    assert mode == 0o660, oct(mode)
    result = _as_user(stranger, str(runner.socket))
    assert result == {"refused": 13}, result  # EACCES
    runner.wait_all_running()


def test_stranger_on_a_loose_socket_needs_a_token(daemon_factory, stranger, reachable_dir):
    """Even with the file mode opened up (a misconfiguration), a peer that is not root, the
    daemon's user or in the socket's group holds no permission without a token."""
    runner = daemon_factory(
        overrides={"api": {"socket": f"{reachable_dir}/agentd.sock", "socket_mode": "0666"}},
        wait_running=True,
    )
    result = _as_user(stranger, str(runner.socket))
    answer = result.get("answer", "")
    head, _, body = answer.partition("\r\n\r\n")
    assert " 401 " in head.split("\r\n")[0], answer[:500]
    assert json.loads(body)["error"]["code"] == 1004
    runner.wait_all_running()
    assert all(r["state"] == "RUNNING" for r in runner.processes())


def test_idle_tcp_connections_cannot_starve_the_daemon(tmp_path, figures):
    """Clients that connect over TCP and never send a byte must not use up the daemon's
    file descriptors: supervision and the unix socket go on, TCP serves again after."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) is missing")
    limited = tmp_path / "python-limited"
    limited.write_text(f'#!/bin/sh\nexec {prlimit} --nofile=1024:1024 -- {sys.executable} "$@"\n')
    limited.chmod(0o755)
    pool = DaemonPool(tmp_path / "d")
    port = free_port()
    idle: list[socket.socket] = []
    try:
        runner = pool.make(
            overrides={"api": {"tcp": f"127.0.0.1:{port}",
                               "tokens": [token_entry("full", FULL, ["HOST_VIEWER"])]}},
            start=False,
        )
        runner.python = str(limited)
        runner.start()
        runner.wait_all_running()
        assert runner.pid is not None
        for _ in range(1500):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        fds = wait_for(
            lambda: (n := len(os.listdir(f"/proc/{runner.pid}/fd"))) < 600 and n, 20,
            "the daemon to shed the connections past its limit",
        )
        before, after = kill_and_wait_restart(
            runner, "ocp_exporter", "the killed program restarted while TCP is flooded")
        assert runner.status()
        figures["idle TCP connections opened"] = len(idle)
        figures["daemon descriptors meanwhile (limit 1024)"] = fds
        figures["restart meanwhile (pid)"] = f"{before['pid']} -> {after['pid']}"
        for sock in idle:
            sock.close()
        idle.clear()
        client = ApiClient(host="127.0.0.1", port=port, token=FULL, timeout=5)
        wait_for(lambda: client.get("/api/v1/status").successful, 20, "TCP serving again")
    finally:
        for sock in idle:
            sock.close()
        pool.cleanup()


@pytest.mark.parametrize("trace", ["A" * 6000, "../../etc/passwd", "<script>", "%0d%0aSet: x",
                                   "é" * 10, "", " ", "0" * 16])
def test_hostile_trace_ids(target, trace):
    response = target.client().get("/api/v1/status",
                                   headers={"X-OCP-Trace-ID": trace.encode().decode("latin-1")})
    expect(response, None, 200)
    echoed = response.headers.get("X-OCP-Trace-ID", "")
    assert echoed == response.envelope["traceId"]
    assert len(echoed) <= 128 and "<" not in echoed and "\r" not in echoed and "/" not in echoed


def test_no_token_in_the_logs(target):
    """Tokens sent, right or wrong, never reach the daemon's log."""
    wrong = secrets.token_hex(16)
    target.client(token=wrong).get("/api/v1/status")
    target.client(token=FULL).get("/api/v1/status")
    target.client(token=VIEWER).post("/api/v1/agent/stop-all")
    assert target.runner.settings is not None
    logs = target.runner.log() + (target.runner.settings.agent.log_dir
                                  / "ocp_agentd.log").read_text(errors="replace")
    for token in (wrong, FULL, VIEWER, TASKS_ONLY):
        assert token not in logs


def test_slow_clients_filling_every_tcp_slot_are_dropped(daemon_factory, figures):
    """More slow clients than TCP connections allowed (256): a caller that sends its
    request at once makes room by closing the oldest slow one, and the slow ones are
    dropped at the 3 s header deadline."""
    port = free_port()
    runner = daemon_factory(
        overrides={"api": {"tcp": f"127.0.0.1:{port}",
                           "tokens": [token_entry("full", FULL, ["HOST_VIEWER"])]}},
        wait_running=True,
    )
    stop = threading.Event()
    dropped: list[float] = []
    started = time.monotonic()

    def slow(sock: socket.socket) -> None:
        with sock:
            for byte in b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n":
                if stop.wait(1.0):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    dropped.append(time.monotonic() - started)
                    return

    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(300)]
    threads = [threading.Thread(target=slow, args=(s,), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    try:
        client = ApiClient(host="127.0.0.1", port=port, token=FULL, timeout=3)
        served = wait_for(lambda: client.get("/api/v1/status").successful
                          and time.monotonic() - started, 30, "TCP serving despite slow clients")
        assert runner.client.get("/api/v1/status").successful  # the socket all along
        wait_for(lambda: len(dropped) >= 250, 30, "the slow clients dropped")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    figures["slow TCP clients"] = len(sockets)
    figures["TCP served again after (s)"] = round(served, 1)
    figures["slow clients dropped"] = len(dropped)
    assert served < 20


def test_idle_keep_alive_connection_is_closed(target, figures):
    """A client that makes one request and then sits on the connection gives its TCP slot
    back within the keep-alive limit (15 s), not aiohttp's default 75 s."""
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + FULL.encode() + b"\r\n\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        answered = time.monotonic()
        sock.settimeout(1.0)

        def closed() -> bool:
            try:
                return sock.recv(65536) == b""
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True

        wait_for(closed, 30, "the daemon to close the idle keep-alive connection")
    figures["idle keep-alive connection closed after (s)"] = round(time.monotonic() - answered, 1)
