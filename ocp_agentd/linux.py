"""Linux calls the standard library does not wrap: inotify(7), fallocate(2) ranges,
capabilities(7) (prctl(2), capset(2)) and the child subreaper (prctl(2)).

All go through libc with ctypes; each raises OSError with the C errno on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct

# glibc's soname (Debian, RHEL and the others this is packaged for). Not
# ctypes.util.find_library("c"): it runs /sbin/ldconfig -p in a subprocess to find this
# same name, and importing ctypes.util costs 2 MiB of resident memory in every log keeper.
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.capget.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]

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
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ONESHOT = 0x80000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_EVENT = struct.Struct("iIII")

# <linux/capability.h>, <linux/prctl.h>
CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_FOWNER = 3
CAP_SETPCAP = 8
CAP_SYS_RESOURCE = 24
_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


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


# <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def set_child_subreaper() -> None:
    """Makes this process a child subreaper (prctl(2) PR_SET_CHILD_SUBREAPER, Linux 3.4+):
    orphans below it are reparented to it. Raises OSError when refused."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))


def is_child_subreaper() -> bool:
    """Whether this process is a child subreaper now (PR_GET_CHILD_SUBREAPER); False when
    it cannot be asked."""
    value = ctypes.c_int(0)
    if _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(value), 0, 0, 0) != 0:
        return False
    return value.value != 0


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, the last one of Linux 5.9+


def keep_only_capabilities(keep: set[int]) -> None:
    """Reduces this process to the capabilities in ``keep`` (numbers of capabilities(7)),
    for good: each other one leaves the bounding set (prctl PR_CAPBSET_DROP, while
    CAP_SETPCAP is still held; skipped without it), the ambient set is emptied, and the
    effective and permitted sets become ``keep`` & what was permitted, the inheritable
    set empty (capset(2), version 3). Then PR_SET_NO_NEW_PRIVS, so no exec can gain any
    back. A process without capabilities (not root) just gets PR_SET_NO_NEW_PRIVS.
    Raises OSError when capget/capset or prctl fails."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data))
    permitted = data[0].permitted | (data[1].permitted << 32)
    if permitted >> CAP_SETPCAP & 1:
        for cap in range(_last_cap() + 1):
            if cap not in keep:
                _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0))
    with contextlib.suppress(OSError):  # EINVAL before Linux 4.3: no ambient set to clear
        _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))
    mask = permitted & sum(1 << cap for cap in keep)
    for index in range(2):
        part = mask >> (32 * index) & 0xFFFFFFFF
        data[index].effective = data[index].permitted = part
        data[index].inheritable = 0
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), data))
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
