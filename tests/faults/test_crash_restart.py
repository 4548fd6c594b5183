"""kill -9 of the daemon in the middle of a restart of every program (stop-all, then
start-all) and of a crash loop, at several moments of it; then a new daemon.

The pid records are written a little after the changes they carry (pid_records.py gathers
changes up to 50 ms apart into one write), so the daemon dies here with records missing or
naming an earlier instance. Whatever it left, at no moment may a program run twice, and
the next daemon must find every program's process (or start it once), keep an operator's
stop, and leave a stranger's process alone.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from faultlib import by_cmdline, environ_of, marked, python_sleeper, zombies
from harness import DaemonRunner, wait_for

pytestmark = pytest.mark.faults

NO_DEMO = {"programs": {"pos_proxy": None, "ocp_exporter": None, "ob_logtailer": None}}
WORKERS = 10
# Seconds from the restart's request to the kill: before, during and after its writes.
KILL_AFTER = (0.0, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.08)


def _restart_all(runner: DaemonRunner) -> None:
    """stop-all then start-all, as a restart task does; the daemon may die meanwhile."""
    with contextlib.suppress(Exception):
        runner.post("/api/v1/agent/stop-all")
        runner.post("/api/v1/agent/start-all")


def _copies(commands: dict[str, list[str]]) -> dict[str, int]:
    return {name: len(by_cmdline(command)) for name, command in commands.items()}


def test_daemon_killed_during_restart_all_and_crash_loop(daemon_factory, figures):
    tag = uuid.uuid4().hex[:8]
    commands = {f"w{i}": python_sleeper(f"crash-{tag}-w{i}") for i in range(WORKERS)}
    programs: dict[str, dict[str, Any]] = {
        name: {"command": command, "start_seconds": 0, "stop_timeout": 2.0}
        for name, command in commands.items()
    }
    loop_command = [sys.executable, "-c", "import time; time.sleep(0.05)", f"crash-{tag}-loop"]
    programs["looper"] = {"command": loop_command, "start_seconds": 0, "autorestart": "always",
                          "backoff_initial": 0.01, "backoff_max": 0.02,
                          "max_quick_exits": 1000, "stop_timeout": 2.0}
    stranger = subprocess.Popen(python_sleeper(f"crash-{tag}-stranger"))
    runner = daemon_factory(programs, NO_DEMO, wait_running=False, timeout=60)
    twice: list[str] = []
    rounds = 0
    try:
        wait_for(lambda: all(r["state"] == "RUNNING" for r in runner.processes()
                             if r["name"] in commands), 60, "every worker RUNNING")
        for delay in KILL_AFTER:
            rounds += 1
            request = threading.Thread(target=_restart_all, args=(runner,))
            request.start()
            time.sleep(delay)  # the moment of the fault being made, not a wait for a result
            runner.kill9()
            request.join(60)
            seen = _copies({**commands, "looper": loop_command})
            twice += [f"round {rounds}: {n} x{c} with no daemon" for n, c in seen.items() if c > 1]
            runner.start(timeout=60)
            seen = _copies({**commands, "looper": loop_command})
            twice += [f"round {rounds}: {n} x{c} after adoption" for n, c in seen.items()
                      if c > 1]
            runner.post("/api/v1/agent/start-all").check()
            records = {r["name"]: r for r in runner.processes()}
            for name, command in commands.items():
                found = by_cmdline(command)
                pids = sorted(p.pid for p in found)
                if records[name]["state"] != "RUNNING" or pids != [records[name]["pid"]]:
                    twice.append(f"round {rounds}: {name} {records[name]['state']} pid "
                                 f"{records[name]['pid']}, processes {pids}")
        # An operator's stop, answered, then the daemon killed at once: it stays stopped.
        runner.post("/api/v1/processes/w0/stop").check()
        runner.kill9()
        runner.start(timeout=60)
        assert runner.process("w0")["state"] == "STOPPED"
        assert by_cmdline(commands["w0"]) == []
        assert stranger.poll() is None, "a stranger's process was killed"
        assert twice == [], twice
        # Nothing of an earlier instance is left, no zombie under the daemon.
        runs = {r["name"]: environ_of(r["pid"]).get("OCP_AGENTD_RUN_ID")
                for r in runner.processes() if r["pid"]}
        left = [(pid, env.get("OCP_AGENTD_PROGRAM")) for pid, env in marked(str(runner.state_dir))
                if env.get("OCP_AGENTD_PROGRAM") in commands
                and runs.get(env.get("OCP_AGENTD_PROGRAM")) != env.get("OCP_AGENTD_RUN_ID")]
        assert left == []
        assert [z for z in zombies() if z[1] == runner.pid] == []
        figures["rounds"] = rounds
    finally:
        stranger.kill()
        stranger.wait()
