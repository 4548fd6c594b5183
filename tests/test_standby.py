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

    os.kill(first["pid"], signal.SIGKILL)
    record = wait_for(
        lambda: (r := daemon.process("sleeper"))["state"] == "RUNNING"
        and r["pid"] != first["pid"] and r,
        20, "the restart",
    )
    assert record["pid"] == standby.pid
    assert Path(record["cgroup"]) == spare
    assert psutil.Process(record["pid"]).cmdline() == spec["command"]
    assert psutil.Process(record["pid"]).environ()["OCP_AGENTD_PROGRAM"] == "sleeper"
    assert copies_of(spec["command"]) == [record["pid"]]
    # The next standby waits in the slot the crashed main left.
    assert wait_for(lambda: held_in(old_slot), 20, "the next standby").pid != standby.pid


def test_a_stop_ends_the_standby_and_a_start_still_works(daemon_factory) -> None:
    spec = sleeper(new_tag())
    daemon = daemon_factory({"sleeper": spec})
    daemon.wait_state("sleeper", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "sleeper")
    current, spare = slots(daemon, "sleeper")

    daemon.post("/api/v1/processes/sleeper/stop").check()
    wait_for(lambda: not standby.is_running() or standby.status() == psutil.STATUS_ZOMBIE,
             10, "the standby to end")
    for slot in (current, spare):
        assert (slot / "cgroup.procs").read_text().split() == []
    assert copies_of(spec["command"]) == []

    daemon.post("/api/v1/processes/sleeper/start").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert copies_of(spec["command"]) == [record["pid"]]


def test_a_killed_standby_is_replaced_by_an_ordinary_start(daemon_factory) -> None:
    spec = sleeper(new_tag())
    daemon = daemon_factory({"sleeper": spec})
    first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "sleeper")
    standby.kill()
    wait_for(lambda: not standby.is_running(), 10, "the standby reaped")

    os.kill(first["pid"], signal.SIGKILL)
    record = wait_for(
        lambda: (r := daemon.process("sleeper"))["state"] == "RUNNING"
        and r["pid"] != first["pid"] and r,
        20, "the restart",
    )
    assert psutil.Process(record["pid"]).cmdline() == spec["command"]
    assert copies_of(spec["command"]) == [record["pid"]]
    assert f"standby pid {standby.pid} exited" in daemon.log()


def test_a_daemon_killed_leaves_no_standby_and_one_copy(daemon_factory) -> None:
    spec = sleeper(new_tag())
    daemon = daemon_factory({"sleeper": spec})
    first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "sleeper")

    daemon.kill9()
    # Its GO pipe closed with the daemon: the shell reads end of file and exits unrun.
    wait_for(lambda: not standby.is_running() or standby.status() == psutil.STATUS_ZOMBIE,
             10, "the orphaned standby to exit")
    assert copies_of(spec["command"]) == [first["pid"]]

    daemon.restart()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert record["pid"] == first["pid"]
    assert copies_of(spec["command"]) == [first["pid"]]
    # An adopted program gets its standby after its next start, not at adoption (its log
    # keeper is the earlier daemon's until then).
    daemon.post("/api/v1/processes/sleeper/restart").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert wait_standby(daemon, "sleeper").pid not in (standby.pid, record["pid"])
    assert copies_of(spec["command"]) == [record["pid"]]


def test_a_restart_uses_the_standby_with_the_current_spec(daemon_factory) -> None:
    spec = sleeper(new_tag())
    daemon = daemon_factory({"sleeper": spec})
    first = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    standby = wait_standby(daemon, "sleeper")

    daemon.post("/api/v1/processes/sleeper/restart").check()
    record = daemon.wait_state("sleeper", "RUNNING", timeout=30)
    assert record["pid"] == standby.pid != first["pid"]
    assert copies_of(spec["command"]) == [record["pid"]]


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

        os.kill(first["pid"], signal.SIGKILL)
        record = wait_for(
            lambda: (r := daemon.process("sleeper"))["state"] == "RUNNING"
            and r["pid"] != first["pid"] and r,
            20, "the restart",
        )
        assert record["pid"] == standby.pid
        released = psutil.Process(record["pid"])
        assert released.cmdline() == spec["command"]
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
    assert psutil.Process(record["pid"]).cwd() == str(tmp_path / "v2")
    assert copies_of(spec["command"]) == [record["pid"]]
