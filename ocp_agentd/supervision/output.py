"""Program stdout and stderr: log files through a keeper process, or journald.

Files: the program writes into pipes; a log keeper (ocp_agentd.logkeeper, one process per
program, in a session of its own) moves the bytes into the log files with splice(2) and
rotates them by rename exactly at log_max_bytes. The daemon keeps the write ends of the
pipes while the program is configured and gives them to each new instance, so a restart
costs no new keeper; a program adopted after a daemon crash keeps the keeper it was
started with until its first restart, which starts a new one. Each stream therefore takes
at most (log_backups + 1) * log_max_bytes on disk at any output rate, rotation loses no
byte, and the keeper outlives a daemon crash, restart or upgrade: the program never writes
into a pipe nobody reads. The daemon opens each log itself first, relative to a descriptor
of its directory and never following a link (safefs), owned by the program's user with
mode 0640; rotated copies keep both (scripts/log_designs.py measures this design against
programs appending to the files themselves, README Security).

rotate_if_needed() remains for files a program appends to directly (one started by an
older daemon and adopted): copy the block-aligned size seen into <log>.1, then collapse it
out of the live file (fallocate FALLOC_FL_COLLAPSE_RANGE, ext4/XFS), truncating where the
file system cannot collapse.

Journal: ``log_target = "journal"`` connects stdout and stderr to journald's stream
socket (systemd-journald.service(8), "Stream logging") with the program's name as
SYSLOG_IDENTIFIER.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pwd
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ocp_agentd import linux, safefs
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision.keeper_exits import KeeperExits
from ocp_agentd.supervision.subreaper import REAPER

log = logging.getLogger("ocp_agentd.output")

LOG_MODE = 0o640
JOURNAL_STDOUT = "/run/systemd/journal/stdout"
# Priorities of the journal stream header: 6 info (stdout), 3 err (stderr); syslog(3).
_STDOUT_PRIORITY = 6
_STDERR_PRIORITY = 3
_COPY_CHUNK = 1 << 24
SLACK_BYTES = 16 * 1024 * 1024
KEEPER_MARK = "OCP_AGENTD_LOG_KEEPER"
_keepers: set[subprocess.Popen[bytes]] = set()  # started by this daemon, not yet ended
# The service manager's and the run markers' variables stay with the daemon.
_NOT_INHERITED = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "OCP_AGENTD_")


def owner_of(spec: ProgramSpec) -> tuple[int, int]:
    """(uid, gid) the program's files belong to: its ``user``, else the daemon's.

    Raises KeyError when the user does not exist.
    """
    if not spec.user:
        return os.getuid(), os.getgid()
    account = pwd.getpwnam(spec.user)
    return account.pw_uid, account.pw_gid


def open_log(path: Path, uid: int | None = None, gid: int | None = None,
             append: bool = True) -> int:
    """A write descriptor (O_APPEND unless ``append`` is False) of the log ``path`` for a
    program running as uid:gid, created owned uid:gid with mode 0640 when missing.

    The directory may belong to uid; anyone else able to write it refuses the open.
    Raises safefs.UnsafePath (an OSError naming the path) or OSError.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    flags = os.O_WRONLY | (os.O_APPEND if append else 0)
    dir_fd = safefs.open_directory(path.parent, owner=uid)
    try:
        return safefs.open_file(dir_fd, path.name, uid, gid, LOG_MODE, flags)
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


def open_streams(spec: ProgramSpec, state_dir: Path | None = None) -> tuple[int, int]:
    """(stdout, stderr) descriptors for a new process of ``spec``; the same number twice
    when both go to one place. The caller closes them once the process has them.

    For files, the program's log keeper is reused while it runs on the same log settings
    and still writes the files found at the logs' paths: the descriptors are copies of the
    write ends of its pipes, which this daemon keeps until close_streams(). Otherwise the
    logs are opened here (safely, see open_log: a planted link refuses every start, a
    reused keeper's included) and a new keeper is started on them, its environment marked
    OCP_AGENTD_LOG_KEEPER=<state_dir>:<name>; the previous one ends once the processes
    still holding its pipes are gone. Raises OSError (safefs.UnsafePath naming a path).
    """
    if spec.log_target == "journal":
        close_streams(spec.name, state_dir)
        out = open_journal_stream(spec.name, _STDOUT_PRIORITY)
        try:
            return out, open_journal_stream(spec.name, _STDERR_PRIORITY)
        except BaseException:
            os.close(out)
            raise
    settings = _log_settings(spec)
    paths, uid, gid = settings[0], settings[3], settings[4]
    key = _key(spec.name, state_dir)
    held = _held.get(key)
    if held is not None and held.still_serves(settings, uid):
        return held.copies()
    files: list[int] = []
    try:
        for path in paths:
            files.append(open_log(path, uid, gid, append=False))
        held = _held.get(key)
        if held is not None and held.serves(settings, files):
            return held.copies()
        close_streams(spec.name, state_dir)
        _held[key] = _start_held(spec, state_dir, settings, files)
    finally:
        for fd in files:
            os.close(fd)
    return _held[key].copies()


