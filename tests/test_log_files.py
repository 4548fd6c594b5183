"""Program logs written as root in a directory a program's user owns (SPEC section 11).

Each attack is run by a real unprivileged user made for the test (tests/unixuser.py):
a symbolic link planted in place of the live log, of a rotated copy, or pointing to a
root-only file; none makes the daemon write, truncate or read another file.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from harness import wait_for
from unixuser import UnixUser

from ocp_agentd import safefs
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output

ROOT_CONTENT = b"root's own file\n"


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


def write_through_keeper(spec: ProgramSpec, script: str) -> None:
    """Runs ``script`` with its stdout and stderr given by output.open_streams (a real log
    keeper behind them) and waits for the keeper to have written everything."""
    out, err = output.open_streams(spec)
    try:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=err, check=True,
                       timeout=120)
    finally:
        os.close(out)
        if err != out:
            os.close(err)
        output.close_streams(spec.name)  # the daemon's copies: the keeper ends after the script
    keepers = [p for p in psutil.process_iter(["cmdline"])
               if "ocp_agentd.logkeeper" in " ".join(p.info["cmdline"] or [])
               and str(spec.stdout_log) in " ".join(p.info["cmdline"] or [])]
    psutil.wait_procs(keepers, timeout=60)


def test_rotation_is_exact_and_loses_no_byte_under_a_fast_writer(tmp_path):
    path = tmp_path / "burst.log"
    spec = ProgramSpec(name="burst", command=["/bin/true"], stdout_log=path, stderr_log=path,
                       log_max_bytes=65536, log_backups=100)
    lines = 40000
    write_through_keeper(spec, (
        "import os\n"
        f"for i in range({lines}):\n    os.write(1, b'%08d %s\\n' % (i, b'.' * 90))\n"))
    rotated = sorted(tmp_path.glob("burst.log.*"), key=lambda p: -int(p.suffix[1:]))
    assert len(rotated) == lines * 100 // 65536
    assert all(p.stat().st_size == 65536 for p in rotated)
    data = b"".join(p.read_bytes() for p in [*rotated, path])
    assert [int(line[:8]) for line in data.splitlines()] == list(range(lines))


def test_each_stream_stays_within_its_bound_at_any_rate(tmp_path):
    out_path, err_path = tmp_path / "fast.stdout.log", tmp_path / "fast.stderr.log"
    spec = ProgramSpec(name="fast", command=["/bin/true"], stdout_log=out_path,
                       stderr_log=err_path, log_max_bytes=1 << 20, log_backups=2)
    # 64 MiB on each stream as fast as the interpreter writes.
    write_through_keeper(spec, (
        "import os\nblock = b'x' * 65536\n"
        "for _ in range(1024):\n    os.write(1, block)\n    os.write(2, block)\n"))
    for path in (out_path, err_path):
        files = sorted(tmp_path.glob(f"{path.name}*"))
        assert [p.name for p in files] == [path.name, f"{path.name}.1", f"{path.name}.2"]
        # Rotated exactly at the limit: the copies hold 1 MiB each, the live file less.
        sizes = [p.stat().st_size for p in files]
        assert sizes[1:] == [1 << 20] * 2 and sizes[0] < 1 << 20


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


def test_a_program_keeps_writing_its_log_through_a_daemon_crash(daemon_factory):
    """The log keeper is no part of the daemon: kill -9 of the daemon leaves the program
    running (no SIGPIPE) and every line it writes meanwhile lands in its log."""
    counter = ("i=0; while :; do echo \"tick $i\"; i=$((i+1)); sleep 0.01; done")
    daemon = daemon_factory(extra_programs={"ticker": {
        "command": ["/bin/sh", "-c", counter], "start_seconds": 0, "cwd": "/",
        "log_max_bytes": 4096, "log_backups": 50}})
    pid = daemon.wait_state("ticker", "RUNNING", timeout=20)["pid"]
    assert daemon.settings is not None
    log = daemon.settings.programs["ticker"].stdout_log
    assert log is not None

    def ticks() -> list[int]:
        files = sorted(log.parent.glob(f"{log.name}.*"), key=lambda p: -int(p.suffix[1:]))
        data = b"".join(p.read_bytes() for p in [*files, log])
        return [int(line.split()[1]) for line in data.splitlines() if line.startswith(b"tick")]

    daemon.kill9()
    seen = len(ticks())
    wait_for(lambda: len(ticks()) > seen + 100, timeout=20, message="lines written meanwhile")
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    daemon.start(timeout=20)
    assert daemon.wait_state("ticker", "RUNNING", timeout=20)["pid"] == pid
    numbers = ticks()
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    assert numbers[0] == 0


def test_journal_target_speaks_journald_stream_protocol(tmp_path, monkeypatch):
    """A stand-in for journald's stream socket (no journald runs on the build machine):
    a listening unix socket at output.JOURNAL_STDOUT's place that records what a program
    given log_target = "journal" sends: the stream header (identifier = the program's
    name, priority 6 for stdout, 3 for stderr), then its lines. tests/e2e checks the same
    against the real journald of a systemd container."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = tmp_path / "stdout"
    listener.bind(str(address))
    listener.listen(4)
    monkeypatch.setattr(output, "JOURNAL_STDOUT", str(address))
    spec = ProgramSpec(name="jprog", command=["/bin/true"], log_target="journal")
    out, err = output.open_streams(spec)
    try:
        subprocess.run(["/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2"],
                       stdout=out, stderr=err, check=True, timeout=30)
    finally:
        os.close(out)
        os.close(err)
    received = []
    for _ in range(2):
        conn, _ = listener.accept()
        with conn:
            received.append(b"".join(iter(lambda c=conn: c.recv(4096), b"")).decode())
    listener.close()
    assert sorted(received) == sorted([
        "jprog\n\n6\n0\n0\n0\n0\nto-stdout\n", "jprog\n\n3\n0\n0\n0\n0\nto-stderr\n"])
    assert not list(tmp_path.glob("*.log"))


