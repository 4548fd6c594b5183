"""The log keeper's privileges and hard links to its live file (SPEC section 11).

A real program runs as a real unprivileged user made for the test (tests/unixuser.py)
behind a real keeper (output.open_streams). The keeper must hold no capability beyond
what rotation needs (none of CAP_SYS_RESOURCE: its writes are charged to the file owner's
quota), have no_new_privs, still rotate in a root-owned log directory and in one the user
owns, and stop feeding a live file the user has hard-linked to keep it past rotation.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import wait_for
from unixuser import UnixUser

from ocp_agentd import linux
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output

# Writes numbered 100-byte lines until killed (a shell: the user cannot run the venv).
WRITER = "i=0; while :; do printf '%08d %090d\\n' $i 0; i=$((i+1)); sleep 0.001; done"


def log_dir(base: Path, owner: UnixUser | None) -> Path:
    logs = base / "logs"
    logs.mkdir()
    if owner is not None:
        os.chown(logs, owner.uid, owner.gid)
    logs.chmod(0o755)
    return logs


@contextlib.contextmanager
def program_as(user: UnixUser, logs: Path, max_bytes: int) -> Iterator[psutil.Process]:
    """WRITER running as ``user`` with its output in logs/app.log behind a real keeper;
    yields the keeper. The writer is killed and the keeper waited for afterwards."""
    spec = ProgramSpec(name=f"caps{os.getpid()}", command=["/bin/true"], user=user.name,
                       stdout_log=logs / "app.log", stderr_log=logs / "app.log",
                       log_max_bytes=max_bytes, log_backups=2)
    out, err = output.open_streams(spec)
    writer = None
    try:
        writer = subprocess.Popen(["/bin/sh", "-c", WRITER], stdout=out, stderr=err,
                                  stdin=subprocess.DEVNULL, user=user.uid, group=user.gid,
                                  extra_groups=[], cwd="/")
        os.close(out)
        out = -1
        keepers = [p for p in psutil.process_iter(["cmdline"])
                   if "ocp_agentd.logkeeper" in " ".join(p.info["cmdline"] or [])
                   and str(spec.stdout_log) in " ".join(p.info["cmdline"] or [])]
        assert len(keepers) == 1
        yield keepers[0]
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        if out >= 0:
            os.close(out)
        output.close_streams(spec.name)
        keepers = [p for p in psutil.process_iter(["cmdline"])
                   if "ocp_agentd.logkeeper" in " ".join(p.info["cmdline"] or [])
                   and str(spec.stdout_log) in " ".join(p.info["cmdline"] or [])]
        _, alive = psutil.wait_procs(keepers, timeout=30)
        for proc in alive:
            proc.kill()


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


@pytest.mark.parametrize("owned_by_user", [False, True], ids=["root-dir", "user-dir"])
def test_the_keeper_drops_its_powers_and_still_rotates(base, user, owned_by_user):
    logs = log_dir(base, user if owned_by_user else None)
    with program_as(user, logs, max_bytes=4096) as keeper:
        # The capabilities are dropped before the first pipe is read: once a rotated copy
        # exists, the keeper is long past that point.
        wait_for(lambda: (logs / "app.log.2").exists(), timeout=30,
                 message="two rotations")
        status = status_fields(keeper.pid)
        effective = int(status["CapEff"], 16)
        assert not effective >> linux.CAP_SYS_RESOURCE & 1
        assert effective & ~((1 << linux.CAP_CHOWN) | (1 << linux.CAP_DAC_OVERRIDE)) == 0
        assert int(status["CapPrm"], 16) == effective
        assert not int(status["CapBnd"], 16) >> linux.CAP_SYS_RESOURCE & 1
        assert int(status["CapInh"], 16) == 0
        assert status["NoNewPrivs"] == "1"
    for name in ("app.log", "app.log.1", "app.log.2"):
        st = (logs / name).stat()
        assert (st.st_uid, st.st_nlink) == (user.uid, 1)
    assert (logs / "app.log.1").stat().st_size == 4096


@pytest.mark.parametrize("owned_by_user", [False, True], ids=["root-dir", "user-dir"])
def test_a_hard_link_to_the_live_file_makes_the_keeper_move_on(base, user, owned_by_user,
                                                              capfd):
    logs = log_dir(base, user if owned_by_user else None)
    stash = base / "stash"
    stash.mkdir()
    os.chown(stash, user.uid, user.gid)
    live = logs / "app.log"
    with program_as(user, logs, max_bytes=1 << 30):
        wait_for(lambda: live.exists() and live.stat().st_size > 0, timeout=30,
                 message="the first line")
        user.run("ln", str(live), str(stash / "kept"))
        kept = stash / "kept"
        linked = kept.stat().st_ino
        wait_for(lambda: live.stat().st_ino != linked, timeout=30,
                 message="a fresh live file")
        size = kept.stat().st_size
        # The fresh file grows while the linked inode does not.
        wait_for(lambda: live.stat().st_size > 20_000, timeout=30, message="more lines")
        assert kept.stat().st_size == size
        assert (logs / "app.log.1").stat().st_ino == linked  # rotated like any full file
    assert "links (someone linked the live file)" in capfd.readouterr().err
    # No line was lost: the linked inode holds the start, the fresh file the rest.
    numbers = [int(line[:8]) for line in (kept.read_bytes() + live.read_bytes()).splitlines()]
    assert numbers == list(range(len(numbers)))
