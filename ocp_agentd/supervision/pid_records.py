"""The pid records: which process is each program's main (SPEC section 3), kept for the
next daemon of this boot (a kill -9, a handover, an upgrade).

Every program's record is in one file, <state_dir>/pids/records.json (RECORDS_FILE),
replaced atomically: written to a new file, renamed over the old one. A file per program
cost a new inode at every start, and creating one takes about 0.2 ms of kernel CPU on
this ext4: 10 ms per start-all of 50. The records of an earlier version (one
``<name>.json`` per program) are read too and removed once the one file holds them.

Written off the event loop: save() and remove() only note the change in memory and one
writer thread puts the whole file on disk, as often as it can (the changes noted while it
writes go in the next write), so a spawn does not wait for a file system. load() and
names() see the noted changes at once. flush() waits until every change is on disk: the
supervisor calls it when it closes (a shutdown, or a handover whose successor reads the
records). A daemon killed before its writer caught up leaves a record missing or stale,
the same as a crash a moment earlier; adoption then falls back to the markers, and a
stale record fails its identity check (identity.same_process).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from dataclasses import asdict
from pathlib import Path

import orjson

from ocp_agentd import safefs
from ocp_agentd.supervision.identity import PidRecord

log = logging.getLogger("ocp_agentd.identity")

RECORDS_FILE = "records.json"
MAX_BYTES = 64 << 20  # far above the records of any config; a larger file is not read whole


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
        self._made = False  # the directory exists (made once, not per write)

    @property
    def path(self) -> Path:
        """The file that holds every record."""
        return self.directory / RECORDS_FILE

    def _all(self) -> dict[str, bytes]:
        """The records; call with self._changed held."""
        if self._records is None:
            self._records, self._legacy = _read_directory(self.directory)
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
            return self._changed.wait_for(lambda: self._written >= self._noted, timeout)

    def _write_forever(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._noted > self._written)
                noted = self._noted
                records = self._all()
                data = b"{" + b",".join(
                    orjson.dumps(name) + b":" + value for name, value in records.items()
                ) + b"}"
                legacy, self._legacy = self._legacy, []
            self._write(data)
            for path in legacy:
                with contextlib.suppress(OSError):
                    path.unlink()
            with self._changed:
                self._written = noted
                self._changed.notify_all()

    def _write(self, data: bytes) -> None:
        """Replaces the file with data (in the writer thread); errors are logged."""
        tmp = self.directory / f".{RECORDS_FILE}.{uuid.uuid4().hex}.tmp"
        for attempt in (0, 1):
            try:
                if not self._made:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._made = True
                # No fsync: a record only matters while its process lives, and a power
                # loss ends every process anyway; the page cache outlives a daemon crash.
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)  # replaces a link in the way, never follows it
                return
            except FileNotFoundError:
                if attempt:
                    log.error("cannot write the pid records %s: the directory is gone", self.path)
                    return
                self._made = False  # the directory went away: made again, once
            except OSError as exc:
                # Supervision goes on without the records; adoption falls back to markers.
                log.error("cannot write the pid records %s: %s", self.path, exc)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                return

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


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes (safefs.read_regular_file: never through a link, never blocking on
    a FIFO); None when there is none. Raises UnsafePath when something else is in its
    place, OSError when it cannot be read."""
    return safefs.read_regular_file(path, MAX_BYTES)


def _set_aside(path: Path) -> None:
    """Moves what is in the file's place out of the way (a directory there would make every
    write fail), so that the next write puts the file back."""
    aside = safefs.set_aside(path)
    if aside is None:
        log.error("cannot move %s out of the way: the pid records cannot be written", path)
    else:
        log.warning("moved %s, which is not a regular file, to %s", path, aside)


def _read_directory(directory: Path) -> tuple[dict[str, bytes], list[Path]]:
    """The records in directory as JSON by name: RECORDS_FILE's, then each earlier-version
    file's not in it; with the files to remove at the next write (the earlier version's,
    and temporary files a crash left). A file that cannot be read is
    skipped with a warning; each record is checked when it is loaded."""
    records: dict[str, bytes] = {}
    path = directory / RECORDS_FILE
    try:
        data = _read_bytes(path)
        raw = orjson.loads(data) if data is not None else {}
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        records = {str(name): orjson.dumps(value) for name, value in raw.items()}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable pid records %s: %s", path, exc)
        if isinstance(exc, safefs.UnsafePath):
            _set_aside(path)
    legacy: list[Path] = []
    leftovers: list[Path] = []  # temporary files of a write a crash cut short
    with contextlib.suppress(OSError):
        legacy = sorted(p for p in directory.glob("*.json") if p.name != RECORDS_FILE)
        leftovers = sorted(directory.glob("*.tmp"))
    for old in legacy:
        try:
            data = _read_bytes(old)
            if data is not None and old.stem not in records:
                orjson.loads(data)  # JSON at least; the record itself is checked by load()
                records[old.stem] = data
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable pid record %s: %s", old, exc)
    return records, legacy + leftovers
