"""ocp-agentd under a real systemd, installed from the real .deb: one scenario, in steps.

A Debian 12 tree (debootstrap, cached) boots with systemd-nspawn; in it the .deb is
installed, started, reloaded, restarted by its own restart task, stalled until the
watchdog kills it, upgraded to N+1, stopped, removed and purged. After the purge the
container's file system is the one it booted with, and after power-off nothing of the
container is left on this machine.

The container config runs the demo programs with the package's own Python.
A drop-in shortens the watchdog to WATCHDOG_SEC, so the stall step stays short; the
test removes it again before it compares the file systems.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from nspawn import Container, log

from ocp_agentd.demo.config import to_toml

pytestmark = [pytest.mark.e2e, pytest.mark.steps]

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
SNAPSHOT = r"""find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /run \
 -o -path /tmp -o -path /var/tmp -o -path /var/log/journal -o -path /var/lib/systemd \
 -o -path /var/cache -o -path /var/lib/dpkg -o -path /var/lib/apt -o -path /root/e2e \) \
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

    def __init__(self, box: Container, packages: Any) -> None:
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
        return self.box.sh(SNAPSHOT).stdout.splitlines()


@pytest.fixture(scope="module")
def scenario(debian_tree, packages) -> Iterator[Scenario]:
    box = Container(debian_tree)
    try:
        box.boot()
        box.put("/root/e2e/current.deb", packages.deb)
        box.put("/root/e2e/next.deb", packages.next_deb)
        yield Scenario(box, packages)
    finally:
        box.destroy()
        assert not box.leftovers(), box.leftovers()


