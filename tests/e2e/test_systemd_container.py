"""ocp-agentd under a real systemd, installed from the real .deb: one scenario, in steps.

A Debian 12 tree (debootstrap, cached) boots with systemd-nspawn; in it the .deb is
installed, started, reloaded, restarted by its own restart task, stalled until the
watchdog kills it, upgraded to N+1 (handing over), stopped, upgraded while disabled (it
stays disabled) and while policy-rc.d forbids service actions (nothing is touched),
removed and purged, and installed once more under such a policy-rc.d (nothing starts).
After the purge the container's file system is the one it booted with, and after
power-off nothing of the container is left on this machine.

The container config runs the demo programs with the package's own Python.
A drop-in shortens the watchdog to WATCHDOG_SEC, so the stall step stays short; the
test removes it again before it compares the file systems.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentbox import (
    CONFIG,
    DROPIN,
    DROPIN_DIR,
    FIRST,
    SECOND,
    UNIT,
    WATCHDOG_SEC,
    Scenario,
    booted,
    changes,
    config,
)
from nspawn import log
from test_unit_file import MAX_EXPOSURE, exposure

pytestmark = [pytest.mark.e2e, pytest.mark.steps]

WANTS = f"/etc/systemd/system/multi-user.target.wants/{UNIT}"
# policy-rc.d(8) as image builders use it: 101 = action forbidden.
POLICY = "/usr/sbin/policy-rc.d"
FORBID_ALL = "#!/bin/sh\nexit 101\n"


@pytest.fixture(scope="module")
def scenario(debian_tree, packages) -> Iterator[Scenario]:
    with booted(debian_tree, packages, {"/root/e2e/current.deb": packages.deb,
                                        "/root/e2e/next.deb": packages.next_deb}) as scenario:
        yield scenario


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


def test_unit_as_loaded_scores_at_most_six(scenario):
    result = scenario.box.run("systemd-analyze", "security", "--no-pager", UNIT)
    assert exposure(result.stdout) <= MAX_EXPOSURE, result.stdout


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
    assert scenario.show("StatusText")["StatusText"] == "3 of 3 programs running"
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
    # STATUS= follows the programs: one killed, then restarted by the daemon.
    box.run("kill", "-KILL", str(after["ocp_exporter"]))
    scenario.wait("STATUS= counting one program less",
                  lambda: re.fullmatch(r"2 of 3 programs running.*",
                                       scenario.show("StatusText")["StatusText"]))
    scenario.wait("ocp_exporter restarted", lambda: scenario.all_running(set(SECOND)))
    scenario.wait("STATUS= back to all running",
                  lambda: scenario.show("StatusText")["StatusText"] == "3 of 3 programs running")


def test_reload_refuses_an_invalid_config(scenario):
    box = scenario.box
    main = scenario.main_pid()
    programs = scenario.program_pids()
    box.put(CONFIG, scenario.edited_config.replace("host_id = 7", "host_id = -5"))
    try:
        box.run("systemctl", "reload", UNIT)
        scenario.wait("the refusal in the journal", lambda: any(
            "reload refused" in str(e.get("MESSAGE", "")) for e in scenario.journal()))
        assert scenario.show("ActiveState")["ActiveState"] == "active"
        assert scenario.main_pid() == main
        assert scenario.program_pids() == programs
        assert scenario.all_running(set(SECOND))
    finally:
        box.put(CONFIG, scenario.edited_config)


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
    assert version == scenario.packages.next_full_version
    props = scenario.show("MainPID", "ActiveState")
    assert props["ActiveState"] == "active" and props["MainPID"] != str(main)
    assert scenario.program_pids() == programs
    states = scenario.all_running(set(SECOND))
    assert states and {n: pid for n, (_, pid) in states.items()} == programs
    assert box.path(CONFIG).read_text() == scenario.edited_config
    assert sorted(p.name for p in box.path("/etc/ocp_agentd").iterdir()) == ["config.toml"]


def test_journal_target_sends_a_program_s_output_to_journald(scenario):
    """log_target = "journal" against the container's real journald: each line becomes an
    entry with SYSLOG_IDENTIFIER = the program's name, stderr at priority 3; no file."""
    box = scenario.box
    writer = {"command": ["/bin/sh", "-c", "echo to-journal-out; echo to-journal-err >&2; "
                          "exec sleep 100000"],
              "log_target": "journal", "start_seconds": 0.5, "stop_timeout": 5.0}
    with_writer = {**SECOND, "jwriter": writer}
    box.put(CONFIG, config(with_writer))
    box.run("systemctl", "reload", UNIT)
    scenario.wait("jwriter RUNNING", lambda: scenario.all_running(set(with_writer)))

    def entries() -> dict[str, str] | None:
        out = box.run("journalctl", "-t", "jwriter", "-o", "json", "--no-pager").stdout
        found = {json.loads(line)["MESSAGE"]: json.loads(line).get("PRIORITY")
                 for line in out.splitlines() if line.strip()}
        return found if {"to-journal-out", "to-journal-err"} <= set(found) else None

    found = scenario.wait("jwriter's lines in the journal", entries)
    assert found["to-journal-out"] == "6" and found["to-journal-err"] == "3"
    assert not box.path("/var/log/ocp_agentd/jwriter.stdout.log").exists()
    box.put(CONFIG, scenario.edited_config)
    box.run("systemctl", "reload", UNIT)
    scenario.wait("jwriter gone", lambda: scenario.all_running(set(SECOND)))


