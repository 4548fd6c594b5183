"""The measurements. Each figure alternates the targets (A B C, C B A, ...) so that drift
on a busy machine falls on all alike; each target's turn runs alone (the other targets'
programs are stopped meanwhile, so the host's process count is the same for all).

Effects are read from /proc by the watcher (bench/watch.py), never from a target's own
status; the reply of the call, and when the target's status first reports the programs
RUNNING, are reported beside them. All durations are seconds.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence

from bench.procs import rss_uss_mib
from bench.targets import PROGRAM_ARGV, Target
from bench.watch import Effect, Watcher

# label -> metric -> samples
Samples = dict[str, dict[str, list[float]]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p95(values: Sequence[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    rank = max(1, -(-95 * len(ordered) // 100))
    return ordered[rank - 1]


def new_samples() -> Samples:
    return defaultdict(lambda: defaultdict(list))


def rounds(targets: Sequence[Target], reps: int) -> Iterator[tuple[int, Target]]:
    for i in range(reps):
        for target in targets if i % 2 == 0 else reversed(targets):
            yield i, target


def _checked(effect: Effect, target: Target, what: str) -> Effect:
    if effect.timed_out:
        target.check_alive()
        raise TimeoutError(f"{target.label}: {what} not seen in /proc before the timeout")
    return effect


def cycle(
    targets: Sequence[Target], reps: int, watcher: Watcher, out: Samples,
    status_seconds: float = 0.0,
) -> None:
    """Per turn, from all programs stopped: start-all, status, restart-all, stop-all.

    - start: ``start.new`` all N new pids run the program (/proc), ``start.reported`` the
      target's status first shows all N RUNNING (asked back to back once the effect is
      seen), ``start.reply`` the call's answer;
    - ``status``: the latency of each of the sequential status requests (every
      program's state) made over ``status_seconds``, the programs running;
    - restart (stop-all call, then start-all call): ``restart.gone`` all old pids gone,
      ``restart.new``, ``restart.reported``, ``restart.reply``, ``restart.settled`` the
      target settled again (Target.settle: ocp-agentd's next standbys made), and
      ``restart.cpu``: CPU seconds the supervisor spent from the first call until the
      reply and the effect were in, plus while it settled;
    - stop: ``stop.gone``, ``stop.reply``.

    Status, restart and stop each begin from a settled target.
    """
    for _, target in rounds(targets, reps):
        got = out[target.label]
        target.begin_turn()
        try:
            watcher.arm(new=target.n, argv=PROGRAM_ARGV, mark=target.mark)
            begin = time.monotonic()
            target.start_all()
            replied = time.monotonic()
            effect = _checked(watcher.result(), target, "start-all's programs")
            reported = target.wait_reported()
            got["start.new"].append(effect.new_at - begin)
            got["start.reported"].append(reported - begin)
            got["start.reply"].append(replied - begin)
            if effect.passes:
                got["resolution.pass_ms"].append(effect.pass_ms)
            target.settle()
            if status_seconds:
                status_burst(target, status_seconds, got["status"])

            old = effect.new_pids
            watcher.arm(gone=old, new=target.n, argv=PROGRAM_ARGV, mark=target.mark)
            cpu = target.cpu_seconds()
            begin = time.monotonic()
            target.restart_all()
            replied = time.monotonic()
            effect = _checked(watcher.result(), target, "restart-all's programs")
            cpu = target.cpu_seconds() - cpu
            reported = target.wait_reported(set(old))
            settling = target.cpu_seconds()  # the status requests above are not counted
            target.settle()
            got["restart.settled"].append(time.monotonic() - begin)
            got["restart.cpu"].append(cpu + target.cpu_seconds() - settling)
            got["restart.gone"].append(effect.gone_at - begin)
            got["restart.new"].append(effect.new_at - begin)
            got["restart.reported"].append(reported - begin)
            got["restart.reply"].append(replied - begin)

            watcher.arm(gone=effect.new_pids)
            begin = time.monotonic()
            target.stop_all()
            replied = time.monotonic()
            effect = _checked(watcher.result(), target, "stop-all's end")
            got["stop.gone"].append(effect.gone_at - begin)
            got["stop.reply"].append(replied - begin)
        finally:
            target.end_turn()


def start_programs(target: Target, watcher: Watcher) -> list[int]:
    """start-all, until all N run (from /proc) and the target has settled; their pids."""
    watcher.arm(new=target.n, argv=PROGRAM_ARGV, mark=target.mark)
    target.start_all()
    effect = _checked(watcher.result(), target, "start-all's programs")
    target.wait_reported()
    target.settle()
    return effect.new_pids


def stop_programs(target: Target, watcher: Watcher, pids: list[int]) -> None:
    watcher.arm(gone=pids)
    target.stop_all()
    _checked(watcher.result(), target, "stop-all's end")


def crash(
    targets: Sequence[Target], kills: int, turns: int, watcher: Watcher, out: Samples,
    min_age: float = 1.5,
) -> None:
    """``crash``: kill -9 of one program until a new pid runs its command (/proc).

    Each turn starts the target's programs, lets them run min_age seconds (either
    supervisor may hold back a program that dies young), then kills ``kills`` of them in
    turn, each after a random pause (out of step with any periodic loop), waiting after
    each until the target reports every program RUNNING again and has settled.
    """
    for i, target in rounds(targets, turns):
        got = out[target.label]
        target.begin_turn()
        try:
            pids = start_programs(target, watcher)
            time.sleep(min_age)
            for k in range(kills):
                victim = pids[(i * kills + k) % len(pids)]
                time.sleep(random.uniform(0.05, 0.25))
                watcher.arm(gone=[victim], new=1, argv=PROGRAM_ARGV, mark=target.mark)
                begin = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                effect = _checked(watcher.result(), target, "the crashed program's new pid")
                got["crash"].append(effect.new_at - begin)
                pids[pids.index(victim)] = effect.new_pids[0]
                target.wait_reported({victim})
                target.settle()
            stop_programs(target, watcher, pids)
        finally:
            target.end_turn()


def status_burst(target: Target, seconds: float, latencies: list[float]) -> None:
    """Sequential status requests for ``seconds`` (at least one); appends each latency."""
    target.states()  # warm the connection
    end = time.monotonic() + seconds
    while True:
        begin = time.monotonic()
        states = target.states()
        now = time.monotonic()
        latencies.append(now - begin)
        if now >= end:
            break
    if len(states) != target.n:
        raise AssertionError(f"{target.label}: {len(states)} states for {target.n}")


def cli_status(targets: Sequence[Target], reps: int, out: Samples) -> None:
    """``cli``: the operator's status command, exec to exit (programs as they are)."""
    for _, target in rounds(targets, reps):
        argv = target.cli_status()
        if argv is None:
            continue
        begin = time.monotonic()
        done = subprocess.run(argv, capture_output=True, timeout=120)
        took = time.monotonic() - begin
        if done.returncode != 0:
            raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr[-500:]!r}")
        out[target.label]["cli"].append(took)


