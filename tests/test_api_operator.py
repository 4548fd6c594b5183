"""SPEC section 12's routes over the real socket: logs, events (SSE), reload, signal; and
ocp-agentctl's commands on them."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from harness import DaemonRunner, demo_command, wait_for

from ocp_agentd.demo.config import to_toml

CTL = [sys.executable, "-m", "ocp_agentd.cli"]


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[str, dict | None]]:
    """(event name, data) per block; ("comment", None) per comment line."""
    name, data = "message", None
    while line := response.readline():
        text = line.decode().rstrip("\n")
        if text.startswith(":"):
            yield "comment", None
        elif text.startswith("event: "):
            name = text[7:]
        elif text.startswith("data: "):
            data = json.loads(text[6:])
        elif not text and data is not None:
            yield name, data
            name, data = "message", None


def open_events(runner: DaemonRunner, query: str = "",
                timeout: float = 30.0) -> tuple[_Unix, http.client.HTTPResponse]:
    conn = _Unix(runner.socket, timeout)
    conn.request("GET", f"/api/v1/events{query}")
    return conn, conn.getresponse()


def state_events(stream: Iterator, program: str, until: str) -> list[tuple[str, str]]:
    moves = []
    for name, event in stream:
        if name == "state" and event["program"] == program:
            moves.append((event["from"], event["to"]))
            if event["to"] == until:
                return moves
    raise AssertionError(f"the stream ended: {moves}")


def test_events_stream_state_changes_at_once(demo_daemon: DaemonRunner) -> None:
    conn, response = open_events(demo_daemon)
    try:
        # Headers before any event: the subscription is live once they are here.
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        stream = sse_events(response)
        assert next(stream) == ("comment", None)
        demo_daemon.post("/api/v1/processes/ocp_exporter/restart").check()
        assert state_events(stream, "ocp_exporter", "RUNNING") == [
            ("RUNNING", "STOPPING"), ("STOPPING", "STOPPED"), ("STOPPED", "STARTING"),
            ("STARTING", "RUNNING")]
        pid = demo_daemon.process("ob_logtailer")["pid"]
        os.kill(pid, signal.SIGKILL)
        moves = state_events(stream, "ob_logtailer", "RUNNING")
        assert moves == [("RUNNING", "BACKOFF"), ("BACKOFF", "STARTING"),
                         ("STARTING", "RUNNING")]
    finally:
        conn.close()
    # Replay: the four moves of the restart are among the last events kept.
    conn, response = open_events(demo_daemon, "?last=7")
    try:
        replayed = state_events(sse_events(response), "ocp_exporter", "RUNNING")
        assert replayed[-1] == ("STARTING", "RUNNING")
    finally:
        conn.close()


def test_events_keep_alive_comment(demo_daemon: DaemonRunner) -> None:
    conn, response = open_events(demo_daemon, timeout=40)
    try:
        started = time.monotonic()
        response.readline()  # the opening comment
        response.readline()
        line = response.readline()
        assert line == b": keep-alive\n"
        assert 10 < time.monotonic() - started < 35
    finally:
        conn.close()


def test_task_events_and_agent_restart_wait(demo_daemon: DaemonRunner) -> None:
    conn, response = open_events(demo_daemon)
    try:
        stream = sse_events(response)
        next(stream)
        result = demo_daemon.ctl("agent", "restart", "--wait", timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].endswith("SUCCESSFUL")
        kinds: dict[str, list[tuple[str, str]]] = {"task": [], "subtask": []}
        for name, event in stream:
            if name in kinds:
                kinds[name].append((event["from"], event["to"]))
                if name == "task" and event["to"] == "SUCCESSFUL":
                    break
        assert kinds["task"] == [("", "RUNNING"), ("RUNNING", "SUCCESSFUL")]
        assert ("RUNNING", "SUCCESSFUL") in kinds["subtask"]
    finally:
        conn.close()


def _exit_status(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """proc's exit status within ``timeout`` seconds; otherwise it is killed and the
    failure says where it was (its state, signal masks, kernel wait channel and stack)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        where = {}
        for name in ("status", "wchan", "stack"):
            try:
                where[name] = Path(f"/proc/{proc.pid}/{name}").read_text()
            except OSError as exc:
                where[name] = repr(exc)
        proc.kill()
        proc.wait()
        status = "".join(line for line in where["status"].splitlines(keepends=True)
                         if line.startswith(("State", "Sig", "Shd")))
        raise AssertionError(f"pid {proc.pid} still running after {timeout} s:\n{status}"
                             f"wchan {where['wchan']}\n{where['stack']}") from None


