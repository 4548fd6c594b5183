"""The README's console sessions, run: every ``$ command`` of every ```console block, in
order, in one bash session, against a demo daemon, and its output compared by shape.

The daemon runs the demo config (``python -m ocp_agentd.demo.config .demo``) in a fresh
folder whose ``.venv`` is this interpreter's, so the README's relative paths hold. Shape:
every run of digits stands for any number and runs of spaces for any spacing (pids, times,
ports, column widths vary); a line ``...`` stands for any number of lines, and a line that
ends in ``...`` for any line that begins as it does. Between two
commands the test waits until no program is STARTING, BACKOFF or STOPPING and no task is
RUNNING, as a person typing the next command would find it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import DaemonRunner, free_port_block, wait_for

from ocp_agentd.demo.config import write_demo_config

README = Path(__file__).resolve().parent.parent / "README.md"
TRANSIENT = ("STARTING", "BACKOFF", "STOPPING")
ANY_LINES = "..."


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    line: int = 0


def console_steps(text: str) -> list[Step]:
    """Each ``$ command`` of the ```console blocks with the lines it shows after it; a
    command line ending in a backslash goes on on the next line."""
    steps: list[Step] = []
    inside = False
    continued = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            inside = line.strip() == "```console"
            continued = False
            continue
        if not inside:
            continue
        if continued:
            steps[-1].command += "\n" + line
            continued = line.endswith("\\")
        elif line.startswith("$ "):
            steps.append(Step(line[2:], line=number))
            continued = line.endswith("\\")
        elif steps and (line.strip() or steps[-1].expected):
            steps[-1].expected.append(line)
    for step in steps:
        while step.expected and not step.expected[-1].strip():
            step.expected.pop()
    return steps


def shape(line: str) -> str:
    return " ".join(re.sub(r"\d+", "0", line).split())


def matches(expected: list[str], actual: list[str]) -> bool:
    """True when ``actual`` has the shape of ``expected`` (``...`` matches any lines)."""
    if not expected:
        return not actual
    head, *rest = expected
    if head.strip() == ANY_LINES:
        return any(matches(rest, actual[skip:]) for skip in range(len(actual) + 1))
    if not actual:
        return False
    if head.rstrip().endswith(ANY_LINES):
        alike = shape(actual[0]).startswith(shape(head.rstrip()[:-len(ANY_LINES)]))
    else:
        alike = shape(head) == shape(actual[0])
    return alike and matches(rest, actual[1:])


class Shell:
    """One bash process; ``run`` sends a command and answers its output (stdout and
    stderr, as a terminal shows both) and exit status."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.mark = f"__done_{uuid.uuid4().hex}__"
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"], cwd=cwd, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def run(self, command: str) -> tuple[list[str], int]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{command}\nprintf '\\n{self.mark} %s\\n' $?\n")
        self.process.stdin.flush()
        lines: list[str] = []
        while True:
            line = self.process.stdout.readline()
            assert line, f"bash ended while running {command!r}: {lines}"
            if line.startswith(self.mark):
                while lines and not lines[-1].strip():
                    lines.pop()  # as the README's blocks do not show trailing blank lines
                return lines, int(line.split()[1])
            lines.append(line.rstrip("\n"))

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


PF_EXITING = 0x4  # linux/sched.h: the task is in do_exit
SIGKILL_BIT = 1 << 8


def _alive(pid: int) -> bool:
    """The process lives and is not about to die: not a zombie, not exiting, no SIGKILL
    pending (proc(5): /proc/PID/stat flags, /proc/PID/status SigPnd and ShdPnd). A kill
    returns before its target dies; this tells the two apart without waiting."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X") or int(fields[6]) & PF_EXITING:
        return False
    pending = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()
               if line.startswith(("SigPnd:", "ShdPnd:"))}
    return not any(mask & SIGKILL_BIT for mask in pending.values())


def settled(runner: DaemonRunner) -> bool:
    """No program on its way between states (a RUNNING one whose process just died is on
    its way too: the daemon has not handled the exit yet) and no task RUNNING."""
    for record in runner.processes():
        if record["state"] in TRANSIENT:
            return False
        if record["state"] == "RUNNING" and not _alive(record["pid"]):
            return False
    tasks = runner.get("/api/v2/tasks/instances?page=1&size=1").check()["contents"]
    return not tasks or tasks[0]["status"] != "RUNNING"


@pytest.fixture
def demo_folder():
    """A short folder (unix socket paths are limited to 108 bytes) with .venv and .demo."""
    folder = Path(tempfile.mkdtemp(prefix="readme-", dir="/tmp"))
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    runner = DaemonRunner(write_demo_config(folder / ".demo", free_port_block(2), 2))
    try:
        runner.start()
        runner.wait_all_running()
        yield folder, runner
    finally:
        runner.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def test_readme_console_sessions_run_as_shown(demo_folder) -> None:
    folder, runner = demo_folder
    steps = console_steps(README.read_text())
    assert len(steps) >= 10
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OCP_AGENTD_", "OCP_AGENTCTL_", "NO_COLOR"))}
    shell = Shell(folder, env)
    try:
        for step in steps:
            wait_for(lambda: settled(runner), timeout=60, message="the demo to settle")
            output, status = shell.run(step.command)
            where = f"README.md line {step.line}: $ {step.command}"
            assert status == 0, f"{where}\nexit {status}\n" + "\n".join(output)
            assert matches(step.expected, output), (
                f"{where}\n--- README shows:\n" + "\n".join(step.expected)
                + "\n--- it printed:\n" + "\n".join(output))
    finally:
        shell.close()
