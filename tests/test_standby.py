"""The standby (supervision/standby.py): a program's next main waits, held, in the
program's other cgroup slot; a crash or a restart releases it instead of moving a new
process into a cgroup, and nothing of it outlives a stop, a changed spec or the daemon.

Real daemons on this host's cgroups, real kills.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import psutil
import pytest
from harness import DaemonRunner, wait_for
from unixuser import unix_user

from ocp_agentd.supervision import cgroups, spawn

HOST = cgroups.detect(Path("/nonexistent"))
pytestmark = pytest.mark.skipif(
    not HOST.usable or os.geteuid() != 0,
    reason=f"needs cgroups as root (this host: {HOST.layout})",
)


def sleeper(tag: str) -> dict[str, object]:
    """A program that sleeps, with a unique tag (digits) as its second argument."""
    return {"command": ["/bin/sleep", "7000", tag], "start_seconds": 0}


def new_tag() -> str:
    return str(uuid.uuid4().int % 10**9)


def slots(daemon: DaemonRunner, name: str) -> tuple[Path, Path]:
    """(the slot the main is in, the other one), from the record's cgroup path."""
    current = Path(daemon.process(name)["cgroup"])
    first = current.parent / name
    second = current.parent / f"{name}.b"
    assert current in (first, second)
    return current, second if current == first else first


def held_in(slot: Path) -> psutil.Process | None:
    """The held shell waiting in slot, if that is what is there."""
    try:
        pids = [int(p) for p in (slot / "cgroup.procs").read_text().split()]
    except OSError:
        return None
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if spawn.is_held(proc.cmdline()):
                return proc
        except psutil.Error:
            continue
    return None


def wait_standby(daemon: DaemonRunner, name: str) -> psutil.Process:
    return wait_for(lambda: held_in(slots(daemon, name)[1]), 20, f"a standby for {name}")


def execed(pid: int, command: list[str]) -> psutil.Process:
    """pid once it runs command: a released standby is RUNNING as soon as it has GO, a
    moment before its shell has exec'd the program."""
    proc = psutil.Process(pid)
    return wait_for(lambda: proc.cmdline() == command and proc, 10, f"{pid} to exec")


def running_with_standby(
    daemon_factory, **extra: object
) -> tuple[dict, DaemonRunner, dict, psutil.Process]:
    """A daemon running program "sleeper" (sleeper() plus extra), once its standby waits:
    (spec, daemon, the first record, the standby)."""
    spec = {**sleeper(new_tag()), **extra}
    daemon = daemon_factory({"sleeper": spec})
    first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    return spec, daemon, first, wait_standby(daemon, "sleeper")


def crash(daemon: DaemonRunner, name: str, pid: int) -> dict:
    """kill -9 of the program's main pid; its record once another main is RUNNING."""
    os.kill(pid, signal.SIGKILL)
    return wait_for(
        lambda: (r := daemon.process(name))["state"] == "RUNNING" and r["pid"] != pid and r,
        20, "the restart",
    )


def one_copy(command: list[str], pids: list[int]) -> None:
    """Waits until exactly `pids` run command (a start is RUNNING a moment before its
    exec is done), failing at the deadline."""
    wait_for(lambda: copies_of(command) == pids, 10, f"exactly {pids} running {command}")


def copies_of(command: list[str]) -> list[int]:
    """Live processes running exactly command (zombies excluded)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == command and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc.pid)
    return found


def test_a_crash_releases_the_standby_in_the_other_slot(daemon_factory) -> None:
    tag = new_tag()
    spec = sleeper(tag)
    daemon = daemon_factory({"sleeper": spec})
    first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "sleeper")
    # It waits without looking like the program or carrying its run markers.
    assert not any(arg.endswith(tag) for arg in standby.cmdline())
    assert "OCP_AGENTD_PROGRAM" not in standby.environ()
    old_slot, spare = slots(daemon, "sleeper")

    record = crash(daemon, "sleeper", first["pid"])
    assert record["pid"] == standby.pid
    assert Path(record["cgroup"]) == spare
    assert execed(record["pid"], spec["command"]).environ()["OCP_AGENTD_PROGRAM"] == "sleeper"
    one_copy(spec["command"], [record["pid"]])
    # The next standby waits in the slot the crashed main left.
    assert wait_for(lambda: held_in(old_slot), 20, "the next standby").pid != standby.pid


def test_a_stop_keeps_the_standby_for_the_start_and_shutdown_ends_it(daemon_factory) -> None:
    """stop-all then start-all (the restart task): the stopped program runs nothing, its
    standby waits as root, and the start releases it; the daemon's shutdown ends it."""
    spec, daemon, _first, standby = running_with_standby(daemon_factory)
    current, spare = slots(daemon, "sleeper")

    daemon.post("/api/v1/processes/sleeper/stop").check()
    assert daemon.process("sleeper")["state"] == "STOPPED"
    assert (current / "cgroup.procs").read_text().split() == []
    one_copy(spec["command"], [])
    assert held_in(spare) is not None and held_in(spare).pid == standby.pid
    assert standby.uids().effective == 0

    daemon.post("/api/v1/processes/sleeper/start").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert record["pid"] == standby.pid
    one_copy(spec["command"], [record["pid"]])
    following = wait_for(lambda: held_in(current), 20, "the next standby")

    daemon.stop()
    wait_for(lambda: not following.is_running() or following.status() == psutil.STATUS_ZOMBIE,
             10, "the standby to end with the daemon")
    for slot in (current, spare):
        assert not slot.exists() or (slot / "cgroup.procs").read_text().split() == []