def test_logs_tail_follow_and_rotation(demo_daemon: DaemonRunner) -> None:
    log_path = Path(demo_daemon.process("pos_proxy")["log_files"][0])
    wait_for(lambda: log_path.read_text().count("\n") >= 2, message="pos_proxy output")
    answer = demo_daemon.get("/api/v1/processes/pos_proxy/logs?tail=2")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    assert answer.headers["Transfer-Encoding"] == "chunked"
    lines = log_path.read_text().splitlines(keepends=True)
    assert answer.body.decode() == "".join(lines[-2:])
    result = demo_daemon.ctl("logs", "pos_proxy", "-n", "1")
    assert result.returncode == 0 and result.stdout == lines[-1]
    bad = demo_daemon.get("/api/v1/processes/pos_proxy/logs?stream=stdin")
    assert bad.code == 1000

    follower = subprocess.Popen(
        [*CTL, "--socket", str(demo_daemon.socket), "logs", "pos_proxy", "-f", "-n", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert follower.stdout is not None
        os.set_blocking(follower.stdout.fileno(), False)
        seen = bytearray()

        def printed(text: bytes) -> bool:
            chunk = follower.stdout.read()  # type: ignore[union-attr]
            if chunk:
                seen.extend(chunk)
            return text in seen

        def mark_printed() -> bool:
            # Until the follower's request is in, what is appended is before its start.
            with log_path.open("a") as out:
                out.write("mark\n")
            return printed(b"mark\n")

        wait_for(mark_printed, timeout=30, interval=0.3,
                 message="the follower to print new output")
        log_path.rename(log_path.with_name(log_path.name + ".1"))
        log_path.write_text("after rename\n")
        wait_for(lambda: printed(b"after rename\n"), timeout=30,
                 message="output after rotation by rename")
    finally:
        follower.send_signal(signal.SIGINT)
        assert _exit_status(follower, 30) == 0
    # The client went away: the daemon lets the file go.
    daemon = psutil.Process(demo_daemon.pid)
    wait_for(lambda: all(f.path != str(log_path) for f in daemon.open_files()),
             timeout=30, message="the daemon to close the followed log")


def test_signal_reaches_the_program(demo_daemon: DaemonRunner) -> None:
    before = demo_daemon.process("ocp_exporter")
    result = demo_daemon.ctl("signal", "hup", "ocp_exporter")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"sent SIGHUP to ocp_exporter (pid {before['pid']})"
    wait_for(lambda: "SIGHUP received" in demo_daemon.program_log("ocp_exporter"),
             message="the exporter to log SIGHUP")
    assert demo_daemon.process("ocp_exporter")["pid"] == before["pid"]
    refused = demo_daemon.post("/api/v1/processes/ocp_exporter/signal", {"signal": "NOPE"})
    assert refused.code == 1000
    demo_daemon.post("/api/v1/processes/ocp_exporter/stop").check()
    stopped = demo_daemon.post("/api/v1/processes/ocp_exporter/signal", {"signal": "HUP"})
    assert stopped.status == 409 and stopped.code == 2004
    assert "not running" in stopped.error["message"]


def test_reload_reports_the_diff_or_names_each_bad_key(demo_daemon: DaemonRunner) -> None:
    config = demo_daemon.config
    original = config.read_text()
    pids = {p["name"]: p["pid"] for p in demo_daemon.processes()}
    config.write_text(original + "\n" + to_toml({"programs": {"extra": {
        "command": demo_command("misbehave", "tree", "0")}}}))
    result = demo_daemon.ctl("reload", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"added": ["extra"], "removed": [], "changed": [],
                                         "unchanged": ["pos_proxy", "ocp_exporter",
                                                       "ob_logtailer"]}
    demo_daemon.wait_state("extra", "RUNNING")

    config.write_text(original.replace("[agent]", "[agent]\nbogus = 1", 1)
                      .replace("start_seconds = ", "start_seconds = -", 1))
    refused = demo_daemon.post("/api/v1/agent/reload")
    assert refused.status == 400 and refused.code == 1006
    targets = {sub["target"] for sub in refused.error["subErrors"]}
    assert "agent.bogus" in targets
    assert any(t.startswith("programs.") and t.endswith("start_seconds") for t in targets)
    result = demo_daemon.ctl("reload")
    assert result.returncode == 1 and "agent.bogus" in result.stderr
    # Nothing changed: the extra program still runs, the others keep their pids.
    assert demo_daemon.process("extra")["state"] == "RUNNING"
    assert all(demo_daemon.process(n)["pid"] == pid for n, pid in pids.items())


def test_new_routes_are_documented(demo_daemon: DaemonRunner) -> None:
    paths = demo_daemon.get("/api/v1/openapi.json").body
    document = json.loads(paths)
    for path, method in (("/api/v1/processes/{name}/logs", "get"),
                         ("/api/v1/events", "get"),
                         ("/api/v1/agent/reload", "post"),
                         ("/api/v1/processes/{name}/signal", "post")):
        assert method in document["paths"][path], path


def test_task_show_follow_and_logs_in_json(demo_daemon: DaemonRunner) -> None:
    task = demo_daemon.post("/compute/hosts/2/agent/restart").check()
    result = demo_daemon.ctl("task", "show", str(task["id"]), "--follow", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-7].startswith(f"task {task['id']} 'Restart OCP agent': SUCCESSFUL")
    assert all(line.split()[-4] == "SUCCESSFUL" for line in lines[-5:])

    shown = demo_daemon.ctl("task", "show", str(task["id"]), "--log", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [s["status"] for s in data["subtasks"]] == ["SUCCESSFUL"] * 5
    for sub in data["subtasks"]:
        assert "attempt 1: run of" in sub["log"] and sub["log"].endswith("s")
    plain = json.loads(demo_daemon.ctl("task", "show", str(task["id"]), "--json").stdout)
    assert all("log" not in s for s in plain["subtasks"])


def test_followers_end_cleanly_when_the_daemon_stops(demo_daemon: DaemonRunner) -> None:
    events_conn, events = open_events(demo_daemon)
    logs_conn = _Unix(demo_daemon.socket)
    logs_conn.request("GET", "/api/v1/processes/ob_logtailer/logs?tail=0&follow=1")
    logs = logs_conn.getresponse()
    followers = [subprocess.Popen([*CTL, "--socket", str(demo_daemon.socket), *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for args in (["events"], ["logs", "ob_logtailer", "-f"])]
    try:
        assert events.readline() == b": ocp-agentd events\n"
        assert demo_daemon.stop() == 0
        for follower in followers:
            # Whether it was connected yet or not: exit 3, one line saying why.
            _, stderr = follower.communicate(timeout=30)
            assert follower.returncode == 3, stderr
            assert len(stderr.splitlines()) == 1 and "ocp-agentd" in stderr
        # Both answers end with their last chunk (http.client raises IncompleteRead on a
        # connection cut instead): the daemon closed them, it did not drop them.
        assert events.read().strip() == b""
        assert logs.read() == b""
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        events_conn.close()
        logs_conn.close()


def test_logs_of_a_program_that_writes_to_the_journal_point_there(daemon_factory) -> None:
    runner = daemon_factory(extra_programs={"journaled": {
        "command": demo_command("misbehave", "tree", "0"), "log_target": "journal"}})
    answer = runner.get("/api/v1/processes/journaled/logs")
    assert answer.status == 400 and answer.code == 1000
    assert "journalctl -t journaled" in answer.error["message"]