@dataclass
class _Held:
    """A program's log keeper and the write ends of its pipes, kept by this daemon while
    the program is configured so that each new instance writes to the same keeper."""

    keeper: subprocess.Popen[bytes]
    writes: list[int]  # one per log file, in the order of settings' paths
    settings: tuple[Any, ...]  # (paths, max_bytes, backups, uid, gid) it was started with
    # (st_dev, st_ino) of the logs the keeper was last seen writing -> the number of the
    # keeper's descriptor of each. A look at that one descriptor (/proc/PID/fd/N, one
    # stat) tells whether it still writes the file, instead of a listing and a stat per
    # descriptor. The (st_dev, st_ino) alone would not: after the keeper's rotation the
    # log's owner may rename the old file back to the path, which then names a file
    # the keeper wrote once but no longer does (it closed that descriptor).
    seen: dict[tuple[int, int], int] = field(default_factory=dict)

    def serves(self, settings: tuple[Any, ...], files: list[int]) -> bool:
        """Whether the keeper runs, on these settings, writing the files now at the logs'
        paths (given open): a log deleted or renamed by someone else gets a new keeper."""
        if settings != self.settings or not _running(self.keeper):
            return False
        ids = []
        for fd in files:
            st = os.fstat(fd)
            ids.append((st.st_dev, st.st_ino))
        return self._writes_to(ids)

    def still_serves(self, settings: tuple[Any, ...], uid: int) -> bool:
        """serves() without opening the logs: whether the keeper runs, on these settings,
        writing the files found at the logs' paths, each one open_log would open as it is
        (safefs.stat_if_safe). False whenever that cannot be told so cheaply: then the
        logs are opened (safely) and serves() decides."""
        if settings != self.settings or not _running(self.keeper):
            return False
        ids = []
        passed: set[str] = set()
        for path in settings[0]:
            st = safefs.stat_if_safe(path, uid, passed)
            if st is None:
                return False
            ids.append((st.st_dev, st.st_ino))
        return self._writes_to(ids)

    def _writes_to(self, ids: list[tuple[int, int]]) -> bool:
        """Whether the keeper has every file of ids open: through the descriptors `seen`
        names when each is there, else from all of its descriptors (then remembered)."""
        if all(_holds(self.keeper.pid, self.seen.get(key), key) for key in ids):
            return True
        held = _open_files(self.keeper.pid)
        if not all(key in held for key in ids):
            return False
        self.seen = {key: held[key] for key in ids}
        return True

    def copies(self) -> tuple[int, int]:
        """New descriptors of the write ends for a new process: (stdout, stderr), the same
        number twice when both go to one file."""
        out = os.dup(self.writes[0])
        if len(self.writes) == 1:
            return out, out
        try:
            return out, os.dup(self.writes[1])
        except BaseException:
            os.close(out)
            raise

    def close(self) -> None:
        for fd in self.writes:
            os.close(fd)
        self.writes = []


_held: dict[tuple[str, str], _Held] = {}  # (state_dir, program name) -> its keeper


def _key(name: str, state_dir: Path | None) -> tuple[str, str]:
    return (str(state_dir or ""), name)


def _start_held(spec: ProgramSpec, state_dir: Path | None, settings: tuple[Any, ...],
                files: list[int]) -> _Held:
    paths = settings[0]
    uid, gid = settings[3], settings[4]
    pipes: list[tuple[int, int]] = []
    try:
        for _ in paths:
            pipes.append(os.pipe2(os.O_CLOEXEC))
        keeper = start_keeper(spec, state_dir, [
            {"pipe": read, "file": file, "path": str(path), "max_bytes": spec.log_max_bytes,
             "backups": spec.log_backups}
            for (read, _), file, path in zip(pipes, files, paths, strict=True)
        ], uid, gid)
    except BaseException:
        for read, write in pipes:
            os.close(read)
            os.close(write)
        raise
    for read, _ in pipes:
        os.close(read)
    seen = {}
    for fd in files:  # pass_fds: the keeper has each file under the same number
        st = os.fstat(fd)
        seen[(st.st_dev, st.st_ino)] = fd
    return _Held(keeper, [write for _, write in pipes], settings, seen)