def test_a_killed_standby_is_replaced_by_an_ordinary_start(daemon_factory) -> None:
    spec, daemon, first, standby = running_with_standby(daemon_factory)
    standby.kill()
    wait_for(lambda: not standby.is_running(), 10, "the standby reaped")

    record = crash(daemon, "sleeper", first["pid"])
    execed(record["pid"], spec["command"])
    one_copy(spec["command"], [record["pid"]])
    assert f"standby pid {standby.pid} exited" in daemon.log()


def test_a_daemon_killed_leaves_no_standby_and_one_copy(daemon_factory) -> None:
    spec, daemon, first, standby = running_with_standby(daemon_factory)

    daemon.kill9()
    # Its GO pipe closed with the daemon: the shell reads end of file and exits unrun.
    wait_for(lambda: not standby.is_running() or standby.status() == psutil.STATUS_ZOMBIE,
             10, "the orphaned standby to exit")
    one_copy(spec["command"], [first["pid"]])

    daemon.restart()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert record["pid"] == first["pid"]
    one_copy(spec["command"], [first["pid"]])
    # An adopted program gets its standby after its next start, not at adoption (its log
    # keeper is the earlier daemon's until then).
    daemon.post("/api/v1/processes/sleeper/restart").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert wait_standby(daemon, "sleeper").pid not in (standby.pid, record["pid"])
    one_copy(spec["command"], [record["pid"]])


def test_a_restart_uses_the_standby_with_the_current_spec(daemon_factory) -> None:
    spec, daemon, first, standby = running_with_standby(daemon_factory)

    daemon.post("/api/v1/processes/sleeper/restart").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert record["pid"] == standby.pid != first["pid"]
    one_copy(spec["command"], [record["pid"]])


def test_a_standby_waits_as_root_and_the_program_runs_as_its_user(daemon_factory) -> None:
    """The program's user cannot ptrace the held shell (it is root's until the exec,
    setpriv(1) takes on the user there), so nothing of the user's runs outside the slot."""
    with unix_user() as user:
        spec = {**sleeper(new_tag()), "user": user.name}
        daemon = daemon_factory({"sleeper": spec})
        first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
        standby = wait_standby(daemon, "sleeper")
        assert standby.uids().real == standby.uids().effective == 0
        main = psutil.Process(first["pid"])
        assert main.uids().real == main.uids().effective == user.uid
        assert main.gids().real == user.gid

        record = crash(daemon, "sleeper", first["pid"])
        assert record["pid"] == standby.pid
        released = execed(record["pid"], spec["command"])
        assert released.uids().real == released.uids().effective == user.uid
        assert released.gids().real == user.gid
        daemon.post("/api/v1/processes/sleeper/stop").check()


