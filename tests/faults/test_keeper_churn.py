"""Log keepers killed over and over under a running daemon (supervision/keeper_exits.py:
one thread collects every keeper's exit through its pidfd).

Each round kills every program's keeper (SIGKILL), then restarts every program, which
starts a new keeper for each. Afterwards no keeper is a zombie, and the daemon holds no
more descriptors and threads than after the first round: each keeper's pidfd is closed
once its exit is collected.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid

import psutil
import pytest
from faultlib import python_sleeper, zombies
from harness import DaemonRunner, wait_for

from ocp_agentd.supervision import output

pytestmark = pytest.mark.faults

NO_DEMO = {"programs": {"pos_proxy": None, "ocp_exporter": None, "ob_logtailer": None}}
PROGRAMS = 16
ROUNDS = 5


def _keepers(runner: DaemonRunner) -> list[psutil.Process]:
    """The live keepers of the daemon's state dir."""
    prefix = f"{runner.state_dir}:"
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(output.KEEPER_MARK, "").startswith(prefix):
                found.append(proc)
    return found


def _restart_all(runner: DaemonRunner) -> None:
    runner.post("/api/v1/agent/stop-all").check()
    runner.post("/api/v1/agent/start-all").check()


def _usage(runner: DaemonRunner) -> tuple[int, int]:
    daemon = psutil.Process(runner.pid)
    return daemon.num_fds(), daemon.num_threads()


def test_keepers_killed_each_round_leave_no_zombie_descriptor_or_thread(
        daemon_factory, figures):
    tag = uuid.uuid4().hex[:8]
    programs = {f"k{i}": {"command": python_sleeper(f"churn-{tag}-{i}"), "start_seconds": 0,
                          "stop_timeout": 2.0} for i in range(PROGRAMS)}
    runner = daemon_factory(programs, NO_DEMO, timeout=60)
    wait_for(lambda: len(_keepers(runner)) == PROGRAMS, 60, "a keeper per program")
    _restart_all(runner)
    wait_for(lambda: len(_keepers(runner)) == PROGRAMS, 60, "a keeper per program")
    first = _usage(runner)
    for _ in range(ROUNDS):
        for keeper in _keepers(runner):
            with contextlib.suppress(ProcessLookupError):
                os.kill(keeper.pid, signal.SIGKILL)
        # Every killed keeper is collected: none left as a zombie of the daemon.
        wait_for(lambda: not [z for z in zombies() if z[1] == runner.pid], 20,
                 "the killed keepers reaped")
        _restart_all(runner)
        wait_for(lambda: len(_keepers(runner)) == PROGRAMS, 60, "a new keeper per program")
    def settled() -> tuple[int, int] | None:
        usage = _usage(runner)
        return usage if usage[0] <= first[0] + 2 else None

    last = wait_for(settled, 20, f"descriptors back to about {first[0]}")
    assert last[1] <= first[1] + 1, (first, last)
    figures["daemon fds first/last"] = f"{first[0]}/{last[0]}"
    figures["daemon threads first/last"] = f"{first[1]}/{last[1]}"