def test_journal_has_structured_fields(scenario):
    entries = [e for e in scenario.journal() if e.get("SYSLOG_IDENTIFIER") == "ocp-agentd"]
    assert entries, "no ocp-agentd entries in the journal"
    programs = {e["PROGRAM"] for e in entries if "PROGRAM" in e}
    assert set(SECOND) <= programs, programs
    assert any("TASK_ID" in e for e in entries), "no TASK_ID field (restart task)"
    assert any(re.fullmatch(r"[0-9a-zA-Z-]{8,}", str(e.get("TRACE_ID", ""))) for e in entries)
    priorities = {e.get("PRIORITY") for e in entries}
    assert "6" in priorities  # INFO mapped to journald's priority


def test_programs_run_in_cgroups_of_their_own(scenario):
    """Delegate=yes: each program in its own cgroup (SPEC section 9), as the record says."""
    box = scenario.box
    records = {p["name"]: p for p in scenario.status()["processes"]}
    for name, pid in scenario.program_pids().items():
        lines = box.run("cat", f"/proc/{pid}/cgroup").stdout.splitlines()
        unified = [line[3:] for line in lines if line.startswith("0::")]
        # Either of its two slots (a restart moves it to the other: README, cgroups).
        assert unified and unified[0].endswith((f"/{name}", f"/{name}.b")), (name, lines)
        assert records[name]["cgroup"].endswith(unified[0]), (records[name], unified)
    log(f"programs' cgroups: {sorted(p['cgroup'] for p in records.values())}")


def test_stop_leaves_no_program(scenario):
    box = scenario.box
    box.run("systemctl", "stop", UNIT, timeout=120)
    assert scenario.show("ActiveState")["ActiveState"] in ("inactive", "failed")
    assert scenario.show("Result")["Result"] == "success"
    assert scenario.procs() == []
    ps = box.run("ps", "-eo", "args").stdout
    assert "ocp_agentd" not in ps, ps


def test_disabled_stays_disabled_across_upgrade(scenario):
    box = scenario.box
    box.run("systemctl", "disable", UNIT)
    box.run("dpkg", "-i", "/root/e2e/next.deb", timeout=300)
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert not box.path(WANTS).is_symlink()
    assert scenario.show("ActiveState")["ActiveState"] == "inactive"
    assert scenario.procs() == []
    box.run("systemctl", "enable", UNIT)


def test_policy_rc_d_forbids_the_handover(scenario):
    """An upgrade while policy-rc.d says 101 (no service actions) leaves the running
    daemon alone; without it, the next upgrade hands over as usual."""
    box = scenario.box
    box.run("systemctl", "start", UNIT, timeout=120)
    main = scenario.main_pid()
    box.put(POLICY, FORBID_ALL, mode=0o755)
    try:
        result = box.run("dpkg", "-i", "/root/e2e/next.deb", timeout=300)
    finally:
        box.run("rm", "-f", POLICY)
    assert "policy-rc.d forbids" in result.stderr, result.stdout + result.stderr
    assert "handing over" not in result.stdout
    assert scenario.main_pid() == main
    assert scenario.all_running(set(SECOND))


def test_remove_then_purge_leaves_nothing(scenario):
    box = scenario.box
    assert scenario.all_running(set(SECOND))

    box.run("dpkg", "-r", "ocp-agentd", timeout=300)
    assert scenario.procs() == [], "dpkg -r must stop the programs"
    for gone in ("/opt/ocp_agentd", "/usr/bin/ocp-agentd", "/usr/bin/ocp-agentctl",
                 f"/usr/lib/systemd/system/{UNIT}"):
        assert not box.path(gone).exists() and not box.path(gone).is_symlink(), gone
    # As for every Debian service: removed, the unit is masked and its enablement kept
    # until purge (a reinstall comes back enabled).
    assert box.path(f"/etc/systemd/system/{UNIT}").readlink() == Path("/dev/null")
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "masked"
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
    added, removed = changes(scenario.before, scenario.snapshot())
    assert (added, removed) == ([], []), f"added: {added}\nremoved: {removed}"


def test_policy_rc_d_forbids_the_first_start(scenario):
    """Installing while policy-rc.d says 101 (as when an image is built) enables the
    unit and starts nothing."""
    box = scenario.box
    box.put(POLICY, FORBID_ALL, mode=0o755)
    try:
        result = box.run("dpkg", "-i", "/root/e2e/current.deb", timeout=300)
        assert "returned 101" in result.stderr, result.stdout + result.stderr
        assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
        assert scenario.show("ActiveState")["ActiveState"] == "inactive"
        assert scenario.procs() == []
    finally:
        box.run("dpkg", "-P", "ocp-agentd", timeout=300, check=False)
        box.run("rm", "-f", POLICY)
    assert not box.path(WANTS).is_symlink()


def test_power_off_leaves_nothing_on_this_machine(scenario):
    box = scenario.box
    assert box.poweroff() == 0, box.console()
    box.destroy()
    assert box.leftovers() == []
    log("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in scenario.timings.items()))
