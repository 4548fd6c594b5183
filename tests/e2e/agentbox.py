"""What the container scenarios share: the demo config for the container, the unit's
drop-in, file system snapshots and their changes, `booted()` for a scenario's container,
and `Scenario` with the queries the steps make (systemctl show, ocp-agentctl, the
programs' processes read from /proc, the journal, a file system snapshot)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nspawn import Chroot, Container

from ocp_agentd.demo.config import to_toml

UNIT = "ocp-agentd.service"
WATCHDOG_SEC = 4
DROPIN_DIR = "/etc/systemd/system/ocp-agentd.service.d"
DROPIN = f"""[Service]
# e2e only: a short watchdog keeps the stall test quick.
WatchdogSec={WATCHDOG_SEC}s
TimeoutAbortSec=15s
# The host's kernel.core_pattern is "core": no core file in the container's /.
LimitCORE=0
# TRACE_ID is logged for every request at DEBUG.
Environment=OCP_AGENTD_LOG_LEVEL=DEBUG
"""
PY = "/opt/ocp_agentd/bin/python"
CONFIG = "/etc/ocp_agentd/config.toml"

# Paths whose content changes by themselves or belong to the test: not compared.
# rpm's databases (Debian's rpm keeps one in ~/.rpmdb) and /var/lib/rpm-state (rpm's own
# folder on RHEL, where %post leaves a note for %posttrans) belong to rpm.
SNAPSHOT = r"""find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run \
 -o -path /tmp -o -path /var/tmp -o -path /var/log/journal -o -path /var/lib/systemd \
 -o -path /var/cache -o -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/lib/rpm \
 -o -path /root/.rpmdb -o -path /var/lib/rpm-state -o -path /root/e2e \) \
 -prune -o -print | sort"""

# Every process that carries the program marker, read from /proc in the container.
PROCS = r"""
import json, os
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        stat = open(f"/proc/{pid}/stat").read()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    marks = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"OCP_AGENTD_PROGRAM=")]
    if marks:
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        found.append({"pid": int(pid), "ppid": ppid, "program": marks[0],
                      "cmd": [c.decode() for c in cmd if c]})
print(json.dumps(found))
"""


def snapshot(tree: Container | Chroot) -> list[str]:
    """Every path of the tree's file system that SNAPSHOT compares, sorted."""
    return tree.sh(SNAPSHOT).stdout.splitlines()


def changes(before: list[str], after: list[str]) -> tuple[list[str], list[str]]:
    """(added, removed): the paths only in `after`, and those only in `before`."""
    return sorted(set(after) - set(before)), sorted(set(before) - set(after))


def program(module: str, *args: object, **keys: Any) -> dict[str, Any]:
    return {
        "command": [PY, "-m", f"ocp_agentd.demo.{module}", *(str(a) for a in args)],
        "start_seconds": 0.5,
        "stop_timeout": 5.0,
        **keys,
    }


def config(programs: dict[str, dict[str, Any]]) -> str:
    document = {
        "agent": {
            "host_id": 7,
            "install_home": "/var/lib/ocp_agentd",
            "state_dir": "/var/lib/ocp_agentd",
            "log_dir": "/var/log/ocp_agentd",
        },
        "api": {"socket": "/run/ocp_agentd/agentd.sock", "socket_mode": "0660"},
        "programs": programs,
    }
    return "# edited by the e2e test\n" + to_toml(document)


POS_PROXY = program("pos_proxy", "--port", 62888, role="pos_proxy", operable=False,
                    ports=[62888], health_url="http://127.0.0.1:62888/health")
EXPORTER = program("exporter", "--port", 62889, ports=[62889])
TAILER = program("logtailer", "--interval", 5)
NODE_EXPORTER = program("exporter", "--port", 63000, ports=[63000])
FIRST = {"pos_proxy": POS_PROXY, "ocp_exporter": EXPORTER, "ob_logtailer": TAILER}
SECOND = {"pos_proxy": POS_PROXY, "ocp_exporter": EXPORTER, "node_exporter": NODE_EXPORTER}


class Scenario:
    """What the steps hand on to each other."""

    def __init__(self, box: Container, packages: Any) -> None:  # or a Chroot
        self.box = box
        self.packages = packages
        self.before: list[str] = []
        self.edited_config = ""
        self.timings: dict[str, float] = {}

    # queries

    def show(self, *props: str) -> dict[str, str]:
        out = self.box.run("systemctl", "show", UNIT, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def status(self, check: bool = True) -> dict[str, Any]:
        result = self.box.run("ocp-agentctl", "status", "--json", check=check, timeout=30)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    def states(self) -> dict[str, tuple[str, int | None]]:
        return {p["name"]: (p["state"], p["pid"]) for p in self.status()["processes"]}

    def procs(self) -> list[dict[str, Any]]:
        return json.loads(self.box.run("python3.11", "-c", PROCS).stdout)

    def program_pids(self) -> dict[str, int]:
        """Each program's top process; fails when a program runs more than once."""
        procs = self.procs()
        marked = {p["pid"]: p["program"] for p in procs}
        roots = [p for p in procs if marked.get(p["ppid"]) != p["program"]]
        counts = Counter(p["program"] for p in roots)
        twice = {name: n for name, n in counts.items() if n != 1}
        assert not twice, f"programs running more than once: {twice}: {roots}"
        return {p["program"]: p["pid"] for p in roots}

    def wait(self, what: str, predicate, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except (AssertionError, KeyError, ValueError, json.JSONDecodeError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {last!r}")
            time.sleep(0.2)

    def all_running(self, names: set[str]) -> dict[str, tuple[str, int | None]] | None:
        states = self.states()
        ok = set(states) == names and all(s == "RUNNING" for s, _ in states.values())
        return states if ok else None

    def journal(self) -> list[dict[str, Any]]:
        out = self.box.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def snapshot(self) -> list[str]:
        return snapshot(self.box)


@contextlib.contextmanager
def booted(tree: Path, packages: Any, files: dict[str, Path]) -> Iterator[Scenario]:
    """A container booted from tree with `files` (inside path: host file) put in it, as
    the Scenario its steps share; afterwards nothing of the container is left."""
    box = Container(tree)
    try:
        box.boot()
        for inside, source in files.items():
            box.put(inside, source)
        yield Scenario(box, packages)
    finally:
        box.destroy()
        assert not box.leftovers(), box.leftovers()