def test_the_design_measurement_script_runs(tmp_path):
    """scripts/log_designs.py (README, Security) at a small size: both designs report."""
    script = Path(__file__).parent.parent / "scripts" / "log_designs.py"
    result = subprocess.run(
        [sys.executable, str(script), "--seconds", "0.3", "--rate-mb", "20", "--max-mib", "1",
         "--backups", "2", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = result.stdout.splitlines()
    pipe = next(line for line in lines if line.startswith("(a)"))
    assert "max disk MiB 3.0" in pipe or "max disk MiB 2." in pipe, result.stdout
    assert any(line.startswith("(b)") for line in lines)


def test_a_stopped_daemon_leaves_no_log_keeper(daemon_factory):
    daemon = daemon_factory(wait_running=True)

    def keepers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                mark = proc.environ().get(output.KEEPER_MARK, "")
                if mark.startswith(f"{daemon.state_dir}:"):
                    found.append(proc)
        return found

    assert len(keepers()) == 3  # one per demo program
    assert daemon.stop() == 0
    assert keepers() == []


def test_stat_if_safe_accepts_only_what_the_walk_would_open_as_it_is(base, user):
    logs = user_dir(base, user)
    user.run("touch", str(logs / "app.log"))
    st = safefs.stat_if_safe(logs / "app.log", user.uid)
    assert st is not None and st.st_ino == (logs / "app.log").stat().st_ino
    assert safefs.stat_if_safe(logs / "app.log", None) is None  # not root's, not allowed
    assert safefs.stat_if_safe(logs / "missing.log", user.uid) is None
    assert safefs.stat_if_safe("relative/app.log", user.uid) is None
    user.run("ln", "-s", str(logs / "app.log"), str(logs / "link.log"))
    assert safefs.stat_if_safe(logs / "link.log", user.uid) is None
    user.run("ln", str(logs / "app.log"), str(logs / "hard.log"))
    assert safefs.stat_if_safe(logs / "app.log", user.uid) is None  # two links now
    (logs / "hard.log").unlink()
    (base / "by-root").symlink_to(logs)  # root's link: the walk follows it, this declines
    assert safefs.stat_if_safe(base / "by-root" / "app.log", user.uid) is None
    logs.chmod(0o777)
    assert safefs.stat_if_safe(logs / "app.log", user.uid) is None
    logs.chmod(0o1777)  # sticky, but the user's, not root's
    assert safefs.stat_if_safe(logs / "app.log", user.uid) is None
    logs.chmod(0o755)
    assert safefs.stat_if_safe(logs / "app.log", user.uid) is not None
    # One look at two logs walks their directories once; an unsafe one is never passed.
    passed: set[str] = set()
    assert safefs.stat_if_safe(logs / "app.log", user.uid, passed) is not None
    assert str(logs) in passed and "/" + logs.parts[1] in passed
    user.run("touch", str(logs / "err.log"))
    assert safefs.stat_if_safe(logs / "err.log", user.uid, passed) is not None
    logs.chmod(0o777)
    refused: set[str] = set()
    assert safefs.stat_if_safe(logs / "app.log", user.uid, refused) is None
    assert str(logs) not in refused


def test_a_running_keeper_is_not_reused_once_others_can_write_the_directory(base, user):
    """The cheap check for reusing a keeper declines; the safe open then refuses, as for
    a first start."""
    logs = user_dir(base, user)
    spec = ProgramSpec(name="reuse", command=["/bin/true"], user=user.name, cwd="/",
                       stdout_log=logs / "reuse.log", stderr_log=logs / "reuse.log")
    try:
        first = output.open_streams(spec)
        again = output.open_streams(spec)
        assert os.fstat(first[0]).st_ino == os.fstat(again[0]).st_ino  # the same keeper
        for fd in {*first, *again}:
            os.close(fd)
        logs.chmod(0o777)
        with pytest.raises(safefs.UnsafePath, match="writable by others"):
            output.open_streams(spec)
    finally:
        output.close_streams(spec.name)
