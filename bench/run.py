"""ocp-agentd against supervisord 4.3, side by side in one run.

    python -m bench.run            # the full benchmark; writes bench/RESULTS.md
    python -m bench.run --quick    # CI-sized: small N, few repetitions, asserts no speed

Installs supervisor 4.3 into bench/.venv-supervisor when missing. Every process it
starts is stopped at the end, also on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
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
from bench.report import Row
from bench.targets import Agentd, Supervisord, Target

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SUPERVISOR_VENV = BENCH_DIR / ".venv-supervisor"
SUPERVISOR_REQ = "supervisor>=4.3,<4.4"
AGENTD, SUPERVISORD = Agentd.label, Supervisord.label


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]  # N of the phases
    crash_n: int  # the phase that measures crash to new pid
    idle_n: int  # the phase that measures idle cost
    reps: int  # restart all / stop all
    crash_reps: int
    status_seconds: float
    idle_seconds: float
    seed_reps: int


FULL = Plan((10, 50), 10, 50, 7, 20, 5.0, 30.0, 20)
QUICK = Plan((3,), 3, 3, 2, 3, 0.5, 2.0, 2)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _supervisord_version(supervisord: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(supervisord), "--version"], capture_output=True, text=True, timeout=60
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_supervisor() -> str:
    """supervisord 4.3 in its own venv, (re)built when missing or broken; its version."""
    supervisord = SUPERVISOR_VENV / "bin" / "supervisord"
    version = _supervisord_version(supervisord) if supervisord.exists() else None
    if version is None or not version.startswith("4.3"):
        log(f"installing {SUPERVISOR_REQ} into {SUPERVISOR_VENV}")
        shutil.rmtree(SUPERVISOR_VENV, ignore_errors=True)
        python = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([python, "-m", "venv", str(SUPERVISOR_VENV)], check=True)
        pip = [str(SUPERVISOR_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, SUPERVISOR_REQ], check=True)
        version = _supervisord_version(supervisord)
    if version is None or not version.startswith("4.3"):
        raise SystemExit(f"{supervisord} does not run as supervisor 4.3 (got {version!r})")
    return version


def _ms(samples: dict[str, list[float]], label: str, stat=figures.median) -> float | None:
    return stat(samples[label]) * 1000 if label in samples else None


def _met(a: float | None, s: float | None, check) -> bool | None:
    return None if a is None or s is None else bool(check(a, s))


def _note_samples(notes: list[str], figure: str, n: int, got: dict[str, list[float]]) -> None:
    """Every sample of a timed figure, in ms, so the spread shows beside the median."""
    parts = [
        f"{label} " + " ".join(f"{x * 1000:.1f}" for x in values) for label, values in got.items()
    ]
    notes.append(f"{figure}, N={n}, ms: " + "; ".join(parts))


def run_phase(
    plan: Plan,
    n: int,
    workdir: Path,
    reaper: Reaper,
    rows: list[Row],
    notes: list[str],
    only: str | None,
) -> None:
    targets: list[Target] = [
        Agentd(workdir / f"agentd-{n}", n, reaper),
        Supervisord(workdir / f"supervisord-{n}", n, reaper, SUPERVISOR_VENV),
    ]
    targets = [t for t in targets if only in (None, t.label)]
    try:
        for target in targets:
            log(f"N={n}: starting {target.label}")
            target.start()
        big = n == max(plan.sizes)

        for figure, measure, text, limit in (
            ("restart all", figures.restart_all, "≤ 1/5", 0.2),
            ("stop all", figures.stop_all, "≤ 1/10", 0.1),
        ):
            log(f"N={n}: {figure} x{plan.reps}")
            got = measure(targets, plan.reps)
            _note_samples(notes, figure, n, got)
            a, s = _ms(got, AGENTD), _ms(got, SUPERVISORD)
            rows.append(Row(f"{figure}, median", n, a, s, "ms", *_target(big, a, s, text, limit)))

        if n == plan.crash_n:
            log(f"N={n}: crash to new pid x{plan.crash_reps}")
            got = figures.crash_to_new_pid(targets, plan.crash_reps)
            _note_samples(notes, "crash to new pid", n, got)
            a, s = _ms(got, AGENTD), _ms(got, SUPERVISORD)
            met = _met(a, s, lambda a, s: a <= s and a < 10)
            rows.append(
                Row("crash to new pid, median", n, a, s, "ms", "≤ supervisord and < 10 ms", met)
            )
            a, s = _ms(got, AGENTD, figures.p95), _ms(got, SUPERVISORD, figures.p95)
            rows.append(Row("crash to new pid, p95", n, a, s, "ms"))

        log(f"N={n}: status throughput {plan.status_seconds:g}s each")
        rate = figures.status_throughput(targets, plan.status_seconds)
        a, s = rate.get(AGENTD), rate.get(SUPERVISORD)
        met = _met(a, s, lambda a, s: a >= 10 * s) if big else None
        rows.append(Row("status throughput", n, a, s, "req/s", "≥ 10x" if big else "—", met))

        if n == plan.idle_n:
            log(f"N={n}: idle cost over {plan.idle_seconds:g}s")
            idle = figures.idle_cost(targets, plan.idle_seconds)
            a_idle, s_idle = idle.get(AGENTD, {}), idle.get(SUPERVISORD, {})
            a, s = a_idle.get("cpu_percent"), s_idle.get("cpu_percent")
            met = _met(a, s, lambda a, s: a <= s)
            rows.append(Row("idle CPU", n, a, s, "%", "≤ supervisord", met))
            a = a_idle.get("rss_mib")
            met = None if a is None else a < 45
            rows.append(Row("RSS", n, a, s_idle.get("rss_mib"), "MiB", "goal < 45 MiB", met))
            rows.append(Row("USS", n, a_idle.get("uss_mib"), s_idle.get("uss_mib"), "MiB"))
    finally:
        for target in targets:
            target.stop()


def run_seed(
    plan: Plan, workdir: Path, reaper: Reaper, rows: list[Row], notes: list[str]
) -> None:
    log(f"the seed's restart task x{plan.seed_reps} (ocp-agentd only, demo programs)")
    got = seed.seed_task(workdir / "seed", reaper, plan.seed_reps)
    n = got.programs
    samples = {"POST": got.post_seconds, "task": got.task_seconds, "direct": got.direct_seconds}
    _note_samples(notes, "seed task", n, samples)
    post, task, direct = (figures.median(values) * 1000 for values in samples.values())
    rows.append(Row("seed task: POST answer, median", n, post, None, "ms", "< 20 ms", post < 20))
    rows.append(Row("seed task: whole task, median", n, task, None, "ms"))
    rows.append(Row("seed task: same steps called directly, median", n, direct, None, "ms"))
    overhead = task - direct
    rows.append(
        Row("seed task: beyond the programs' readiness", n, overhead, None, "ms", "< 1 s",
            overhead < 1000)
    )


def _target(
    big: bool, a: float | None, s: float | None, text: str, limit: float
) -> tuple[str, bool | None]:
    if not big:
        return "—", None
    return text, _met(a, s, lambda a, s: a <= limit * s)


def agentd_version() -> str:
    from ocp_agentd import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run, no speed asserted")
    parser.add_argument("--out", type=Path, help="markdown results file to write")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--only", choices=(AGENTD, SUPERVISORD), help="run one side only")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out or (None if args.quick or args.only else BENCH_DIR / "RESULTS.md")

    versions = {
        "ocp-agentd": agentd_version(),
        "supervisor": ensure_supervisor(),
    }
    env_lines = report.environment(REPO, versions, "quick" if args.quick else "full")
    reaper = Reaper(secrets.token_hex(8))
    workdir = Path(tempfile.mkdtemp(prefix="ocp-bench-"))
    rows: list[Row] = []
    notes: list[str] = []

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background, where SIGINT comes in ignored.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        for n in plan.sizes:
            run_phase(plan, n, workdir, reaper, rows, notes, args.only)
        if args.only in (None, AGENTD):
            run_seed(plan, workdir, reaper, rows, notes)
    finally:
        reaper.stop_all()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if args.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    load = report.load_average()
    env_lines.append(f"- run took {time.monotonic() - started:.0f} s; load average at end {load}")
    log(f"done in {time.monotonic() - started:.0f}s")

    print("\n".join(env_lines))
    print()
    print(report.table(rows))
    if out:
        out.write_text(report.results_markdown(env_lines, rows, notes))
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every process the benchmark started is stopped")
        sys.exit(130)
