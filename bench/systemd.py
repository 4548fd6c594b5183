"""systemd as a peer, and the part of the run that happens inside the Debian 12 container.

    python3.11 -m bench.systemd --sizes 10,50 --reps 3 --json OUT   # inside the container

systemd runs the N programs as instances of one template unit, ``bench@.service``
(``/bin/sleep 100000``, ``Type=simple`` so started once spawned, SIGTERM then 10 s,
``Restart=on-failure`` with ``RestartSec=0`` instead of the default 100 ms, output
appended to files), driven with ``systemctl`` as an operator would: one ``systemctl
start``/``stop`` naming all N units (it waits for every job), and ``systemctl show``
for the status. ocp-agentd runs in the same container on the same programs, driven as on
the host; the figures alternate the two and are read from the container's /proc by the
same watcher. bench/container.py boots the container and starts this.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import figures
from bench.procs import Reaper
from bench.report import Phase, Results
from bench.targets import PROGRAM_ARGV, Agentd, States, Target
from bench.watch import Watcher

UNIT_DIR = Path("/etc/systemd/system")
TEMPLATE = "bench@.service"
UNIT = """[Unit]
Description=benchmark program %i
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart={argv}
Environment={mark}
Restart=on-failure
RestartSec=0
KillSignal=SIGTERM
TimeoutStopSec=10
StandardOutput=append:{logs}/%i.stdout.log
StandardError=append:{logs}/%i.stderr.log
"""


def systemctl(*args: str) -> str:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"systemctl {' '.join(args[:3])} ... exited {done.returncode}: "
                           f"{done.stderr[-1000:]}")
    return done.stdout


class Systemd(Target):
    """The container's systemd (pid 1) with N instances of bench@.service."""

    label = "systemd"

    def __init__(self, workdir: Path, n: int, reaper: Reaper) -> None:
        super().__init__(workdir, n, reaper)
        self.units = [f"bench@{name}.service" for name in self.names]

    def supervisor_pids(self) -> list[int]:
        return [1]

    def write_config(self) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        text = UNIT.format(argv=" ".join(PROGRAM_ARGV), mark=self.mark, logs=logs)
        (UNIT_DIR / TEMPLATE).write_text(text)
        systemctl("daemon-reload")

    def argv(self) -> list[str]:
        return []

    def start(self) -> float:
        self.write_config()
        self.start_all()
        return 0.0

    def check_alive(self) -> None:
        pass

    def ping(self) -> None:
        systemctl("is-system-running")

    def states(self) -> States:
        out = systemctl("show", "-p", "Id,ActiveState,SubState,MainPID", *self.units)
        states: States = {}
        for block in out.strip().split("\n\n"):
            fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
            name = fields["Id"].removeprefix("bench@").removesuffix(".service")
            running = fields["ActiveState"] == "active" and fields["SubState"] == "running"
            pid = int(fields["MainPID"]) or None
            states[name] = ("RUNNING" if running else fields["ActiveState"].upper(), pid)
        return states

    def stop_all(self) -> None:
        systemctl("stop", *self.units)

    def start_all(self) -> None:
        systemctl("start", *self.units)

    def close_client(self) -> None:
        pass

    def cli_status(self) -> list[str] | None:
        return ["systemctl", "show", "-p", "ActiveState,SubState,MainPID", *self.units]

    def stop(self) -> None:
        subprocess.run(["systemctl", "stop", "bench@*.service"], capture_output=True,
                       timeout=600)
        (UNIT_DIR / TEMPLATE).unlink(missing_ok=True)
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True, timeout=120)


def run_inside(sizes: list[int], reps: int, seconds: float, idle_seconds: float,
               crash: tuple[int, int, int]) -> Results:
    """Every figure for systemd and ocp-agentd at each N, in this (the container's) pid
    namespace. ``crash`` = (N, kills per turn, turns)."""
    watcher = Watcher()
    reaper = Reaper(secrets.token_hex(8))
    workdir = Path(tempfile.mkdtemp(prefix="ocp-bench-"))
    ctl = [sys.executable, "-m", "ocp_agentd.cli"]  # what the ocp-agentctl script runs
    results = Results()
    try:
        for n in sizes:
            samples = results.phase(Phase(n, 0, "container"))
            targets: list[Target] = [
                Agentd(workdir / f"agentd-{n}", n, reaper, sys.executable, ctl),
                Systemd(workdir / f"systemd-{n}", n, reaper),
            ]
            try:
                for target in targets:
                    log(f"container N={n}: launching {target.label}")
                    target.start()
                    target.wait_reported()
                    target.stop_all()
                log(f"container N={n}: start/status/restart/stop x{reps}")
                figures.cycle(targets, reps, watcher, samples, seconds / reps)
                if n == crash[0]:
                    log(f"container N={n}: crash to new pid")
                    figures.crash(targets, crash[1], crash[2], watcher, samples)
                    running = {t.label: figures.start_programs(t, watcher) for t in targets}
                    figures.cli_status(targets, 5, samples)
                    log(f"container N={n}: idle over {idle_seconds:g}s")
                    figures.idle(targets, idle_seconds, samples)
                    for target in targets:
                        figures.stop_programs(target, watcher, running[target.label])
            finally:
                for target in targets:
                    target.stop()
    finally:
        reaper.stop_all()
        watcher.close()
    return results


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="systemd and ocp-agentd, in this container")
    parser.add_argument("--sizes", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--status-seconds", type=float, default=2.0)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--crash", default="50,5,2", help="N,kills per turn,turns")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    crash_n, kills, turns = (int(x) for x in args.crash.split(","))
    results = run_inside([int(x) for x in args.sizes.split(",")], args.reps,
                         args.status_seconds, args.idle_seconds, (crash_n, kills, turns))
    args.json.write_text(json.dumps(results.as_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
