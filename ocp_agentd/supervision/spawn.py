"""Spawning a program's main process: environment, user, log descriptors, Popen, pidfd.

The child gets the daemon's environment minus the service manager's private variables,
the program's env, and the run markers (proctable.MARK_*) by which its tree is found.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pwd
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ocp_agentd import descriptors
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output
from ocp_agentd.supervision.cgroups import CgroupError, ProgramCgroup
from ocp_agentd.supervision.identity import Handle, starttime_of
from ocp_agentd.supervision.proctable import (
    MARK_PROGRAM,
    MARK_RUN_ID,
    MARK_STATE_DIR,
)
from ocp_agentd.supervision.subreaper import REAPER

# Variables of the daemon's own service manager that a child must not inherit.
PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "OCP_AGENTD_CONFIG",
)
# A shell's bookkeeping, which says nothing true of a program's process (its directory,
# its shell depth): not inherited from the daemon's environment (a program's own env may
# still set them).
SHELL_BOOKKEEPING = ("PWD", "OLDPWD", "SHLVL", "_")


# What a held process reads on stdin before it execs the program (hold()).
GO = b"go\n"
# How a held shell's script begins, so ps shows what it is (and is_held() knows it).
_HELD_TITLE = ": ocp-agentd held start;"
# The variables that carry a held command's argv (hold()); unset before the exec.
_ARG_PREFIX = "OCP_AGENTD_ARGV_"
_EXPORT_PREFIX = "OCP_AGENTD_AT_EXEC_"
_ARG_COUNT = "OCP_AGENTD_ARGC"
_EXACT_ENV = "OCP_AGENTD_EXACT_ENV"
_EXACT_ENV_SCRIPT = (
    "import json, os, sys; "
    f"env = json.loads(os.environ['{_EXACT_ENV}']); "
    "os.execve(sys.argv[1], sys.argv[1:], env)"
)
_MARKERS = frozenset({MARK_PROGRAM, MARK_STATE_DIR, MARK_RUN_ID})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables a POSIX shell (dash) or bash sets or changes itself ("Shell Variables").
_SHELL_SET = frozenset({
    "IFS", "OPTIND", "PPID", "PWD", "OLDPWD", "SHLVL", "_", "PS1", "PS2", "PS4",
    "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "HOSTNAME", "HOSTTYPE", "MACHTYPE",
    "OSTYPE",
})


# setpriv(1) from util-linux (essential on Debian, in every RHEL): the held shell's user
# change at exec (become_user).
SETPRIV = "/usr/bin/setpriv"
ENV = "/usr/bin/env"
# Spawns between start_process and their release (counted()), for descriptor accounting:
# each holds IN_FLIGHT_COST descriptors meanwhile (its GO pipe, then its pidfd).
_in_flight = 0
IN_FLIGHT_COST = 2


class SpawnRefused(Exception):
    """What the host cannot give a program at spawn time; the message names the key
    (e.g. "programs.web.user: no user 'web' on this host")."""


def child_env(spec: ProgramSpec, state_dir: Path, run_id: str) -> dict[str, str]:
    """The environment of a new main process: inherited, spec.env, then the run markers."""
    env = {
        k: v for k, v in os.environ.items() if k not in PRIVATE_ENV and k not in SHELL_BOOKKEEPING
    }
    env.update(spec.env)
    env[MARK_PROGRAM] = spec.name
    env[MARK_STATE_DIR] = str(state_dir)
    env[MARK_RUN_ID] = run_id
    return env


def user_kwargs(spec: ProgramSpec, env: dict[str, str]) -> dict[str, Any]:
    """Popen's user/group/extra_groups for spec.user (and HOME, USER, LOGNAME into env).

    Raises SpawnRefused when the user does not exist (deleted since the host check).
    """
    if not spec.user:
        return {}
    try:
        account = pwd.getpwnam(spec.user)
    except KeyError:
        raise SpawnRefused(
            f"programs.{spec.name}.user: no user {spec.user!r} on this host"
        ) from None
    env.update(HOME=account.pw_dir, USER=spec.user, LOGNAME=spec.user)
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": os.getgrouplist(spec.user, account.pw_gid),
    }


# Why this has no window: the child is a shell that runs only builtins (read, [, exec)
# until the daemon has written its pid into every cgroup.procs of the program and then
# sent "go" on its stdin; it forks nothing before that, and the program's first instruction
# runs after the exec that follows. Every process the program ever forks inherits the
# cgroups. If the daemon dies before "go", read sees end of file and the shell exits
# without running the program. The alternatives are worse: Popen's preexec_fn runs Python
# in the forked child of a threaded daemon (the daemon uses worker threads), which can
# deadlock on a lock another thread held at fork time; clone3(CLONE_INTO_CGROUP) covers the
# v2 tree only, not the v1 controllers of a hybrid host, and Python does not expose it.
# Switching to the program's user happens in Popen's C code before the shell runs; the
# daemon, still root, does the writing, so the user needs no right on cgroupfs.
def hold(
    command: list[str], at_exec: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """argv and environment additions for a shell that waits for GO on stdin, then
    execs command (stdin from /dev/null; exit status 127 on end of file instead), with
    the variables of `at_exec` (names are shell identifiers) exported just before.

    The daemon, still root, moves the waiting shell into the program's cgroup and only
    then writes GO, so the program's first instruction already runs there and the user
    needs no right on cgroupfs. The command and `at_exec` travel under other names and
    are unset before the exec: a waiting shell neither looks like the program to ps or
    ``pgrep -f`` nor carries its run markers (a standby may wait a long time and is not
    an instance: standby.py).
    """
    at_exec = at_exec or {}
    carried = {f"{_ARG_PREFIX}{index}": arg for index, arg in enumerate(command)}
    carried[_ARG_COUNT] = str(len(command))
    exports = []
    for name, value in at_exec.items():
        carrier = f"{_EXPORT_PREFIX}{name}"
        carried[carrier] = value
        exports.append(f'{name}="${carrier}"')
    unset = " ".join(carrier for carrier in carried if not carrier.startswith(_ARG_PREFIX))
    # The argv is gathered in a loop, so the script has the same small size for any
    # number of arguments (one argument of a command line may not exceed 128 KiB).
    # Only the index is spliced into the eval'd text; the values are never parsed.
    script = (
        f"{_HELD_TITLE} "
        'read -r OCP_AGENTD_GO && [ "$OCP_AGENTD_GO" = go ] || exit 127; '
        "set --; OCP_AGENTD_I=0; "
        f'while [ "$OCP_AGENTD_I" -lt "${_ARG_COUNT}" ]; do '
        f'eval "set -- \\"\\$@\\" \\"\\${_ARG_PREFIX}$OCP_AGENTD_I\\"; '
        f'unset {_ARG_PREFIX}$OCP_AGENTD_I"; '
        "OCP_AGENTD_I=$((OCP_AGENTD_I + 1)); done; "
        + (f"export {' '.join(exports)}; " if exports else "")
        + f"unset OCP_AGENTD_GO OCP_AGENTD_I {unset}; "
        'exec "$@" </dev/null'
    )
    return ["/bin/sh", "-c", script], carried


def shell_alters(name: str) -> bool:
    """Whether /bin/sh would drop or change the environment variable `name` on its way to
    the program: a name that is no shell identifier (``spring.profiles.active``, ``A-B``)
    is not passed on, the shell sets IFS, OPTIND, PPID, PWD and (bash) SHLVL and others
    itself (POSIX and bash, "Shell Variables"), and the held script's own variables are
    OCP_AGENTD_*."""
    return (
        name in _SHELL_SET
        or not _IDENTIFIER.fullmatch(name)
        or (name.startswith("OCP_AGENTD_") and name not in _MARKERS)
    )


def exact_env_command(env: dict[str, str]) -> list[str]:
    """An argv prefix that execs the rest with exactly `env` (which it carries in
    OCP_AGENTD_EXACT_ENV, as JSON: a variable only root and the program's user can read),
    for the programs whose environment the held shell would alter (shell_alters). Python
    without site, the daemon's own interpreter: about 8 ms more per start, for those
    programs alone."""
    env[_EXACT_ENV] = json.dumps(env)
    return [sys.executable, "-I", "-S", "-c", _EXACT_ENV_SCRIPT]


def become_user(spec: ProgramSpec, ids: dict[str, Any]) -> list[str]:
    """The argv prefix that execs the rest as spec's user (ids: user_kwargs' uid, gid and
    supplementary groups) through setpriv(1), from util-linux; [] for no user. Raises
    SpawnRefused when setpriv is missing."""
    if not ids:
        return []
    if not os.access(SETPRIV, os.X_OK):
        raise SpawnRefused(
            f"programs.{spec.name}.user: running a program as another user in its cgroup "
            f"needs setpriv (util-linux) at {SETPRIV}"
        )
    groups = ",".join(str(gid) for gid in ids["extra_groups"])
    # setpriv keeps its capabilities (KEEPCAPS) until its own exec, so that exec would be
    # checked as root's (CAP_DAC_OVERRIDE): a program the user may not run or read would
    # run. env(1), which anyone may run, makes the program's exec as the user alone; it
    # passes the environment unchanged ("--" ends its options; a program path with "="
    # goes through exact_env_command instead, see start_process).
    return [
        SETPRIV,
        f"--reuid={ids['user']}",
        f"--regid={ids['group']}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--",
        ENV,
        "--",
    ]


def is_held(cmdline: list[str]) -> bool:
    """Whether cmdline is a held shell's (hold()) still waiting for GO."""
    return len(cmdline) >= 3 and cmdline[2].startswith(_HELD_TITLE)


