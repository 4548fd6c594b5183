"""The benchmark's own machinery on real processes: the watcher, the floor, the
regression check of `make bench-quick`. (Speed goals live in bench/, not here.)"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.procs import ENV_MARK, Reaper
from bench.targets import PROGRAM_ARGV, Agentd, Floor
from bench.watch import Watcher
from ocp_agentd.supervision import cgroups

CGROUPS = cgroups.detect(Path("/nonexistent"))


@pytest.fixture
def watcher():
    watching = Watcher()
    yield watching
    watching.close()


@pytest.fixture
def reaper():
    reaping = Reaper(secrets.token_hex(8))
    yield reaping
    reaping.stop_all()


def test_watcher_sees_marked_programs_start_and_end(watcher, reaper) -> None:
    mark = f"{ENV_MARK}={reaper.token}"
    env = dict(os.environ, **{ENV_MARK: reaper.token})
    stranger = subprocess.Popen(PROGRAM_ARGV)  # the same command without the mark
    try:
        watcher.arm(new=3, argv=PROGRAM_ARGV, mark=mark, timeout=30)
        mine = [subprocess.Popen(PROGRAM_ARGV, env=env) for _ in range(3)]
        effect = watcher.result()
        assert not effect.timed_out
        assert sorted(effect.new_pids) == sorted(p.pid for p in mine)
        assert effect.new_at is not None and effect.new_at >= effect.armed_at

        watcher.arm(gone=[p.pid for p in mine], timeout=30)
        for proc in mine:
            proc.terminate()
        effect = watcher.result()
        assert not effect.timed_out and effect.gone_at is not None
        assert all(proc.wait(10) == -signal.SIGTERM for proc in mine)
    finally:
        stranger.kill()
        stranger.wait(10)


def test_watcher_times_out_when_nothing_happens(watcher, reaper) -> None:
    watcher.arm(new=1, argv=PROGRAM_ARGV, mark=f"{ENV_MARK}={reaper.token}", timeout=0.3)
    effect = watcher.result()
    assert effect.timed_out and effect.new_pids == []


def test_floor_respawns_a_killed_program_and_stops_all(watcher, reaper, tmp_path: Path) -> None:
    floor = Floor(tmp_path / "floor", 2, reaper)
    floor.start()
    try:
        pids = [pid for _, pid in floor.states().values()]
        assert all(pids)
        watcher.arm(gone=[pids[0]], new=1, argv=PROGRAM_ARGV, mark=floor.mark, timeout=30)
        os.kill(pids[0], signal.SIGKILL)
        effect = watcher.result()
        assert not effect.timed_out and effect.new_pids[0] not in pids
        now = [pid for _, pid in floor.states().values()]
        assert effect.new_pids[0] in now and pids[1] in now

        watcher.arm(gone=now, timeout=30)
        floor.stop_all()
        assert not watcher.result().timed_out
        assert all(state == "STOPPED" for state, _ in floor.states().values())
    finally:
        floor.stop()


@pytest.mark.skipif(not CGROUPS.usable or os.geteuid() != 0,
                    reason=f"standbys need cgroups as root (this host: {CGROUPS.layout})")
def test_agentd_settles_once_every_program_has_its_standby(reaper, tmp_path: Path) -> None:
    agentd = Agentd(tmp_path / "agentd", 3, reaper, sys.executable)
    agentd.start()
    try:
        agentd.wait_reported()
        agentd.settle()
        assert agentd.standbys() == 3
    finally:
        agentd.stop()


def _results(agentd_crash: float, supervisord_crash: float) -> report.Results:
    results = report.Results()
    samples = results.phase(report.Phase(10))
    samples[report.AGENTD]["crash"] += [agentd_crash] * 3
    samples[report.SUPERVISORD]["crash"] += [supervisord_crash] * 3
    return results


def test_regressions_name_a_ratio_past_its_limit() -> None:
    assert report.regressions(_results(0.004, 1.0)) == []
    failures = report.regressions(_results(0.5, 1.0))
    assert len(failures) == 1 and "crash to new pid vs supervisord" in failures[0]