def test_install_enables_and_starts(scenario):
    box = scenario.box
    scenario.before = scenario.snapshot()
    box.put(f"{DROPIN_DIR}/e2e.conf", DROPIN)
    started = time.monotonic()
    result = box.run("dpkg", "-i", "/root/e2e/current.deb", timeout=300)
    scenario.timings["install"] = time.monotonic() - started
    log(f"dpkg -i took {scenario.timings['install']:.1f} s")
    assert "ocp-agentd" in result.stdout
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    props = scenario.show("ActiveState", "Type", "NotifyAccess", "WatchdogUSec", "KillMode",
                          "Restart", "RestartForceExitStatus")
    assert props["ActiveState"] == "active", props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
    assert props["KillMode"] == "process" and props["Restart"] == "on-failure"
    assert props["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    assert "75" in props["RestartForceExitStatus"]
    status = scenario.status()
    assert status["daemon"]["state"] == "running" and status["processes"] == []
    assert box.run("ocp-agentd", "--version").stdout.strip().endswith(scenario.packages.version)


def test_unit_verifies_without_a_word(scenario):
    result = scenario.box.run("systemd-analyze", "verify", f"/usr/lib/systemd/system/{UNIT}",
                              check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_reload_applies_a_config_change(scenario):
    box = scenario.box
    scenario.edited_config = config(FIRST)
    box.put(CONFIG, scenario.edited_config)
    box.run("ocp-agentd", "--check", "--config", CONFIG)
    main = scenario.main_pid()
    box.run("systemctl", "reload", UNIT)
    states = scenario.wait("the three demo programs RUNNING",
                           lambda: scenario.all_running(set(FIRST)))
    assert scenario.main_pid() == main
    assert {name: pid for name, (_, pid) in states.items()} == scenario.program_pids()


def test_start_returns_only_after_ready(scenario):
    box = scenario.box
    box.run("systemctl", "stop", UNIT, timeout=120)
    assert scenario.procs() == []
    started = time.monotonic()
    box.run("systemctl", "start", UNIT, timeout=120)
    scenario.timings["start"] = time.monotonic() - started
    # No waiting here: READY=1 comes only after the API listens and the programs run.
    states = scenario.all_running(set(FIRST))
    assert states, scenario.status(check=False)
    log(f"systemctl start returned after {scenario.timings['start']:.1f} s, all RUNNING")


def test_restart_task_succeeds(scenario):
    box = scenario.box
    before = scenario.program_pids()
    result = box.run("ocp-agentctl", "agent", "restart", "--wait", timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    states = scenario.wait("every program RUNNING after the restart task",
                           lambda: scenario.all_running(set(FIRST)))
    after = scenario.program_pids()
    assert {name: pid for name, (_, pid) in states.items()} == after
    assert all(after[name] != before[name] for name in FIRST), (before, after)


def test_reload_adds_removes_and_leaves_the_rest(scenario):
    box = scenario.box
    before = scenario.program_pids()
    scenario.edited_config = config(SECOND)
    box.put(CONFIG, scenario.edited_config)
    box.run("systemctl", "reload", UNIT)
    scenario.wait("node_exporter RUNNING and ob_logtailer gone",
                  lambda: scenario.all_running(set(SECOND)))
    after = scenario.wait("ob_logtailer's process gone",
                          lambda: (p := scenario.program_pids()) and "ob_logtailer" not in p
                          and p)
    assert after["pos_proxy"] == before["pos_proxy"]
    assert after["ocp_exporter"] == before["ocp_exporter"]
    assert set(after) == set(SECOND)


def test_watchdog_kills_a_stalled_daemon_and_programs_are_adopted(scenario):
    box = scenario.box
    main = scenario.main_pid()
    programs = scenario.program_pids()
    restarts = int(scenario.show("NRestarts")["NRestarts"])
    stalled = time.monotonic()
    box.run("kill", "-STOP", str(main))

    def restarted() -> bool:
        props = scenario.show("MainPID", "ActiveState")
        return props["ActiveState"] == "active" and props["MainPID"] not in ("0", str(main))

    scenario.wait("systemd to restart the stalled daemon", restarted,
                  timeout=WATCHDOG_SEC + 15 + 30)
    scenario.timings["watchdog"] = time.monotonic() - stalled
    log(f"stalled daemon replaced after {scenario.timings['watchdog']:.1f} s")
    assert int(scenario.show("NRestarts")["NRestarts"]) == restarts + 1
    messages = [e.get("MESSAGE", "") for e in scenario.journal()]
    assert any("Watchdog timeout" in str(m) for m in messages), messages[-20:]
    # Every program adopted: same pids, one instance each, RUNNING.
    assert scenario.program_pids() == programs
    states = scenario.all_running(set(SECOND))
    assert states and {n: pid for n, (_, pid) in states.items()} == programs
    assert box.run("kill", "-0", str(main), check=False).returncode != 0


def test_upgrade_hands_over_keeping_programs_and_config(scenario):
    box = scenario.box
    main = scenario.main_pid()
    programs = scenario.program_pids()
    started = time.monotonic()
    result = box.run("dpkg", "-i", "/root/e2e/next.deb", timeout=300)
    scenario.timings["upgrade"] = time.monotonic() - started
    log(f"upgrade with handover took {scenario.timings['upgrade']:.1f} s")
    assert "handing over" in result.stdout, result.stdout
    version = box.run("dpkg-query", "-W", "-f=${Version}", "ocp-agentd").stdout
    assert version == scenario.packages.next_version
    props = scenario.show("MainPID", "ActiveState")
    assert props["ActiveState"] == "active" and props["MainPID"] != str(main)
    assert scenario.program_pids() == programs
    states = scenario.all_running(set(SECOND))
    assert states and {n: pid for n, (_, pid) in states.items()} == programs
    assert box.path(CONFIG).read_text() == scenario.edited_config
    assert sorted(p.name for p in box.path("/etc/ocp_agentd").iterdir()) == ["config.toml"]


def test_journal_has_structured_fields(scenario):
    entries = [e for e in scenario.journal() if e.get("SYSLOG_IDENTIFIER") == "ocp-agentd"]
    assert entries, "no ocp-agentd entries in the journal"
    programs = {e["PROGRAM"] for e in entries if "PROGRAM" in e}
    assert set(SECOND) <= programs, programs
    assert any("TASK_ID" in e for e in entries), "no TASK_ID field (restart task)"
    assert any(re.fullmatch(r"[0-9a-zA-Z-]{8,}", str(e.get("TRACE_ID", ""))) for e in entries)
    priorities = {e.get("PRIORITY") for e in entries}
    assert "6" in priorities  # INFO mapped to journald's priority


def test_stop_leaves_no_program(scenario):
    box = scenario.box
    box.run("systemctl", "stop", UNIT, timeout=120)
    assert scenario.show("ActiveState")["ActiveState"] in ("inactive", "failed")
    assert scenario.show("Result")["Result"] == "success"
    assert scenario.procs() == []
    ps = box.run("ps", "-eo", "args").stdout
    assert "ocp_agentd" not in ps, ps


def test_remove_then_purge_leaves_nothing(scenario):
    box = scenario.box
    box.run("systemctl", "start", UNIT, timeout=120)
    assert scenario.all_running(set(SECOND))

    box.run("dpkg", "-r", "ocp-agentd", timeout=300)
    assert scenario.procs() == [], "dpkg -r must stop the programs"
    for gone in ("/opt/ocp_agentd", "/usr/bin/ocp-agentd", "/usr/bin/ocp-agentctl",
                 f"/usr/lib/systemd/system/{UNIT}",
                 f"/etc/systemd/system/multi-user.target.wants/{UNIT}"):
        assert not box.path(gone).exists() and not box.path(gone).is_symlink(), gone
    assert box.path(CONFIG).read_text() == scenario.edited_config  # a conffile stays until purge
    pycache = box.run("find", "/opt", "/usr/lib/python3", "-name", "__pycache__", "-path",
                      "*ocp_agentd*", check=False).stdout
    assert not pycache.strip(), pycache

    box.run("dpkg", "-P", "ocp-agentd", timeout=300)
    assert box.run("dpkg-query", "-W", "ocp-agentd", check=False).returncode != 0
    for gone in ("/etc/ocp_agentd", "/var/lib/ocp_agentd", "/var/log/ocp_agentd",
                 "/run/ocp_agentd"):
        assert box.run("test", "-e", gone, check=False).returncode != 0, gone
    assert not list(box.path("/var/lib/dpkg/info").glob("ocp-agentd.*"))

    box.run("rm", "-rf", DROPIN_DIR)
    box.run("systemctl", "daemon-reload")
    assert box.run("systemctl", "cat", UNIT, check=False).returncode != 0
    after = scenario.snapshot()
    added, removed = sorted(set(after) - set(scenario.before)), sorted(
        set(scenario.before) - set(after))
    assert (added, removed) == ([], []), f"added: {added}\nremoved: {removed}"


def test_power_off_leaves_nothing_on_this_machine(scenario):
    box = scenario.box
    assert box.poweroff() == 0, box.console()
    box.destroy()
    assert box.leftovers() == []
    log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in scenario.timings.items()))
