"""Opening files as root where other users may reach (SPEC section 11, "Files written as root").

A directory is opened component by component from ``/`` with ``O_NOFOLLOW``, and each
directory on the way must be writable only by root or by the one owner the caller allows
(a sticky directory owned by root, such as /tmp, is accepted on the way too: others
cannot rename or remove what is in it). A symbolic link on the way is followed only when
root made it (owned by root, in a directory only root can write). The returned directory
descriptor is then the base of every open, rename and unlink (``dir_fd``), and files are
opened with ``O_NOFOLLOW``; an existing file must be a regular file with one link whose
owner is root or the allowed owner. Nothing planted in such a directory by its owner can
make the caller write, truncate or read a file elsewhere (see path_resolution(7),
openat(2), and the protected_hardlinks note in proc(5) for why one link is required).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS


class UnsafePath(OSError):
    """A path the daemon refuses to use; str() names the path and the reason.

    An OSError (errno EPERM) so callers that report OSError.strerror report this too.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(errno.EPERM, f"{path}: {reason}")
        self.path = str(path)


def writers_problem(st: os.stat_result, owner: int | None) -> str | None:
    """Why a directory with this stat lets someone other than root or ``owner`` change it.

    None when only root (and ``owner``, when given) can create, rename or remove entries:
    owned by root or owner and writable by neither group nor others, or sticky and owned
    by root (others cannot touch entries they do not own).
    """
    allowed = {0} if owner is None else {0, owner}
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in allowed:
        return f"owned by uid {st.st_uid}"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        if mode & stat.S_ISVTX and st.st_uid == 0:
            return None
        return f"writable by others (mode {mode:04o})"
    return None


def open_directory(
    path: str | Path, owner: int | None = None, create_mode: int = 0o755
) -> int:
    """A descriptor (O_RDONLY|O_DIRECTORY) of ``path``, made safe to work in as root.

    ``owner`` is a uid that may own (and write) the directory and its ancestors besides
    root. Missing directories are created (root-owned, ``create_mode``). Raises
    UnsafePath naming the first directory that others can write or a link root did not
    make; OSError when a component cannot be opened or created.
    """
    path = Path(path)
    if not path.is_absolute():
        raise UnsafePath(path, "not an absolute path")
    walk = _Walk(path)
    try:
        while walk.pending:
            name = walk.pending.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                raise UnsafePath(path, "'..' is not allowed")
            st = _stat_or_create(name, walk.current, create_mode)
            if stat.S_ISLNK(st.st_mode):
                walk.follow_link(name, st)
            else:
                walk.descend(name, owner)
    except BaseException:
        os.close(walk.current)
        raise
    return walk.current


def _stat_or_create(name: str, dir_fd: int, create_mode: int) -> os.stat_result:
    """lstat of ``name`` in ``dir_fd``, after creating it as a directory if it is missing."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, create_mode, dir_fd=dir_fd)
            os.chmod(name, create_mode, dir_fd=dir_fd, follow_symlinks=False)
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


class _Walk:
    """Where open_directory's walk is: the directory reached (an open descriptor, owned
    by the walk), its path, and the components still to go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = list(path.parts[1:])
        self.current = os.open("/", _DIR_FLAGS)
        self.where = Path("/")
        self.links = 0

    def follow_link(self, name: str, st: os.stat_result) -> None:
        """Puts the target of the symbolic link ``name`` (lstat ``st``) before the
        components still to go, if root made the link; else raises UnsafePath."""
        self.links += 1
        parent = os.fstat(self.current)
        if self.links > _MAX_LINKS:
            raise UnsafePath(self.path, "too many levels of symbolic links")
        if st.st_uid != 0 or writers_problem(parent, None) is not None:
            raise UnsafePath(
                self.where / name, "is a symbolic link that root did not make; refusing it"
            )
        target = os.readlink(name, dir_fd=self.current)
        self.pending = list(Path(target).parts) + self.pending
        if target.startswith("/"):
            self.pending = self.pending[1:]
            self._move_to(os.open("/", _DIR_FLAGS), Path("/"))

    def descend(self, name: str, owner: int | None) -> None:
        """Opens the directory ``name`` and moves there; raises UnsafePath if it changed
        into something else meanwhile or if others than root and ``owner`` can write it."""
        try:
            child = os.open(name, _DIR_FLAGS, dir_fd=self.current)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(self.where / name, "changed while being opened") from None
            raise
        self._move_to(child, self.where / name)
        problem = writers_problem(os.fstat(self.current), owner)
        if problem is not None:
            raise UnsafePath(self.where, f"directory {problem}; refusing to use it")

    def _move_to(self, fd: int, where: Path) -> None:
        os.close(self.current)
        self.current = fd
        self.where = where


