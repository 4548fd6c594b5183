"""Reading a program's log file for ``GET /api/v1/processes/{name}/logs`` (SPEC section 12):
its last lines, then, when following, what is written after, across rotation.

The file is opened as the daemon opens logs to write them (safefs): its directory walked
from ``/`` without following a link root did not make and writable only by root or the
program's user, the file itself without following a link, a regular file with one link
owned by root or that user. So nothing the program's user plants makes the daemon read
another file (SPEC section 11).
Rotation is noticed both ways it happens: a file that shrinks in place (copied away, then
truncated or its copied head collapsed out, supervision/output.py: reading goes on from
its start) and a file renamed away with a new one created at the path (the old one is read
to its end, then the new one from its start). A follower reads every POLL_SECONDS, so on a
rotation in place it may show again, or miss, what the program wrote in that last
interval (the bytes themselves are in the rotated copy).

    with LogFile.open(path, owner=uid) as log:
        log.seek_tail(10)                # from the start of the last 10 lines
        while data := log.read_new():    # bytes, CHUNK at most
            ...
        async for chunk in log.follow(stopped):
            ...                          # bytes, as written

Reads are small (at most ``CHUNK`` bytes) and from the page cache, so they run on the event
loop instead of a thread each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ocp_agentd import safefs

CHUNK = 64 * 1024
POLL_SECONDS = 0.25  # how soon new output is seen while following


class NotALogFile(OSError):
    """The path cannot be read as a log: unsafe (a link, not a regular file, a directory
    others can write, another owner) or missing (errno ENOENT)."""


class LogFile:
    """One log file being read; ``fd`` follows the file through rotation."""

    def __init__(self, path: Path, dir_fd: int, fd: int, owners: set[int]) -> None:
        self.path = path
        self.dir_fd = dir_fd
        self.fd = fd
        self.owners = owners
        self.position = 0

    @classmethod
    def open(cls, path: Path, owner: int | None = None) -> LogFile:
        """The log at ``path`` of a program running as uid ``owner`` (None: root's).
        Raises NotALogFile naming the path and why."""
        try:
            dir_fd = safefs.open_directory(path.parent, owner=owner)
        except OSError as exc:
            raise NotALogFile(exc.errno, f"cannot read {path}: {exc.strerror}") from None
        owners = {0} if owner is None else {0, owner}
        try:
            fd = safefs.open_existing(dir_fd, path.name, owners, os.O_RDONLY)
        except OSError as exc:
            os.close(dir_fd)
            raise NotALogFile(exc.errno, f"cannot read {path}: {exc.strerror}") from None
        if fd is None:
            os.close(dir_fd)
            raise NotALogFile(errno.ENOENT, f"{path} does not exist (yet)")
        return cls(path, dir_fd, fd, owners)

    def close(self) -> None:
        for fd in (self.fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dir_fd = -1

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def seek_tail(self, lines: int | None) -> None:
        """Puts the reading position at the start of the last ``lines`` lines (None: at
        the start of the file), for read_new to give them CHUNK bytes at a time. The file
        is looked through backwards one CHUNK at a time, each counted once and let go: a
        log of one long line (no newline, or a progress bar redrawn with \\r) costs one
        pass over it and one CHUNK of memory, not the log gathered in one buffer."""
        if lines is None:
            self.position = 0
            return
        size = os.fstat(self.fd).st_size
        self.position = size
        if lines == 0 or size == 0:
            return
        # A last line without its newline counts as a line too: a final newline ends the
        # last line, it starts none.
        end = size - 1 if os.pread(self.fd, 1, size - 1) == b"\n" else size
        wanted = lines  # newlines still to pass going back; the tail starts after the last
        while end > 0:
            start = max(0, end - CHUNK)
            chunk = os.pread(self.fd, end - start, start)
            found = chunk.count(b"\n")
            if found >= wanted:
                cut = len(chunk)
                for _ in range(wanted):
                    cut = chunk.rindex(b"\n", 0, cut)
                self.position = start + cut + 1
                return
            wanted -= found
            end = start
        self.position = 0

    def read_new(self) -> bytes:
        """What was written since the last read (at most CHUNK bytes); from the start of
        the file again after it was truncated."""
        size = os.fstat(self.fd).st_size
        if size < self.position:
            self.position = 0  # truncated in place (copy and truncate rotation)
        if size == self.position:
            return b""
        data = os.pread(self.fd, min(CHUNK, size - self.position), self.position)
        self.position += len(data)
        return data

    def replaced(self) -> bool:
        """True when the name now belongs to another file (renamed away and created anew)."""
        try:
            now = os.stat(self.path.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return False  # not there yet: keep reading the old one
        current = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) != (current.st_dev, current.st_ino)

    def reopen(self) -> bool:
        """Switches to the file now under the name, from its start; False when it cannot
        be opened safely (then the old one is kept)."""
        try:
            fd = safefs.open_existing(self.dir_fd, self.path.name, self.owners, os.O_RDONLY)
        except OSError:
            return False
        if fd is None:
            return False
        os.close(self.fd)
        self.fd = fd
        self.position = 0
        return True

    async def follow(self, stopped: Callable[[], bool]) -> AsyncIterator[bytes]:
        """New output as it is written, until ``stopped()`` is true (checked between
        polls)."""
        while not stopped():
            data = self.read_new()
            if data:
                yield data
                continue
            # Nothing new in the file we hold: if another file took its path, the old
            # one was read to its end just now, so go on with the new one.
            with contextlib.suppress(OSError):
                if self.replaced() and self.reopen():
                    continue
            await asyncio.sleep(POLL_SECONDS)
