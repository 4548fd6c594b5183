"""Readiness and verify checks: ports listening by a process tree, a health URL."""

from __future__ import annotations

import os
from collections.abc import Iterable

import aiohttp

_LISTEN = "0A"


def _listening_inodes() -> dict[int, int]:
    """socket inode -> local port, for every TCP socket in LISTEN state."""
    inodes: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _LISTEN:
                        port = int(fields[1].rsplit(":", 1)[1], 16)
                        inodes[int(fields[9])] = port
        except OSError:
            continue
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    found: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def listening_ports(pids: Iterable[int]) -> set[int]:
    """The TCP ports on which any of pids listens (blocking: call in a thread)."""
    inodes = _listening_inodes()
    ports: set[int] = set()
    for pid in pids:
        for inode in _socket_inodes(pid) & inodes.keys():
            ports.add(inodes[inode])
    return ports


async def health_ok(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> str | None:
    """None when url answers 2xx, else why not."""
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as response:
            if 200 <= response.status < 300:
                return None
            return f"{url} answered {response.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"{url}: {exc.__class__.__name__} {exc}".strip()