def stat_if_safe(
    path: str | Path, owner: int | None = None, passed: set[str] | None = None
) -> os.stat_result | None:
    """The lstat of the file at ``path`` when open_directory(path.parent, owner) and
    open_file would both accept it as it is now without creating or following anything:
    every directory below ``/`` on the way writable only by root or ``owner`` (or sticky
    and root's), no symbolic link anywhere, the file regular with one link and owned by
    root or ``owner``. None otherwise, or when something cannot be read: then open it the
    usual way, which says why. Opens nothing: for comparing what is there with what is
    held open already (a few lstat(2) calls against a walk of open(2) calls).

    ``passed``: the directories found fine by earlier calls of the same look (a
    program's stdout and stderr logs share theirs), skipped here and added to."""
    parts = Path(path).parts
    if not parts or parts[0] != "/" or ".." in parts:
        return None
    owners = {0} if owner is None else {0, owner}
    try:
        where = ""
        for name in parts[1:-1]:
            where = f"{where}/{name}"
            if passed is not None and where in passed:
                continue
            st = os.lstat(where)
            if not stat.S_ISDIR(st.st_mode) or writers_problem(st, owner) is not None:
                return None
            if passed is not None:
                passed.add(where)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in owners:
        return None
    return st


def check_directory(path: str | Path, owner: int | None = None) -> str | None:
    """None when open_directory(path, owner) succeeds, else the reason naming the path."""
    try:
        os.close(open_directory(path, owner))
    except UnsafePath as exc:
        return exc.strerror
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def _check_file(fd: int, name: str, owners: set[int]) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(name, "is not a regular file")
    if st.st_nlink != 1:
        raise UnsafePath(name, f"has {st.st_nlink} hard links; refusing to write it")
    if st.st_uid not in owners:
        raise UnsafePath(name, f"is owned by uid {st.st_uid}")
    return st


def _blocking(fd: int) -> int:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


def create_file(dir_fd: int, name: str, uid: int, gid: int, mode: int = 0o640,
                flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """A new file ``name`` in ``dir_fd`` (O_CREAT|O_EXCL|O_NOFOLLOW) owned uid:gid with mode.

    Raises FileExistsError when the name exists (whatever it is, a link included).
    """
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        # The mode first, while the file is still the caller's: after the chown, root
        # would need CAP_FOWNER for it, which the log keeper does not keep.
        os.fchmod(fd, mode)  # whatever the umask took away
        os.fchown(fd, uid, gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str, uid: int, gid: int, mode: int = 0o640,
              flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """``name`` in ``dir_fd`` opened with ``flags`` (never following a link), created when
    missing; the file ends up owned uid:gid with ``mode``.

    An existing file must be a regular file with one link, owned by root or uid (a file of
    root's from before is handed to uid). Raises UnsafePath otherwise (a symbolic link,
    a FIFO, a hard link, another owner).
    """
    for _ in range(3):
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            try:
                return create_file(dir_fd, name, uid, gid, mode, flags)
            except FileExistsError:
                continue  # appeared in between: open it as an existing file
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(name, "is a symbolic link; refusing to follow it") from None
            if exc.errno == errno.ENXIO:  # a FIFO or socket with no reader
                raise UnsafePath(name, "is not a regular file") from None
            raise
        try:
            st = _check_file(fd, name, {0, uid})
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)
            if stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return _blocking(fd)
    raise UnsafePath(name, "keeps changing while being opened")


def _open_no_follow(name: str | Path, flags: int, dir_fd: int | None = None) -> int | None:
    """open(2) never following a link nor blocking (O_NOFOLLOW, O_NONBLOCK); None when
    there is no such name. Raises UnsafePath for a link or a FIFO without a reader."""
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                       dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            raise UnsafePath(name, "is not a regular file") from None
        raise


def open_existing(dir_fd: int, name: str, owners: set[int], flags: int) -> int | None:
    """An existing regular file with one link and one of ``owners``, never following a
    link; None when there is no such name. Raises UnsafePath when the name is something
    else."""
    fd = _open_no_follow(name, flags, dir_fd)
    if fd is None:
        return None
    try:
        _check_file(fd, name, owners)
    except BaseException:
        os.close(fd)
        raise
    return _blocking(fd)


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of the regular file at path, never through a link (O_NOFOLLOW)
    and never blocking: a FIFO in its place would block open(2) until a writer came, and
    a device node could do anything on open, so only a regular file is opened (lstat(2)
    first, fstat(2) after the open for a name replaced in between). None when there is no
    such name. Raises UnsafePath when the name is something else (a directory, a FIFO, a
    socket, a device, a link), OSError when it cannot be read."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise UnsafePath(path, "is not a regular file")
    except FileNotFoundError:
        return None
    fd = _open_no_follow(path, os.O_RDONLY)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(path, "is not a regular file")
        return handle.read(limit)


def set_aside(path: Path) -> Path | None:
    """Renames what is at path out of the way (to a unique name beside it) so that a new
    file can be put there, e.g. a directory where a records file belongs, which rename(2)
    cannot replace; answers the new name, None when it could not be moved."""
    aside = path.with_name(f"{path.name}.not-a-file.{os.urandom(4).hex()}")
    try:
        os.rename(path, aside)
    except OSError:
        return None
    return aside
