"""A real unprivileged user for tests of what root must not do on another user's behalf.

    with unix_user() as user:      # user.name, user.uid, user.gid
        user.run("ln", "-sf", "/etc/shadow", "/some/dir/app.log")   # runs as that user

The user (and its group) is created with useradd under a unique name and removed with
userdel when the block ends, failing or not. A shared base directory other users can
reach is made with reachable_dir() (under /var/tmp, removed after).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class UnixUser:
    name: str
    uid: int
    gid: int

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """argv run as this user (no shell), output captured."""
        return subprocess.run(
            list(argv), user=self.uid, group=self.gid, extra_groups=[], check=check,
            capture_output=True, text=True, timeout=30, cwd="/",
        )


@contextlib.contextmanager
def unix_user() -> Iterator[UnixUser]:
    """A fresh user with its own group, no home directory, removed afterwards."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    name = f"ocpt{uuid.uuid4().hex[:10]}"
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, timeout=30,
    )
    try:
        ids = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True)
        gids = subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True)
        yield UnixUser(name, int(ids.stdout), int(gids.stdout))
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


@contextlib.contextmanager
def reachable_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /var/tmp that any user can traverse."""
    path = Path(tempfile.mkdtemp(prefix="ocp-agentd-test-", dir="/var/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
