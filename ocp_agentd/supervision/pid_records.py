"""The pid records: which process is each program's main (SPEC section 3), kept for the
next daemon of this boot (a kill -9, a handover, an upgrade).

Every program's record is in one file, <state_dir>/pids/records.json, replaced
atomically (recordfile.py: how it is read and written, and the earlier version's files).

Written off the event loop: save() and remove() only note the change in memory and one
writer thread puts the whole file on disk, so a spawn does not wait for a file system.
The writer gathers the changes that come close together (GATHER apart, for at most
GATHER_MAX) into one write: a restart of N programs notes about 2N changes, and each
write makes a new inode and carries every record (O(N) each), so writing each change
on its own cost O(N²) and most of the writer's CPU. load() and
names() see the noted changes at once. flush() waits until every change is on disk: the
supervisor calls it when it closes (a shutdown, or a handover whose successor reads the
records). A daemon killed before its writer caught up leaves a record missing or stale,
the same as a crash a moment earlier; adoption then falls back to the markers, and a
stale record fails its identity check (identity.same_process).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

import orjson

from ocp_agentd.supervision import recordfile
from ocp_agentd.supervision.identity import PidRecord

log = logging.getLogger("ocp_agentd.identity")

RECORDS_FILE = recordfile.FILE_NAME

# Seconds: a change this soon after the last one joins its write; a write waits at most
# GATHER_MAX for its changes to stop coming (flush() does not wait for it).
GATHER = 0.005
GATHER_MAX = 0.05


class PidRecords:
    """The pid records of one state directory (see the module's docstring). Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._changed = threading.Condition()
        # name -> its record as JSON; None until read from disk (on first use)
        self._records: dict[str, bytes] | None = None
        self._legacy: list[Path] = []  # an earlier version's files, removed at the next write
        self._noted = 0  # changes noted so far
        self._written = 0  # changes on disk (or given up on, logged)
        self._writer: threading.Thread | None = None
        self._flushing = 0  # flush() calls waiting: write without gathering

    @property
    def path(self) -> Path:
        """The file that holds every record."""
        return self.directory / RECORDS_FILE

    def _all(self) -> dict[str, bytes]:
        """The records; call with self._changed held."""
        if self._records is None:
            found = recordfile.read(self.directory, "pid records")
            self._records = {str(name): orjson.dumps(value) for name, value in found.values.items()}
            self._legacy = found.remove
        return self._records

    # ---- changes ----------------------------------------------------------------------------

    def save(self, record: PidRecord) -> None:
        """Notes record as its program's (replacing any earlier one)."""
        data = orjson.dumps(asdict(record))
        with self._changed:
            self._all()[record.name] = data
            self._note()

    def remove(self, name: str) -> None:
        """Notes that name has no record; nothing to write when it had none."""
        with self._changed:
            if self._all().pop(name, None) is not None:
                self._note()

    def _note(self) -> None:
        self._noted += 1
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_forever, name="pid-records", daemon=True
            )
            self._writer.start()
        self._changed.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until every noted change is on disk; False if that took over timeout."""
        with self._changed:
            self._flushing += 1
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: self._written >= self._noted, timeout)
            finally:
                self._flushing -= 1

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._noted > self._written)
                self._gather()
                noted = self._noted
                records = self._all()
                data = b"{" + b",".join(
                    orjson.dumps(name) + b":" + value for name, value in records.items()
                ) + b"}"
                legacy, self._legacy = self._legacy, []
            self._write(data, legacy)
            with self._changed:
                self._written = noted
                self._changed.notify_all()

    def _gather(self) -> None:
        """Waits (self._changed held) while changes keep coming GATHER apart, for at most
        GATHER_MAX; at once when a flush() waits."""
        deadline = time.monotonic() + GATHER_MAX
        seen = self._noted
        while not self._flushing:
            left = min(GATHER, deadline - time.monotonic())
            if left <= 0:
                return
            self._changed.wait(left)
            if self._noted == seen:
                return
            seen = self._noted

    def _write(self, data: bytes, remove: list[Path]) -> None:
        """Replaces the file with data (in the writer thread); errors are logged."""
        try:
            # No fsync: a record only matters while its process lives, and a power loss
            # ends every process anyway; the page cache outlives a daemon crash.
            recordfile.write(self.directory, data, remove)
        except OSError as exc:
            # Supervision goes on without the records; adoption falls back to markers.
            log.error("cannot write the pid records %s: %s", self.path, exc)

    # ---- reading ----------------------------------------------------------------------------

    def load(self, name: str) -> PidRecord | None:
        """name's record, or None: there is none, or it cannot be read (then it is dropped
        with a warning)."""
        with self._changed:
            data = self._all().get(name)
        if data is None:
            return None
        try:
            return _record(name, orjson.loads(data))
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable pid record of %s in %s: %s", name, self.path, exc)
            self.remove(name)
            return None

    def names(self) -> list[str]:
        """The names that have a record."""
        with self._changed:
            return sorted(self._all())


def _record(name: str, raw: object) -> PidRecord:
    """A PidRecord from its JSON object; ValueError or TypeError when it is not one."""
    if not isinstance(raw, dict):
        raise ValueError(f"not an object: {raw!r}")
    record = PidRecord(**raw)
    if record.name != name:
        raise ValueError(f"the record of {record.name!r} stands for {name!r}")
    if not isinstance(record.pid, int) or record.pid <= 0:
        raise ValueError("bad pid")
    if not isinstance(record.starttime, int) or record.starttime < 0:
        raise ValueError("bad start time")
    return record
