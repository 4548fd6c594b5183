"""What must hold before the daemon runs: writable directories, one daemon per state_dir."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path


def check_writable(directory: Path) -> str | None:
    """None if the daemon can create files in directory (made if missing), else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"{directory} is not writable: {exc.strerror or exc}"
    return None


def take_instance_lock(state_dir: Path) -> int:
    """One daemon per state_dir: a second one would adopt and start the same programs.

    Takes flock(2) on state_dir/ocp_agentd.lock and writes our pid into it. Returns the
    locked descriptor (kept open for the daemon's life; not inherited by programs).
    Raises RuntimeError naming the holder if another daemon has it, OSError when the file
    cannot be opened.
    """
    path = state_dir / "ocp_agentd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"another ocp-agentd (pid {holder}) already runs with state_dir {state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
