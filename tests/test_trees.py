"""Every process a program ever started is part of its tree until it is gone (issue 10,
kind 2; SPEC sections 3 and 9): a program that daemonizes while STARTING, a setsid
grandchild, a process that rewrote its title and environment. Each exit path (crash in
STARTING, FATAL, stop, daemon shutdown, reload removal) ends the whole tree, with a cgroup
and, where the host has none (cgroup = "off"), through the subreaper and the process table.

Real daemons, real processes; each program's processes are told apart by a unique sleep
argument or title.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from harness import wait_for, write_demo_config

from ocp_agentd.supervision import cgroups
from ocp_agentd.supervision.proctable import Lineage, Snapshot, take_snapshot

CGROUPS = cgroups.detect(Path("/nonexistent")).usable and os.geteuid() == 0
MODES = [
    pytest.param("auto", marks=pytest.mark.skipif(not CGROUPS, reason="no usable cgroups")),
    "off",
]


def _matching(predicate) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if predicate(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def sleeps(seconds: int) -> list[psutil.Process]:
    """Live `/bin/sleep <seconds>` processes (the argument is unique per test)."""
    return _matching(lambda cmd: cmd == ["/bin/sleep", str(seconds)])


def titled(title: str) -> list[psutil.Process]:
    return _matching(lambda cmd: bool(cmd) and cmd[0] == title)


def unique_seconds() -> int:
    return random.randint(200_000, 999_999)


def forker(seconds: int) -> dict:
    """The daemonizing program of issue 10: starts a setsid sleep and exits 0 at once."""
    return {
        "command": [
            "/bin/sh",
            "-c",
            f"setsid /bin/sleep {seconds} </dev/null >/dev/null 2>&1 & exit 0",
        ],
        "autorestart": "always",
        "start_seconds": 1.0,
        "backoff_initial": 0.1,
        "max_quick_exits": 3,
    }


@pytest.mark.parametrize("mode", MODES)
def test_a_program_that_daemonizes_while_starting_leaves_nothing_behind(
    daemon_factory, mode
):
    seconds = unique_seconds()
    daemon = daemon_factory({"forker": forker(seconds)}, {"agent": {"cgroup": mode}})
    record = daemon.wait_state("forker", "FATAL", timeout=30)
    assert record["last_exit"]["code"] == 0
    # Every try's setsid sleep was ended with the try that started it.
    wait_for(lambda: not sleeps(seconds), 10, "no sleep left after FATAL")
    done = daemon.ctl("stop", "forker")
    assert done.returncode == 0, done.stderr
    assert sleeps(seconds) == []
    # The orphaned sleeps came back to the daemon (child subreaper), which reaped them.
    wait_for(lambda: not zombies_of(daemon.pid), 10, "no zombie child of the daemon")


def zombies_of(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("mode", MODES)
def test_stop_and_shutdown_end_setsid_grandchildren_of_a_running_program(
    daemon_factory, mode
):
    seconds = unique_seconds()
    program = {
        "command": [
            "/bin/sh",
            "-c",
            f"setsid /bin/sleep {seconds} & setsid /bin/sleep {seconds} & "
            f"exec /bin/sleep {seconds}",
        ],
        "start_seconds": 0.3,
    }
    daemon = daemon_factory({"grandkids": program}, {"agent": {"cgroup": mode}})
    daemon.wait_state("grandkids", "RUNNING", timeout=20)
    wait_for(lambda: len(sleeps(seconds)) == 3, 10, "three sleeps")
    done = daemon.ctl("stop", "grandkids")
    assert done.returncode == 0, done.stderr
    assert sleeps(seconds) == []
    daemon.ctl("start", "grandkids")
    daemon.wait_state("grandkids", "RUNNING", timeout=20)
    wait_for(lambda: len(sleeps(seconds)) == 3, 10, "three sleeps again")
    assert daemon.stop() == 0
    assert sleeps(seconds) == []


@pytest.mark.parametrize("mode", MODES)
def test_daemon_shutdown_ends_what_a_daemonizing_program_left(daemon_factory, mode):
    seconds = unique_seconds()
    daemon = daemon_factory({"forker": forker(seconds)}, {"agent": {"cgroup": mode}})
    wait_for(lambda: daemon.process("forker")["restarts"] >= 1, 20, "a restart")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert sleeps(seconds) == []


@pytest.mark.skipif(not CGROUPS, reason="needs cgroups: nothing else can find this process")
def test_a_retitled_process_without_environment_is_found_and_stopped(daemon_factory):
    seconds = unique_seconds()
    title = f"retitled-{seconds}"
    inner = f"exec -a {title} /bin/sleep {seconds}"
    program = {
        "command": [
            "/bin/bash",
            "-c",
            f"env -i setsid /bin/bash -c '{inner}' & exec /bin/sleep {seconds}",
        ],
        "start_seconds": 0.3,
    }
    daemon = daemon_factory({"hider": program})
    record = daemon.wait_state("hider", "RUNNING", timeout=20)
    assert record["cgroup"], record
    hidden = wait_for(lambda: titled(title), 10, "the retitled process")
    assert b"OCP_AGENTD" not in Path(f"/proc/{hidden[0].pid}/environ").read_bytes()
    done = daemon.ctl("stop", "hider")
    assert done.returncode == 0, done.stderr
    assert titled(title) == [] and sleeps(seconds) == []


@pytest.mark.skipif(not CGROUPS, reason="needs cgroups")
def test_adoption_recognises_a_retitled_program_and_ends_a_daemonized_leftover(
    daemon_factory,
):
    seconds = unique_seconds()
    title = f"renamed-{seconds}"
    programs = {
        # The main renames itself and clears its environment: still adopted.
        "renamed": {
            "command": ["/bin/bash", "-c", f"exec -a {title} env -i /bin/sleep {seconds}"],
            "start_seconds": 0.3,
        },
        # The main leaves a setsid child without markers, then is killed while the
        # daemon is down: the child is stopped before a new instance starts.
        "leaver": {
            "command": [
                "/bin/bash",
                "-c",
                f"env -i setsid /bin/sleep {seconds + 1} & exec /bin/sleep {seconds + 2}",
            ],
            "start_seconds": 0.3,
        },
    }
    daemon = daemon_factory(programs)
    renamed = daemon.wait_state("renamed", "RUNNING", timeout=20)
    leaver = daemon.wait_state("leaver", "RUNNING", timeout=20)
    wait_for(lambda: sleeps(seconds + 1), 10, "the leaver's child")
    daemon.kill9()
    psutil.Process(leaver["pid"]).kill()
    old_child = sleeps(seconds + 1)[0].pid
    daemon.start()
    again = daemon.wait_state("renamed", "RUNNING", timeout=20)
    assert again["pid"] == renamed["pid"]
    wait_for(lambda: not psutil.pid_exists(old_child) or
             psutil.Process(old_child).status() == psutil.STATUS_ZOMBIE,
             15, "the leftover child ended")
    fresh = daemon.wait_state("leaver", "RUNNING", timeout=20)
    assert fresh["pid"] != leaver["pid"]


@pytest.mark.parametrize("mode", MODES)
def test_reload_removal_and_a_crash_while_running_end_the_whole_tree(daemon_factory, mode):
    seconds = unique_seconds()
    overrides = {"agent": {"cgroup": mode}}
    programs = {
        "kept": {
            "command": ["/bin/sh", "-c", f"setsid /bin/sleep {seconds} & exec /bin/sleep 300"],
            "start_seconds": 0.3,
        },
        # RUNNING after 0.3 s, then crashes, leaving a setsid child.
        "crasher": {
            "command": [
                "/bin/sh",
                "-c",
                f"setsid /bin/sleep {seconds + 1} & /bin/sleep 1; exit 3",
            ],
            "start_seconds": 0.3,
            "autorestart": "never",
        },
    }
    daemon = daemon_factory(programs, overrides)
    daemon.wait_state("kept", "RUNNING", timeout=20)
    record = daemon.wait_state("crasher", "EXITED", timeout=20)
    assert record["last_exit"]["code"] == 3
    wait_for(lambda: not sleeps(seconds + 1), 10, "the crasher's child ended")
    wait_for(lambda: sleeps(seconds), 10, "the kept program's child")
    write_demo_config(daemon.config.parent, daemon.base_port, 2, None, overrides)
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: "kept" not in {p["name"] for p in daemon.processes()}, 15, "removal")
    wait_for(lambda: not sleeps(seconds), 10, "the removed program's child ended")


def test_without_cgroups_an_orphan_comes_back_to_the_daemon_and_is_reaped(
    daemon_factory, tmp_path
):
    """cgroup = "off": a grandchild that left the session and wiped its environment is out
    of the process table's reach (nothing the kernel keeps ties it to the program; that
    is what cgroups are for), but as the daemon is a child subreaper it becomes the
    daemon's child rather than init's, and is reaped by the daemon when it ends."""
    seconds = unique_seconds()
    ready = tmp_path / "escaped"
    os.mkfifo(ready)
    # The main exits only once the grandchild has left its session and environment.
    escape = f"env -i setsid /bin/sh -c 'echo > {ready}; exec /bin/sleep {seconds}' &"
    program = {
        "command": ["/bin/sh", "-c", f"{escape} read x < {ready}; exit 0"],
        "autorestart": "never",
        "start_seconds": 0,
        "max_quick_exits": 1,
    }
    daemon = daemon_factory({"vanisher": program}, {"agent": {"cgroup": "off"}})
    try:
        orphan = wait_for(lambda: sleeps(seconds), 20, "the orphan")[0]
        assert orphan.ppid() == daemon.pid
        orphan.kill()
        wait_for(lambda: not psutil.pid_exists(orphan.pid), 10, "the orphan reaped")
        # The orphan held the program's log pipes last: its end also ends the log keeper,
        # a child the daemon reaps a moment later from its own thread.
        wait_for(lambda: not zombies_of(daemon.pid), 10, "no zombie left below the daemon")
    finally:
        for proc in sleeps(seconds):
            proc.kill()


def _cmdline_has(text: str) -> list[psutil.Process]:
    return _matching(lambda cmd: any(text in part for part in cmd))


def test_without_cgroups_an_escaped_grandchild_seen_in_the_tree_is_stopped_with_it(
    daemon_factory, tmp_path
):
    """cgroup = "off": a grandchild calls setsid and runs with an empty environment (no
    run marker), then its parent exits, so it becomes the daemon's child (the daemon is a
    child subreaper) with nothing tying it to the program. A sample of the tree saw it
    while its parent lived (its 64 MiB show in the program's memory): by that pid and
    start time it is still the program's, counted in its usage and stopped with it."""
    seconds = unique_seconds()
    release = tmp_path / "release"
    os.mkfifo(release)
    hog = f"import time; b = b'x' * (64 << 20); time.sleep({seconds})"
    script = tmp_path / "escape.sh"
    script.write_text(
        f'env -i setsid {sys.executable} -c "{hog}" &\n'
        f"read x < {release}\n"
        "exit 0\n"
    )
    program = {
        "command": ["/bin/sh", "-c", f"/bin/sh {script} & exec /bin/sleep {seconds}"],
        "start_seconds": 0.2,
    }
    daemon = daemon_factory({"escaper": program}, {"agent": {"cgroup": "off"}})
    try:
        daemon.wait_state("escaper", "RUNNING", timeout=20)
        wait_for(lambda: (daemon.process("escaper")["memory_bytes"] or 0) > 60 << 20, 20,
                 "the grandchild in the program's figures")
        hidden = _cmdline_has(hog)[0]
        assert b"OCP_AGENTD" not in Path(f"/proc/{hidden.pid}/environ").read_bytes()
        with open(release, "w") as fifo:
            fifo.write("go\n")
        wait_for(lambda: hidden.ppid() == daemon.pid, 10, "the grandchild orphaned")
        done = daemon.ctl("stop", "escaper")
        assert done.returncode == 0, done.stderr
        assert not hidden.is_running() or hidden.status() == psutil.STATUS_ZOMBIE
        assert sleeps(seconds) == []
    finally:
        for proc in _cmdline_has(hog):
            proc.kill()


def _vanisher(tmp_path: Path, seconds: int) -> dict:
    """A program whose grandchild leaves its session and environment at once, before any
    sample can see it, and whose main then exits: an orphan no record attributes."""
    ready = tmp_path / f"escaped-{seconds}"
    os.mkfifo(ready)
    escape = f"env -i setsid /bin/sh -c 'echo > {ready}; exec /bin/sleep {seconds}' &"
    return {
        "command": ["/bin/sh", "-c", f"{escape} read x < {ready}; exit 0"],
        "autorestart": "never",
        "start_seconds": 0,
        "max_quick_exits": 1,
    }


def test_without_cgroups_shutdown_ends_an_orphan_no_record_attributes(
    daemon_factory, tmp_path
):
    seconds = unique_seconds()
    daemon = daemon_factory({"vanisher": _vanisher(tmp_path, seconds)},
                            {"agent": {"cgroup": "off"}})
    try:
        orphan = wait_for(lambda: sleeps(seconds), 20, "the orphan")[0]
        assert orphan.ppid() == daemon.pid
        assert daemon.stop() == 0
        assert sleeps(seconds) == []
        assert "ending 1 orphaned process(es) of no running program" in daemon.log()
    finally:
        for proc in sleeps(seconds):
            proc.kill()


def test_without_cgroups_stop_all_ends_orphans_but_not_a_running_programs(
    daemon_factory, tmp_path
):
    """stop-all (the workers; pos_proxy keeps running) ends the unattributed orphan, but
    not a process of pos_proxy that also came to the daemon: pos_proxy still runs."""
    seconds = unique_seconds()
    release = tmp_path / "release"
    os.mkfifo(release)
    # pos_proxy's helper: a double fork whose middle exits at once, in pos_proxy's session.
    proxy = {
        "role": "pos_proxy",
        "command": ["/bin/sh", "-c",
                    f"(/bin/sleep {seconds + 1} &) ; exec /bin/sleep {seconds + 2}"],
        "start_seconds": 0.2,
    }
    daemon = daemon_factory({"vanisher": _vanisher(tmp_path, seconds), "proxy": proxy},
                            {"agent": {"cgroup": "off"}, "programs": {"pos_proxy": None}})
    try:
        orphan = wait_for(lambda: sleeps(seconds), 20, "the orphan")[0]
        helper = wait_for(lambda: sleeps(seconds + 1), 20, "pos_proxy's helper")[0]
        assert orphan.ppid() == daemon.pid and helper.ppid() == daemon.pid
        done = daemon.ctl("stop", "all")
        assert done.returncode == 0, done.stderr
        assert sleeps(seconds) == []
        assert helper.is_running() and daemon.process("proxy")["state"] == "RUNNING"
    finally:
        for proc in sleeps(seconds) + sleeps(seconds + 1) + sleeps(seconds + 2):
            proc.kill()


def test_the_lineage_names_a_process_by_pid_and_start_time_never_a_reused_pid():
    """A remembered process is matched only while the same pid has the same start time.
    The kernel cannot be made to hand a live pid to another process on demand, so the
    reuse is stood in for by the same snapshot entry with a later start time (what /proc
    shows after a reuse); the first part reads a real process."""
    proc = subprocess.Popen(["/bin/sleep", str(unique_seconds())])
    try:
        snap = take_snapshot(with_markers=False)
        entry = snap.entries[proc.pid]
        lineage = Lineage()
        lineage.remember("run-a", [entry])
        assert lineage.survivors("run-a", snap) == [proc.pid]
        assert lineage.owner(entry) == "run-a"
        reused = dataclasses.replace(entry, starttime=entry.starttime + 1)
        after = Snapshot(entries={**snap.entries, proc.pid: reused})
        assert lineage.survivors("run-a", after) == []
        assert lineage.owner(reused) is None
        lineage.prune(after)
        assert len(lineage) == 0 and lineage.owner(entry) is None
    finally:
        proc.kill()
        proc.wait()
