"""The samples of a run, the issue's targets judged on them, and bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.figures import Samples, median, new_samples, p95

AGENTD, FLOOR, SYSTEMD = "ocp-agentd", "floor", "systemd"
NO_CGROUP = "ocp-agentd, cgroup off"  # the same daemon with [agent] cgroup = "off"
SUPERVISORD, POLLED, CIRCUS = "supervisord", "supervisord+poll", "circus"
PEERS = (SUPERVISORD, POLLED, CIRCUS, SYSTEMD)
COLUMNS = (AGENTD, NO_CGROUP, SUPERVISORD, POLLED, CIRCUS, SYSTEMD, FLOOR)


@dataclass(frozen=True, order=True)
class Phase:
    """Where samples were taken: N programs, ``crowd`` extra idle processes on the host,
    on the host itself or in the systemd container."""

    n: int
    crowd: int = 0
    where: str = "host"

    def __str__(self) -> str:
        if self.where == "seed":
            return f"{self.n} demo programs"
        text = f"N={self.n}"
        if self.crowd:
            text += f", +{self.crowd} idle"
        return text if self.where == "host" else f"{text} (container)"

    @property
    def host(self) -> str:
        parts = [self.where]
        if self.crowd:
            parts.append(f"+{self.crowd:,} idle procs")
        return ", ".join(parts)


class Results:
    """Phase -> label -> metric -> samples (seconds, or the metric's own unit)."""

    def __init__(self) -> None:
        self.phases: dict[Phase, Samples] = {}

    def phase(self, phase: Phase) -> Samples:
        return self.phases.setdefault(phase, new_samples())

    def get(self, phase: Phase, label: str, metric: str) -> list[float]:
        return list(self.phases.get(phase, {}).get(label, {}).get(metric, []))

    def value(
        self, phase: Phase, label: str, metric: str, stat: Callable = median
    ) -> float | None:
        samples = self.get(phase, label, metric)
        return stat(samples) if samples else None

    def sorted_phases(self, where: str = "host") -> list[Phase]:
        return sorted(p for p in self.phases if p.where == where)

    def add_json(self, rows: list[dict]) -> None:
        """Adds the samples of as_json()'s rows (of another run) to these."""
        for row in rows:
            phase = Phase(row["n"], row["crowd"], row["where"])
            self.phase(phase)[row["label"]][row["metric"]] += row["samples"]

    def as_json(self) -> list[dict]:
        return [
            {"n": p.n, "crowd": p.crowd, "where": p.where, "label": label,
             "metric": metric, "samples": values}
            for p, by_label in self.phases.items()
            for label, metrics in by_label.items()
            for metric, values in metrics.items()
        ]


def throughput(values: list[float]) -> float:
    """Sequential requests per second from their latencies."""
    return len(values) / sum(values)


# ---- formatting ----------------------------------------------------------------------------

def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":  # durations are kept in seconds, shown in ms
        value, unit = value * 1000, "ms"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 0.1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    if 0 < value < 1:
        return f"{value:.2f} (1/{1 / value:.1f})"
    return f"{value:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- the targets of the issue ----------------------------------------------------------------

@dataclass
class Goal:
    figure: str
    phase: Phase
    agentd: str
    peers: str
    floor: str
    ratio: str
    target: str
    met: bool | None


def _peers_text(values: dict[str, float | None], unit: str) -> str:
    return "; ".join(f"{label} {fmt(v, unit)}" for label, v in values.items() if v is not None)


def _compare(
    results: Results, phase: Phase, metric: str, peers: tuple[str, ...], stat: Callable = median,
    unit: str = "s",
) -> tuple[float | None, dict[str, float | None], float | None]:
    agentd = results.value(phase, AGENTD, metric, stat)
    values = {label: results.value(phase, label, metric, stat) for label in peers}
    floor = results.value(phase, FLOOR, metric, stat)
    return agentd, {k: v for k, v in values.items() if v is not None}, floor


def goals(results: Results) -> list[Goal]:
    """Every target of the benchmark issue that this run has the samples to judge."""
    out: list[Goal] = []
    host = [p for p in results.sorted_phases() if results.get(p, AGENTD, "stop.gone")]

    for phase in host:  # stop-all, pids gone: <= supervisord (both), <= 3x floor
        a, peers, floor = _compare(results, phase, "stop.gone", (SUPERVISORD, POLLED, CIRCUS))
        sup = min((v for k, v in peers.items() if k in (SUPERVISORD, POLLED)), default=None)
        met = None if a is None or sup is None or floor is None else a <= sup and a <= 3 * floor
        out.append(Goal(
            "stop all: old pids gone", phase, fmt(a, "s"), _peers_text(peers, "s"),
            fmt(floor, "s"),
            f"{fmt_ratio(_ratio(a, sup))} of supervisord; {fmt_ratio(_ratio(a, floor))} floor",
            "≤ supervisord, ≤ 3x floor", met))
    for phase in host:  # restart-all, new pids running: <= 1/2 best peer at N=50, 200
        if phase.n not in (50, 200):
            continue
        a, peers, floor = _compare(results, phase, "restart.new", (SUPERVISORD, POLLED, CIRCUS))
        best = min(peers.values(), default=None)
        met = None if a is None or best is None else a <= best / 2
        out.append(Goal(
            "restart all: new pids running", phase, fmt(a, "s"), _peers_text(peers, "s"),
            fmt(floor, "s"), f"{fmt_ratio(_ratio(a, best))} of best peer", "≤ 1/2 best peer",
            met))
    for phase in host:  # crash to new pid: p50 <= 5 ms, p95 <= 15 ms, below every peer
        if not results.get(phase, AGENTD, "crash"):
            continue
        for stat, name, limit in ((median, "p50", 0.005), (p95, "p95", 0.015)):
            a, peers, floor = _compare(results, phase, "crash", (SUPERVISORD, POLLED, CIRCUS),
                                       stat)
            best = min(peers.values(), default=None)
            met = None if a is None or best is None else a <= limit and a < best
            out.append(Goal(
                f"crash to new pid, {name}", phase, fmt(a, "s"), _peers_text(peers, "s"),
                fmt(floor, "s"), f"{fmt_ratio(_ratio(a, best))} of best peer",
                f"≤ {limit * 1000:g} ms, below every peer", met))
    for phase in host:  # status: >= 10x supervisord at N=50; <= 10 ms at N=1000
        if phase.n == 50 and not phase.crowd:
            a, peers, floor = _compare(results, phase, "status", (SUPERVISORD, CIRCUS),
                                       throughput, "req/s")
            sup = peers.get(SUPERVISORD)
            met = None if a is None or sup is None else a >= 10 * sup
            out.append(Goal(
                "status throughput", phase, fmt(a, "req/s"), _peers_text(peers, "req/s"),
                fmt(floor, "req/s"), f"{fmt_ratio(_ratio(a, sup))} supervisord",
                "≥ 10x supervisord", met))
        if phase.n == 1000:
            a, peers, floor = _compare(results, phase, "status", (SUPERVISORD, CIRCUS))
            out.append(Goal(
                "status latency, median", phase, fmt(a, "s"), _peers_text(peers, "s"),
                fmt(floor, "s"), fmt_ratio(_ratio(a, peers.get(SUPERVISORD))) + " supervisord",
                "≤ 10 ms", None if a is None else a <= 0.010))
    for phase in host:  # the one-off figures
        if results.get(phase, AGENTD, "startup"):
            a, peers, floor = _compare(results, phase, "startup", (SUPERVISORD, CIRCUS))
            sup = peers.get(SUPERVISORD)
            out.append(Goal(
                "daemon start to first answer", phase, fmt(a, "s"), _peers_text(peers, "s"),
                fmt(floor, "s"), f"{fmt_ratio(_ratio(a, sup))} supervisord", "≤ supervisord",
                None if a is None or sup is None else a <= sup))
        if results.get(phase, AGENTD, "cli"):
            a, peers, floor = _compare(results, phase, "cli", (SUPERVISORD, CIRCUS))
            sup = peers.get(SUPERVISORD)
            out.append(Goal(
                "`ocp-agentctl status` (exec to exit)", phase, fmt(a, "s"),
                _peers_text(peers, "s"), fmt(floor, "s") + " (/bin/true)",
                f"{fmt_ratio(_ratio(a, sup))} supervisorctl", "≤ 1/2 supervisorctl",
                None if a is None or sup is None else a <= sup / 2))
        if results.get(phase, AGENTD, "idle.cpu_pct"):
            a, peers, floor = _compare(results, phase, "idle.cpu_pct", (SUPERVISORD, CIRCUS),
                                       unit="%")
            worst = min(peers.values(), default=None)
            out.append(Goal(
                "idle CPU", phase, fmt(a, "%"), _peers_text(peers, "%"), fmt(floor, "%"),
                f"{fmt_ratio(_ratio(a, worst))} of the lowest peer", "≤ every peer",
                None if a is None or worst is None else a <= worst))
            a, peers, floor = _compare(results, phase, "rss_mib", (SUPERVISORD, CIRCUS))
            out.append(Goal(
                "RSS", phase, fmt(a, "MiB"), _peers_text(peers, "MiB"), fmt(floor, "MiB"),
                fmt_ratio(_ratio(a, peers.get(SUPERVISORD))) + " supervisord", "≤ 45 MiB",
                None if a is None else a <= 45))
            keepers = results.value(phase, AGENTD, "helpers.uss_mib", median)
            if keepers is not None:
                own = results.value(phase, AGENTD, "uss_mib", median)
                a, peers, _ = _compare(results, phase, "uss_mib", (SUPERVISORD, CIRCUS))
                whole = None if own is None else own + keepers
                out.append(Goal(
                    "USS with the log keepers (ocp-agentd's output runs through one keeper "
                    "process per program; the peers' in their own process)", phase,
                    f"{fmt(whole, 'MiB')} ({fmt(own, 'MiB')} + keepers {fmt(keepers, 'MiB')})",
                    _peers_text(peers, "MiB"), "—",
                    fmt_ratio(_ratio(whole, peers.get(SUPERVISORD))) + " supervisord", "—",
                    None))
    for phase in host:  # CPU seconds per restart-all <= supervisord's
        a, peers, floor = _compare(results, phase, "restart.cpu", (SUPERVISORD, POLLED, CIRCUS))
        sup = peers.get(SUPERVISORD)
        out.append(Goal(
            "CPU per restart all (supervisor process)", phase, fmt(a, "s"),
            _peers_text(peers, "s"), fmt(floor, "s"), f"{fmt_ratio(_ratio(a, sup))} supervisord",
            "≤ supervisord", None if a is None or sup is None else a <= sup))
    out += cgroup_goals(results)
    out += container_goals(results)
    out += seed_goals(results)
    return out


def seed_goals(results: Results) -> list[Goal]:
    """The seed's restart task (ocp-agentd only): its answer, and its cost beyond the
    same steps called directly (the programs' own readiness)."""
    out: list[Goal] = []
    for phase in results.sorted_phases("seed"):
        post = results.value(phase, AGENTD, "seed.post")
        task = results.value(phase, AGENTD, "seed.task")
        direct = results.value(phase, AGENTD, "seed.direct")
        if post is None or task is None or direct is None:
            continue
        out.append(Goal("seed task: POST answer", phase, fmt(post, "s"), "—", "—", "—",
                        "< 20 ms", post < 0.020))
        out.append(Goal(
            "seed task: whole task beyond the same steps called directly", phase,
            f"{fmt(task - direct, 's')} ({fmt(task, 's')} - {fmt(direct, 's')})", "—", "—",
            "—", "< 1 s", task - direct < 1.0))
    return out


def cgroup_goals(results: Results) -> list[Goal]:
    """Issue 12's goal: with cgroups, stop all's pids-gone time at N=200 does not grow with
    the host's process count (1,000 extra idle processes against none)."""
    out: list[Goal] = []
    for label in (AGENTD, NO_CGROUP):
        quiet = results.value(Phase(200), label, "stop.gone")
        crowded = [p for p in results.sorted_phases() if p.n == 200 and p.crowd]
        busy = results.value(crowded[0], label, "stop.gone") if crowded else None
        if quiet is None or busy is None:
            continue
        growth = busy / quiet
        out.append(Goal(
            f"stop all, pids gone: +{crowded[0].crowd:,} idle processes against none "
            f"({label})", crowded[0], f"{fmt(busy, 's')} against {fmt(quiet, 's')}", "—",
            "—", f"{growth:.2f}x", "does not grow (≤ 1.2x)" if label == AGENTD else "—",
            growth <= 1.2 if label == AGENTD else None))
    return out


def container_goals(results: Results) -> list[Goal]:
    """ocp-agentd against systemd, both in the Debian 12 container on the same programs."""
    out: list[Goal] = []
    for phase in results.sorted_phases("container"):
        for metric, figure, stat, unit in (
            ("stop.gone", "stop all: old pids gone", median, "s"),
            ("restart.new", "restart all: new pids running", median, "s"),
            ("crash", "crash to new pid, p50", median, "s"),
            ("crash", "crash to new pid, p95", p95, "s"),
            ("status", "status latency, median", median, "s"),
            ("cli", "CLI status (ocp-agentctl status / systemctl show)", median, "s"),
            ("restart.cpu", "CPU per restart all (supervisor process)", median, "s"),
            ("idle.cpu_pct", "idle CPU (systemd: its pid 1)", median, "%"),
        ):
            a, peers, _ = _compare(results, phase, metric, (SYSTEMD,), stat)
            s = peers.get(SYSTEMD)
            if a is None or s is None:
                continue
            if metric == "cli":  # the target is against supervisorctl; shown here
                target, met = "— (beside supervisorctl's target)", None
            elif metric == "restart.new":
                target, met = "≤ 1/2 systemd", a <= s / 2
            else:
                target, met = "≤ systemd", a <= s
            out.append(Goal(
                figure, phase, fmt(a, unit), _peers_text(peers, unit), "—",
                f"{fmt_ratio(_ratio(a, s))} systemd", target, met))
    return out


def goals_table(rows: list[Goal]) -> str:
    lines = [
        "| figure | N, where | ocp-agentd | peers | floor | ratio | target | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in rows:
        met = "—" if g.met is None else ("yes" if g.met else "**no**")
        lines.append(f"| {g.figure} | {g.phase} | {g.agentd} | {g.peers} | {g.floor} | "
                     f"{g.ratio} | {g.target} | {met} |")
    return "\n".join(lines)


# ---- every figure, every N -------------------------------------------------------------------

METRICS = (
    ("stop.gone", "stop all: old pids gone", "s", median),
    ("stop.reply", "stop all: reply", "s", median),
    ("start.new", "start all: new pids running", "s", median),
    ("start.reported", "start all: status shows RUNNING", "s", median),
    ("start.reply", "start all: reply", "s", median),
    ("restart.gone", "restart all: old pids gone", "s", median),
    ("restart.new", "restart all: new pids running", "s", median),
    ("restart.reported", "restart all: status shows RUNNING", "s", median),
    ("restart.reply", "restart all: reply", "s", median),
    ("restart.settled", "restart all: settled (ocp-agentd: next standbys made)", "s", median),
    ("restart.cpu", "restart all: supervisor CPU", "s", median),
    ("crash", "crash to new pid, p50", "s", median),
    ("crash", "crash to new pid, p95", "s", p95),
    ("status", "status request, median latency", "s", median),
    ("startup", "daemon start to first answer", "s", median),
    ("cli", "CLI status, exec to exit", "s", median),
    ("idle.cpu_pct", "idle CPU", "%", median),
    ("rss_mib", "RSS", "MiB", median),
    ("uss_mib", "USS", "MiB", median),
    ("helpers.rss_mib", "RSS of the log keepers (sum)", "MiB", median),
    ("helpers.uss_mib", "USS of the log keepers (sum)", "MiB", median),
)


def figures_table(results: Results, where: str) -> str:
    phases = results.sorted_phases(where)
    columns = [c for c in COLUMNS if any(c in results.phases[p] for p in phases)]
    lines = [
        "| figure | N, host | " + " | ".join(columns) + " | ocp-agentd / best peer | "
        "ocp-agentd / floor |",
        "|---|---|" + "---|" * (len(columns) + 2),
    ]
    for metric, figure, unit, stat in METRICS:
        for phase in phases:
            values = {c: results.value(phase, c, metric, stat) for c in columns}
            if values.get(AGENTD) is None:
                continue
            peer_values = [v for c, v in values.items() if c in PEERS and v is not None]
            best = min(peer_values, default=None)
            cells = " | ".join(fmt(values[c], unit) for c in columns)
            lines.append(
                f"| {figure} | {phase.n}, {phase.host} | {cells} | "
                f"{fmt_ratio(_ratio(values[AGENTD], best))} | "
                f"{fmt_ratio(_ratio(values[AGENTD], values.get(FLOOR)))} |"
            )
    return "\n".join(lines)


def peer_wins(results: Results) -> list[str]:
    """Every figure (median, or p95 where named) in which some peer beats ocp-agentd."""
    wins = []
    for where in ("host", "container"):
        for metric, figure, unit, stat in METRICS:
            for phase in results.sorted_phases(where):
                a = results.value(phase, AGENTD, metric, stat)
                if a is None:
                    continue
                better = {
                    label: v for label in PEERS
                    if (v := results.value(phase, label, metric, stat)) is not None and v < a
                }
                if better:
                    others = ", ".join(f"{k} {fmt(v, unit)}" for k, v in better.items())
                    wins.append(f"{figure}, {phase}: ocp-agentd {fmt(a, unit)}; {others}")
    return wins


# ---- bench-quick: ratios that must not regress -------------------------------------------------

# (metric, stat, other label, limit, what): fails when ocp-agentd / other > limit.
# Generous on purpose: CI machines are noisy, and each figure is the median of
# alternated samples. They catch a change of kind (a lost pidfd wake-up, a status path
# that grew a /proc scan), not a few per cent.
REGRESSION_LIMITS = (
    ("crash", median, SUPERVISORD, 0.25, "crash to new pid vs supervisord's loop"),
    ("crash", median, FLOOR, 30.0, "crash to new pid vs the floor"),
    ("stop.gone", median, FLOOR, 40.0, "stop all, pids gone vs the floor"),
    ("restart.new", median, FLOOR, 30.0, "restart all, new pids running vs the floor"),
    ("status", median, SUPERVISORD, 0.6, "status latency vs supervisord's"),
)


def regressions(results: Results) -> list[str]:
    """The REGRESSION_LIMITS this run breaks, as sentences (empty: none)."""
    failures = []
    for phase in results.sorted_phases():
        for metric, stat, other, limit, what in REGRESSION_LIMITS:
            a = results.value(phase, AGENTD, metric, stat)
            b = results.value(phase, other, metric, stat)
            if a is None or b is None:
                continue
            if a / b > limit:
                failures.append(f"{what} at {phase}: {fmt(a, 's')} / {fmt(b, 's')} = "
                                f"{a / b:.2f} > {limit:g}")
    return failures


# ---- the file ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def _process_count() -> int:
    return sum(entry.isdigit() for entry in os.listdir("/proc"))


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def environment(repo: Path, versions: dict[str, str], mode: str) -> list[str]:
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores ({_cpu_model()}), {platform.system()} "
        f"{platform.release()}; load average at start {load_average()}; "
        f"{_process_count()} processes on the host at start",
        f"- python: {platform.python_version()}",
        *(f"- {name}: {version}" for name, version in versions.items()),
        f"- commit: {_git_commit(repo)}; mode: {mode}",
    ]


METHOD = """\
How it is measured (see also the README's Benchmark section):

- Every target runs the same N programs (`/bin/sleep 100000`, output to files, counted as
  started once spawned, SIGTERM to stop), configured as its documentation ships it
  otherwise. The figures alternate the targets (A B C, C B A, ...), and each target's turn
  runs with the other targets' programs stopped.
- **Effects are read from /proc by the bench**, by a watching process of its own:
  "old pids gone" through a pidfd per old pid, waited on with poll(2) (the kernel's
  wake-up, tens of microseconds); "new pids running" from the kernel's exec events on
  the host, and by a tight /proc scan in the container (a new pid counts once its
  command line is the program's and its environment carries the run's mark; resolution
  one scan, given below, plus 0.1 ms). The target's reply to its call, and when its own
  status first shows the programs RUNNING (asked back to back once the effect is seen),
  are reported beside the effect, labelled.
- Status, restart all, stop all and crash each begin from a settled target: ocp-agentd
  makes each program's next main (a held shell in its other cgroup slot) half a second
  after a start, and the bench waits until all N exist ("restart all: settled" says
  when, after a restart; the peers have nothing to wait for).
- restart all = the target's stop-all call, then its start-all call (what `supervisorctl
  restart all` does). CPU per restart all = CPU time of the supervisor's own process
  (schedstat), from the first call until both the reply and the effect are in, plus
  while it settles (ocp-agentd: making the N next standbys).
- supervisord+poll = the same supervisord while another client asks `getState` every
  10 ms (each request wakes its loop). circus is driven by its own client over ZeroMQ; its
  one status call for all watchers carries no pids. The floor is `bench/floor.py`:
  `os.posix_spawn`, `kill`, pidfd and `waitid`, nothing else; its CLI figure is one exec
  of `/bin/true`.
- Status = one request for every program's state (ocp-agentd `GET /api/v1/processes`,
  supervisord `getAllProcessInfo`, circus `status`, systemd `systemctl show`),
  sequential, on one connection; throughput = requests / time spent in them."""


def results_markdown(env_lines: list[str], results: Results, goal_rows: list[Goal]) -> str:
    parts = [
        "# Benchmark: ocp-agentd against supervisord, circus and systemd, with the floor",
        "",
        "Written by `make bench` (`python -m bench.run`); see the README's Benchmark section.",
        "",
        *env_lines,
        "",
        "## The targets of the benchmark issue",
        "",
        goals_table(goal_rows),
        "",
        "## Every figure (medians unless named)",
        "",
        figures_table(results, "host"),
    ]
    if results.sorted_phases("container"):
        parts += ["", "## In the Debian 12 container: systemd and ocp-agentd", "",
                  figures_table(results, "container")]
    scans = [
        f"{phase}: {median(v):.2f} ms"
        for phase in results.sorted_phases() + results.sorted_phases("container")
        if (v := [x for by in results.phases[phase].values()
                  for x in by.get("resolution.pass_ms", [])])
    ]
    wins = peer_wins(results)
    parts += ["", "## Where a peer is ahead", ""]
    parts += [f"- {line}" for line in wins] if wins else ["- nowhere in this run"]
    parts += ["", METHOD, "", "\"New pids running\" was detected from the kernel's exec "
              "events where no /proc scan is listed; one /proc scan took (median) "
              + ("; ".join(scans) if scans else "— (none was needed)") + "."]
    return "\n".join(parts) + "\n"
