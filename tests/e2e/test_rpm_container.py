"""The .rpm's scriptlets, run for real by rpm under a booted systemd.

The Debian 12 container has rpm too (`--nodeps`: rpm's own database knows none of the
Debian packages, `--force-debian`: Debian's rpm asks for it). The scriptlets are plain
sh and call systemctl exactly as on RHEL 9, so this runs them for real: install applies
the preset (enabled) and starts, an upgrade hands over in %posttrans keeping every
program's pid and the edited %config(noreplace), an upgrade of a disabled and stopped
service leaves it so, erase stops everything. Erase keeps state and logs (rpm has
no purge); the test deletes those and then compares the file system with the start.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from agentbox import CONFIG, DROPIN, DROPIN_DIR, FIRST, UNIT, Scenario, booted, changes, config
from nspawn import log

pytestmark = [pytest.mark.e2e, pytest.mark.steps]

RPM = ("rpm", "--nodeps", "--force-debian")


@pytest.fixture(scope="module")
def scenario(debian_tree, packages) -> Iterator[Scenario]:
    with booted(debian_tree, packages, {"/root/e2e/current.rpm": packages.rpm,
                                        "/root/e2e/next.rpm": packages.next_rpm}) as scenario:
        yield scenario


def test_rpm_install_enables_and_starts(scenario):
    box = scenario.box
    scenario.before = scenario.snapshot()
    box.put(f"{DROPIN_DIR}/e2e.conf", DROPIN)
    box.run(*RPM, "-i", "/root/e2e/current.rpm", timeout=300)
    assert box.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert scenario.show("ActiveState")["ActiveState"] == "active"
    assert scenario.status()["daemon"]["state"] == "running"
    version = box.run("rpm", "-q", "--qf", "%{VERSION}", "ocp-agentd").stdout
    assert version == scenario.packages.version


def test_rpm_config_and_reload(scenario):
    box = scenario.box
    scenario.edited_config = config(FIRST)
    box.put(CONFIG, scenario.edited_config)
    box.run("systemctl", "reload", UNIT)
    scenario.wait("the demo programs RUNNING", lambda: scenario.all_running(set(FIRST)))


def test_rpm_upgrade_hands_over_in_posttrans(scenario):
    box = scenario.box
    main = scenario.main_pid()
    programs = scenario.program_pids()
    started = time.monotonic()
    result = box.run(*RPM, "-U", "/root/e2e/next.rpm", timeout=300)
    log(f"rpm -U with handover took {time.monotonic() - started:.1f} s")
    assert "handing over" in result.stdout, result.stdout + result.stderr
    version = box.run("rpm", "-q", "--qf", "%{VERSION}", "ocp-agentd").stdout
    assert version == scenario.packages.next_version
    props = scenario.show("MainPID", "ActiveState")
    assert props["ActiveState"] == "active" and props["MainPID"] != str(main)
    assert scenario.program_pids() == programs
    states = scenario.all_running(set(FIRST))
    assert states and {n: pid for n, (_, pid) in states.items()} == programs
    assert box.path(CONFIG).read_text() == scenario.edited_config
    assert sorted(p.name for p in box.path("/etc/ocp_agentd").iterdir()) == ["config.toml"]
    assert not box.path("/var/lib/rpm-state/ocp-agentd").exists()


def test_rpm_disabled_stays_disabled_across_upgrade(scenario):
    """%systemd_post applies presets on the first install only, and try-restart
    restarts only a running unit: a stopped, disabled service stays so."""
    box = scenario.box
    box.run("systemctl", "stop", UNIT, timeout=120)
    box.run("systemctl", "disable", UNIT)
    box.run(*RPM, "-U", "--replacepkgs", "/root/e2e/next.rpm", timeout=300)
    assert box.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip() == "disabled"
    assert scenario.show("ActiveState")["ActiveState"] == "inactive"
    assert scenario.procs() == []
    box.run("systemctl", "enable", "--now", UNIT, timeout=120)
    scenario.wait("the demo programs RUNNING", lambda: scenario.all_running(set(FIRST)))


def test_rpm_erase_stops_everything(scenario):
    box = scenario.box
    box.run(*RPM, "-e", "ocp-agentd", timeout=300)
    assert scenario.procs() == [], "rpm -e must stop the programs"
    assert scenario.show("ActiveState")["ActiveState"] in ("inactive", "failed")
    for gone in ("/opt/ocp_agentd", "/usr/bin/ocp-agentd", f"/usr/lib/systemd/system/{UNIT}",
                 f"/etc/systemd/system/multi-user.target.wants/{UNIT}"):
        assert not box.path(gone).exists() and not box.path(gone).is_symlink(), gone
    # rpm keeps an edited %config(noreplace) as .rpmsave; state and logs stay (no purge).
    assert box.path(CONFIG + ".rpmsave").read_text() == scenario.edited_config
    assert not box.path(CONFIG).exists()
    assert box.run("test", "-e", "/run/ocp_agentd", check=False).returncode != 0
    # /usr/share/licenses belongs to the filesystem package on RHEL; in this Debian tree
    # rpm made it for the package's %license files and, owned by no one, keeps it.
    box.run("rm", "-rf", "/etc/ocp_agentd", "/var/lib/ocp_agentd", "/var/log/ocp_agentd",
            DROPIN_DIR, "/usr/share/licenses")
    box.run("systemctl", "daemon-reload")
    added, removed = changes(scenario.before, scenario.snapshot())
    assert (added, removed) == ([], []), f"added: {added}\nremoved: {removed}"


def test_rpm_container_powers_off_clean(scenario):
    box = scenario.box
    assert box.poweroff() == 0, box.console()
    box.destroy()
    assert box.leftovers() == []
