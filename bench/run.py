"""ocp-agentd against supervisord, circus and systemd, with the floor, in one run.

    python -m bench.run            # the full benchmark; writes bench/RESULTS.md
    python -m bench.run --quick    # CI-sized (under a minute); fails on a regressed ratio

Installs supervisor 4.3 and circus 0.19 into bench/.venv-peers when missing and runs
itself from there (circus's client needs its venv); ocp-agentd runs from the project's
venv (the Python that started this). The systemd part boots the e2e suite's Debian 12
container (tests/e2e/nspawn.py) and measures systemd and ocp-agentd inside it
(bench/systemd.py). Every process it starts is stopped at the end, also on error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import figures, report, seed
from bench.procs import Reaper
from bench.report import AGENTD
from bench.targets import Agentd, Floor, Target
from bench.watch import Watcher

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS_VENV = BENCH_DIR / ".venv-peers"
PEERS_REQ = ("supervisor>=4.3,<4.4", "circus>=0.19,<0.20")
IDLE_ARGV = ["/bin/sleep", "100001"]  # the extra idle processes: not the programs' argv
PYTHON_ENV, CTL_ENV = "BENCH_AGENTD_PYTHON", "BENCH_AGENTCTL"


@dataclass(frozen=True)
class Plan:
    """What a run measures. Sizes are N (programs per target)."""

    sizes: tuple[int, ...]
    crowded: tuple[int, ...]  # sizes measured again with `extra` idle processes on the host
    extra: int
    reps: dict[int, int]  # N -> alternated start/restart/stop cycles per target
    status_seconds: float
    crash_n: int
    crash_kills: int  # per turn
    crash_turns: int
    crash_min_age: float  # seconds a program runs before it is killed
    single_n: int  # N of the one-off figures: start-up, CLI, idle, RSS
    startup_reps: int
    cli_reps: int
    idle_seconds: float
    peers: tuple[str, ...]  # supervisord, supervisord+poll, circus
    poll_sizes: tuple[int, ...] = ()  # N at which supervisord+poll is measured too
    cgroup_off_sizes: tuple[int, ...] = ()  # N at which ocp-agentd runs with cgroup = "off" too
    systemd_sizes: tuple[int, ...] = ()
    systemd_reps: int = 3
    seed_reps: int = 0
    regress: bool = False  # --quick: fail on a regressed ratio


FULL = Plan(
    sizes=(10, 50, 200, 500, 1000),
    crowded=(50, 200, 500, 1000),
    extra=1000,
    reps={10: 5, 50: 5, 200: 3, 500: 3, 1000: 2},
    status_seconds=2.0,
    crash_n=50,
    crash_kills=5,
    crash_turns=4,
    crash_min_age=1.5,
    single_n=50,
    startup_reps=5,
    cli_reps=7,
    idle_seconds=30.0,
    peers=("supervisord", "supervisord+poll", "circus"),
    poll_sizes=(10, 50, 200),
    cgroup_off_sizes=(10, 50, 200),
    systemd_sizes=(10, 50, 200),
    seed_reps=10,
)
# The full matrix in less time: for a machine that others share, or a deadline.
REDUCED = Plan(
    sizes=(10, 50, 200, 1000),
    crowded=(200,),
    extra=1000,
    reps={10: 3, 50: 3, 200: 3, 1000: 2},
    status_seconds=2.0,
    crash_n=50,
    crash_kills=4,
    crash_turns=2,
    crash_min_age=1.5,
    single_n=50,
    startup_reps=3,
    cli_reps=5,
    idle_seconds=20.0,
    peers=("supervisord", "supervisord+poll", "circus"),
    poll_sizes=(10, 50, 200),
    cgroup_off_sizes=(50, 200),
    systemd_sizes=(10, 50, 200),
    seed_reps=5,
)
QUICK = Plan(
    sizes=(10,),
    crowded=(),
    extra=0,
    reps={10: 3},
    status_seconds=1.0,
    crash_n=10,
    crash_kills=2,
    crash_turns=2,
    crash_min_age=1.0,
    single_n=10,
    startup_reps=0,
    cli_reps=5,  # one call is at the mercy of a busy machine; a median of 5 costs 0.6 s
    idle_seconds=2.0,
    peers=("supervisord",),
    regress=True,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _peers_ready(python: Path) -> str | None:
    """The peers' versions when the venv has them all, else None."""
    if not python.exists():
        return None
    probe = "import supervisor.options as s, circus; print(s.VERSION, circus.__version__)"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_peers() -> Path:
    """bench/.venv-peers with supervisor 4.3 and circus 0.19, (re)built when missing or
    broken; its python."""
    python = PEERS_VENV / "bin" / "python"
    if _peers_ready(python) is None:
        log(f"installing {', '.join(PEERS_REQ)} into {PEERS_VENV}")
        shutil.rmtree(PEERS_VENV, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS_REQ], check=True)
        if _peers_ready(python) is None:
            raise SystemExit(f"{PEERS_VENV} does not import supervisor and circus")
    return python


