"""The test harness itself: waiting, ports, the socket client, daemons and their cleanup."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
import uuid

import psutil
import pytest
from harness import (
    STATE_ENV,
    ApiCallFailed,
    ApiClient,
    DaemonRunner,
    WaitTimeout,
    demo_command,
    free_port,
    free_port_block,
    kill_marked,
    marked_processes,
    wait_for,
)

# --- wait_for and ports -------------------------------------------------------------------


def test_wait_for_returns_the_first_truthy_value():
    calls = []

    def third_time() -> str | None:
        calls.append(1)
        return "done" if len(calls) == 3 else None

    assert wait_for(third_time, 5, "three calls", interval=0.001) == "done"
    assert len(calls) == 3


def test_wait_for_times_out_naming_the_condition_and_last_value():
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"the moon.*last: 0"):
        wait_for(lambda: 0, 0.2, "the moon")
    assert 0.2 <= time.monotonic() - started < 2


def test_wait_for_treats_connection_errors_as_not_yet_but_not_bugs():
    attempts = []

    def refused_then_ok() -> bool:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionRefusedError("not yet")
        return True

    assert wait_for(refused_then_ok, 5, "connect", interval=0.001) is True
    with pytest.raises(KeyError):
        wait_for(lambda: {}["bug"], 5, "a bug")


def test_free_ports_are_bindable():
    port = free_port()
    first = free_port_block(3)
    for candidate in (port, first, first + 1, first + 2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", candidate))


# --- the unix-socket client ---------------------------------------------------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path == "/text":
            payload = b"not json"
        else:
            payload = json.dumps(
                {
                    "successful": self.path != "/fail",
                    "status": 200,
                    "data": {
                        "method": self.command,
                        "path": self.path,
                        "body": body.decode(),
                        "auth": self.headers.get("Authorization"),
                        "trace": self.headers.get("X-OCP-Trace-ID"),
                    },
                }
            ).encode()
        self.send_response(400 if self.path == "/fail" else 200)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Echo", "yes")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler wants an address tuple
        request, _ = super().get_request()
        return request, ("local", 0)


@pytest.fixture
def echo_socket(tmp_path):
    path = tmp_path / "echo.sock"
    server = _UnixHTTPServer(str(path), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_client_speaks_http_over_the_unix_socket(echo_socket):
    client = ApiClient(socket_path=echo_socket, token="s3cret")
    answer = client.post("/api/v1/x?y=1", json={"timeout": 3}, headers={"X-OCP-Trace-ID": "ab"})
    assert answer.status == 200 and answer.successful and answer.headers["x-echo"] == "yes"
    assert answer.data == {
        "method": "POST",
        "path": "/api/v1/x?y=1",
        "body": '{"timeout": 3}',
        "auth": "Bearer s3cret",
        "trace": "ab",
    }
    assert answer.check() == answer.data
    assert answer.code is None


def test_client_reports_failures_and_non_json(echo_socket):
    client = ApiClient(socket_path=echo_socket)
    failed = client.get("/fail")
    assert (failed.status, failed.successful) == (400, False)
    with pytest.raises(ApiCallFailed, match="HTTP 400"):
        failed.check()
    text = client.get("/text")
    assert (text.status, text.envelope, text.text) == (200, None, "not json")


def test_client_on_a_missing_socket_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        ApiClient(socket_path=tmp_path / "nobody.sock").get("/")


def gone(proc: psutil.Process) -> bool:
    """Dead, or a zombie waiting for a parent that may not reap it here."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- killing by environment marker --------------------------------------------------------


def _announced_pids(output: str) -> dict[str, int] | None:
    """{role: pid} of misbehave setsid-grandchild once parent, child and grandchild spoke."""
    pids = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[:2] == ["misbehave", "setsid-grandchild"]:
            pids[words[2]] = int(words[3].removeprefix("pid="))
    return pids if set(pids) == {"parent", "child", "grandchild"} else None


