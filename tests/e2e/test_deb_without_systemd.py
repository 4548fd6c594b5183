"""The .deb where systemd does not run (a chroot, as when an image is being built):
install, upgrade, remove and purge with dpkg succeed, start nothing, and leave the tree
exactly as it was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agentbox import UNIT, changes, snapshot
from nspawn import Chroot

pytestmark = pytest.mark.e2e


@pytest.fixture
def chroot(debian_tree) -> Iterator[Chroot]:
    with Chroot(debian_tree) as tree:
        yield tree
    assert not tree.dir.exists()


def test_dpkg_lifecycle_without_systemd(chroot, packages):
    chroot.put("/root/e2e/current.deb", packages.deb)
    chroot.put("/root/e2e/next.deb", packages.next_deb)
    before = snapshot(chroot)

    chroot.run("dpkg", "-i", "/root/e2e/current.deb", timeout=300)
    # Enabled for the next boot, nothing started.
    wants = chroot.path(f"/etc/systemd/system/multi-user.target.wants/{UNIT}")
    assert wants.is_symlink()
    assert chroot.run("ocp-agentd", "--check").returncode == 0
    assert chroot.run("ocp-agentctl", "status", check=False).returncode == 3  # no daemon
    # The launcher ignores the caller's Python environment and runs from any folder.
    chroot.put("/root/e2e/shadow/ocp_agentd/__init__.py", "raise SystemExit('shadowed')\n")
    result = chroot.run("env", "PYTHONPATH=/root/e2e/shadow", "sh", "-c",
                        "cd /tmp && ocp-agentctl --version")
    assert result.stdout.startswith("ocp-agentctl ") and "shadowed" not in result.stderr
    result = chroot.run("ocp-agentctl", "--config", "/root/e2e/nope.toml", "status",
                        check=False)
    assert result.returncode == 2 and "/root/e2e/nope.toml" in result.stderr

    config = chroot.path("/etc/ocp_agentd/config.toml")
    config.write_text(config.read_text().replace("host_id = 1", "host_id = 9"))
    chroot.run("dpkg", "-i", "/root/e2e/next.deb", timeout=300)
    assert "host_id = 9" in config.read_text()
    version = chroot.run("dpkg-query", "-W", "-f=${Version}", "ocp-agentd").stdout
    assert version == packages.next_full_version

    chroot.run("dpkg", "-r", "ocp-agentd", timeout=300)
    # Removed, the unit is masked and its enablement kept until purge (Debian's way).
    assert wants.is_symlink()
    assert chroot.path(f"/etc/systemd/system/{UNIT}").readlink() == Path("/dev/null")
    assert not chroot.path("/opt/ocp_agentd").exists()
    chroot.run("dpkg", "-P", "ocp-agentd", timeout=300)
    added, removed = changes(before, snapshot(chroot))
    assert (added, removed) == ([], []), f"added: {added}\nremoved: {removed}"
