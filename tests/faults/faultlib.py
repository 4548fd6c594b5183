"""Helpers of the fault suite: envelope checks, the daemon's host id and tokens, the process
table, mounts and a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import DaemonRunner, wait_for

# The codes of SPEC section 4, plus 2004 (process operation failed, see api/envelope.py).
DOCUMENTED_CODES = {
    1000, 1001, 1002, 1003, 1004, 1005, 2000, 2001, 2002, 2003, 2004,
    20000, 20003, 20004, 5000,
}
ENVELOPE_KEYS = {"successful", "timestamp", "duration", "status", "traceId", "server"}


def envelope_problem(status: int, envelope: dict[str, Any] | None) -> str | None:
    """None when (status, envelope) is a well-formed OCP answer, else what is wrong."""
    if not isinstance(envelope, dict):
        return f"HTTP {status}: no JSON envelope"
    missing = ENVELOPE_KEYS - envelope.keys()
    if missing:
        return f"HTTP {status}: envelope lacks {sorted(missing)}"
    if envelope["status"] != status:
        return f"HTTP {status}: envelope says status {envelope['status']}"
    if envelope["successful"]:
        return None if status < 400 else f"HTTP {status} but successful"
    error = envelope.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return f"HTTP {status}: error without code/message: {error!r}"
    if error.get("code") not in DOCUMENTED_CODES:
        return f"HTTP {status}: undocumented code {error.get('code')!r}"
    if status >= 500:
        return f"HTTP {status}: server error {error}"
    return None


def host_id(runner: DaemonRunner) -> int:
    """The host id the daemon answers for (the demo config's 2 when its config is invalid)."""
    return runner.settings.agent.host_id if runner.settings else 2


def token_entry(name: str, token: str, permissions: list[str]) -> dict[str, Any]:
    """An [[api.tokens]] entry for `token`, which the config holds only as its sha256."""
    return {"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "permissions": permissions}


# --- the process table ---------------------------------------------------------------------


def environ_of(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def by_cmdline(command: list[str]) -> list[psutil.Process]:
    """Every live (non-zombie) process in the whole table whose argv is exactly `command`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.info["cmdline"] == command:
                found.append(proc)
    return found


def marked(state_dir: str) -> list[tuple[int, dict[str, str]]]:
    """(pid, environ) of every live process carrying the daemon's state_dir marker."""
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        env = environ_of(proc.pid)
        if env and env.get("OCP_AGENTD_STATE_DIR") == state_dir:
            found.append((proc.pid, env))
    return found


def kill_and_wait_restart(
    runner: DaemonRunner, name: str, message: str, timeout: float = 20.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """SIGKILLs the program's main process and waits until it is RUNNING under a new pid;
    the program's record before and after."""
    before = runner.process(name)
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for(
        lambda: (r := runner.process(name))["state"] == "RUNNING" and r["pid"] != before["pid"]
        and r,
        timeout, message,
    )
    return before, after


def zombies() -> list[tuple[int, int, str]]:
    """(pid, ppid, name) of every zombie in the table."""
    found = []
    for proc in psutil.process_iter(["ppid", "name", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            found.append((proc.pid, proc.info["ppid"], proc.info["name"]))
    return found


# --- mounts (root only) ----------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", options: str = "") -> Iterator[Path]:
    """A small tmpfs mounted at path for the duration; skips the test if it cannot mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path, chunk: int = 65536) -> None:
    """Writes zeros to the file at path until its file system has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while os.write(fd, b"\0" * chunk):
                pass
    finally:
        os.close(fd)


def python_sleeper(tag: str) -> list[str]:
    """A program that writes nothing and sleeps; `tag` makes its command line unique."""
    return [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)", tag]
