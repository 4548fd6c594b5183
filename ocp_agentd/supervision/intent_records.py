"""Operator intent kept across a daemon restart, not across a host reboot (SPEC section 12).

One small JSON file per program under <state_dir>/intent, present only while the program is
"left so" on purpose: stopped on request (``state = "STOPPED"``), or exited by itself and
left so by its ``autorestart`` (``state = "EXITED"``). A start or restart removes it. Each
record names the kernel boot it was written in (/proc/sys/kernel/random/boot_id, random(4));
a record of another boot is ignored and removed, as ``systemctl stop`` does not outlive a
reboot either.

Written at once, on the caller's path, before the operation waits for anything: the file is
a few dozen bytes on the daemon's own state directory (one open, write, rename; no fsync, as
a power loss is a reboot and ends the record's meaning anyway), so a stop that was answered
survives a kill -9 a moment later. Files are opened with O_NOFOLLOW and replaced with
rename(2), which replaces a link in the way instead of following it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

log = logging.getLogger("ocp_agentd.intent")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
LeftState = Literal["STOPPED", "EXITED"]


@functools.cache
def boot_id() -> str:
    """This boot's id (random(4): a new UUID at every boot), or "" if it cannot be read."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class IntentRecord:
    """A program left so on purpose: ``state`` STOPPED (stopped on request) or EXITED (its
    exit left so by autorestart); ``at`` in epoch seconds; ``reason`` for people."""

    name: str
    state: LeftState
    at: float
    boot_id: str
    reason: str = ""


class IntentRecords:
    """The records of one state directory. Errors of the file system are logged, never
    raised: supervision goes on, and the record then lasts only as long as the daemon."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def save(self, name: str, state: LeftState, reason: str = "") -> None:
        """Records that name is left in state (replacing any record of it)."""
        record = IntentRecord(name, state, time.time(), boot_id(), reason)
        data = orjson.dumps(record.__dict__)
        path = self._path(name)
        tmp = self.directory / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            self._make_directory()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot record %s as %s: %s", name, state, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _make_directory(self) -> None:
        with contextlib.suppress(FileExistsError):  # a file or link in the way: below
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.directory.is_symlink() or not self.directory.is_dir():
            raise OSError(f"{self.directory} is not a directory")

    def remove(self, name: str) -> None:
        """Forgets name's record (a start or restart was requested); none is fine."""
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove the intent record of %s: %s", name, exc)

    def load(self, name: str) -> IntentRecord | None:
        """name's record of this boot; None if there is none. A record of another boot, or
        one that cannot be read, is removed (with a warning for the unreadable one)."""
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("ignoring unreadable intent record %s: %s", path, exc)
            self.remove(name)
            return None
        try:
            with os.fdopen(fd, "rb") as handle:
                record = IntentRecord(**orjson.loads(handle.read(65536)))
            if record.state not in ("STOPPED", "EXITED") or record.name != name:
                raise ValueError(f"bad record {record!r}")
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable intent record %s: %s", path, exc)
            self.remove(name)
            return None
        if record.boot_id != boot_id() or not record.boot_id:
            log.info("%s: ignoring the record of a stop or exit of an earlier boot", name)
            self.remove(name)
            return None
        return record

    def names(self) -> list[str]:
        """Names with a record on disk (of any boot)."""
        try:
            return sorted(p.stem for p in self.directory.glob("*.json"))
        except OSError:
            return []
