"""Liveness probes driving the state machine (SPEC section 10), on real processes.

In-process supervisors for the timing and race cases; a real daemon for the status record,
the metric and verify, with the demo exporter wedged by SIGUSR1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import DaemonRunner, free_port, marked_processes, wait_for

from ocp_agentd.config import ProgramSpec, Settings
from ocp_agentd.demo.config import demo_command
from ocp_agentd.supervision import State, Supervisor
from ocp_agentd.supervision.proctable import MARK_STATE_DIR

MARGIN = 3.0  # stop, spawn and a loaded 2-core machine, on top of the probe budget


class World:
    """Settings for one test, every path under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.programs: dict[str, dict[str, Any]] = {}

    def add(self, name: str, command: list[str], **fields: Any) -> None:
        fields.setdefault("start_seconds", 0.1)
        fields.setdefault("stop_timeout", 3.0)
        fields.setdefault("backoff_initial", 0.1)
        env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        self.programs[name] = {"command": command, "env": env, **fields}

    def settings(self) -> Settings:
        settings = Settings(
            agent={"state_dir": str(self.tmp / "state"), "log_dir": str(self.tmp / "log"),
                   "install_home": str(self.tmp)},
            api={"socket": str(self.tmp / "run" / "agentd.sock")},
            programs={n: ProgramSpec(**f) for n, f in self.programs.items()},
        )
        settings.resolve_paths(self.tmp)
        return settings


@pytest.fixture
def world(tmp_path: Path):
    w = World(tmp_path)
    yield w
    for proc in marked_processes([(MARK_STATE_DIR, str(tmp_path / "state"))]):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def run(world: World, body: Callable[[Supervisor], Awaitable[None]]) -> None:
    async def main() -> None:
        sup = Supervisor(world.settings())
        try:
            await sup.start_pending(await sup.adopt())
            await body(sup)
        finally:
            await sup.shutdown()

    asyncio.run(main())


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.1f}s: {what}")
        await asyncio.sleep(0.01)
    return value


def listen(port: int, sick_file: Path) -> list[str]:
    return demo_command("misbehave", "listen", port, "--sick-file", sick_file)


def probe_budget(live: dict[str, float]) -> float:
    """SPEC section 10's bound: initial_delay + period x failure_threshold + timeout."""
    return live["initial_delay"] + live["period"] * live["failure_threshold"] + live["timeout"]


def test_sick_program_is_restarted_within_the_probe_budget(world: World, tmp_path: Path) -> None:
    port, sick = free_port(), tmp_path / "sick"
    live = {"http_get": f"http://127.0.0.1:{port}/health", "period": 0.3, "timeout": 0.5,
            "failure_threshold": 3, "initial_delay": 0.2}
    world.add("web", listen(port, sick), ports=[port], liveness=live)

    async def body(sup: Supervisor) -> None:
        program = sup.program("web")
        await until(lambda: program.liveness.last and program.liveness.last.ok, 10, "a good probe")
        first = sup.info("web")
        assert first.liveness and first.liveness["last_probe"]["ok"] is True
        sick.touch()
        began = time.monotonic()
        await until(lambda: program.state != State.RUNNING, probe_budget(live) + MARGIN,
                    "the restart to begin")
        took = time.monotonic() - began
        sick.unlink()
        info = await until(lambda: sup.info("web").state == State.RUNNING and sup.info("web"),
                           15, "running again")
        assert info.pid != first.pid and info.restarts == 1
        assert info.last_exit and info.last_exit["reason"].startswith("liveness failed: ")
        assert info.last_exit["reason"].endswith("answered 503")
        assert took >= live["period"] * (live["failure_threshold"] - 1)  # not before 3 fails
        assert program.liveness.failures_total == 3

    run(world, body)


