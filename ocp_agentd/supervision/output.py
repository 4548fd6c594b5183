"""Program stdout and stderr: files opened safely, rotated by size, or journald.

Files: the program appends to its log itself (the daemon is not in the data path, so a
program keeps logging while the daemon restarts or is upgraded). The daemon opens and
rotates each file relative to a descriptor of its directory, never following a link
(safefs), owned by the program's user with mode 0640; rotated copies keep both.

Rotation: the block-aligned size seen is copied into ``<log>.1`` (copy_file_range) and
then collapsed out of the live file (fallocate FALLOC_FL_COLLAPSE_RANGE, ext4/XFS): bytes
written meanwhile stay in the live file, so no byte is lost. Where the file system cannot
collapse, the rest is copied too and the file truncated: what the program writes between
that copy and the truncate is lost (README, Security). A LogWatcher thread rotates as the
size passes the limit (inotify), not on a period.

Journal: ``log_target = "journal"`` connects stdout and stderr to journald's stream
socket (systemd-journald.service(8), "Stream logging") with the program's name as
SYSLOG_IDENTIFIER.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import select
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ocp_agentd import descriptors, linux, safefs
from ocp_agentd.config import ProgramSpec

log = logging.getLogger("ocp_agentd.output")

LOG_MODE = 0o640
JOURNAL_STDOUT = "/run/systemd/journal/stdout"
# Priorities of the journal stream header: 6 info (stdout), 3 err (stderr); syslog(3).
_STDOUT_PRIORITY = 6
_STDERR_PRIORITY = 3
_COPY_CHUNK = 1 << 24
SLACK_BYTES = 16 * 1024 * 1024


def owner_of(spec: ProgramSpec) -> tuple[int, int]:
    """(uid, gid) the program's files belong to: its ``user``, else the daemon's.

    Raises KeyError when the user does not exist.
    """
    if not spec.user:
        return os.getuid(), os.getgid()
    account = pwd.getpwnam(spec.user)
    return account.pw_uid, account.pw_gid


def open_log(path: Path, uid: int | None = None, gid: int | None = None) -> int:
    """An O_APPEND descriptor of the log ``path`` for a program running as uid:gid.

    The directory may belong to uid; anyone else able to write it refuses the open.
    Raises safefs.UnsafePath (an OSError naming the path) or OSError.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    dir_fd = safefs.open_directory(path.parent, owner=uid)
    try:
        return safefs.open_file(dir_fd, path.name, uid, gid, LOG_MODE)
    except safefs.UnsafePath as exc:
        raise safefs.UnsafePath(path, exc.strerror.split(": ", 1)[-1]) from None
    finally:
        os.close(dir_fd)


