"""What each program needs from this host, checked against the real host (hostcheck.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

from ocp_agentd.config import ProgramSpec
from ocp_agentd.hostcheck import program_problems


def spec(**fields: object) -> ProgramSpec:
    fields.setdefault("command", ["/bin/sleep", "1"])
    program = ProgramSpec(**fields)
    program.name = "p"
    return program


def keys(program: ProgramSpec) -> list[str]:
    return [problem.key for problem in program_problems(program)]


def test_a_runnable_program_has_no_problem(tmp_path: Path) -> None:
    assert program_problems(spec(user="root", cwd=str(tmp_path))) == []


def test_each_problem_names_its_key_and_reason(tmp_path: Path) -> None:
    user = f"nouser{uuid.uuid4().hex[:10]}"
    problems = program_problems(spec(user=user, cwd=str(tmp_path / "gone")))
    assert [str(p) for p in problems] == [
        f"programs.p.user: no user {user!r} on this host",
        f"programs.p.cwd: {tmp_path / 'gone'}: does not exist",
    ]


def test_the_command_must_be_an_executable_file(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    assert keys(spec(command=[str(script)])) == ["programs.p.command"]
    script.chmod(0o755)
    assert keys(spec(command=[str(script)])) == []
    assert keys(spec(command=[str(tmp_path)])) == ["programs.p.command"]
    assert keys(spec(command=[str(tmp_path / "missing")])) == ["programs.p.command"]


def test_a_cwd_that_is_a_file_is_named(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    assert [str(p) for p in program_problems(spec(cwd=str(afile)))] == [
        f"programs.p.cwd: {afile} is not a directory"
    ]
