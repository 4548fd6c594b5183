"""The ocp-agentctl launcher the packages install (packaging/ocp-agentctl.in), filled in here
as build.sh fills it in, with this venv's interpreter and this tree for site-packages: it
runs from any folder, ignores the caller's Python environment (a PYTHONPATH that shadows
the package included), and answers as the console script does, errors too.

tests/e2e/test_packages.py checks the launcher inside the installed .deb and .rpm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import DaemonRunner

from ocp_agentd import __version__

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "packaging" / "ocp-agentctl.in"


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    script = tmp_path / "bin" / "ocp-agentctl"
    script.parent.mkdir()
    text = TEMPLATE.read_text().replace("@PYTHON@", sys.executable)
    script.write_text(text.replace("@SITE_PACKAGES@", str(REPO)))
    script.chmod(0o755)
    return script


def run(launcher: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OCP_AGENTD_", "OCP_AGENTCTL_", "PYTHON"))}
    return subprocess.run([str(launcher), *args], capture_output=True, text=True,
                          cwd=cwd, env={**clean, **env}, timeout=60)


def test_launcher_is_isolated_and_answers(launcher: Path, tmp_path: Path,
                                          demo_daemon: DaemonRunner) -> None:
    assert TEMPLATE.read_text().startswith("#!@PYTHON@ -IS\n")
    # A PYTHONPATH whose ocp_agentd would take over, were the environment obeyed.
    shadow = tmp_path / "shadow" / "ocp_agentd"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise SystemExit('the shadow package ran')\n")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {"PYTHONPATH": str(shadow.parent)}

    result = run(launcher, "--version", cwd=workdir, **env)
    assert (result.returncode, result.stdout) == (0, f"ocp-agentctl {__version__}\n")
    result = run(launcher, "--socket", str(demo_daemon.socket), "--json", "status",
                 cwd=workdir, **env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["daemon"]["pid"] == demo_daemon.pid
    assert [p["name"] for p in data["processes"]] == ["pos_proxy", "ocp_exporter",
                                                      "ob_logtailer"]
    table = run(launcher, "--socket", str(demo_daemon.socket), "status", cwd=workdir, **env)
    assert table.returncode == 0 and "NAME" in table.stdout and "RUNNING" in table.stdout


def test_launcher_reports_a_bad_config_and_a_missing_daemon(launcher: Path,
                                                            tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = run(launcher, "--config", str(missing), "status", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (f"ocp-agentctl: configuration file {missing} (from --config) "
                             "does not exist\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\nhost_id = \n")
    result = run(launcher, "status", cwd=tmp_path, OCP_AGENTD_CONFIG=str(broken))
    assert result.returncode == 2
    assert f"cannot parse configuration file {broken} (from $OCP_AGENTD_CONFIG)" in result.stderr
    result = run(launcher, "--socket", str(tmp_path / "none.sock"), "status", cwd=tmp_path)
    assert result.returncode == 3
    assert "ocp-agentd is not running (no socket at" in result.stderr
    assert "Traceback" not in result.stderr
