"""scripts/startup_costs.py (README, Benchmark): what start-up and resident memory are
made of, and the floor the daemon's libraries set. Run once, as the README shows it; its
figures are not judged here (bench/ does that), only that each one is measured."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "startup_costs.py"
sys.path.insert(0, str(SCRIPT.parent))
import startup_costs  # noqa: E402 - from scripts/, after the path above


def _row(lines: list[str], label: str) -> list[float]:
    """The figures of the table row that starts with label ("-" left out)."""
    line = next(line for line in lines if line.startswith(label + " "))
    return [float(word) for word in line.removeprefix(label).split() if word != "-"]


def test_the_start_up_cost_script_measures_each_import_and_both_starts() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--runs", "1"],
                            capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    labels = ["interpreter", *(label for label, _ in startup_costs.STEPS)]
    rows = [_row(lines, label) for label in labels]
    # interpreter: VmRSS and its split; each step: ms, VmRSS after it, what it added.
    assert [len(row) for row in rows] == [4] + [5] * len(startup_costs.STEPS), result.stdout
    assert all(row[0] > 0 for row in rows), result.stdout
    resident = [row[-4] for row in rows]
    # Importing more never leaves the process smaller (0.1 MiB of measuring noise).
    assert all(later >= earlier - 0.1 for earlier, later in itertools.pairwise(resident)), (
        result.stdout)
    floor_ms, floor_rss = _row(lines, "library floor")
    daemon_ms, daemon_rss = _row(lines, "ocp-agentd")
    assert floor_ms > 0 and daemon_ms > 0, result.stdout
    # The daemon loads everything the floor does, and its own modules on top.
    assert daemon_rss > floor_rss, result.stdout
