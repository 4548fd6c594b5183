"""Linux calls the standard library does not wrap: inotify(7) and fallocate(2) ranges.

Both go through libc with ctypes; each raises OSError with the C errno on failure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")


def _check(result: int) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def collapse_range(fd: int, offset: int, length: int) -> None:
    """Removes bytes [offset, offset+length) from the file; what follows moves down.

    fallocate(2) FALLOC_FL_COLLAPSE_RANGE: ext4 and XFS only, offset and length multiples
    of the file system block size, and the range must end before the end of the file.
    Writers appending with O_APPEND keep appending at the (new) end: no byte after the
    range is lost. EOPNOTSUPP/EINVAL where the file system cannot do it.
    """
    _check(_libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, offset, length))


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor (inotify_init1(2))."""
    return _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))


def inotify_add_watch(fd: int, path: str | bytes, mask: int) -> int:
    """Watches ``path`` (a /proc/self/fd/N path watches an open file); the watch descriptor."""
    raw = os.fsencode(path)
    return _check(_libc.inotify_add_watch(fd, raw, mask))


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(fd, wd))


def inotify_read(fd: int) -> list[tuple[int, int]]:
    """The (watch descriptor, mask) pairs waiting on ``fd``; [] when none are."""
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return []
    events = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, name_len = _EVENT.unpack_from(data, offset)
        events.append((wd, mask))
        offset += _EVENT.size + name_len
    return events