def test_hanging_exec_probe_is_killed_at_timeout_and_fails(world: World, tmp_path: Path) -> None:
    token = f"{os.getpid()}{time.monotonic_ns()}"
    live = {"exec": ["/bin/sh", "-c", f"exec sleep 3{token[-5:]}"], "period": 0.2,
            "timeout": 0.4, "failure_threshold": 2, "initial_delay": 0.0}
    world.add("app", ["/bin/sleep", "1000"], liveness=live)

    def probe_processes() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if proc.info["cmdline"] and proc.info["cmdline"][-1] == f"3{token[-5:]}":
                found.append(proc)
        return found

    async def body(sup: Supervisor) -> None:
        program = sup.program("app")
        first = sup.info("app")
        await until(probe_processes, 5, "the probe running")
        await until(lambda: program.state != State.RUNNING, probe_budget(live) + MARGIN,
                    "the restart to begin")
        info = await until(lambda: sup.info("app").last_exit and sup.info("app"), 10, "stopped")
        assert info.last_exit
        assert info.last_exit["reason"] == "liveness failed: sh did not finish within 0.4s (killed)"
        assert program.liveness.last and program.liveness.last.seconds < 0.4 + MARGIN
        await until(lambda: sup.info("app").pid not in (None, first.pid), 10, "a new instance")
        await sup.stop("app")
        await until(lambda: not probe_processes(), 5, "no probe process left")

    run(world, body)


def test_never_healthy_program_goes_fatal_after_max_quick_exits(
    world: World, tmp_path: Path
) -> None:
    port, sick = free_port(), tmp_path / "sick"
    sick.touch()
    live = {"http_get": f"http://127.0.0.1:{port}/health", "period": 0.1, "timeout": 0.5,
            "failure_threshold": 1, "initial_delay": 0.0}
    world.add("sick", listen(port, sick), ports=[port], liveness=live, max_quick_exits=3)

    async def body(sup: Supervisor) -> None:
        seen: list[State] = []
        sup.add_listener(lambda name, old, new: seen.append(new))
        await until(lambda: sup.info("sick").state == State.FATAL, 30, "FATAL")
        info = sup.info("sick")
        assert info.restarts == 2  # three runs, each killed by its probe
        assert info.last_exit and info.last_exit["reason"].startswith("liveness failed: ")
        assert seen.count(State.BACKOFF) == 2
        assert info.pid is None
        count = sup.program("sick").liveness.failures_total
        await asyncio.sleep(0.5)  # FATAL: nothing probes any more
        assert sup.program("sick").liveness.failures_total == count

    run(world, body)


def test_healthy_once_then_failing_restarts_at_once_without_counting(
    world: World, tmp_path: Path
) -> None:
    port, sick = free_port(), tmp_path / "sick"
    live = {"http_get": f"http://127.0.0.1:{port}/health", "period": 0.2, "timeout": 0.5,
            "failure_threshold": 1, "initial_delay": 0.0}
    world.add("web", listen(port, sick), ports=[port], liveness=live, max_quick_exits=1)

    async def body(sup: Supervisor) -> None:
        program = sup.program("web")
        for round_ in (1, 2):
            await until(lambda: program.state == State.RUNNING and program.liveness.healthy,
                        15, "a healthy run")
            sick.touch()
            await until(lambda r=round_: sup.info("web").restarts == r, 15, "a restart")
            sick.unlink()
        # max_quick_exits = 1 would have made it FATAL had these counted as quick exits.
        await until(lambda: program.state == State.RUNNING, 15, "running")
        assert program.quick_exits == 0

    run(world, body)


