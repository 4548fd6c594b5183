"""Something other than a regular file planted where a record file goes, and a first
read of the records that must not block on it (tests of pid and intent records)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

from ocp_agentd.supervision.recordfile import FILE_NAME


class Named(Protocol):
    def names(self) -> list[str]: ...


def plant_in_place(directory: Path, kind: str) -> Path:
    """Makes directory and puts a FIFO ("fifo") or a directory ("directory") at its
    records file's path; answers that path."""
    directory.mkdir()
    path = directory / FILE_NAME
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


def names_within(records: Named, path: Path, timeout: float = 5.0) -> list[str] | None:
    """records.names() (the first read of the file), or None when it did not return within
    timeout seconds; a FIFO's reader is then let go (a writer opened and closed)."""
    answer: list[list[str]] = []
    reader = threading.Thread(target=lambda: answer.append(records.names()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout)
        return None
    return answer[0]