def start_process(
    spec: ProgramSpec, state_dir: Path, run_id: str, held: bool = False
) -> subprocess.Popen[bytes]:
    """Starts spec.command in a new session with its logs as stdout/stderr; with `held`,
    through a shell that waits for release_into before it execs the program
    (hold), so the program joins its cgroup before its first instruction.

    Raises SpawnRefused (see user_kwargs), OSError when the logs cannot be opened safely
    (safefs.UnsafePath names the path) or the command cannot be spawned. The child gets
    the descriptor limit the daemon was started with (descriptors.program_command).
    """
    env = child_env(spec, state_dir, run_id)
    kwargs = user_kwargs(spec, env)
    program = spec.command[0]
    exact = held and (
        any(shell_alters(name) for name in env) or (bool(kwargs) and "=" in program)
    )
    argv = descriptors.program_command(
        [*exact_env_command(env), *spec.command] if exact else spec.command
    )
    if held:
        # The shell would report a missing program only as exit status 127: say it now.
        if not os.path.isfile(program):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if not os.access(program, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        markers = {name: env.pop(name) for name in (MARK_PROGRAM, MARK_STATE_DIR, MARK_RUN_ID)}
        # The held shell stays root and the user is taken on at the exec (become_user):
        # a shell of the program's user could be ptraced by that user, who could then run
        # code before it is in its cgroup, or in the standby's slot past a stop.
        argv, carried = hold([*become_user(spec, kwargs), *argv], markers)
        env.update(carried)
        kwargs = {}
    out, err = output.open_streams(spec, state_dir)
    if not held:
        REAPER.note_uncontained()  # held: in its cgroup before it runs (release_into)
    try:
        return subprocess.Popen(
            argv,
            cwd=spec.cwd,
            env=env,
            stdin=subprocess.PIPE if held else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
            **kwargs,
        )
    finally:
        os.close(out)
        if err != out:
            os.close(err)


def release_into(popen: subprocess.Popen[bytes], cgroup: ProgramCgroup, go: bool = True) -> None:
    """Places the held child (start_process with `held`) in cgroup, then (with `go`)
    lets it exec the program; without, it waits there for release(). On failure the
    child is killed and reaped, and OSError names the cgroup.

    Blocking: moving a process between cgroups waits for an RCU grace period (the
    kernel's cgroup_threadgroup_rwsem; about 10 ms here, see Documentation/admin-guide/
    cgroup-v2.rst, "favordynmods"), so the daemon calls it from a worker thread, where
    the moves of programs started together share one grace period.
    """
    try:
        cgroup.place(popen.pid)
        if go:
            release(popen)
    except (CgroupError, OSError) as exc:
        popen.kill()
        popen.wait()
        raise OSError(exc.errno, f"cannot put the program in {cgroup.path}: {exc}") from exc


def release(popen: subprocess.Popen[bytes]) -> None:
    """Writes GO to a held child, which then execs the program. Raises OSError (EPIPE
    when the child is gone); a pipe's few bytes never block."""
    assert popen.stdin is not None
    try:
        popen.stdin.write(GO)
        popen.stdin.close()
    finally:
        popen.stdin = None


def pin(popen: subprocess.Popen[bytes]) -> Handle:
    """A Handle pinning the child by pidfd. Raises OSError (the child is then killed and
    reaped: better no process than a lost one)."""
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        popen.kill()
        popen.wait()
        raise
    return Handle(popen.pid, starttime_of(popen.pid) or 0, pidfd)


def end_child(popen: subprocess.Popen[bytes]) -> None:
    """Kills and reaps a child a spawn gave up on (a no-op once it is reaped)."""
    if popen.returncode is None:
        with contextlib.suppress(OSError):
            popen.kill()
        popen.wait()


async def finish_in_thread(work: Callable[..., None], *args: object) -> None:
    """Runs blocking work in the loop's default executor and waits for it to finish even
    when cancelled (then re-raises the cancellation): a half-done spawn must not be left
    to a thread nobody waits for."""
    future = asyncio.get_running_loop().run_in_executor(None, work, *args)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def in_flight() -> int:
    """How many spawns are under way (counted()): each holds descriptors meanwhile."""
    return _in_flight


@contextlib.contextmanager
def counted() -> Iterator[None]:
    """Counts a spawn as under way for its duration (in_flight())."""
    global _in_flight
    _in_flight += 1
    try:
        yield
    finally:
        _in_flight -= 1
