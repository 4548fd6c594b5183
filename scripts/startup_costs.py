"""What the daemon's start-up and resident memory are made of, and the floor its libraries set.

    python scripts/startup_costs.py [--runs K]

Two tables, each figure the median of K runs in fresh interpreters (run it with the
project's venv python, after ``python -m compileall ocp_agentd``: an installed copy runs
from bytecode, and with PYTHONDONTWRITEBYTECODE set the sources would be compiled again at
every start):

1. **Imports**, in the order the daemon's imports reach them: the milliseconds each step
   takes and the resident memory it adds (VmRSS, split into RssAnon and RssFile, from
   /proc/self/status; proc(5)). ``aiohttp`` includes its connector building two client
   SSL contexts at import, each loading the system CA bundle.
2. **Start to first answer**, alternated: the *library floor* (a bare aiohttp.web
   application with one route on a unix socket, importing what the daemon imports from
   outside the project) and ocp-agentd itself on a configuration with no programs and
   ``cgroup = "off"``; each from exec to its first answer to ``GET /api/v1/status``,
   with its VmRSS at that answer.

Nothing is left behind: the daemon runs on a temporary directory, each process is
stopped (SIGTERM, then SIGKILL after 10 s) and the directory removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0

# (label, modules): what each step imports, on top of the steps before it.
STEPS: list[tuple[str, list[str]]] = [
    ("ssl", ["ssl"]),
    ("asyncio", ["asyncio"]),
    ("aiohttp (two CA bundle loads)", ["aiohttp"]),
    ("aiohttp.web", ["aiohttp.web"]),
    ("pydantic (BaseModel)", ["pydantic.main", "pydantic.fields"]),
    ("pydantic-settings", ["pydantic_settings"]),
    ("psutil, sqlite3, orjson", ["psutil", "sqlite3", "orjson"]),
    ("ocp-agentd's own modules", ["ocp_agentd.__main__"]),
]

# Prints one JSON list: [label, ms, VmRSS, RssAnon, RssFile] (KiB) for the bare
# interpreter, then for each step.
_IMPORT_PROBE = """
import importlib, json, sys, time
def status():
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0])
    return [fields["VmRSS"], fields["RssAnon"], fields["RssFile"]]
rows = [["interpreter", 0.0, *status()]]
for label, modules in json.loads(sys.argv[1]):
    begin = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    rows.append([label, (time.perf_counter() - begin) * 1e3, *status()])
print(json.dumps(rows))
"""

# The library floor: what the daemon imports from outside the project, one pydantic
# model, one route; serves on the unix socket argv[1].
_FLOOR_APP = """
import asyncio, ssl, sys
import orjson, psutil, pydantic, pydantic_settings, sqlite3
from aiohttp import web

class Status(pydantic.BaseModel):
    state: str = "running"

async def status(request):
    return web.json_response({"successful": True, "data": Status().model_dump()})

