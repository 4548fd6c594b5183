"""What a program's configuration needs from this host: its user, its cwd, its command.

The schema (config.py) says whether a file is well formed; this says whether each program
can run here. `ocp-agentd --check` fails on any problem, naming the key; the daemon checks
a program again before each spawn, so a problem that appears later (a user deleted, a
directory removed) fails that program alone with the key and the true reason, never the
daemon.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from ocp_agentd.config import ProgramSpec, Settings


@dataclass(frozen=True)
class HostProblem:
    """One key whose value this host cannot satisfy, e.g. ("programs.web.user", "no user
    'web' on this host")."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def program_problems(spec: ProgramSpec) -> list[HostProblem]:
    """Every problem of one program on this host: `user` exists (getpwnam(3)), `cwd` is a
    directory, `command[0]` is an executable regular file. Empty when it can be spawned."""
    prefix = f"programs.{spec.name}"
    problems: list[HostProblem] = []
    if spec.user:
        try:
            pwd.getpwnam(spec.user)
        except KeyError:
            problems.append(HostProblem(f"{prefix}.user", f"no user {spec.user!r} on this host"))
    if spec.cwd is not None:
        why = _directory_problem(spec.cwd)
        if why:
            problems.append(HostProblem(f"{prefix}.cwd", why))
    why = _executable_problem(Path(spec.command[0]))
    if why:
        problems.append(HostProblem(f"{prefix}.command", why))
    return problems


def host_problems(settings: Settings) -> list[HostProblem]:
    """program_problems of every program, in the config's order."""
    return [problem for spec in settings.programs.values() for problem in program_problems(spec)]


def _directory_problem(path: Path) -> str | None:
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {_why(exc)}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory"
    return None


def _executable_problem(path: Path) -> str | None:
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path}: {_why(exc)}"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    # execve(2) needs an execute bit; root passes access(X_OK) as soon as one is set.
    if not info.st_mode & 0o111 or not os.access(path, os.X_OK):
        return f"{path} is not executable"
    return None


def _why(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    return exc.strerror or str(exc)