def open_journal_stream(identifier: str, priority: int) -> int:
    """A socket connected to journald's stream socket, header sent: each line the program
    writes becomes one journal entry with SYSLOG_IDENTIFIER=identifier.

    Raises OSError when journald does not listen here.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(JOURNAL_STDOUT)
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix, forward to syslog, kmsg, console
        header = f"{identifier}\n\n{priority}\n0\n0\n0\n0\n"
        sock.sendall(header.encode())
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def open_streams(spec: ProgramSpec) -> tuple[int, int]:
    """(stdout, stderr) descriptors for a new process of ``spec``; the same number twice
    when both go to one file. The caller closes them. Raises OSError."""
    if spec.log_target == "journal":
        out = open_journal_stream(spec.name, _STDOUT_PRIORITY)
        try:
            return out, open_journal_stream(spec.name, _STDERR_PRIORITY)
        except BaseException:
            os.close(out)
            raise
    assert spec.stdout_log is not None and spec.stderr_log is not None
    uid, gid = owner_of(spec)
    out = open_log(spec.stdout_log, uid, gid)
    if spec.stderr_log == spec.stdout_log:
        return out, out
    try:
        return out, open_log(spec.stderr_log, uid, gid)
    except BaseException:
        os.close(out)
        raise


# --- rotation -----------------------------------------------------------------------------


def _copy(src: int, dst: int, start: int, length: int) -> None:
    done = 0
    while done < length:
        moved = os.copy_file_range(src, dst, min(_COPY_CHUNK, length - done), start + done)
        if moved == 0:
            break
        done += moved


def _drop_prefix(live: int, length: int) -> int:
    """Removes the first ``length`` bytes (rounded down to the block size) from the live
    file without losing what follows; truncates when the file system cannot. Returns the
    number of bytes of the live file that were dropped uncopied (0 with collapse)."""
    if length <= 0:
        return 0
    try:
        linux.collapse_range(live, 0, length)
        return 0
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    size = os.fstat(live).st_size
    os.ftruncate(live, 0)
    return max(0, size - length)


def rotate_if_needed(path: Path, max_bytes: int, backups: int,
                     uid: int | None = None, gid: int | None = None) -> bool:
    """Keeps ``path`` near ``max_bytes``: ``path.1`` .. ``path.<backups>`` hold older bytes.

    Works relative to the directory's descriptor and never follows a link: a planted link
    or hard link is renamed, removed or refused, never written through. Each rotated copy
    is created new (O_EXCL) owned uid:gid with mode 0640 (default: the live file's owner).
    Returns True when it rotated. Raises safefs.UnsafePath or OSError.
    """
    if max_bytes <= 0:
        return False
    dir_fd = safefs.open_directory(path.parent, owner=uid if uid is not None else None)
    try:
        live = safefs.open_existing(
            dir_fd, path.name, {0} | ({uid} if uid is not None else set()), os.O_RDWR
        )
        if live is None:
            return False
        try:
            st = os.fstat(live)
            if st.st_size <= max_bytes:
                return False
            owner = (st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
            _rotate(dir_fd, path.name, live, st.st_size, max_bytes, backups, owner)
            return True
        finally:
            os.close(live)
    finally:
        os.close(dir_fd)


def _rotate(dir_fd: int, name: str, live: int, size: int, max_bytes: int, backups: int,
            owner: tuple[int, int]) -> None:
    block = os.fstatvfs(live).f_bsize
    seen = size - size % block if size >= block else size
    if seen == size and seen > block:
        seen -= block  # a collapse must end before the end of the file
    if backups > 0:
        for index in range(backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{name}.{index}", f"{name}.{index + 1}",
                          src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{name}.1", dir_fd=dir_fd)  # a link itself goes, not its target
        copy = safefs.create_file(dir_fd, f"{name}.1", *owner, LOG_MODE, os.O_WRONLY)
        try:
            # A copy holds at most max_bytes + SLACK_BYTES (the section 11 bound's 16 MiB):
            # when rotation fell further behind, the oldest bytes are dropped.
            start = max(0, seen - max_bytes - SLACK_BYTES)
            _copy(live, copy, start, seen - start)
        finally:
            os.close(copy)
    lost = _drop_prefix(live, seen)
    if lost:
        log.warning("%s: %d byte(s) written during rotation were dropped "
                    "(the file system cannot collapse a range)", name, lost)


# --- the watcher --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Watched:
    path: Path
    max_bytes: int
    backups: int
    uid: int
    gid: int
    fd: int  # O_PATH descriptor the inotify watch was added through


class LogWatcher:
    """Rotates program logs as they pass their size (inotify IN_MODIFY), in its own thread.

    ``watch(specs)`` (re)sets the files watched; ``close()`` stops the thread. The size is
    checked on each wake-up, so a burst costs one fstat per batch of events.
    """

    def __init__(self) -> None:
        self._inotify = linux.inotify_init()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._by_wd: dict[int, _Watched] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-watcher", daemon=True)
        self._thread.start()

    def watch(self, specs: Iterable[ProgramSpec]) -> None:
        """Watches the log files of ``specs`` that exist (file target only)."""
        wanted: dict[Path, ProgramSpec] = {}
        for spec in specs:
            if spec.log_target != "file" or spec.log_max_bytes <= 0:
                continue
            for path in (spec.stdout_log, spec.stderr_log):
                if path is not None:
                    wanted.setdefault(path, spec)
        with self._lock:
            for wd, item in list(self._by_wd.items()):
                if item.path not in wanted or _replaced(item):
                    self._forget(wd)
            present = {item.path for item in self._by_wd.values()}
            for path, spec in wanted.items():
                if path not in present:
                    self._add(path, spec)

    def _add(self, path: Path, spec: ProgramSpec) -> None:
        if descriptors.shortfall(need=2):
            return  # the API's reserve comes first; housekeeping rotates this file instead
        try:
            uid, gid = owner_of(spec)
            dir_fd = safefs.open_directory(path.parent, owner=uid)
        except (KeyError, OSError):
            return
        try:
            fd = os.open(path.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return
        finally:
            os.close(dir_fd)
        try:
            wd = linux.inotify_add_watch(self._inotify, f"/proc/self/fd/{fd}", linux.IN_MODIFY)
        except OSError:
            os.close(fd)
            return
        self._by_wd[wd] = _Watched(path, spec.log_max_bytes, spec.log_backups, uid, gid, fd)

    def _forget(self, wd: int) -> None:
        item = self._by_wd.pop(wd)
        with contextlib.suppress(OSError):
            linux.inotify_rm_watch(self._inotify, wd)
        os.close(item.fd)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout=10)
        with self._lock:
            for wd in list(self._by_wd):
                self._forget(wd)
        for fd in (self._inotify, self._wake_r, self._wake_w):
            os.close(fd)

    def _run(self) -> None:
        while not self._closed:
            select.select([self._inotify, self._wake_r], [], [])
            events = linux.inotify_read(self._inotify)
            with self._lock:
                due = {wd: self._by_wd[wd] for wd, _ in events if wd in self._by_wd}
            for item in due.values():
                self._check(item)

    def _check(self, item: _Watched) -> None:
        try:
            if os.fstat(item.fd).st_size <= item.max_bytes:
                return
            rotate_if_needed(item.path, item.max_bytes, item.backups, item.uid, item.gid)
        except OSError as exc:
            log.warning("cannot rotate %s: %s", item.path, exc)


def _replaced(item: _Watched) -> bool:
    """True when the name now points to another file than the one watched."""
    try:
        now = os.stat(item.path, follow_symlinks=False)
    except OSError:
        return True
    was = os.fstat(item.fd)
    return (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino)
