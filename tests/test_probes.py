"""The probe kinds and the liveness runner, in-process, on real sockets and processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from harness import free_port, marked_processes

from ocp_agentd.config import LivenessSpec
from ocp_agentd.supervision.liveness import Liveness
from ocp_agentd.supervision.probes import http_get, listening_ports, run_command, tcp_connect
from ocp_agentd.supervision.types import ProbeResult

SH = "/bin/sh"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class HttpStub:
    """A real HTTP server on 127.0.0.1 whose /health answers `status`, or never answers
    while `hang` is set."""

    def __init__(self) -> None:
        self.status = 200
        self.hang = False
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HttpStub:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            if self.hang:
                await asyncio.sleep(3600)
            writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()


# ---- http_get and tcp_connect ----------------------------------------------------------------


def test_http_probe_answers_ok_failed_and_timed_out() -> None:
    async def body() -> list[ProbeResult]:
        async with HttpStub() as stub, aiohttp.ClientSession() as session:
            results = [await http_get(session, stub.url, 2.0)]
            stub.status = 500
            results.append(await http_get(session, stub.url, 2.0))
            stub.hang = True
            results.append(await http_get(session, stub.url, 0.3))
            return results

    ok, failed, hung = run(body())
    assert ok.ok and ok.detail.endswith("answered 200")
    assert not failed.ok and failed.detail.endswith("answered 500")
    assert not hung.ok and "no answer within 0.3s" in hung.detail
    assert 0.3 <= hung.seconds < 2.0


def test_tcp_probe_connects_or_says_why() -> None:
    async def body() -> tuple[ProbeResult, ProbeResult]:
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            up = await tcp_connect("127.0.0.1", port, 1.0)
        down = await tcp_connect("127.0.0.1", free_port(), 1.0)
        return up, down

    up, down = run(body())
    assert up.ok and "accepted" in up.detail
    assert not down.ok and "refused" in down.detail.lower()


# ---- run_command ---------------------------------------------------------------------------


def test_command_probe_exit_status_and_output() -> None:
    ok = run(run_command([SH, "-c", "echo fine"], 5.0))
    bad = run(run_command([SH, "-c", "echo first; echo 'port 1 is   dead' >&2; exit 3"], 5.0))
    missing = run(run_command(["/nonexistent/check"], 5.0))
    assert ok.ok and ok.detail == "sh exited 0: fine"
    assert not bad.ok and bad.detail == "sh exited 3: port 1 is dead"
    assert not missing.ok and missing.detail.startswith("cannot run /nonexistent/check")


def test_hanging_command_probe_is_killed_with_its_group_at_timeout() -> None:
    mark = f"probe-{uuid.uuid4().hex}"
    env = {**os.environ, "PROBE_TEST_MARK": mark}
    # The probe and a child it forked both hang; the child is in the probe's group.
    argv = [SH, "-c", "sleep 300 & sleep 300"]

    async def body() -> tuple[ProbeResult, list[psutil.Process]]:
        task = asyncio.ensure_future(run_command(argv, 0.5, env=env))
        await until(lambda: len(marked_processes([("PROBE_TEST_MARK", mark)])) >= 3, 5,
                    "the probe and its children")
        result = await task
        # SIGKILL is sent to the group at the timeout; the children take a moment to die
        # (longer on a loaded machine), so wait on that with a deadline.
        await until(lambda: not marked_processes([("PROBE_TEST_MARK", mark)]), 10,
                    "the probe's group to die")
        return result, marked_processes([("PROBE_TEST_MARK", mark)])

    try:
        result, left = run(body())
        assert not result.ok and result.detail == "sh did not finish within 0.5s (killed)"
        assert 0.5 <= result.seconds < 3.0
        assert left == [], f"left running: {left}"
    finally:
        for proc in marked_processes([("PROBE_TEST_MARK", mark)]):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_cancelled_command_probe_kills_its_group() -> None:
    mark = f"probe-{uuid.uuid4().hex}"
    env = {**os.environ, "PROBE_TEST_MARK": mark}

    async def body() -> list[psutil.Process]:
        task = asyncio.ensure_future(run_command([SH, "-c", "sleep 300 & sleep 300"], 60,
                                                 env=env))
        await until(lambda: len(marked_processes([("PROBE_TEST_MARK", mark)])) >= 3, 5,
                    "the probe and its children")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # SIGKILL reaches the group at the cancel; the children take a moment to die.
        await until(lambda: not marked_processes([("PROBE_TEST_MARK", mark)]), 10,
                    "the probe's group to die")
        return marked_processes([("PROBE_TEST_MARK", mark)])

    try:
        assert run(body()) == []
    finally:
        for proc in marked_processes([("PROBE_TEST_MARK", mark)]):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_command_probe_cancelled_while_spawning_leaves_nothing() -> None:
    """Cancelled at any point of its start (after 0 to 20 loop iterations), a probe leaves
    no process behind: asyncio on its own would kill the leader only."""
    mark = f"probe-{uuid.uuid4().hex}"
    env = {**os.environ, "PROBE_TEST_MARK": mark}

    async def body() -> None:
        for turns in range(21):
            task = asyncio.ensure_future(run_command([SH, "-c", "sleep 300 & sleep 300"], 60,
                                                     env=env))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await until(lambda: not marked_processes([("PROBE_TEST_MARK", mark)]), 5,
                    "every probe process gone")

    try:
        run(body())
    finally:
        for proc in marked_processes([("PROBE_TEST_MARK", mark)]):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_command_probe_waits_for_held_output_without_spinning() -> None:
    """Exited, but a child it left holds the pipe: the probe waits on the loop, idle, until
    the pipe closes or its deadline passes."""
    argv = [SH, "-c", "sleep 1 & echo started; exit 0"]  # the sleep ends by itself
    before = time.process_time()
    result = run(run_command(argv, 0.8))
    used = time.process_time() - before
    assert result.ok and result.detail == "sh exited 0: started"
    assert result.seconds >= 0.7  # waited for the output until about the deadline
    assert used < 0.2, f"{used:.2f} s of CPU in a 0.8 s wait"  # idle: about 2 ms


def test_command_probe_waits_without_a_thread() -> None:
    """Its exit is seen through a pidfd on the loop (asyncio's child watcher on Python 3.11
    would have started a waitpid thread per probe)."""

    async def body() -> tuple[int, int, ProbeResult]:
        before = threading.active_count()
        task = asyncio.ensure_future(run_command([SH, "-c", "sleep 0.5"], 5))
        await until(lambda: bool(psutil.Process().children()), 5, "the probe's child")
        during = threading.active_count()
        return before, during, await task

    before, during, result = run(body())
    assert result.ok, result.detail
    assert during == before


def test_command_probe_runs_as_the_user_in_the_cwd_with_the_env() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    account = "nobody"
    entry = pwd.getpwnam(account)
    folder = Path(tempfile.mkdtemp(prefix="probe-cwd-"))
    try:
        folder.chmod(0o755)
        user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        argv = [SH, "-c", 'echo "$(id -un) $(pwd) $PROBE_VALUE"']
        result = run(run_command(argv, 5.0, cwd=folder, env={"PROBE_VALUE": "v1"}, user=user))
        assert result.ok, result.detail
        assert result.detail == f"sh exited 0: {account} {folder} v1"
    finally:
        shutil.rmtree(folder)


# ---- the liveness runner ---------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.results: list[ProbeResult] = []
        self.failed: list[tuple[str, bool, float]] = []

    def on_result(self, result: ProbeResult) -> None:
        self.results.append(result)

    def on_failed(self, detail: str, healthy: bool) -> None:
        self.failed.append((detail, healthy, time.monotonic()))


def test_runner_reports_the_threshold_once_within_its_deadline() -> None:
    spec = LivenessSpec(tcp_connect=1, period=0.2, timeout=0.5, failure_threshold=3,
                        initial_delay=0.1)

    async def body() -> tuple[Recorder, Liveness]:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        seen = Recorder()
        live = Liveness("p", seen.on_result, seen.on_failed)
        live.start(spec, lambda: tcp_connect("127.0.0.1", port, spec.timeout))
        await until(lambda: any(r.ok for r in seen.results), 5, "a good probe")
        server.close()
        # Good probes may have counted before the close; the next three fail.
        budget = spec.period * spec.failure_threshold + spec.timeout + 2.0
        await until(lambda: bool(seen.failed), budget, "the threshold")
        count = len(seen.results)
        await asyncio.sleep(spec.period * 3)  # no probing after the threshold
        assert len(seen.results) == count
        return seen, live

    seen, live = run(body())
    assert len(seen.failed) == 1
    detail, healthy, _ = seen.failed[0]
    assert healthy and "refused" in detail.lower()
    assert [r.ok for r in seen.results[-3:]] == [False, False, False]
    assert live.consecutive_failures == 3 and live.failures_total == 3
    assert not live.active
    assert live.as_dict()["last_probe"]["ok"] is False


def test_runner_never_healthy_and_first_probe_after_initial_delay() -> None:
    spec = LivenessSpec(tcp_connect=free_port(), period=0.1, timeout=0.5, failure_threshold=2,
                        initial_delay=0.4)

    async def body() -> tuple[Recorder, float]:
        seen = Recorder()
        live = Liveness("p", seen.on_result, seen.on_failed)
        began = time.monotonic()
        live.start(spec, lambda: tcp_connect(*spec.tcp_address, spec.timeout))
        await until(lambda: bool(seen.failed), 5, "the threshold")
        return seen, began

    seen, began = run(body())
    assert seen.results[0].at >= 0  # ran
    _, healthy, when = seen.failed[0]
    assert not healthy
    assert when - began >= spec.initial_delay + spec.period


def test_runner_stop_during_a_probe_discards_it() -> None:
    mark = f"probe-{uuid.uuid4().hex}"
    env = {**os.environ, "PROBE_TEST_MARK": mark}
    spec = LivenessSpec(exec=[SH, "-c", "sleep 300"], period=0.1, timeout=30,
                        failure_threshold=1)

    async def body() -> tuple[Recorder, list[psutil.Process]]:
        seen = Recorder()
        live = Liveness("p", seen.on_result, seen.on_failed)
        assert spec.exec is not None
        argv = spec.exec
        live.start(spec, lambda: run_command(argv, spec.timeout, env=env))
        await until(lambda: bool(marked_processes([("PROBE_TEST_MARK", mark)])), 5,
                    "the probe running")
        live.stop()
        await until(lambda: not marked_processes([("PROBE_TEST_MARK", mark)]), 5,
                    "the probe killed")
        await asyncio.sleep(0.3)  # a late result would arrive here
        return seen, marked_processes([("PROBE_TEST_MARK", mark)])

    try:
        seen, left = run(body())
        assert seen.results == [] and seen.failed == [] and left == []
    finally:
        for proc in marked_processes([("PROBE_TEST_MARK", mark)]):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def test_listening_ports_sees_ipv4_and_ipv6_listeners_not_connections() -> None:
    v4 = socket.create_server(("127.0.0.1", 0))
    try:
        v6: socket.socket | None = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:  # a host without IPv6
        v6 = None
    client = socket.create_connection(v4.getsockname()[:2])
    try:
        ports = listening_ports([os.getpid()])
        assert v4.getsockname()[1] in ports
        if v6 is not None:
            assert v6.getsockname()[1] in ports
        assert client.getsockname()[1] not in ports
        assert listening_ports([2**22 + 1]) == set()  # no such pid: nothing, no error
    finally:
        client.close()
        v4.close()
        if v6 is not None:
            v6.close()


SUBREAPER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json
    from ocp_agentd.supervision.probes import run_command
    from ocp_agentd.supervision.proctable import read_stat
    from ocp_agentd.supervision.subreaper import REAPER

    async def main():
        REAPER.install()
        # Each probe exits with its own code after leaving an orphan in a session of its
        # own (which comes to this subreaper): thirty at once, so SIGCHLDs cross.
        probes = [run_command(["/bin/sh", "-c", f"setsid /bin/sleep 0.2 & exit {n}"], 10)
                  for n in range(30)]
        results = await asyncio.gather(*probes)
        for _ in range(500):  # the orphans end and are reaped
            await asyncio.sleep(0.01)
            if REAPER.reaped >= 30:
                break
        print(json.dumps({"details": [r.detail for r in results], "reaped": REAPER.reaped}))

    asyncio.run(main())
    """
)


def test_command_probe_keeps_its_exit_status_under_the_subreaper() -> None:
    """The daemon reaps orphans on SIGCHLD; a probe's exit status must stay the probe's."""
    done = subprocess.run([sys.executable, "-c", SUBREAPER_SCRIPT], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["details"] == [f"sh exited {n}" for n in range(30)]
    assert result["reaped"] >= 30