app = web.Application()
app.router.add_get("/api/v1/status", status)
web.run_app(app, path=sys.argv[1], print=None)
"""


def import_steps(runs: int) -> list[tuple[str, float, float, float, float, float]]:
    """[(label, ms, VmRSS MiB after it, +VmRSS MiB, +RssAnon MiB, +RssFile MiB)] as
    medians of `runs` fresh interpreters; the first row is the bare interpreter."""
    samples = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE, json.dumps(STEPS)], cwd=ROOT,
            capture_output=True, text=True, check=True, timeout=START_TIMEOUT,
        )
        samples.append(json.loads(done.stdout))
    table = []
    for index, row in enumerate(samples[0]):
        def median(column: int, index: int = index) -> float:
            return statistics.median(sample[index][column] for sample in samples)

        def added(column: int, index: int = index) -> float:
            if index == 0:
                return median(column) / 1024
            return statistics.median(sample[index][column] - sample[index - 1][column]
                                     for sample in samples) / 1024

        table.append((row[0], median(1), median(2) / 1024, added(2), added(3), added(4)))
    return table


def _answers(path: Path) -> bool:
    """True once a GET /api/v1/status on the unix socket `path` gets an HTTP answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5.0)
            conn.connect(str(path))
            conn.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: localhost\r\n"
                         b"Connection: close\r\n\r\n")
            return conn.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _quiet_env() -> dict[str, str]:
    """This environment without what would make a server think systemd runs it, or
    override the daemon's configuration (OCP_AGENTD_*)."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "JOURNAL_STREAM",
                                   "INVOCATION_ID", "OCP_AGENTD_"))}


def _vm_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def first_answer(argv: list[str], sock: Path, log: Path) -> tuple[float, float]:
    """(ms from exec to the first answer on `sock`, VmRSS MiB then) of the server argv.
    Raises RuntimeError, with the end of its output, when it exits or does not answer
    within START_TIMEOUT."""
    with log.open("wb") as output:
        begin = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, cwd=ROOT, env=_quiet_env())
    try:
        while not _answers(sock):
            if process.poll() is not None or time.monotonic() - begin > START_TIMEOUT:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{argv[1:3]} gave no answer; its output ends with:\n{tail}")
            time.sleep(0.001)
        elapsed = (time.monotonic() - begin) * 1e3
        return elapsed, _vm_rss_mib(process.pid)
    finally:
        _stop(process)


def _daemon_config(work: Path) -> Path:
    config = work / "agentd.toml"
    config.write_text("\n".join([
        "[agent]",
        f"install_home = {json.dumps(str(work))}",
        f"state_dir = {json.dumps(str(work / 'state'))}",
        f"log_dir = {json.dumps(str(work / 'logs'))}",
        'cgroup = "off"',
        'daemon_log_file = "never"',
        "[api]",
        f"socket = {json.dumps(str(work / 'agentd.sock'))}",
        'socket_mode = "0600"',
        "",
    ]))
    return config


def starts(runs: int) -> dict[str, tuple[float, float]]:
    """{"library floor" | "ocp-agentd": (median ms to first answer, median VmRSS MiB)},
    the two taking turns."""
    samples: dict[str, list[tuple[float, float]]] = {"library floor": [], "ocp-agentd": []}
    work = Path(tempfile.mkdtemp(prefix="startup-costs-"))
    try:
        config = _daemon_config(work)
        for turn in range(runs):
            order = list(samples) if turn % 2 == 0 else list(reversed(samples))
            for name in order:
                if name == "library floor":
                    sock = work / "floor.sock"
                    argv = [sys.executable, "-c", _FLOOR_APP, str(sock)]
                else:
                    sock = work / "agentd.sock"
                    argv = [sys.executable, "-m", "ocp_agentd", "--config", str(config)]
                sock.unlink(missing_ok=True)
                samples[name].append(first_answer(argv, sock, work / "output.log"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {name: (statistics.median(ms for ms, _ in values),
                   statistics.median(rss for _, rss in values))
            for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    args = parser.parse_args(argv)
    env_note = " (PYTHONDONTWRITEBYTECODE set)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    print(f"Python {sys.version.split()[0]}{env_note}, medians of {args.runs} run(s)\n")
    print(f"{'imports':34s} {'ms':>6s} {'VmRSS':>7s} {'+RSS':>6s} {'+anon':>6s} {'+file':>6s}")
    for index, (label, ms, rss, plus, anon, file) in enumerate(import_steps(args.runs)):
        took = f"{ms:6.1f}" if index else f"{'-':>6s}"
        print(f"{label:34s} {took} {rss:7.1f} {plus:6.1f} {anon:6.1f} {file:6.1f}")
    print(f"\n{'exec to first answer':34s} {'ms':>6s} {'VmRSS':>7s}")
    for name, (ms, rss) in starts(args.runs).items():
        print(f"{name:34s} {ms:6.0f} {rss:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
