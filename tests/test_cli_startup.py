"""What ocp-agentctl loads to answer: the lazily defined commands parse, fail and help
exactly as the fully defined parser does (the one the man page and completion come from),
and ``status`` imports none of the heavy standard modules it has no use for.

Speed itself is measured by the benchmark (bench/, ``make bench-quick``), not here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from harness import DaemonRunner

from ocp_agentd.cli.parser import _terminal_columns, build_parser

ARGVS = [
    ["status"], ["--json", "status", "a", "b", "--names"], ["status", "-l", "--socket", "/s"],
    ["--sock", "/s", "status"], ["start", "x", "--timeout", "5"], ["stop", "all", "--force"],
    ["restart", "x"], ["verify"], ["verify", "x"], ["logs", "x", "-f", "-n", "3", "--stderr"],
    ["events", "--kind", "task", "--kind", "state", "--last", "2", "--count", "1"],
    ["reload"], ["signal", "hup", "x"], ["signal", "9", "x"], ["version"],
    ["agent", "restart", "--wait", "--wait-timeout", "9"], ["agent", "stop"],
    ["task", "list", "--size", "3"], ["task", "show", "4", "--log", "--follow"],
    ["task", "retry", "2", "--wait"], ["task", "rollback", "2"],
    # usage errors and help
    [], ["nosuch"], ["status", "--bogus"], ["agent"], ["task", "show"], ["task", "show", "0"],
    ["signal", "FOO", "x"], ["events", "--kind", "nope"], ["logs", "x", "-n", "-1"],
    ["--help"], ["status", "--help"], ["agent", "--help"], ["task", "show", "--help"],
    ["--version"],
]


def _parse(argv: list[str], lazy: bool) -> tuple[object, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = sorted(vars(build_parser(lazy=lazy).parse_args(argv)).items(),
                                    key=lambda item: item[0])
        except SystemExit as exc:
            result = ("exit", exc.code)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", ARGVS, ids=lambda argv: " ".join(argv) or "(none)")
def test_lazy_commands_parse_fail_and_help_as_the_whole_parser(
        argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    lazy, eager = _parse(argv, lazy=True), _parse(argv, lazy=False)
    assert lazy == eager
    assert lazy[0] != [] and (lazy[1] or lazy[2] or isinstance(lazy[0], list))


def test_lazy_parser_defines_only_the_command_it_runs() -> None:
    parser = build_parser(lazy=True)
    parser.parse_args(["status"])
    commands = next(a for a in parser._actions if a.dest == "command").choices
    defined = sorted(name for name, sub in commands.items() if sub._define is None)
    assert defined == ["status"]


# Standard modules the status command must not load (unless the interpreter's own start-up
# did, e.g. an editable install's import hook loads pathlib): each costs milliseconds.
HEAVY = ("http.client", "email", "ssl", "tomllib", "typing", "pathlib", "urllib.parse",
         "signal", "dataclasses", "inspect", "asyncio", "shutil")
PROBE = """
import json, sys
before = set(sys.modules)
from ocp_agentd.cli.main import main
code = main(["--socket", sys.argv[1], "status"])
print(json.dumps({"code": code, "new": sorted(set(sys.modules) - before)}), file=sys.stderr)
"""


def test_status_imports_only_what_it_uses(demo_daemon: DaemonRunner) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCP_AGENT")}
    result = subprocess.run([sys.executable, "-c", PROBE, str(demo_daemon.socket)],
                            capture_output=True, text=True, env=env, timeout=60)
    report = json.loads(result.stderr.splitlines()[-1])
    assert report["code"] == 0 and "pos_proxy" in result.stdout
    loaded = [m for m in report["new"] if m.split(".")[0] in HEAVY or m in HEAVY]
    assert loaded == []
    assert "ocp_agentd.cli.transport" in report["new"]


@pytest.mark.parametrize("columns", ["100", "37", "0", "wide", None])
def test_help_is_as_wide_as_argparse_makes_it(columns: str | None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The formatter asks the width without shutil; it must answer what shutil does."""
    monkeypatch.delenv("LINES", raising=False)
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert _terminal_columns() == shutil.get_terminal_size().columns
