"""One JSON file of records by name, replaced atomically: how the pid records and the
intent records (pid_records.py, intent_records.py) are kept in the state directory.

A file per record cost a new inode at every change, and creating one takes about 0.2 ms
of kernel CPU on this ext4 (10 ms for a stop-all of 50). The file is read only when it is
a regular file (safefs.read_regular_file: never through a link, never blocking on a FIFO);
anything else in its place is moved aside so that the next write can put the file back.
It is written as a new file renamed over it (rename(2) replaces a link in the way, never
follows it), with no fsync: a power loss is a reboot, and no record outlives one. Its
directory is made 0700, and one that others than root can write is not read: a record
planted there could make the daemon adopt, and later stop, a process that is not its.
An earlier version kept one ``<name>.json`` per record: those are read too, and removed
after the next write, with the temporary files of a write a crash cut short.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ocp_agentd import safefs

log = logging.getLogger("ocp_agentd.records")

FILE_NAME = "records.json"
MAX_BYTES = 64 << 20  # far above the records of any config; a larger file is not read whole


@dataclass
class Found:
    """What read() found: each record's JSON value by name (the caller checks each), and
    the files to remove after the next write (an earlier version's, leftovers)."""

    values: dict[str, object] = field(default_factory=dict)
    remove: list[Path] = field(default_factory=list)


def read(directory: Path, what: str) -> Found:
    """The records in directory: FILE_NAME's, then each earlier-version file's not in it.
    `what` names them in the log ("pid records"). What cannot be read is skipped with a
    warning and is gone after the next write; never raises."""
    found = Found()
    problem = _directory_problem(directory)
    if problem is not None:
        log.warning("ignoring the %s in %s: %s", what, directory, problem)
        return found
    path = directory / FILE_NAME
    try:
        data = safefs.read_regular_file(path, MAX_BYTES)
        raw = orjson.loads(data) if data is not None else {}
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        found.values.update(raw)
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s %s: %s", what, path, exc)
        if isinstance(exc, safefs.UnsafePath):
            _set_aside(path, what)
    with contextlib.suppress(OSError):
        legacy = sorted(p for p in directory.glob("*.json") if p.name != FILE_NAME)
        found.remove = legacy + sorted(directory.glob("*.tmp"))
        for old in legacy:
            try:
                data = safefs.read_regular_file(old, MAX_BYTES)
                if data is not None and old.stem not in found.values:
                    found.values[old.stem] = orjson.loads(data)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable %s %s: %s", what.rstrip("s"), old, exc)
    return found


def write(directory: Path, data: bytes, remove: list[Path] | None = None) -> None:
    """Replaces the file with data (made 0600), the directory made 0700 when missing; then
    removes the files in `remove`. Raises OSError (the caller logs it: supervision goes
    on without the records)."""
    path = directory / FILE_NAME
    tmp = directory / f".{FILE_NAME}.{uuid.uuid4().hex}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:  # made at the first write, and again if it was removed
        _make_directory(directory)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    for old in remove or ():
        with contextlib.suppress(OSError):
            old.unlink()


def _directory_problem(directory: Path) -> str | None:
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.path.isdir(directory) or os.path.islink(directory):
        return "not a directory"
    return safefs.writers_problem(st, None)


def _make_directory(directory: Path) -> None:
    with contextlib.suppress(FileExistsError):  # a file or link in the way: below
        directory.mkdir(mode=0o700, parents=True)
    problem = _directory_problem(directory)
    if problem is not None:
        raise OSError(f"{directory}: {problem}")


def _set_aside(path: Path, what: str) -> None:
    """Moves what is in the file's place out of the way (a directory there would make every
    write fail), so that the next write puts the file back."""
    aside = safefs.set_aside(path)
    if aside is None:
        log.error("cannot move %s out of the way: the %s cannot be written", path, what)
    else:
        log.warning("moved %s, which is not a regular file, to %s", path, aside)
