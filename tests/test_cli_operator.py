"""ocp-agentctl as an operator meets it: its imports, pipes, terminals, messages and help."""

from __future__ import annotations

import argparse
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

from harness import DaemonRunner, wait_for

from ocp_agentd.cli.parser import build_parser

CTL = [sys.executable, "-m", "ocp_agentd.cli"]


def _env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OCP_AGENTD_", "OCP_AGENTCTL_")) and k != "NO_COLOR"}
    return {**clean, **extra}


def test_cli_imports_neither_aiohttp_nor_pydantic() -> None:
    probe = ("import sys, ocp_agentd.cli.main\n"
             "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True, env=_env()).stdout.split())
    assert "ocp_agentd.cli.main" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("aiohttp", "pydantic", "pydantic_core",
                                                       "pydantic_settings", "psutil",
                                                       "asyncio")}
    assert not heavy
    assert "ocp_agentd.config" not in loaded and "ocp_agentd.client" not in loaded


def test_output_into_a_closed_pipe_ends_quietly(demo_daemon: DaemonRunner) -> None:
    for args in (["status"], ["--json", "task", "list"], ["verify"],
                 ["logs", "ob_logtailer", "-n", "5"], ["events", "--last", "3", "--count", "3"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written
        try:
            result = subprocess.run([*CTL, "--socket", str(demo_daemon.socket), *args],
                                    stdout=write_end, stderr=subprocess.PIPE, text=True,
                                    env=_env(), timeout=60)
        finally:
            os.close(write_end)
        assert result.returncode == 0, (args, result.stderr)
        assert result.stderr == "", args


def _on_terminal(args: list[str], **env: str) -> str:
    """What the command prints when its stdout is a terminal (a pty)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(args, stdout=terminal, stderr=subprocess.DEVNULL,
                                   stdin=subprocess.DEVNULL, env=_env(**env))
        os.close(terminal)
        chunks = []
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=60) == 0
    finally:
        os.close(controller)
    return b"".join(chunks).decode()


def test_colours_only_on_a_terminal_and_never_with_no_color(demo_daemon: DaemonRunner) -> None:
    args = [*CTL, "--socket", str(demo_daemon.socket), "status"]
    coloured = _on_terminal(args)
    assert "\x1b[32mRUNNING\x1b[0m" in coloured
    plain = _on_terminal(args, NO_COLOR="1")
    assert "\x1b" not in plain and "RUNNING" in plain
    piped = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=60)
    assert piped.returncode == 0 and "\x1b" not in piped.stdout


def test_status_of_names_and_unknown_names(demo_daemon: DaemonRunner) -> None:
    result = demo_daemon.ctl("status", "ocp_exporter", "pos_proxy")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("NAME") and [line.split()[0] for line in lines[1:]] == [
        "ocp_exporter", "pos_proxy"]
    for args in (("status", "nosuch"), ("restart", "nosuch"), ("verify", "nosuch"),
                 ("logs", "nosuch"), ("signal", "HUP", "nosuch")):
        result = demo_daemon.ctl(*args)
        assert result.returncode == 1, args
        assert ("no program named 'nosuch'; the programs are: pos_proxy, ocp_exporter, "
                "ob_logtailer") in result.stderr, (args, result.stderr)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    for args, env in (((f"--config={missing}", "status"), {}),
                      (("status",), {"OCP_AGENTD_CONFIG": str(missing)})):
        result = subprocess.run([*CTL, *args], capture_output=True, text=True,
                                env=_env(**env), timeout=60)
        assert result.returncode == 2
        assert f"configuration file {missing}" in result.stderr
        assert "does not exist" in result.stderr


def test_last_exit_reads_naturally_once(demo_daemon: DaemonRunner) -> None:
    before = demo_daemon.process("ocp_exporter")["pid"]
    os.kill(before, signal.SIGKILL)
    wait_for(lambda: (p := demo_daemon.process("ocp_exporter"))["state"] == "RUNNING"
             and p["pid"] != before, timeout=20, message="ocp_exporter back")
    result = demo_daemon.ctl("status", "ocp_exporter")
    row = result.stdout.splitlines()[1]
    assert re.search(r"killed by SIGKILL at \d\d:\d\d:\d\d$", row), row
    assert row.count("SIGKILL") == 1


def _actions(parser: argparse.ArgumentParser, path: str = "ocp-agentctl"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, parser, action


def test_every_command_has_a_description_and_states_defaults() -> None:
    parsers = {}
    for path, parser, action in _actions(build_parser()):
        parsers[path] = parser
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        assert action.help, (path, action.dest)
        optional = bool(action.option_strings) or action.nargs in ("?", "*")
        if optional:
            assert "default" in action.help, (path, action.dest, action.help)
    assert len(parsers) >= 19
    for path, parser in parsers.items():
        assert parser.description, path
    result = subprocess.run([*CTL, "task", "show", "--help"], capture_output=True, text=True,
                            env=_env(), timeout=60)
    assert result.returncode == 0 and "A task and its subtasks" in result.stdout
