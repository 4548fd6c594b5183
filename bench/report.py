"""The results table (markdown) and bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


@dataclass
class Row:
    figure: str
    n: int | str
    agentd: float | None
    supervisord: float | None
    unit: str
    target: str = "—"
    met: bool | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.agentd is not None and self.supervisord:
            self.ratio = self.agentd / self.supervisord


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    if value < 1:
        return f"{value:.3f} (1/{1 / value:.1f})" if value > 0 else "0"
    return f"{value:.1f}x"


def table(rows: list[Row]) -> str:
    lines = [
        "| figure | N | ocp-agentd | supervisord | ratio | target | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        met = "—" if row.met is None else ("yes" if row.met else "**no**")
        lines.append(
            f"| {row.figure} | {row.n} | {_num(row.agentd, row.unit)} | "
            f"{_num(row.supervisord, row.unit)} | {_ratio(row.ratio)} | {row.target} | {met} |"
        )
    return "\n".join(lines)


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
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def environment(repo: Path, versions: dict[str, str], mode: str) -> list[str]:
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} cores ({_cpu_model()}), {platform.system()} "
        f"{platform.release()}; load average at start {load_average()}",
        f"- python: {platform.python_version()}",
        *(f"- {name}: {version}" for name, version in versions.items()),
        f"- commit: {_git_commit(repo)}; mode: {mode}",
    ]


METHOD = """\
How: both supervisors run the same N programs (`/bin/sleep 100000`, output to files,
counted as started once spawned: supervisord `startsecs=0`, ocp-agentd `start_seconds=0`,
no ports) and are driven over their unix socket by one keep-alive `http.client`
connection (supervisord: XML-RPC, ocp-agentd: its JSON API). Figures alternate the two
(A B, B A, ...). Restart all = stop-all + start-all calls, done when the supervisor's status
shows every program RUNNING under a new pid; stop all is done when none of the old pids
runs (/proc); crash = `kill -9` of one program until /proc shows a new pid running its
command (polled every ~0.2 ms); idle cost = CPU time of the supervisor process itself
(psutil) over a window with nothing happening, both watched at once. Ratio = ocp-agentd /
supervisord."""


def results_markdown(env_lines: list[str], rows: list[Row], notes: list[str]) -> str:
    parts = [
        "# Benchmark: ocp-agentd against supervisord",
        "",
        "Written by `make bench` (`python -m bench.run`); see the README's Benchmark section.",
        "",
        *env_lines,
        "",
        table(rows),
        "",
        METHOD,
    ]
    if notes:
        parts += ["", "Every sample:", "", *(f"- {note}" for note in notes)]
    return "\n".join(parts) + "\n"
