"""Probes of a program: TCP ports listening in its process tree, an HTTP health URL.

Readiness (Program waiting for STARTING -> RUNNING) and verify (SPEC section 7) call the
same probe per kind, so a program is never "ready" by one rule and "failing" by another.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable

import aiohttp

from ocp_agentd.supervision.proctable import take_snapshot

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


def _ports_of_tree(pid: int, run_id: str) -> set[int]:
    # Readiness polls often: descendants and group suffice, the marker scan is not needed.
    pids = [e.pid for e in take_snapshot(with_markers=False).tree(pid, run_id)] or [pid]
    return listening_ports(pids)


async def missing_ports(pid: int, run_id: str, ports: Iterable[int]) -> list[int]:
    """The port probe: which of ports no process of pid's tree (run run_id) listens on."""
    listening = await asyncio.to_thread(_ports_of_tree, pid, run_id)
    return [p for p in ports if p not in listening]


async def health_ok(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> str | None:
    """The HTTP probe: None when url answers 2xx within timeout seconds, else why not."""
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as response:
            if 200 <= response.status < 300:
                return None
            return f"{url} answered {response.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"{url}: {exc.__class__.__name__} {exc}".strip()
