"""The systemd part of the run: boots the e2e suite's Debian 12 container
(tests/e2e/nspawn.py), copies the bench, the daemon and its libraries in, and runs
``python3.11 -m bench.systemd`` there (systemd and ocp-agentd on the same programs).

The container's Python is Debian's 3.11, the same minor version as the project's venv,
so the venv's site-packages (compiled wheels included) serve it on PYTHONPATH; the
daemon runs from source, as on the host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.report import Phase, Results

REPO = Path(__file__).resolve().parent.parent
INSIDE = "/root/bench"
RUN_TIMEOUT = 1800.0

sys.path.insert(0, str(REPO / "tests" / "e2e"))
import nspawn  # noqa: E402  (the e2e suite's container, not a package)


def site_packages(python: str) -> Path:
    """The purelib directory of the venv that ``python`` belongs to."""
    probe = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def run(
    python: str, sizes: tuple[int, ...], reps: int, crash: tuple[int, int, int],
    results: Results, log: Callable[[str], None],
) -> None:
    """Measures systemd and ocp-agentd in a fresh container at each N; adds the samples
    to ``results`` under Phase(n, 0, "container")."""
    nspawn.ensure_host_packages()
    nspawn.clean_stale()
    base = nspawn.debian_tree()
    with nspawn.Container(base) as box:
        src = box.path(f"{INSIDE}/src")
        src.mkdir(parents=True)
        ignore = shutil.ignore_patterns(".venv*")
        for package in ("bench", "ocp_agentd"):
            shutil.copytree(REPO / package, src / package, ignore=ignore)
        shutil.copytree(site_packages(python), box.path(f"{INSIDE}/site"), ignore=ignore,
                        symlinks=True)
        log(f"container: systemd and ocp-agentd at N={','.join(map(str, sizes))}")
        done = box.run(
            "env", f"PYTHONPATH={INSIDE}/src:{INSIDE}/site", "python3.11", "-m", "bench.systemd",
            "--sizes", ",".join(map(str, sizes)), "--reps", str(reps),
            "--crash", ",".join(map(str, crash)), "--json", f"{INSIDE}/out.json",
            check=False, timeout=RUN_TIMEOUT,
        )
        sys.stderr.write(done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"the container part exited {done.returncode}:\n"
                               f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
        for row in json.loads(box.path(f"{INSIDE}/out.json").read_text()):
            phase = Phase(row["n"], row["crowd"], "container")
            results.phase(phase)[row["label"]][row["metric"]] += row["samples"]