def _running(keeper: subprocess.Popen[bytes]) -> bool:
    """Whether the keeper has not exited (not even as a zombie its thread has yet to reap).
    Popen.poll() cannot tell: it answers None while another thread waits."""
    if keeper.returncode is not None:
        return False
    try:
        ended = os.waitid(os.P_PID, keeper.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False  # reaped already
    return ended is None


def _open_files(pid: int) -> dict[tuple[int, int], int]:
    """(st_dev, st_ino) of every file process ``pid`` has open -> the number of one of its
    descriptors of it; empty when unreadable."""
    found = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{name}")
            found[(st.st_dev, st.st_ino)] = int(name)
    return found


def _holds(pid: int, fd: int | None, key: tuple[int, int]) -> bool:
    """Whether process pid's descriptor fd is open on the file key (st_dev, st_ino)."""
    if fd is None:
        return False
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == key


def keeper_of(spec: ProgramSpec, state_dir: Path | None = None) -> object | None:
    """The log keeper the last open_streams() of ``spec`` gave a process (an object to
    compare with current_keeper() by identity); None for the journal or when none runs."""
    if spec.log_target == "journal":
        return None
    return _held.get(_key(spec.name, state_dir))


def current_keeper(spec: ProgramSpec, state_dir: Path | None = None) -> object | None:
    """The log keeper a new process of ``spec`` would write to now, as an object to
    compare by identity (a standby made with another one writes elsewhere), without
    duplicating its pipes; None when open_streams would start a new keeper or refuse
    (the logs changed, are unsafe, or the program logs to the journal)."""
    held = keeper_of(spec, state_dir)
    if not isinstance(held, _Held):
        return None
    settings = _log_settings(spec)
    return held if held.still_serves(settings, settings[3]) else None


def _log_settings(spec: ProgramSpec) -> tuple[Any, ...]:
    """(log paths, max_bytes, backups, uid, gid) of a program that logs to files: what
    its keeper is started on (one path when stdout and stderr share a file)."""
    assert spec.stdout_log is not None and spec.stderr_log is not None
    uid, gid = owner_of(spec)
    paths = [spec.stdout_log]
    if spec.stderr_log != spec.stdout_log:
        paths.append(spec.stderr_log)
    return (tuple(paths), spec.log_max_bytes, spec.log_backups, uid, gid)


def close_streams(name: str, state_dir: Path | None = None) -> None:
    """Closes this daemon's copies of program ``name``'s log pipes: its keeper ends once
    the program's processes have closed theirs. For a program leaving the config, a log
    target or file that changed, and the daemon's exit."""
    held = _held.pop(_key(name, state_dir), None)
    if held is not None:
        held.close()


def close_all_streams() -> None:
    """close_streams() of every program (the daemon is about to exit)."""
    while _held:
        _held.popitem()[1].close()


def start_keeper(spec: ProgramSpec, state_dir: Path | None, streams: list[dict[str, Any]],
                 uid: int, gid: int) -> subprocess.Popen[bytes]:
    """Starts ``python -m ocp_agentd.logkeeper`` on the given descriptors (they stay open
    here: the caller closes them). Its exit is collected by the keepers' exit thread
    (keeper_exits.py), so it never lingers as a zombie. Raises OSError when it cannot be
    started."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    # Marked apart from the program's processes (it is no part of the program's tree and
    # ends by itself when the program's last writer does): for people and tools.
    env[KEEPER_MARK] = f"{state_dir or ''}:{spec.name}"
    config = {"uid": uid, "gid": gid, "streams": streams}
    keeper = subprocess.Popen(
        [sys.executable, "-m", "ocp_agentd.logkeeper", json.dumps(config)],
        cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
        pass_fds=[fd for item in streams for fd in (item["pipe"], item["file"])],
    )
    _keepers.add(keeper)
    REAPER.claim(keeper.pid)  # its exit is _KEEPER_EXITS' to collect, not the subreaper's
    _KEEPER_EXITS.watch(keeper)
    return keeper


def _keeper_ended(keeper: subprocess.Popen[bytes]) -> None:
    _keepers.discard(keeper)
    REAPER.release(keeper.pid)


_KEEPER_EXITS = KeeperExits(_keeper_ended)


def wait_keepers(timeout: float, state_dir: Path | None = None) -> int:
    """Waits up to ``timeout`` seconds for the keepers this daemon started to end (each ends
    once its program's last writer is gone) and, given ``state_dir``, for those an earlier
    daemon on it started (the keepers of programs adopted after a crash, found by their
    mark); how many are still running."""
    deadline = time.monotonic() + timeout
    for keeper in list(_keepers):
        with contextlib.suppress(subprocess.TimeoutExpired):
            keeper.wait(max(0.0, deadline - time.monotonic()))
    left = sum(1 for keeper in list(_keepers) if keeper.returncode is None)
    if state_dir is None:
        return left
    earlier = [proc for proc in _marked_keepers(state_dir)
               if proc.pid not in {keeper.pid for keeper in _keepers}]
    _, alive = psutil.wait_procs(earlier, timeout=max(0.0, deadline - time.monotonic()))
    return left + len(alive)


def _marked_keepers(state_dir: Path) -> list[psutil.Process]:
    """Running keepers whose mark names ``state_dir`` (start_keeper's KEEPER_MARK)."""
    prefix = f"{state_dir}:"
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (proc.environ().get(KEEPER_MARK, "").startswith(prefix)
                    and proc.status() != psutil.STATUS_ZOMBIE):
                found.append(proc)
    return found


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
    seen = safefs.stat_if_safe(path, uid)
    if seen is not None and seen.st_size <= max_bytes:
        # Nothing to rotate (a keeper never lets its file grow past the limit), known
        # from a few lstat calls, where the walk below opens every directory from /.
        # Anything unusual on the way (a link, a FIFO, a directory others can write)
        # takes the walk, which says why.
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