def reexec_in_peers_venv(argv: list[str]) -> None:
    """Runs this module again with the peers' venv (a no-op when already there)."""
    python = ensure_peers()
    if Path(sys.prefix).resolve() == PEERS_VENV.resolve():
        return
    env = dict(os.environ)
    env.setdefault(PYTHON_ENV, sys.executable)
    env.setdefault(CTL_ENV, str(Path(sys.executable).parent / "ocp-agentctl"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    os.execve(str(python), [str(python), "-m", "bench.run", *argv], env)


def versions() -> dict[str, str]:
    agentd = subprocess.run(
        [os.environ[PYTHON_ENV], "-c", "import ocp_agentd; print(ocp_agentd.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    supervisor, circus = (_peers_ready(PEERS_VENV / "bin" / "python") or "? ?").split()
    return {"ocp-agentd": agentd, "supervisor": supervisor, "circus": circus}


def make_targets(plan: Plan, workdir: Path, n: int, reaper: Reaper) -> list[Target]:
    # Imported here: the peers' clients (circus's ZeroMQ) exist only in the peers' venv,
    # and the in-container run imports this module without them.
    from bench.peers import Circus, PolledSupervisord, Supervisord

    agentd = Agentd(
        workdir / f"agentd-{n}", n, reaper, os.environ[PYTHON_ENV], [os.environ[CTL_ENV]]
    )
    targets: list[Target] = [agentd]
    if n in plan.cgroup_off_sizes:
        targets.append(Agentd(workdir / f"agentd-nocg-{n}", n, reaper, os.environ[PYTHON_ENV],
                              [os.environ[CTL_ENV]], cgroup="off"))
    quiet = Supervisord(workdir / f"supervisord-{n}", n, reaper, PEERS_VENV)
    if "supervisord" in plan.peers or "supervisord+poll" in plan.peers:
        targets.append(quiet)
    if "supervisord+poll" in plan.peers and n in plan.poll_sizes:
        targets.append(PolledSupervisord(quiet))
    if "circus" in plan.peers:
        targets.append(Circus(workdir / f"circus-{n}", n, reaper, PEERS_VENV))
    targets.append(Floor(workdir / f"floor-{n}", n, reaper))
    return targets


def launched(targets: list[Target]) -> list[Target]:
    """The targets that are a process of their own (the poller variant shares one)."""
    from bench.peers import PolledSupervisord  # see make_targets

    return [t for t in targets if not isinstance(t, PolledSupervisord)]


def run_phase(
    plan: Plan, n: int, crowd: int, workdir: Path, reaper: Reaper, watcher: Watcher,
    results: report.Results,
) -> None:
    """Every figure at one N: launch all targets, stop their programs, then alternate."""
    phase = report.Phase(n, crowd)
    samples = results.phase(phase)
    targets = make_targets(plan, workdir / f"{n}-{crowd}", n, reaper)
    try:
        for target in launched(targets):
            log(f"{phase}: launching {target.label}")
            target.start()
            target.wait_reported()
            target.stop_all()
        reps = plan.reps[n]
        log(f"{phase}: start/status/restart/stop x{reps}")
        figures.cycle(targets, reps, watcher, samples, plan.status_seconds / reps)
        if n == plan.crash_n and crowd == 0:
            log(f"{phase}: crash to new pid, {plan.crash_kills} x {plan.crash_turns} turns")
            figures.crash(targets, plan.crash_kills, plan.crash_turns, watcher, samples,
                          plan.crash_min_age)
        if n == plan.single_n and crowd == 0:
            running = {t.label: figures.start_programs(t, watcher) for t in launched(targets)}
            log(f"{phase}: CLI status x{plan.cli_reps}")
            figures.cli_status(launched(targets), plan.cli_reps, samples)
            log(f"{phase}: idle over {plan.idle_seconds:g}s")
            figures.idle(launched(targets), plan.idle_seconds, samples)
            for target in launched(targets):
                figures.stop_programs(target, watcher, running[target.label])
    finally:
        for target in targets:
            target.stop()


def run_startup(plan: Plan, workdir: Path, reaper: Reaper, results: report.Results) -> None:
    """``startup``: exec of the supervisor (N programs configured) to its first answer."""
    samples = results.phase(report.Phase(plan.single_n, 0))
    log(f"start-up to first answer x{plan.startup_reps}")
    for i in range(plan.startup_reps):
        targets = launched(make_targets(plan, workdir / f"startup-{i}", plan.single_n, reaper))
        for target in targets if i % 2 == 0 else reversed(targets):
            try:
                samples[target.label]["startup"].append(target.start())
                target.wait_reported()  # a supervisor stopped mid-start may linger
            finally:
                target.stop()


def run_seed(plan: Plan, workdir: Path, reaper: Reaper, results: report.Results) -> None:
    log(f"the seed's restart task x{plan.seed_reps} (ocp-agentd only, demo programs)")
    got = seed.seed_task(workdir / "seed", reaper, plan.seed_reps, os.environ[PYTHON_ENV])
    samples = results.phase(report.Phase(got.programs, 0, "seed"))[AGENTD]
    samples["seed.post"] += got.post_seconds
    samples["seed.task"] += got.task_seconds
    samples["seed.direct"] += got.direct_seconds


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run; fails on regression")
    parser.add_argument("--reduced", action="store_true",
                        help="fewer sizes and repetitions (about half the full run's time)")
    parser.add_argument("--out", type=Path, help="markdown results file to write")
    parser.add_argument("--json", type=Path, help="every sample, as JSON, to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--sizes", help="comma-separated N, instead of the plan's ('' for none)")
    parser.add_argument("--crowded", help="comma-separated N to run with extra idle processes")
    parser.add_argument("--no-systemd", action="store_true", help="skip the container part")
    parser.add_argument("--systemd-sizes", help="comma-separated N for the container part")
    parser.add_argument("--add", type=Path, action="append", default=[],
                        help="a --json file of an earlier run (of the same commit) whose "
                             "samples join this run's, e.g. the parts measured before it "
                             "stopped; repeatable")
    args = parser.parse_args(argv)
    reexec_in_peers_venv(argv)

    plan = QUICK if args.quick else REDUCED if args.reduced else FULL
    if args.sizes is not None:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x)
        plan = Plan(**{**plan.__dict__, "sizes": sizes,
                       "reps": {n: plan.reps.get(n, 2) for n in sizes},
                       "crowded": tuple(n for n in plan.crowded if n in sizes)})
    if args.crowded is not None:
        crowded = tuple(int(x) for x in args.crowded.split(",") if x)
        plan = Plan(**{**plan.__dict__, "crowded": crowded, "extra": plan.extra or 1000})
    if args.systemd_sizes:
        plan = Plan(**{**plan.__dict__,
                       "systemd_sizes": tuple(int(x) for x in args.systemd_sizes.split(","))})
    out = args.out or (None if args.quick else BENCH_DIR / "RESULTS.md")

    watcher = Watcher()  # forked first: before any client library starts a thread
    mode = "quick" if args.quick else "reduced" if args.reduced else "full"
    env_lines = report.environment(REPO, versions(), mode)
    reaper = Reaper(secrets.token_hex(8))
    workdir = Path(tempfile.mkdtemp(prefix="ocp-bench-"))
    results = report.Results()
    for earlier in args.add:
        results.add_json(json.loads(earlier.read_text()))
        env_lines.append(f"- with the samples of {earlier.name} (an earlier run of this commit)")

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background, where SIGINT comes in ignored.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        for n in plan.sizes:
            run_phase(plan, n, 0, workdir, reaper, watcher, results)
        if plan.crowded:
            crowd = Floor(workdir / "crowd", plan.extra, reaper, IDLE_ARGV)
            log(f"{plan.extra} extra idle processes on the host")
            crowd.start()
            try:
                for n in plan.crowded:
                    run_phase(plan, n, plan.extra, workdir, reaper, watcher, results)
            finally:
                crowd.stop()
        if plan.startup_reps:
            run_startup(plan, workdir, reaper, results)
        if plan.seed_reps:
            run_seed(plan, workdir, reaper, results)
        if plan.systemd_sizes and not args.no_systemd:
            # Imported here: it loads the e2e suite's container module (the full run only).
            from bench import container

            container.run(
                os.environ[PYTHON_ENV], plan.systemd_sizes, plan.systemd_reps,
                (plan.crash_n, plan.crash_kills, max(2, plan.crash_turns // 2)), results, log,
            )
    finally:
        reaper.stop_all()
        watcher.close()
        if args.json:  # also after a failure: the samples taken so far
            args.json.write_text(json.dumps(results.as_json(), indent=1))
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    took = time.monotonic() - started
    env_lines.append(f"- run took {took:.0f} s; load average at end {report.load_average()}")
    log(f"done in {took:.0f}s")

    goals = report.goals(results)
    print("\n".join(env_lines))
    print()
    print(report.goals_table(goals))
    if out:
        out.write_text(report.results_markdown(env_lines, results, goals))
        log(f"wrote {out}")
    if plan.regress:
        failures = report.regressions(results)
        for failure in failures:
            log(f"REGRESSION: {failure}")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every process the benchmark started is stopped")
        sys.exit(130)