def test_stop_during_a_probe_cancels_it_and_never_restarts(world: World) -> None:
    token = f"{time.monotonic_ns()}"[-5:]
    live = {"exec": ["/bin/sh", "-c", f"exec sleep 4{token}"], "period": 0.1,
            "timeout": 1.0, "failure_threshold": 1}
    world.add("app", ["/bin/sleep", "1000"], liveness=live)

    def probing() -> list[psutil.Process]:
        # A killed probe may stay a zombie until it is reaped: dead is what counts here.
        return [p for p in psutil.process_iter(["cmdline", "status"])
                if p.info["cmdline"] and p.info["cmdline"][-1] == f"4{token}"
                and p.info["status"] != psutil.STATUS_ZOMBIE]

    async def body(sup: Supervisor) -> None:
        await until(probing, 5, "a probe in flight")
        await sup.stop("app")
        assert not probing()
        await asyncio.sleep(live["timeout"] + 1.0)  # when a late failure would have acted
        info = sup.info("app")
        assert (info.state, info.pid, info.restarts) == (State.STOPPED, None, 0)
        assert sup.program("app").liveness.failures_total == 0

    run(world, body)


def test_stop_queued_behind_a_liveness_restart_wins(world: World) -> None:
    live = {"tcp_connect": free_port(), "period": 0.1, "timeout": 0.5, "failure_threshold": 1}
    stubborn = demo_command("misbehave", "ignore-term")
    world.add("app", stubborn, liveness=live, stop_timeout=1.0)

    async def body(sup: Supervisor) -> None:
        program = sup.program("app")
        await until(lambda: program.state == State.STOPPING, 10, "the liveness stop")
        await sup.stop("app")  # waits for the liveness stop (SIGKILL after 1 s), then acts
        await asyncio.sleep(0.5)  # when a queued restart would have started
        info = sup.info("app")
        assert (info.state, info.pid) == (State.STOPPED, None)
        assert info.last_exit and info.last_exit["reason"].startswith("liveness failed: ")

    run(world, body)


def test_reload_adds_and_removes_the_probe_without_a_restart(world: World) -> None:
    live = {"tcp_connect": free_port(), "period": 0.1, "timeout": 0.5,
            "failure_threshold": 1000}
    world.add("app", ["/bin/sleep", "1000"])

    async def body(sup: Supervisor) -> None:
        program = sup.program("app")
        pid = sup.info("app").pid
        assert sup.info("app").liveness is None and not program.liveness.active
        world.programs["app"]["liveness"] = live
        report = await sup.reload(world.settings())
        assert report["changed"] == ["app"]
        await until(lambda: program.liveness.failures_total >= 2, 5, "probing")
        assert sup.info("app").liveness["consecutive_failures"] >= 2  # type: ignore[index]
        del world.programs["app"]["liveness"]
        await sup.reload(world.settings())
        assert not program.liveness.active and sup.info("app").liveness is None
        count = program.liveness.failures_total
        await asyncio.sleep(0.5)  # five periods
        assert program.liveness.failures_total == count
        assert (sup.info("app").pid, sup.info("app").state) == (pid, State.RUNNING)

    run(world, body)


def test_verify_includes_the_liveness_probe(world: World, tmp_path: Path) -> None:
    port, sick = free_port(), tmp_path / "sick"
    live = {"http_get": f"http://127.0.0.1:{port}/health", "period": 60.0,
            "initial_delay": 60.0}
    world.add("web", listen(port, sick), ports=[port], liveness=live)
    world.add("plain", ["/bin/sleep", "1000"])

    async def body(sup: Supervisor) -> None:
        good = await sup.verify("web")
        sick.touch()
        bad = await sup.verify("web")
        plain = await sup.verify("plain")
        assert good.ok and next(c for c in good.checks if c.name == "liveness").ok
        check = next(c for c in bad.checks if c.name == "liveness")
        assert not bad.ok and not check.ok and check.detail.endswith("answered 503")
        assert all(c.name != "liveness" for c in plain.checks)

    run(world, body)


# ---- the daemon: the demo exporter wedged ------------------------------------------------------