def test_kill_marked_kills_a_whole_tree_even_after_setsid(tmp_path):
    marker = uuid.uuid4().hex
    out = tmp_path / "out"
    with out.open("wb") as handle:
        proc = subprocess.Popen(
            demo_command("misbehave", "setsid-grandchild", "--ignore-term"),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, STATE_ENV: marker},
            start_new_session=True,
        )
    try:
        # Each process announces itself ("misbehave setsid-grandchild <role> pid=N ..."); the
        # parent may announce before the grandchild exists, so wait for all three roles.
        announced = wait_for(lambda: _announced_pids(out.read_text()), 10, "all three announced")
        tree = marked_processes([(STATE_ENV, marker)])
        assert sorted(p.pid for p in tree) == sorted(announced.values())
        assert sorted(kill_marked(STATE_ENV, marker)) == sorted(p.pid for p in tree)
        proc.wait(5)
        assert not marked_processes([(STATE_ENV, marker)])
        assert all(gone(p) for p in tree)
    finally:
        kill_marked(STATE_ENV, marker)


# --- a real daemon ------------------------------------------------------------------------


def test_demo_daemon_runs_the_demo(demo_daemon: DaemonRunner):
    status = demo_daemon.status()
    assert status["pid"] == demo_daemon.pid
    assert status["host_id"] == 2
    records = {r["name"]: r for r in demo_daemon.processes()}
    assert list(records) == ["pos_proxy", "ocp_exporter", "ob_logtailer"]
    assert all(r["state"] == "RUNNING" for r in records.values())
    assert records["pos_proxy"]["ports"] == [demo_daemon.base_port]
    # the programs carry the state-dir marker, so cleanup will find them
    leftovers = {p.pid for p in demo_daemon.leftovers()}
    assert {demo_daemon.pid, *(r["pid"] for r in records.values())} <= leftovers
    health = wait_for(
        lambda: "GET /health 200" in demo_daemon.program_log("pos_proxy"), 10, "health logged"
    )
    assert health


def test_kill9_leaves_programs_and_start_adopts_them(daemon_factory):
    runner = daemon_factory(wait_running=True)
    pids = {r["name"]: r["pid"] for r in runner.processes()}
    runner.kill9()
    assert not runner.running and runner.returncode == -signal.SIGKILL
    assert all(psutil.pid_exists(pid) for pid in pids.values())
    with pytest.raises(OSError):
        runner.client.get("/api/v1/status", timeout=2)
    runner.start()
    runner.wait_all_running()
    assert {r["name"]: r["pid"] for r in runner.processes()} == pids
    assert "--- harness: starting daemon" in runner.log()


def test_stop_ends_the_daemon_and_its_programs(daemon_factory):
    runner = daemon_factory(wait_running=True)
    pids = [r["pid"] for r in runner.processes()]
    assert runner.stop() == 0
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert runner.leftovers() == []
    runner.restart()
    assert all(r["pid"] not in pids for r in runner.wait_all_running())


def test_cleanup_kills_daemon_programs_and_escaped_grandchildren(daemon_factory):
    extra = {
        "escaper": {"command": demo_command("misbehave", "setsid-grandchild", "--ignore-term")}
    }
    runner = daemon_factory(extra, wait_running=True)
    wait_for(lambda: len(runner.leftovers()) >= 1 + 4 + 2, 10, "daemon, 4 programs, 2 children")
    runner.kill9()
    survivors = runner.leftovers()
    assert len(survivors) >= 6
    runner.cleanup()
    assert runner.leftovers() == []
    assert all(gone(p) for p in survivors)


def test_a_daemon_that_dies_at_start_is_reported_with_its_log(daemon_factory, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runner = daemon_factory(start=False, overrides={"agent": {"log_dir": str(blocker / "log")}})
    with pytest.raises(RuntimeError, match=r"exited with status \d+ before answering"):
        runner.start(timeout=20)


def test_overrides_and_tcp_client(daemon_factory):
    port = free_port()
    runner = daemon_factory(
        overrides={"api": {"tcp": f"127.0.0.1:{port}",
                           "tokens": [{"name": "t", "sha256": "0" * 64}]},
                   "programs": {"ob_logtailer": None}},
        host_id=9,
    )
    assert runner.status()["host_id"] == 9
    assert [r["name"] for r in runner.processes()] == ["pos_proxy", "ocp_exporter"]
    answer = ApiClient(host="127.0.0.1", port=port).get("/api/v1/status")
    assert answer.status == 401 and answer.code == 1004
