"""Operator intent kept across a daemon restart, not across a host reboot (SPEC section 12).

One record per program, all in <state_dir>/intent/records.json, present only while the
program is "left so" on purpose: stopped on request (``state = "STOPPED"``), or exited by
itself and left so by its ``autorestart`` (``state = "EXITED"``). A start or restart removes
it. Each record names the kernel boot it was written in (/proc/sys/kernel/random/boot_id,
random(4)); a record of another boot is ignored and removed, as ``systemctl stop`` does not
outlive a reboot either.

Handed to one writer thread in the event loop pass the operation is requested in (save_soon
and remove_soon; one write of the file for all of that pass's changes: a stop-all's N
records cost one), and awaited before the operation answers, so an answered stop survives a
kill -9 a moment later. Off the event loop because a rename over an existing file makes
ext4 write the new file's blocks first (auto_da_alloc): measured at about 1.7 ms here, 4 ms
under load. No fsync: a power loss is a reboot, which ends the record's meaning anyway. The
file is opened with O_NOFOLLOW and replaced with rename(2), which replaces a link in the
way instead of following it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import orjson

from ocp_agentd.supervision import recordfile

log = logging.getLogger("ocp_agentd.intent")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
LeftState = Literal["STOPPED", "EXITED"]
RECORDS_FILE = recordfile.FILE_NAME


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
    """The records of one state directory, all in one file (RECORDS_FILE), replaced
    atomically at each change (recordfile.py: how it is read and written, and why one
    file, and the earlier version's files).

    The records live in memory (read from disk on first use); changes are made there at
    once and reach the disk through the writer thread. Errors of the file system are
    logged, never raised: supervision goes on, and the record then lasts only as long as
    the daemon. Call everything from the event loop's thread.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # One thread: the changes reach the disk in the order they were requested.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intent-records")
        # The futures of changes requested in this pass of the event loop, not yet handed
        # to the writer.
        self._batch: list[asyncio.Future[None]] = []
        self._records: dict[str, IntentRecord] | None = None  # None: not read yet
        self._legacy: list[Path] = []  # an earlier version's files, removed at the next write

    @property
    def path(self) -> Path:
        """The file that holds every record."""
        return self.directory / RECORDS_FILE

    def _all(self) -> dict[str, IntentRecord]:
        if self._records is None:
            found = recordfile.read(self.directory, "intent records")
            self._records = {}
            for name, value in found.values.items():
                try:
                    self._records[name] = _record(name, value)
                except (ValueError, TypeError) as exc:
                    log.warning("ignoring the unreadable intent record of %s: %s", name, exc)
            self._legacy = found.remove
        return self._records

    # ---- changes ----------------------------------------------------------------------------

    def save_soon(self, name: str, state: LeftState, reason: str = "") -> asyncio.Future[None]:
        """Records that name is left in state; the future is done once it is on disk (or
        the write failed, logged). Call from the event loop."""
        self._all()[name] = IntentRecord(name, state, time.time(), boot_id(), reason)
        return self._soon()

    def remove_soon(self, name: str) -> asyncio.Future[None]:
        """Forgets name's record (a start or restart was requested); none is fine."""
        self._all().pop(name, None)
        return self._soon()

    async def flush(self) -> None:
        """Waits until every change requested so far is on disk."""
        if self._batch:
            await asyncio.shield(self._batch[-1])
        await asyncio.get_running_loop().run_in_executor(self._writer, lambda: None)

    def save(self, name: str, state: LeftState, reason: str = "") -> None:
        """save_soon(), waiting (blocking) until it is on disk."""
        self._all()[name] = IntentRecord(name, state, time.time(), boot_id(), reason)
        self._write_now()

    def remove(self, name: str) -> None:
        """remove_soon(), waiting (blocking) until it is on disk."""
        if self._all().pop(name, None) is not None or self._legacy:
            self._write_now()

    def _write_now(self) -> None:
        self._writer.submit(self._write, self._serialized(), list(self._legacy)).result()
        self._legacy = []

    def _soon(self) -> asyncio.Future[None]:
        """The changes requested within one pass of the event loop (a stop-all's N stops)
        go to the writer as one write of the file; each future is done once it is done."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._hand_off)
        self._batch.append(future)
        return future

    def _hand_off(self) -> None:
        batch, self._batch = self._batch, []
        legacy, self._legacy = self._legacy, []
        written = asyncio.get_running_loop().run_in_executor(
            self._writer, self._write, self._serialized(), legacy
        )

        def answer(_: asyncio.Future[None]) -> None:
            for future in batch:
                if not future.done():  # its caller may have given up waiting
                    future.set_result(None)

        written.add_done_callback(answer)

    def _serialized(self) -> bytes:
        return orjson.dumps({name: asdict(record) for name, record in self._all().items()})

    def _write(self, data: bytes, legacy: list[Path]) -> None:
        """Replaces the file with data (in the writer thread), then removes the earlier
        version's files it now holds; errors are logged."""
        try:
            recordfile.write(self.directory, data, legacy)
        except OSError as exc:
            log.error("cannot record the programs left stopped or exited: %s", exc)

    # ---- reading ----------------------------------------------------------------------------

    def load(self, name: str) -> IntentRecord | None:
        """name's record of this boot; None if there is none. A record of another boot is
        forgotten (removed at the next write)."""
        record = self._all().get(name)
        if record is None:
            return None
        if record.boot_id != boot_id() or not record.boot_id:
            log.info("%s: ignoring the record of a stop or exit of an earlier boot", name)
            self.remove(name)
            return None
        return record

    def names(self) -> list[str]:
        """Names with a record (of any boot)."""
        return sorted(self._all())


def _record(name: str, raw: object) -> IntentRecord:
    """An IntentRecord from its JSON object; ValueError or TypeError when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError(f"not an object: {raw!r}")
    record = IntentRecord(**raw)
    if record.state not in ("STOPPED", "EXITED") or record.name != name:
        raise ValueError(f"bad record {record!r}")
    return record
