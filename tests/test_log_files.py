"""Program logs written as root in a directory a program's user owns (SPEC section 11).

Each attack is run by a real unprivileged user made for the test (tests/unixuser.py):
a symbolic link planted in place of the live log, of a rotated copy, or pointing to a
root-only file; none makes the daemon write, truncate or read another file.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_for
from unixuser import UnixUser, reachable_dir, unix_user

from ocp_agentd import safefs
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output

ROOT_CONTENT = b"root's own file\n"


@pytest.fixture
def user() -> Iterator[UnixUser]:
    with unix_user() as made:
        yield made


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_dir() as made:
        yield made


def user_dir(base: Path, user: UnixUser, mode: int = 0o755) -> Path:
    logs = base / "logs"
    logs.mkdir()
    os.chown(logs, user.uid, user.gid)
    logs.chmod(mode)
    return logs


def root_file(base: Path, mode: int = 0o644, content: bytes = ROOT_CONTENT) -> Path:
    target = base / "root-owned"
    target.write_bytes(content)
    target.chmod(mode)
    return target


def test_logs_belong_to_the_program_user_0640_and_rotated_copies_keep_it(base, user):
    logs = user_dir(base, user)
    path = logs / "app.stdout.log"
    fd = output.open_log(path, user.uid, user.gid)
    try:
        os.write(fd, b"x" * 10000)
    finally:
        os.close(fd)
    assert output.rotate_if_needed(path, 4096, 2, user.uid, user.gid)
    for name in (path, Path(f"{path}.1")):
        st = os.stat(name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o640)
    # The program's user reads its own logs, live and rotated.
    assert user.run("cat", str(path), f"{path}.1").stdout.count("x") == 10000


def test_a_symlink_in_place_of_the_log_is_never_written_through(base, user):
    logs = user_dir(base, user)
    target = root_file(base)
    path = logs / "app.stdout.log"
    user.run("ln", "-s", str(target), str(path))
    with pytest.raises(safefs.UnsafePath, match="symbolic link"):
        output.open_log(path, user.uid, user.gid)
    assert target.read_bytes() == ROOT_CONTENT
    assert os.stat(target).st_uid == 0


def test_rotation_never_truncates_the_target_of_a_planted_link(base, user):
    logs = user_dir(base, user)
    target = root_file(base, content=b"y" * 100000)
    path = logs / "app.stdout.log"
    user.run("ln", "-s", str(target), str(path))
    with pytest.raises(safefs.UnsafePath):
        output.rotate_if_needed(path, 1024, 2, user.uid, user.gid)
    assert target.stat().st_size == 100000
    assert not Path(f"{path}.1").exists()


def test_rotation_never_copies_a_root_only_file_for_the_user_to_read(base, user):
    logs = user_dir(base, user)
    secret = root_file(base, mode=0o600, content=b"secret " * 10000)
    path = logs / "app.stdout.log"
    user.run("ln", "-s", str(secret), str(path))
    with pytest.raises(safefs.UnsafePath):
        output.rotate_if_needed(path, 1024, 2, user.uid, user.gid)
    readable = user.run("sh", "-c", f"cat {logs}/* 2>/dev/null", check=False).stdout
    assert "secret" not in readable


def test_a_link_planted_as_a_rotated_copy_is_replaced_not_followed(base, user):
    logs = user_dir(base, user)
    target = root_file(base)
    path = logs / "app.stdout.log"
    fd = output.open_log(path, user.uid, user.gid)
    os.write(fd, b"z" * 20000)
    os.close(fd)
    for index in (1, 2):
        user.run("ln", "-s", str(target), f"{path}.{index}")
    assert output.rotate_if_needed(path, 4096, 2, user.uid, user.gid)
    assert target.read_bytes() == ROOT_CONTENT
    copy = os.lstat(f"{path}.1")
    assert stat.S_ISREG(copy.st_mode) and copy.st_uid == user.uid
    assert stat.S_IMODE(copy.st_mode) == 0o640


def test_a_directory_others_can_write_is_refused_naming_it(base, user):
    logs = user_dir(base, user, mode=0o777)
    with pytest.raises(safefs.UnsafePath, match=str(logs)):
        output.open_log(logs / "app.stdout.log", user.uid, user.gid)
    # Owned by the user but the program runs as someone else: refused too.
    logs.chmod(0o755)
    with pytest.raises(safefs.UnsafePath, match=f"{logs}: directory owned by uid {user.uid}"):
        output.open_log(logs / "app.stdout.log", 0, 0)


def test_a_directory_swapped_for_a_link_by_its_owner_is_refused(base, user):
    parent = user_dir(base, user)
    user.run("mkdir", str(parent / "real"))
    user.run("ln", "-s", "/etc", str(parent / "linked"))
    with pytest.raises(safefs.UnsafePath, match="symbolic link that root did not make"):
        output.open_log(parent / "linked" / "passwd", user.uid, user.gid)
    # A link root made in a directory only root writes is followed.
    (base / "by-root").symlink_to(parent / "real")
    fd = output.open_log(base / "by-root" / "app.log", user.uid, user.gid)
    os.close(fd)
    assert (parent / "real" / "app.log").stat().st_uid == user.uid


def test_rotation_under_a_fast_writer_loses_no_byte(tmp_path):
    """A writer appends numbered lines while the watcher rotates as the size passes."""
    path = tmp_path / "burst.log"
    spec = ProgramSpec(name="burst", command=["/bin/true"], stdout_log=path, stderr_log=path,
                       log_max_bytes=65536, log_backups=100)
    lines = 40000
    fd = output.open_log(path)
    os.close(fd)
    watcher = output.LogWatcher()
    try:
        watcher.watch([spec])
        writer = subprocess.run(
            [sys.executable, "-c",
             f"import os\nfd = os.open({str(path)!r}, os.O_WRONLY | os.O_APPEND)\n"
             f"for i in range({lines}):\n    os.write(fd, b'%08d %s\\n' % (i, b'.' * 90))\n"],
            check=True, timeout=60,
        )
        assert writer.returncode == 0
        wait_for(lambda: path.stat().st_size <= 65536 + 4096, message="last rotation")
    finally:
        watcher.close()
    rotated = sorted(tmp_path.glob("burst.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(rotated) >= 10, "the watcher never rotated"
    data = b"".join(p.read_bytes() for p in [*rotated, path])
    numbers = [int(line[:8]) for line in data.splitlines()]
    assert numbers == list(range(lines))


def test_a_program_whose_log_directory_others_can_write_fails_alone(daemon_factory, base):
    open_dir = base / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    daemon = daemon_factory(
        extra_programs={"exposed": {
            "command": ["/bin/sleep", "1000"], "autorestart": "never", "start_seconds": 0,
            "stdout_log": str(open_dir / "exposed.log"), "max_quick_exits": 1,
        }},
        wait_running=False,
    )
    record = daemon.wait_state("exposed", "FATAL", "BACKOFF", "EXITED", "STOPPED", timeout=20)
    assert str(open_dir) in record["last_exit"]["reason"], record
    assert "writable by others" in record["last_exit"]["reason"]
    assert daemon.wait_state("ocp_exporter", "RUNNING", timeout=20)
    assert not (open_dir / "exposed.log").exists()


def test_the_program_user_cannot_redirect_a_restart_through_a_link(daemon_factory, base, user):
    logs = user_dir(base, user)
    target = root_file(base)
    daemon = daemon_factory(
        extra_programs={"victim": {
            "command": ["/bin/sh", "-c", "echo planted-line; exec sleep 1000"],
            "user": user.name, "cwd": "/", "start_seconds": 0, "autorestart": "never",
            "stdout_log": str(logs / "victim.log"), "stderr_log": str(logs / "victim.log"),
        }},
    )
    daemon.wait_state("victim", "RUNNING", timeout=20)
    live = logs / "victim.log"
    wait_for(lambda: b"planted-line" in live.read_bytes(), message="the program's line")
    st = live.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o640)
    user.run("rm", str(live))
    user.run("ln", "-s", str(target), str(live))
    daemon.post("/api/v1/processes/victim/restart")
    record = wait_for(
        lambda: (r := daemon.process("victim"))["last_exit"]
        and "symbolic link" in (r["last_exit"].get("reason") or "") and r,
        timeout=20, message="the refused restart",
    )
    assert str(live) in record["last_exit"]["reason"]
    time.sleep(0)  # the assertions below are about what did not happen
    assert target.read_bytes() == ROOT_CONTENT
