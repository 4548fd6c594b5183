"""Spawning a program's main process: environment, user, log descriptors, Popen, pidfd.

The child gets the daemon's environment minus the service manager's private variables,
the program's env, and the run markers (proctable.MARK_*) by which its tree is found.
"""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

from ocp_agentd import descriptors
from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision import output
from ocp_agentd.supervision.cgroups import GO, CgroupError, ProgramCgroup, held_command
from ocp_agentd.supervision.identity import Handle, starttime_of
from ocp_agentd.supervision.proctable import (
    MARK_PROGRAM,
    MARK_RUN_ID,
    MARK_STATE_DIR,
)

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


class SpawnRefused(Exception):
    """What the host cannot give a program at spawn time; the message names the key
    (e.g. "programs.web.user: no user 'web' on this host")."""


def child_env(spec: ProgramSpec, state_dir: Path, run_id: str) -> dict[str, str]:
    """The environment of a new main process: inherited, spec.env, then the run markers."""
    env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
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


def spawn(
    spec: ProgramSpec, state_dir: Path, run_id: str, cgroup: ProgramCgroup | None = None
) -> tuple[subprocess.Popen[bytes], Handle]:
    """Starts spec.command in a new session with its logs as stdout/stderr, inside cgroup
    when one is given (before the program's first instruction: cgroups.held_command).

    Returns the Popen and a Handle pinning the child by pidfd. Raises SpawnRefused (see
    user_kwargs), OSError when the logs cannot be opened safely (safefs.UnsafePath names
    the path), the command cannot be spawned, cannot be placed in its cgroup or the child
    cannot be pinned (the child is then killed: better no process than a lost one). The
    child gets the descriptor limit the daemon was started with
    (descriptors.program_command).
    """
    env = child_env(spec, state_dir, run_id)
    kwargs = user_kwargs(spec, env)
    program = spec.command[0]
    argv = descriptors.program_command(spec.command)
    if cgroup is not None:
        # The shell would report a missing program only as exit status 127: say it now.
        if not os.path.isfile(program):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if not os.access(program, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        argv = held_command(argv)
    out, err = output.open_streams(spec, state_dir)
    try:
        popen = subprocess.Popen(
            argv,
            cwd=spec.cwd,
            env=env,
            stdin=subprocess.PIPE if cgroup is not None else subprocess.DEVNULL,
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
    if cgroup is not None:
        _release_into(popen, cgroup)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError:
        popen.kill()
        popen.wait()
        raise
    return popen, Handle(popen.pid, starttime_of(popen.pid) or 0, pidfd)


def _release_into(popen: subprocess.Popen[bytes], cgroup: ProgramCgroup) -> None:
    """Places the held child in cgroup, then lets it exec the program."""
    assert popen.stdin is not None
    try:
        cgroup.place(popen.pid)
        popen.stdin.write(GO)
        popen.stdin.close()
    except (CgroupError, OSError) as exc:
        popen.kill()
        popen.wait()
        raise OSError(exc.errno, f"cannot put the program in {cgroup.path}: {exc}") from exc
    finally:
        popen.stdin = None
