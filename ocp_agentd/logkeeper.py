"""The log keeper: one small process per program that moves the program's stdout and
stderr from pipes into its log files and rotates them exactly at the limit.

    python -m ocp_agentd.logkeeper '<json>'

The JSON gives, per stream, the descriptors it inherited: ``pipe`` (the read end of the
program's stdout or stderr) and ``file`` (the log, opened by the daemon with safefs),
plus ``path``, ``max_bytes``, ``backups``, and the ``uid``/``gid`` the files belong to.

Bytes move with splice(2) and never more than what is left before ``max_bytes``: the
live file is renamed to ``<log>.1`` exactly at the limit (the older copies shift up,
the oldest goes) and a new one is created O_EXCL (safefs), so each stream takes at most
``(backups + 1) * max_bytes`` on disk whatever the program's rate (a program faster than
the disk waits on its full pipe) and rotation loses no byte. The keeper is its own
process in its own session: it outlives a daemon crash, restart or upgrade (the program
never gets SIGPIPE for it) and ends when every writer of its pipes has closed them (the
daemon keeps a copy of the write ends while the program is configured, so the keeper
serves every instance of the program).
When the disk refuses a write, what the pipe holds is read and dropped (the program
must not block on a full disk) and counted on the keeper's stderr.

Before it reads any pipe the keeper keeps only the capabilities rotation needs
(KEPT_CAPABILITIES) and sets no_new_privs: its writes are charged to the file owner's
quota and cannot use the root-reserved blocks (no CAP_SYS_RESOURCE). A live file with
more than one link (someone hard-linked it to keep it past rotation) is reported once on
the keeper's stderr and rotated at once, so the keeper stops feeding the linked inode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import sys
import time
from pathlib import Path

from ocp_agentd import linux, safefs

LOG_MODE = 0o640
PIPE_BYTES = 1 << 20  # the pipe's capacity (F_SETPIPE_SZ); a burst waits here, not in RAM
_CHUNK = 1 << 20
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
LINK_CHECK_SECONDS = 0.5  # how often a pumping stream looks at its live file's link count
# Rotation creates the new live file and gives it to the program's user (CAP_CHOWN), and
# renames, unlinks and creates in a log directory that user may own (CAP_DAC_OVERRIDE);
# every other capability is dropped, CAP_SYS_RESOURCE first of all.
KEPT_CAPABILITIES = {linux.CAP_CHOWN, linux.CAP_DAC_OVERRIDE}


class Stream:
    """One pipe drained into one log file. (A plain class: dataclasses would import
    inspect, about 1 MiB more in each keeper.)"""

    def __init__(self, pipe: int, file: int, path: Path, max_bytes: int, backups: int,
                 uid: int, gid: int) -> None:
        self.pipe = pipe
        self.file = file
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.uid = uid
        self.gid = gid
        self.dropped = 0
        self.next_link_check = 0.0
        self.size = os.lseek(self.file, 0, os.SEEK_END)
        os.set_blocking(self.pipe, False)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pipe, fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    def pump(self) -> bool:
        """Moves what the pipe holds into the file; False at the end of the stream."""
        while True:
            room = self.max_bytes - self.size if self.max_bytes > 0 else _CHUNK
            if room <= 0 or self._linked():
                self.rotate()
                continue
            try:
                moved = os.splice(self.pipe, self.file, min(room, _CHUNK), flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return True
                return self._drop(exc)
            if moved == 0:
                return False
            self.size += moved

    def _linked(self) -> bool:
        """True (reported once on stderr) when the live file has gained a hard link: its
        owner may keep that inode past rotation, so it must not be fed any further. Looked
        at every LINK_CHECK_SECONDS while the stream pumps (one fstat)."""
        now = time.monotonic()
        if now < self.next_link_check:
            return False
        self.next_link_check = now + LINK_CHECK_SECONDS
        links = os.fstat(self.file).st_nlink
        if links <= 1:
            return False
        print(f"ocp-agentd log keeper: {self.path} has {links} links (someone linked the live "
              f"file); rotating to a new file", file=sys.stderr, flush=True)
        return True

    def _drop(self, exc: OSError) -> bool:
        try:
            data = os.read(self.pipe, _CHUNK)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.dropped += len(data)
        print(f"ocp-agentd log keeper: {self.path}: {exc.strerror}; "
              f"{self.dropped} byte(s) dropped so far", file=sys.stderr, flush=True)
        return True

    def rotate(self) -> None:
        """<log> -> <log>.1 (older copies shift up, the oldest goes), then a new <log>.

        Renames never follow links (a planted name is moved or replaced, not written
        through) and the new file is created O_EXCL. When the directory can no longer
        be used safely, the live file is emptied instead (bounded, the loss reported).
        """
        try:
            dir_fd = safefs.open_directory(self.path.parent, owner=self.uid)
        except OSError as exc:
            self._empty(exc)
            return
        name = self.path.name
        try:
            if self.backups > 0:
                for index in range(self.backups - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(f"{name}.{index}", f"{name}.{index + 1}",
                                  src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.rename(name, f"{name}.1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
            fresh = self._fresh(dir_fd, name)
        except OSError as exc:
            self._empty(exc)
            return
        finally:
            os.close(dir_fd)
        os.close(self.file)
        self.file = fresh
        self.size = os.lseek(fresh, 0, os.SEEK_END)

    def _fresh(self, dir_fd: int, name: str) -> int:
        """The new live file; one the daemon created in between (it opens the log before a
        spawn) is taken as it is, when it is a safe one (safefs.open_existing)."""
        try:
            return safefs.create_file(dir_fd, name, self.uid, self.gid, LOG_MODE, os.O_WRONLY)
        except FileExistsError:
            fd = safefs.open_existing(dir_fd, name, {0, self.uid}, os.O_WRONLY)
            if fd is None:
                raise
            return fd

    def _empty(self, exc: OSError) -> None:
        print(f"ocp-agentd log keeper: cannot rotate {self.path}: {exc}; emptied it instead "
              f"({self.size} bytes dropped)", file=sys.stderr, flush=True)
        os.ftruncate(self.file, 0)
        os.lseek(self.file, 0, os.SEEK_SET)
        self.size = 0


def run(streams: list[Stream]) -> None:
    """Pumps until every stream has ended. poll(2), not select(2): the pipes keep the
    numbers they had in the daemon, which pass 1023 (FD_SETSIZE) on a host with many
    programs."""
    live = {stream.pipe: stream for stream in streams}
    poller = select.poll()
    for fd in live:
        poller.register(fd, select.POLLIN)
    while live:
        for fd, _events in poller.poll():
            if fd in live and not live[fd].pump():
                stream = live.pop(fd)
                poller.unregister(fd)
                os.close(stream.pipe)
                os.close(stream.file)


def main(argv: list[str]) -> int:
    linux.keep_only_capabilities(KEPT_CAPABILITIES)
    config = json.loads(argv[1])
    streams = [
        Stream(item["pipe"], item["file"], Path(item["path"]), item["max_bytes"],
               item["backups"], config["uid"], config["gid"])
        for item in config["streams"]
    ]
    run(streams)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