def test_a_standby_made_before_the_cwd_moved_is_not_used(daemon_factory, tmp_path) -> None:
    """An upgrade that switches the cwd symlink to another release: the restart must run
    in the new one, not in the directory the standby was made in."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    current = tmp_path / "current"
    current.symlink_to("v1")
    spec = {**sleeper(new_tag()), "cwd": str(current)}
    daemon = daemon_factory({"sleeper": spec})
    daemon.wait_state("sleeper", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "sleeper")

    switched = tmp_path / "switched"
    switched.symlink_to("v2")
    switched.replace(current)
    daemon.post("/api/v1/processes/sleeper/restart").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert record["pid"] != standby.pid
    assert execed(record["pid"], spec["command"]).cwd() == str(tmp_path / "v2")
    one_copy(spec["command"], [record["pid"]])


def test_names_the_shell_would_drop_reach_the_program(daemon_factory) -> None:
    """A held start goes through /bin/sh, which passes on no variable whose name is not a
    shell identifier and sets IFS itself; the program must get its env exactly, on its
    first start and when its standby is released."""
    env = {"spring.profiles.active": "prod", "A-B": "1", "IFS": "o", "PLAIN": "x y"}
    spec = {**sleeper(new_tag()), "env": env}
    daemon = daemon_factory({"sleeper": spec})
    first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    for pid in (first["pid"],):
        got = execed(pid, spec["command"]).environ()
        assert {name: got.get(name) for name in env} == env
        assert not [name for name in got if name.startswith("OCP_AGENTD_") and
                    name not in ("OCP_AGENTD_PROGRAM", "OCP_AGENTD_STATE_DIR",
                                 "OCP_AGENTD_RUN_ID")]
    standby = wait_standby(daemon, "sleeper")
    record = crash(daemon, "sleeper", first["pid"])
    assert record["pid"] == standby.pid
    got = execed(record["pid"], spec["command"]).environ()
    assert {name: got.get(name) for name in env} == env


def test_a_program_its_user_may_not_run_is_not_run_for_it(daemon_factory, tmp_path) -> None:
    """The user is taken on before the program's exec is checked: a binary only root may
    run is refused, as it is without cgroups (setpriv keeps root's capabilities until its
    own exec, so it must not exec the program itself)."""
    secret = tmp_path / "root-only"
    secret.write_bytes(Path("/bin/sleep").read_bytes())
    secret.chmod(0o700)
    with unix_user() as user:
        spec = {"command": [str(secret), "7000", new_tag()], "user": user.name,
                "start_seconds": 0, "max_quick_exits": 1}
        daemon = daemon_factory({"secret": spec})
        record = daemon.wait_state("secret", "FATAL", "BACKOFF", timeout=30)
        assert record["pid"] is None
        one_copy(spec["command"], [])


def test_an_exited_program_keeps_no_standby(daemon_factory) -> None:
    spec = {"command": ["/bin/sh", "-c", "sleep 1.5", new_tag()], "start_seconds": 0,
            "autorestart": "never"}
    daemon = daemon_factory({"once": spec})
    daemon.wait_state("once", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "once")
    daemon.wait_state("once", "EXITED", timeout=30)
    wait_for(lambda: not standby.is_running() or standby.status() == psutil.STATUS_ZOMBIE,
             10, "the standby of an exited program to end")


def test_names_the_held_script_uses_reach_the_program_unchanged(daemon_factory) -> None:
    env = {"go": "mine", "i": "mine too", "PWD": "/not/the/cwd"}
    spec, daemon, first, standby = running_with_standby(daemon_factory, env=env)
    got = execed(first["pid"], spec["command"]).environ()
    assert {name: got.get(name) for name in env} == env
    record = crash(daemon, "sleeper", first["pid"])
    assert record["pid"] == standby.pid
    got = execed(record["pid"], spec["command"]).environ()
    assert {name: got.get(name) for name in env} == env


def _keepers_of(daemon: DaemonRunner, name: str) -> list[int]:
    """Pids of the live log keepers of program name of this daemon."""
    mark = f"{daemon.state_dir}:{name}"
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if (proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get("OCP_AGENTD_LOG_KEEPER") == mark):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_a_log_renamed_back_by_its_user_discards_the_standby_writing_elsewhere(
        daemon_factory, base) -> None:
    """The program's user owns its log directory. After the keeper's rotation the user
    renames <log>.1 back over <log>: the standby, made on that keeper, would write the
    replaced file, which no longer has a name. The restart must not release it on that
    keeper: the program's output goes to a keeper writing the file at the log's path."""
    with unix_user() as user:
        logs = base / "logs"
        logs.mkdir()
        os.chown(logs, user.uid, user.gid)
        log = logs / "app.log"
        tag = new_tag()
        go = base / "go"
        # The output comes once the standby waits (made later, it would see the rotation).
        burst = (f"while [ ! -e {go} ]; do sleep 0.05; done; "
                 f"head -c 1500 /dev/zero | tr '\\0' a; exec /bin/sleep 7000 {tag}")
        daemon = daemon_factory({"writer": {
            "command": ["/bin/sh", "-c", burst], "start_seconds": 0, "user": user.name,
            "stdout_log": str(log), "stderr_log": str(log), "log_max_bytes": 1024,
            "log_backups": 2}})
        daemon.wait_state("writer", "RUNNING", timeout=30)
        wait_standby(daemon, "writer")
        go.touch()
        rotated = logs / "app.log.1"
        wait_for(lambda: rotated.exists() and log.exists() and log.stat().st_size == 476,
                 20, "the keeper's rotation")
        first = _keepers_of(daemon, "writer")
        assert len(first) == 1
        user.run("/bin/mv", str(rotated), str(log))  # the live file loses its name
        daemon.post("/api/v1/processes/writer/restart").check()
        # The old keeper ends with its last writer; the one left is new.
        keepers = wait_for(lambda: (k := _keepers_of(daemon, "writer")) and len(k) == 1 and k,
                           20, "one keeper of writer")
        assert keepers != first