def idle(targets: Sequence[Target], seconds: float, out: Samples) -> None:
    """``idle.cpu_pct``: CPU % of each supervisor over one window with nothing happening
    (all watched at once, their programs running), then ``rss_mib`` and ``uss_mib``, and
    ``helpers.rss_mib``/``helpers.uss_mib``: the sums over the processes the supervisor runs
    for itself beside its programs (Target.helper_pids: ocp-agentd's log keepers)."""
    for target in targets:
        target.close_client()
    time.sleep(min(2.0, seconds / 5))  # let the last request's work finish
    before = {t.label: t.cpu_seconds() for t in targets}
    begin = time.monotonic()
    time.sleep(seconds)
    window = time.monotonic() - begin
    for target in targets:
        got = out[target.label]
        got["idle.cpu_pct"].append(100.0 * (target.cpu_seconds() - before[target.label]) / window)
        rss, uss = (sum(v) for v in zip(*(rss_uss_mib(p) for p in target.supervisor_pids()),
                                        strict=True))
        got["rss_mib"].append(rss)
        got["uss_mib"].append(uss)
        helpers = [rss_uss_mib(pid) for pid in target.helper_pids()]
        if helpers:
            got["helpers.rss_mib"].append(sum(r for r, _ in helpers))
            got["helpers.uss_mib"].append(sum(u for _, u in helpers))

