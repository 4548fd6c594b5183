"""The cgroup layer on real cgroups with real processes (SPEC section 9).

This host is hybrid: v1 memory, cpu, pids and freezer hierarchies, and a v2 unified tree
with cgroup.kill and cgroup.events but no controllers. Every test makes its cgroups under a
unique instance (a fresh state_dir) and removes them, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import wait_for

from ocp_agentd.supervision import cgroups, spawn
from ocp_agentd.supervision.cgroups import Host, Layout, Limits, ProgramCgroup

HOST = cgroups.detect(Path("/nonexistent"))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups are made as root")
needs_hybrid = pytest.mark.skipif(
    HOST.layout != Layout.HYBRID, reason=f"needs a hybrid host (this one: {HOST.layout})"
)


def _remove_tree(host: Host) -> None:
    """Kills what is left in the instance's cgroups and removes them, deepest first."""
    bases = {b for b in [host.membership, *host.controllers.values()] if b is not None}
    for base in bases:
        if not base.exists():
            continue
        for child in sorted(base.iterdir(), reverse=True):
            if child.is_dir():
                cg = ProgramCgroup(child.name, child, host.v2 and base == host.membership, {})
                with contextlib.suppress(OSError):
                    cg.kill()
                wait_for(lambda cg=cg: not cg.members(), 10, f"{child} empty")
                child.rmdir()
    host.remove()


@pytest.fixture
def host(tmp_path) -> Iterator[Host]:
    """This host's cgroup layout for a daemon whose state_dir is tmp_path (unique)."""
    chosen = cgroups.detect(tmp_path / "state")
    if not chosen.usable:
        pytest.skip(f"no usable cgroup tree: {chosen.why}")
    chosen.prepare()
    try:
        yield chosen
    finally:
        _remove_tree(chosen)


def spawn_in(cg: ProgramCgroup, argv: list[str], **kwargs) -> subprocess.Popen[bytes]:
    """Starts argv inside cg with the daemon's hand-over (spawn.hold, place, release)."""
    held, carried = spawn.hold(argv)
    env = {**kwargs.pop("env", os.environ), **carried}
    proc = subprocess.Popen(
        held, stdin=subprocess.PIPE, start_new_session=True, env=env, **kwargs
    )
    cg.place(proc.pid)
    spawn.release(proc)
    return proc


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