def test_wedged_demo_exporter_is_restarted_and_reported(daemon_factory) -> None:
    live = {"period": 0.5, "timeout": 0.5, "failure_threshold": 2, "initial_delay": 0.0}
    daemon: DaemonRunner = daemon_factory(
        overrides={"programs": {"ocp_exporter": {"liveness": live}}}, wait_running=True
    )
    spec = daemon.settings.programs["ocp_exporter"].liveness  # type: ignore[union-attr]
    assert spec is not None and spec.http_get.endswith("/health")
    before = wait_for(
        lambda: (r := daemon.process("ocp_exporter"))["liveness"]["last_probe"] and r,
        10, "a first probe in the status record")
    assert before["liveness"]["last_probe"]["ok"] is True
    assert before["liveness"]["consecutive_failures"] == 0
    verify = daemon.post("/api/v1/processes/ocp_exporter/verify").check()
    check = next(c for c in verify["checks"] if c["name"] == "liveness")
    assert check["ok"] is True and check["detail"].endswith("answered 200")

    # The README's way to wedge the demo exporter.
    sent = daemon.ctl("signal", "USR1", "ocp_exporter")
    assert sent.returncode == 0, sent.stderr
    assert f"sent SIGUSR1 to ocp_exporter (pid {before['pid']})" in sent.stdout
    budget = probe_budget({**live, "initial_delay": 0.0}) + MARGIN
    failing = wait_for(
        lambda: (r := daemon.process("ocp_exporter"))["liveness"]["consecutive_failures"] and r,
        budget, "a failed probe in the status record")
    assert failing["liveness"]["last_probe"]["ok"] is False
    after = wait_for(
        lambda: (r := daemon.process("ocp_exporter"))["pid"] not in (None, before["pid"])
        and r["state"] == "RUNNING" and r,
        budget + 10, "the exporter restarted")
    assert after["restarts"] == before["restarts"] + 1
    assert after["last_exit"]["reason"].startswith("liveness failed: ")
    metrics = daemon.get("/metrics").text
    line = 'ocp_agentd_program_liveness_failures_total{program="ocp_exporter"}'
    assert any(m.startswith(line) and float(m.split()[-1]) >= 2 for m in metrics.splitlines())
    # Each failed probe is an event too (SPEC section 12), naming the probe and why.
    probe_events = daemon.ctl("--json", "events", "--last", "1000", "--kind", "probe",
                              "--count", "2")
    assert probe_events.returncode == 0, probe_events.stderr
    events = [json.loads(line) for line in probe_events.stdout.splitlines()]
    assert [e["program"] for e in events] == ["ocp_exporter", "ocp_exporter"]
    assert all(e["probe"].startswith("http_get http://") and e["reason"] for e in events)


def test_daemon_runs_an_exec_probe_in_the_program_cwd_with_its_env(
    daemon_factory, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    check = ["/bin/sh", "-c", 'test ! -e sick && echo "alive in $PWD as $ROLE"']
    live = {"exec": check, "period": 0.3, "timeout": 1.0, "failure_threshold": 2}
    sleeper = {"command": ["/bin/sleep", "1000"], "cwd": str(home), "env": {"ROLE": "tailer"},
               "liveness": live}
    daemon: DaemonRunner = daemon_factory({"sleeper": sleeper}, wait_running=True)
    good = wait_for(lambda: (daemon.process("sleeper")["liveness"] or {}).get("last_probe"),
                    10, "a first probe")
    assert good["ok"] is True and good["detail"] == f"sh exited 0: alive in {home} as tailer"
    pid = daemon.process("sleeper")["pid"]
    (home / "sick").touch()
    record = wait_for(
        lambda: (r := daemon.process("sleeper"))["last_exit"] and r, probe_budget(
            {"initial_delay": 0.0, **live}) + MARGIN, "the liveness restart")
    assert record["last_exit"]["reason"] == "liveness failed: sh exited 1"
    (home / "sick").unlink()
    wait_for(lambda: daemon.process("sleeper")["pid"] not in (None, pid)
             and daemon.process("sleeper")["state"] == "RUNNING", 15, "running again")
