"""The man pages and the bash completion made by ``python -m ocp_agentd.cli.docs OUTDIR``:
roff that groff renders without a warning, every command documented, and a completion
that bash really runs (program names from the running daemon)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import DaemonRunner

COMMANDS = ("status", "start", "stop", "restart", "verify", "logs", "events", "reload",
            "signal", "version", "agent", "task")


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    outdir = tmp_path_factory.mktemp("docs") / "out"
    result = subprocess.run([sys.executable, "-m", "ocp_agentd.cli.docs", str(outdir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in outdir.iterdir()) == [
        "ocp-agentctl.1", "ocp-agentctl.bash", "ocp-agentd.8"]
    return outdir


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_man_pages_render_without_warnings(docs: Path) -> None:
    for name, section in (("ocp-agentd.8", "8"), ("ocp-agentctl.1", "1")):
        page = docs / name
        title = name.split(".")[0].upper().replace("-", "\\-")
        assert page.read_text().startswith(f'.TH {title} "{section}"')
        result = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stderr == "", (name, result.stderr)
    ctl = (docs / "ocp-agentctl.1").read_text()
    for command in COMMANDS:
        assert f"'ocp\\-agentctl {command}'" in ctl, command
    for option in ("\\-\\-cacert", "\\-\\-follow", "\\-\\-stderr", "\\-\\-wait\\-timeout"):
        assert option in ctl, option
    assert "\\-\\-check" in (docs / "ocp-agentd.8").read_text()


def complete(script: Path, words: list[str], env: dict[str, str]) -> list[str]:
    """What bash offers for the last word of ``words`` (COMPREPLY)."""
    line = " ".join(words)
    program = (f"source {script}\n"
               f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
               f"COMP_CWORD={len(words) - 1}\nCOMP_LINE={line!r}\nCOMP_POINT=${{#COMP_LINE}}\n"
               "_shtab_ocp_agentctl\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "--noprofile", "--norc", "-c", program],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_bash_completion_offers_commands_options_and_program_names(
        docs: Path, demo_daemon: DaemonRunner) -> None:
    script = docs / "ocp-agentctl.bash"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OCP_AGENT")},
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OCP_AGENTD_API__SOCKET": str(demo_daemon.socket)}
    assert complete(script, ["ocp-agentctl", "st"], env) == ["status", "start", "stop"]
    assert "--follow" in complete(script, ["ocp-agentctl", "logs", "--"], env)
    assert sorted(complete(script, ["ocp-agentctl", "restart", ""], env)) == [
        "ob_logtailer", "ocp_exporter", "pos_proxy"]
    assert complete(script, ["ocp-agentctl", "logs", "ocp_"], env) == ["ocp_exporter"]