@needs_root
@needs_hybrid
def test_v1_memory_max_ends_a_big_allocation_by_oom_kill(host):
    cg = host.open("hog")
    cg.create(Limits(memory_max=64 << 20))
    assert (cg.dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(64 << 20)
    before = cg.oom_reading()
    assert before.kills is not None  # this kernel (4.13+) keeps the count
    proc = spawn_in(cg, [sys.executable, "-c", "b = b'x' * (300 << 20); print(len(b))"],
                    stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out)
    assert cg.oom_kills() == before.kills + 1
    after = cg.oom_reading()
    assert after.failcnt is None  # with the kernel's count, the failcnt files are not read
    assert cgroups.oom_news(before, after, sigkilled=True) == cgroups.OomNews(1)


@needs_root
@needs_hybrid
def test_v1_cpu_quota_holds_a_busy_loop_near_its_share(host):
    cg = host.open("spin")
    cg.create(Limits(cpu_quota=0.2))
    assert (cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "20000"
    proc = spawn_in(cg, [sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: (cg.usage().cpu_seconds or 0) > 0.05, 10, "the loop to run")
        first = cg.usage().cpu_seconds
        t0 = time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= 3.0, 10, "a 3 s window", interval=0.1)
        used = cg.usage().cpu_seconds - first
        rate = used / (time.monotonic() - t0)
        # Unlimited, the loop would use ~1.0 s/s (or less on a loaded machine: the
        # upper bound is what matters). CFS enforces per 100 ms period.
        assert 0.02 < rate < 0.35, rate
    finally:
        cg.kill()
        proc.wait(10)


@needs_root
@needs_hybrid
def test_v1_pids_max_stops_a_fork_bomb(host):
    cg = host.open("bomb")
    cg.create(Limits(pids_max=20))
    script = "for i in $(seq 100); do /bin/sleep 60 & done; wait"
    proc = spawn_in(cg, ["/bin/sh", "-c", script], stderr=subprocess.PIPE)
    try:
        # The shell reports the forks the pids controller refused.
        wait_for(lambda: int((cg.dirs["pids"] / "pids.events").read_text().split()[1]) > 0,
                 20, "a refused fork")
        assert len(cg.members()) <= 20
        assert int((cg.dirs["pids"] / "pids.current").read_text()) <= 20
    finally:
        cg.kill()
        proc.wait(10)


@needs_root
@needs_hybrid
def test_v2_unified_membership_includes_setsid_and_env_rewritten_descendants(host):
    cg = host.open("forker")
    cg.create(Limits())
    # The main exits at once; its grandchild left the session and runs with no
    # environment at all (no run marker) under another title.
    script = "env -i setsid /bin/bash -c 'exec -a retitled /bin/sleep 300' & exit 0"
    proc = spawn_in(cg, ["/bin/bash", "-c", script], env={"OCP_AGENTD_RUN_ID": "run1"})
    assert proc.wait(10) == 0
    members = wait_for(cg.members, 10, "the grandchild in the cgroup")
    assert len(members) == 1
    grandchild = members[0]
    wait_for(lambda: Path(f"/proc/{grandchild}/cmdline").read_bytes().startswith(b"retitled"),
             10, "the new title")
    assert b"OCP_AGENTD_RUN_ID" not in Path(f"/proc/{grandchild}/environ").read_bytes()
    assert _cgroup_of(grandchild).endswith(f"/{cg.name}")
    assert cg.contains(grandchild)
    assert not cg.contains(os.getpid())
    cg.kill()
    wait_for(lambda: not Path(f"/proc/{grandchild}/cmdline").read_bytes(), 10, "killed")
    assert asyncio.run(cgroups.EmptyWatch().wait_empty(cg, 10))


@needs_root
@needs_hybrid
def test_v2_cgroup_kill_ends_a_process_that_forks_as_fast_as_it_can(host):
    cg = host.open("spawner")
    cg.create(Limits())
    proc = spawn_in(cg, ["/bin/sh", "-c", "while :; do /bin/sleep 60 & done"])
    wait_for(lambda: len(cg.members()) > 20, 20, "many children")
    cg.kill()
    assert asyncio.run(cgroups.EmptyWatch().wait_empty(cg, 20))
    assert cg.members() == []
    proc.wait(10)


@needs_root
@needs_hybrid
def test_empty_event_arrives_when_the_last_member_exits_by_itself(host, tmp_path):
    cg = host.open("brief")
    cg.create(Limits())
    release = tmp_path / "release"
    os.mkfifo(release)
    proc = spawn_in(cg, ["/bin/sh", "-c", f"read x < {release}"])
    wait_for(cg.populated, 10, "populated")

    async def scenario() -> tuple[bool, bool]:
        watch = cgroups.EmptyWatch()
        waiter = asyncio.ensure_future(watch.wait_empty(cg, 30))
        await asyncio.sleep(0)
        early = waiter.done()
        with open(release, "w") as fifo:  # the shell's read returns, it exits
            fifo.write("x\n")
        result = await waiter
        watch.close()
        return early, result

    try:
        early, result = asyncio.run(scenario())
    finally:
        release.unlink()
    assert not early
    assert result is True
    assert not cg.populated()
    proc.wait(10)


@needs_root
@needs_hybrid
def test_signal_all_reaches_every_member_and_only_members(host):
    cg = host.open("group")
    cg.create(Limits())
    proc = spawn_in(cg, ["/bin/sh", "-c", "/bin/sleep 300 & setsid /bin/sleep 300 & wait"])
    wait_for(lambda: len(cg.members()) == 3, 10, "three members")
    sent = cg.signal_all(signal.SIGTERM)
    assert len(sent) == 3
    assert asyncio.run(cgroups.EmptyWatch().wait_empty(cg, 10))
    proc.wait(10)


@needs_root
@needs_hybrid
def test_wait_empty_times_out_while_a_member_lives(host):
    cg = host.open("stays")
    cg.create(Limits())
    proc = spawn_in(cg, ["/bin/sleep", "300"])
    try:
        wait_for(cg.populated, 10, "populated")
        assert asyncio.run(cgroups.EmptyWatch().wait_empty(cg, 0.2)) is False
    finally:
        cg.kill()
        proc.wait(10)


@needs_root
def test_v1_layout_kills_through_the_freezer(tmp_path):
    """A v1-only host: the same mounts minus the unified tree, so membership is the
    freezer hierarchy and the final kill is freeze, SIGKILL each, thaw."""
    mounts = [m for m in cgroups.read_mounts() if not m.v2]
    if not any("freezer" in m.controllers for m in mounts):
        pytest.skip("no v1 freezer hierarchy")
    v1 = cgroups.detect(tmp_path / "state", mounts=mounts)
    assert v1.layout == Layout.V1 and v1.freezer and not v1.v2
    v1.prepare()
    try:
        cg = v1.open("frozen")
        cg.create(Limits())
        proc = spawn_in(cg, ["/bin/sh", "-c", "while :; do /bin/sleep 60 & done"])
        wait_for(lambda: len(cg.members()) > 10, 20, "many children")
        cg.kill()
        assert asyncio.run(cgroups.EmptyWatch().wait_empty(cg, 20))
        assert (cg.freezer / "freezer.state").read_text().strip() == "THAWED"
        proc.wait(10)
    finally:
        _remove_tree(v1)


def test_v2_controller_files_written_and_read(tmp_path):
    """No kernel here offers v2 controllers (memory.max, cpu.max, memory.events exist only
    on a pure v2 host), so this runs against a directory laid out as cgroupfs: plain files
    standing in for the kernel's. It checks what is written and how it is read, not the
    kernel's enforcement (the v1 tests above do that)."""
    base = tmp_path / "cgroup" / "programs"
    host = Host(Layout.V2_DELEGATED, base, True, {c: base for c in ("memory", "cpu", "pids")},
                limits_v2=True)
    cg = host.open("exporter")
    cg.membership.mkdir(parents=True)
    for name in ("memory.max", "memory.high", "cpu.max", "pids.max", "cgroup.procs"):
        (cg.membership / name).write_text("max\n")
    cg.apply(Limits(cpu_quota=0.5, memory_max=512 << 20, pids_max=64))
    assert (cg.membership / "memory.max").read_text() == str(512 << 20)
    assert (cg.membership / "memory.high").read_text() == "max"
    assert (cg.membership / "cpu.max").read_text() == "50000 100000"
    assert (cg.membership / "pids.max").read_text() == "64"
    cg.apply(Limits())
    assert (cg.membership / "cpu.max").read_text() == "max 100000"
    (cg.membership / "memory.events").write_text(
        "low 0\nhigh 3\nmax 9\noom 2\noom_kill 2\noom_group_kill 0\n")
    (cg.membership / "memory.current").write_text("123456\n")
    (cg.membership / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert cg.oom_kills() == 2
    assert cg.usage() == cgroups.Usage(2.5, 123456)
    assert host.enforcement(Limits(memory_high=1 << 30)) == {
        "memory_high": "1 GiB (memory.high)"
    }


def v1_memory_without_oom_kill(directory: Path) -> ProgramCgroup:
    """A directory shaped like a v1 memory cgroup of a kernel before 4.13, whose
    memory.oom_control has no oom_kill line: no such kernel can run here (this one is far
    newer), so plain files stand in for the kernel's. The reading code is the same
    ProgramCgroup.oom_reading that reads real cgroups (the v1 OOM test above)."""
    directory.mkdir(parents=True)
    (directory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")
    (directory / "memory.failcnt").write_text("0\n")
    (directory / "memory.limit_in_bytes").write_text(f"{64 << 20}\n")
    (directory / "cgroup.procs").write_text("")
    return ProgramCgroup("old", directory, False, {"memory": directory})


def test_v1_without_an_oom_kill_counter_infers_the_kill_and_says_so(tmp_path):
    cg = v1_memory_without_oom_kill(tmp_path / "memory" / "old")
    before = cg.oom_reading()
    assert before == cgroups.OomReading(None, 0, False)
    assert cg.oom_kills() == 0
    # The limit was hit three times and the main then died of SIGKILL: likely the OOM killer.
    (cg.membership / "memory.failcnt").write_text("3\n")
    after = cg.oom_reading()
    news = cgroups.oom_news(before, after, sigkilled=True)
    assert news == cgroups.OomNews(
        1, exact=False, evidence="no oom_kill counter on this kernel; memory.failcnt rose by 3"
    )
    # An exit by another signal, or a SIGKILL without the limit reached, is no OOM kill.
    assert cgroups.oom_news(before, after, sigkilled=False).count == 0
    assert cgroups.oom_news(after, after, sigkilled=True).count == 0
    # Out of memory right now (under_oom 1) counts too, without a failcnt change.
    (cg.membership / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 1\n")
    news = cgroups.oom_news(after, cg.oom_reading(), sigkilled=True)
    assert news.count == 1 and "under_oom 1" in news.evidence


def test_detect_chooses_the_delegated_v2_layout_and_prepares_it(tmp_path):
    """A pure v2 host under systemd with Delegate=yes, as a directory laid out as
    cgroupfs (this host is hybrid). Started in <unit>/daemon (DelegateSubgroup=daemon),
    programs go to <unit>/programs with the controllers enabled; started in the unit's own
    cgroup, they go to the shared tree, since systemd could not restart the daemon into a
    cgroup with controllers enabled below it."""
    root = tmp_path / "fs"
    unit = root / "system.slice" / "ocp-agentd.service"
    for path in (unit / "daemon", unit / "programs"):
        path.mkdir(parents=True)
        for name in ("cgroup.procs", "cgroup.subtree_control"):
            (path / name).write_text("")
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (unit / "cgroup.controllers").write_text("cpu memory pids\n")
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        (unit / name).write_text("")
    mounts = [cgroups.Mount(root, True, frozenset())]
    systemd = {"INVOCATION_ID": "x"}
    found = cgroups.detect(tmp_path / "state", mounts=mounts,
                           own={"": "/system.slice/ocp-agentd.service/daemon"}, environ=systemd)
    assert found.layout == Layout.V2_DELEGATED
    assert found.membership == unit / "programs"
    assert found.daemon_leaf == unit / "daemon"
    assert sorted(found.controllers) == ["cpu", "memory", "pids"]
    found.prepare()
    assert (unit / "daemon" / "cgroup.procs").read_text() == "0"
    assert (unit / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (unit / "programs" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (root / "cgroup.subtree_control").exists() is False
    shared = root / "ocp_agentd" / cgroups.instance_name(tmp_path / "state")
    in_unit = cgroups.detect(tmp_path / "state", mounts=mounts,
                             own={"": "/system.slice/ocp-agentd.service"}, environ=systemd)
    assert in_unit.layout == Layout.V2
    assert in_unit.membership == shared
    assert "DelegateSubgroup=daemon" in in_unit.why
    plain = cgroups.detect(tmp_path / "state", mounts=mounts, own={"": "/user.slice"},
                           environ={})
    assert plain.layout == Layout.V2 and plain.membership == shared and not plain.why


def test_two_state_dirs_never_share_an_instance(tmp_path):
    assert cgroups.instance_name(tmp_path / "a") != cgroups.instance_name(tmp_path / "b")
    assert cgroups.instance_name(tmp_path / "a") == cgroups.instance_name(tmp_path / "a")


def test_enforcement_names_what_cannot_be_enforced():
    limits = Limits(cpu_quota=0.5, memory_max=512 << 20, memory_high=256 << 20, pids_max=10)
    none = Host(Layout.NONE, why='cgroup = "off"')
    assert set(none.enforcement(limits).values()) == {'not enforced: no cgroup (cgroup = "off")'}
    hybrid = Host(Layout.HYBRID, Path("/u/x"), True, {"memory": Path("/m/x")})
    got = hybrid.enforcement(limits)
    assert got["memory_max"] == "512 MiB (memory.limit_in_bytes)"
    assert got["memory_high"].startswith("not enforced: memory_high needs the cgroup v2")
    assert got["cpu_quota"] == "not enforced: the cpu controller is not available here"
    assert got["pids_max"] == "not enforced: the pids controller is not available here"


@needs_root
@needs_hybrid
def test_a_cpu_quota_set_while_running_moves_every_member_into_the_v1_cpu_cgroup(host):
    cg = host.open("late")
    cg.create(Limits())
    proc = spawn_in(cg, ["/bin/sh", "-c", "/bin/sleep 300 & exec /bin/sleep 300"])
    try:
        members = wait_for(lambda: len(cg.members()) == 2 and cg.members(), 10, "two members")
        cpu_procs = cg.dirs["cpu"] / "cgroup.procs"
        assert not set(members) & {int(p) for p in cpu_procs.read_text().split()}
        cg.apply(Limits(cpu_quota=0.3))
        assert {int(p) for p in cpu_procs.read_text().split()} == set(members)
        assert (cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "30000"
    finally:
        cg.kill()
        proc.wait(10)


def _pids_max(cg: ProgramCgroup) -> str:
    return (cg.dirs["pids"] / "pids.max").read_text().strip()


def test_made_again_the_limits_hold_after_a_change_or_a_removed_directory(host):
    """create() leaves out rewriting limits it wrote already; a change, or a directory
    made anew (with the kernel's defaults), is written."""
    cg = host.open("again")
    if "pids" not in cg.dirs:
        pytest.skip("no pids controller here")
    cg.create(Limits(pids_max=20))
    assert _pids_max(cg) == "20"
    cg.create(Limits(pids_max=20))
    assert _pids_max(cg) == "20"
    cg.create(Limits(pids_max=30))
    assert _pids_max(cg) == "30"
    cg.dirs["pids"].rmdir()
    cg.create(Limits(pids_max=30))
    assert _pids_max(cg) == "30"
    cg.create(Limits())
    assert _pids_max(cg) == "max"


@needs_root
def test_a_cgroup_removed_after_its_file_was_opened_reads_as_gone(host):
    """kernfs answers ENODEV to a read of a removed cgroup's open file: that is the cgroup
    gone (FileNotFoundError, as for a file opened after), not a read error that a stop or
    the empty watch would report."""
    cg = host.open("removed-mid-read")
    cg.create(Limits())
    paths = [path / "cgroup.procs" for path in cg.all_dirs()]
    fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in paths]
    cg.remove()
    assert not any(path.parent.exists() for path in paths)
    for fd, path in zip(fds, paths, strict=True):
        with pytest.raises(FileNotFoundError):
            cgroups._read_open(fd, path)
    with pytest.raises(OSError) as closed:  # _read_open closed each descriptor
        os.fstat(fds[0])
    assert closed.value.errno == errno.EBADF
