"""The measurements. Every figure alternates the targets (A B, B A, ...) so drift
on a noisy machine falls on both alike, and every "done" is detected the same way
for both: by the supervisor's own status answer, or by /proc for the processes.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from collections.abc import Iterator, Sequence

import psutil

from bench.procs import cmdline, has_mark, is_running, pid_list, wait_for
from bench.targets import PROGRAM_ARGV, Target

Samples = dict[str, list[float]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    rank = max(1, -(-95 * len(ordered) // 100))
    return ordered[rank - 1]


def _rounds(targets: Sequence[Target], reps: int) -> Iterator[tuple[int, Target]]:
    for i in range(reps):
        for target in targets if i % 2 == 0 else reversed(targets):
            yield i, target


def restart_all(targets: Sequence[Target], reps: int) -> Samples:
    """One restart-all call until every program is RUNNING under a new pid (seconds)."""
    out: Samples = {t.label: [] for t in targets}
    for _, target in _rounds(targets, reps):
        old = {pid for _, pid in target.wait_all_running().values()}
        begin = time.perf_counter()
        target.restart_all()
        wait_for(
            lambda t=target, old=old: t.all_running(old), 60, f"{target.label}: restarted", 0.001
        )
        out[target.label].append(time.perf_counter() - begin)
    return out


def stop_all(targets: Sequence[Target], reps: int) -> Samples:
    """One stop-all call until none of the programs' processes runs (seconds)."""
    out: Samples = {t.label: [] for t in targets}
    for _, target in _rounds(targets, reps):
        old = [pid for _, pid in target.wait_all_running().values() if pid]
        begin = time.perf_counter()
        target.stop_all()
        wait_for(
            lambda pids=old: not any(is_running(p) for p in pids),
            60,
            f"{target.label}: programs gone",
            0.0005,
        )
        out[target.label].append(time.perf_counter() - begin)
        target.start_all()
        target.wait_all_running()
    return out


def crash_to_new_pid(targets: Sequence[Target], reps: int, min_age: float = 1.5) -> Samples:
    """kill -9 of one program until a different pid runs its command (seconds).

    The victims take turns, and each has run at least min_age seconds: a crash of a
    program that has been up a while, not of one that has just started (either
    supervisor may hold back a program that dies young). Detection polls /proc
    (about every 0.2 ms) for a pid that did not exist before the kill, whose command
    line is the program's and which carries this run's environment mark.
    """
    out: Samples = {t.label: [] for t in targets}
    for i, target in _rounds(targets, reps):
        states = target.wait_all_running()
        victim = states[target.names[i % target.n]][1]
        assert victim is not None
        age = time.time() - psutil.Process(victim).create_time()
        # A random pause keeps the kill out of step with any periodic loop.
        time.sleep(max(min_age - age, 0) + random.uniform(0.05, 0.25))
        known = set(pid_list())
        begin = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        deadline = begin + 30
        found = None
        while found is None:
            # A forked child shows its parent's command line until it execs,
            # so a new pid is looked at again on every pass until it matches.
            for pid in pid_list():
                if (
                    pid not in known
                    and cmdline(pid) == PROGRAM_ARGV
                    and has_mark(pid, target.reaper.token)
                ):
                    found = pid
                    break
            else:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{target.label}: no new pid 30 s after kill -9 {victim}")
                time.sleep(0.0002)
        out[target.label].append(time.perf_counter() - begin)
    for target in targets:
        target.wait_all_running()
    return out


def status_throughput(targets: Sequence[Target], seconds: float) -> dict[str, float]:
    """Sequential status requests for every program; requests per second."""
    counts = {t.label: 0 for t in targets}
    spent = {t.label: 0.0 for t in targets}
    for _, target in _rounds(targets, 2):
        target.states()  # warm the connection
        begin = time.perf_counter()
        end = begin + seconds / 2
        done = 0
        while True:
            states = target.states()
            done += 1
            now = time.perf_counter()
            if now >= end:
                break
        assert len(states) == target.n
        counts[target.label] += done
        spent[target.label] += now - begin
    return {label: counts[label] / spent[label] for label in counts}


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of every thread of proc: from schedstat (nanoseconds) where the kernel has
    it, since cpu_times counts 10 ms ticks, too coarse for an idle process."""
    total = 0.0
    try:
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as handle:
                total += int(handle.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        times = proc.cpu_times()
        return times.user + times.system
    return total


def idle_cost(targets: Sequence[Target], seconds: float) -> dict[str, dict[str, float]]:
    """CPU % of the supervisor process over an idle window (both watched at once), RSS, USS."""
    for target in targets:
        target.wait_all_running()
        target.close_client()
    procs = {t.label: psutil.Process(t.pid) for t in targets}
    time.sleep(min(2.0, seconds / 5))  # let the last request's work finish
    before = {label: cpu_seconds(p) for label, p in procs.items()}
    begin = time.perf_counter()
    time.sleep(seconds)
    window = time.perf_counter() - begin
    out = {}
    for label, proc in procs.items():
        used = cpu_seconds(proc) - before[label]
        memory = proc.memory_full_info()
        out[label] = {
            "cpu_percent": 100.0 * used / window,
            "rss_mib": memory.rss / 2**20,
            "uss_mib": memory.uss / 2**20,
        }
    return out
