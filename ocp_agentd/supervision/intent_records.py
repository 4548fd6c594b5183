"""Operator intent kept across a daemon restart, not across a host reboot (SPEC section 12).

One small JSON file per program under <state_dir>/intent, present only while the program is
"left so" on purpose: stopped on request (``state = "STOPPED"``), or exited by itself and
left so by its ``autorestart`` (``state = "EXITED"``). A start or restart removes it. Each
record names the kernel boot it was written in (/proc/sys/kernel/random/boot_id, random(4));
a record of another boot is ignored and removed, as ``systemctl stop`` does not outlive a
reboot either.

Handed to one writer thread the moment the operation is requested (save_soon and
remove_soon, in the order requested), and awaited before the operation answers, so an
answered stop survives a kill -9 a moment later. Off the event loop because a rename over an
existing file makes ext4 write the new file's blocks first (auto_da_alloc): measured at
about 1.7 ms here, 4 ms under load. No fsync: a power loss is a reboot, which ends the
record's meaning anyway. Files are opened with O_NOFOLLOW and replaced with rename(2), which
replaces a link in the way instead of following it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
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
        # One thread: the changes reach the disk in the order they were requested.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intent-records")

    def save_soon(self, name: str, state: LeftState, reason: str = "") -> asyncio.Future[None]:
        """save() in the writer thread; the future is done once it is on disk (or failed,
        logged). Call from the event loop."""
        return asyncio.get_running_loop().run_in_executor(
            self._writer, self.save, name, state, reason
        )

    def remove_soon(self, name: str) -> asyncio.Future[None]:
        """remove() in the writer thread, after every change requested before it."""
        return asyncio.get_running_loop().run_in_executor(self._writer, self.remove, name)

    async def flush(self) -> None:
        """Waits until every change requested so far is on disk."""
        await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

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
