"""Program stdout and stderr go straight into files opened in append mode.

The daemon does not sit in the pipe: a program keeps logging while the daemon restarts
or is upgraded, and a full disk fails the program's writes, never the daemon. Files are
rotated by size with copy-and-truncate, which works because every writer appends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger("ocp_agentd.output")


def open_log(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def rotate_if_needed(path: Path, max_bytes: int, backups: int) -> bool:
    """Keeps path under max_bytes: path.1 .. path.<backups> hold the older content."""
    if max_bytes <= 0:
        return False
    try:
        if path.stat().st_size <= max_bytes:
            return False
        if backups <= 0:
            os.truncate(path, 0)
            return True
        for index in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
        os.truncate(path, 0)
        return True
    except OSError as exc:
        # A full disk must not stop supervision: drop what cannot be kept.
        log.warning("cannot rotate %s: %s", path, exc)
        with contextlib.suppress(OSError):
            if path.stat().st_size > max_bytes:
                os.truncate(path, 0)
        return False
