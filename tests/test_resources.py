"""Resource limits through the daemon (SPEC section 9): where a program runs, what is
enforced, OOM kills reported in last_exit and /metrics, usage in the record, --check.

Real daemons on this host's cgroups (hybrid: v1 limit controllers, v2 membership).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import check_config, wait_for
from test_api_metrics import scrape, value
from test_cgroups import v1_memory_without_oom_kill

from ocp_agentd.config import ProgramSpec, Settings
from ocp_agentd.supervision import Supervisor, cgroups

HOST = cgroups.detect(Path("/nonexistent"))
needs_hybrid = pytest.mark.skipif(
    HOST.layout != cgroups.Layout.HYBRID or os.geteuid() != 0,
    reason=f"needs a hybrid host as root (this one: {HOST.layout})",
)
SPIN = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.001) or sum(range(999))"]


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


@needs_hybrid
def test_an_oom_kill_is_reported_with_the_limit_and_counted(daemon_factory):
    hog = {
        "command": [sys.executable, "-c", "import time; b = b'x' * (300 << 20); time.sleep(60)"],
        "memory_max": "64M",
        "autorestart": "never",
        "start_seconds": 0,
    }
    daemon = daemon_factory({"hog": hog})
    record = daemon.wait_state("hog", "EXITED", "BACKOFF", "FATAL", timeout=30)
    assert record["last_exit"]["signal"] == "SIGKILL"
    assert record["last_exit"]["reason"] == "killed by the OOM killer (memory_max 64 MiB)"
    assert record["oom_kills"] == 1
    assert record["limits"] == {"memory_max": "64 MiB (memory.limit_in_bytes)"}
    assert value(scrape(daemon), "ocp_agentd_program_oom_kills_total", program="hog") == 1.0


@needs_hybrid
def test_the_record_names_the_cgroup_the_limits_and_the_usage(daemon_factory):
    spinner = {
        "command": SPIN,
        "cpu_quota": 0.5,
        "memory_max": "256M",
        "memory_high": "128M",
        "pids_max": 32,
        "start_seconds": 0.2,
    }
    daemon = daemon_factory({"spinner": spinner})
    record = daemon.wait_state("spinner", "RUNNING", timeout=20)
    assert record["cgroup"].endswith("/spinner")
    assert _cgroup_of(record["pid"]) == "/" + str(
        Path(record["cgroup"]).relative_to("/sys/fs/cgroup/unified")
    )
    assert record["limits"] == {
        "cpu_quota": "0.5 CPU (cpu.cfs_quota_us)",
        "memory_max": "256 MiB (memory.limit_in_bytes)",
        "memory_high": "not enforced: memory_high needs the cgroup v2 memory controller",
        "pids_max": "32 (pids.max)",
    }
    used = wait_for(lambda: (daemon.process("spinner")["cpu_seconds"] or 0) > 0.05, 20,
                    "CPU time to show")
    assert used
    assert daemon.process("spinner")["memory_bytes"] > 1 << 20
    text = scrape(daemon)
    assert value(text, "ocp_agentd_program_cpu_seconds_total", program="spinner") > 0
    assert value(text, "ocp_agentd_program_memory_bytes", program="spinner") > 1 << 20
    assert "spinner: memory_high not enforced" in daemon.log()
    instance = Path(record["cgroup"]).parent.name
    quota = Path("/sys/fs/cgroup/cpu/ocp_agentd") / instance / "spinner" / "cpu.cfs_quota_us"
    assert quota.read_text().strip() == "50000"
    # Stopped, it has no process: nothing in use, and none shown.
    stopped = daemon.post("/api/v1/processes/spinner/stop").check()
    assert (stopped["cpu_seconds"], stopped["memory_bytes"]) == (None, None)


def test_usage_without_cgroups_is_summed_over_the_whole_tree(daemon_factory):
    """cgroup = "off": the main is an idle shell; a child holds 96 MiB and spins. The
    record and /metrics count the child (SPEC section 9: "else from the process tree")."""
    child = "import time\nb = b'x' * (96 << 20)\nwhile True: time.sleep(0.001) or sum(range(999))"
    program = {
        "command": ["/bin/sh", "-c", f"{sys.executable} -c \"{child}\" & wait"],
        "start_seconds": 0.2,
    }
    daemon = daemon_factory({"family": program}, {"agent": {"cgroup": "off"}})
    record = daemon.wait_state("family", "RUNNING", timeout=20)
    assert record["cgroup"] is None
    wait_for(lambda: (daemon.process("family")["memory_bytes"] or 0) > 90 << 20, 20,
             "the child's memory in the program's figure")
    wait_for(lambda: (daemon.process("family")["cpu_seconds"] or 0) > 0.2, 20,
             "the child's CPU time in the program's figure")
    text = scrape(daemon)
    assert value(text, "ocp_agentd_program_memory_bytes", program="family") > 90 << 20
    assert value(text, "ocp_agentd_program_cpu_seconds_total", program="family") > 0.2


@needs_hybrid
def test_a_sigkill_at_the_limit_on_a_kernel_without_an_oom_count_is_reported_as_likely(
    tmp_path,
):
    """A kernel before 4.13 keeps no oom_kill count in v1 memory.oom_control. Its memory
    cgroup is stood in for by plain files (v1_memory_without_oom_kill: no such kernel can
    run here); membership is this host's real unified tree, the program a real process.
    SIGKILLed after memory.failcnt rose, its exit is reported as a likely OOM kill, the
    evidence named, and counted."""
    settings = Settings(
        agent={"state_dir": str(tmp_path / "state"), "log_dir": str(tmp_path / "log"),
               "install_home": str(tmp_path), "cgroup": "off"},
        api={"socket": str(tmp_path / "run" / "agentd.sock")},
        programs={"old": ProgramSpec(command=["/bin/sleep", "300"], memory_max="64M",
                                     autorestart="never", start_seconds=0)},
    )
    settings.resolve_paths(tmp_path)
    real = cgroups.detect(tmp_path / "state")
    assert real.membership is not None
    standin = tmp_path / "v1-memory"
    v1_memory_without_oom_kill(standin / "old")
    host = cgroups.Host(cgroups.Layout.HYBRID, real.membership, True, {"memory": standin})

    async def scenario() -> tuple[dict, int]:
        sup = Supervisor(settings)
        program = sup.program("old")
        program.host, program.cgroup = host, host.open("old")
        try:
            await sup.start_pending(await sup.adopt())
            assert program.state == "RUNNING" and program.instance is not None
            (standin / "old" / "memory.failcnt").write_text("7\n")
            os.kill(program.instance.pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while program.state != "EXITED":
                assert time.monotonic() < deadline, program.state
                await asyncio.sleep(0.01)
            assert program.last_exit is not None
            return program.last_exit.as_dict(), program.oom_kills
        finally:
            await sup.shutdown()

    try:
        last_exit, kills = asyncio.run(scenario())
    finally:
        cgroup = host.open("old")
        with contextlib.suppress(OSError):
            cgroup.kill()
        wait_for(lambda: not cgroup.members(), 10, "the cgroup empty")
        with contextlib.suppress(FileNotFoundError):
            cgroup.membership.rmdir()
        host.remove()
    assert last_exit["signal"] == "SIGKILL"
    assert last_exit["reason"] == (
        "killed by SIGKILL, likely by the OOM killer (memory_max 64 MiB; no oom_kill "
        "counter on this kernel; memory.failcnt rose by 7)"
    )
    assert kills == 1


def test_check_prints_the_mode_and_every_limit_it_cannot_enforce(daemon_factory):
    daemon = daemon_factory(
        {"capped": {"command": ["/bin/sleep", "60"], "memory_high": "1G", "cpu_quota": 1.5}},
        {"agent": {"cgroup": "off"}},
        start=False,
    )
    result = check_config(daemon.config)
    assert result.returncode == 0, result.stderr
    assert 'cgroup = "off"' in result.stdout
    assert 'capped: memory_high 1 GiB not enforced: no cgroup (cgroup = "off")' in result.stdout
    assert 'capped: cpu_quota 1.5 CPU not enforced: no cgroup' in result.stdout


@needs_hybrid
def test_check_on_this_host_names_the_layout(daemon_factory):
    daemon = daemon_factory(
        {"capped": {"command": ["/bin/sleep", "60"], "memory_high": "1G"}},
        {"agent": {"cgroup": "required"}},
        start=False,
    )
    result = check_config(daemon.config)
    assert result.returncode == 0, result.stderr
    assert "cgroups: hybrid" in result.stdout
    assert "capped: memory_high 1 GiB not enforced: memory_high needs" in result.stdout


def test_a_bad_size_is_named_with_its_key(daemon_factory):
    daemon = daemon_factory({"capped": {"command": ["/bin/sleep", "60"], "memory_max": "12X"}},
                            start=False)
    result = check_config(daemon.config)
    assert result.returncode != 0
    assert "programs.capped.memory_max: expected a size such as 512M" in result.stderr


@needs_hybrid
def test_a_program_of_another_user_is_placed_in_its_cgroup_too(daemon_factory):
    """The daemon (root) writes the pid into cgroupfs; the program's user needs no right
    there, and the program itself cannot move out (cgroup.procs is root's)."""
    program = {
        "command": ["/bin/sh", "-c", "echo $$ > /sys/fs/cgroup/unified/cgroup.procs; "
                    "exec /bin/sleep 300"],
        "user": "nobody",
        "cwd": "/",
        "pids_max": 8,
        "start_seconds": 0.3,
    }
    daemon = daemon_factory({"other": program})
    record = daemon.wait_state("other", "RUNNING", timeout=20)
    pid = record["pid"]
    uid = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
    assert uid == str(pwd.getpwnam("nobody").pw_uid)
    assert _cgroup_of(pid).endswith("/other")
    assert "Permission denied" in daemon.program_log("other", "stderr")
    done = daemon.ctl("stop", "other")
    assert done.returncode == 0, done.stderr


def _without_cgroups(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs argv in a mount namespace of its own with every cgroup filesystem unmounted:
    a host without cgroups, as far as the daemon can tell (it reads /proc/self/mountinfo)."""
    script = 'umount -R /sys/fs/cgroup && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh",
         *argv],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_required_refuses_to_start_without_cgroups_and_auto_carries_on(daemon_factory):
    daemon = daemon_factory({"capped": {"command": ["/bin/sleep", "60"], "memory_max": "1G"}},
                            {"agent": {"cgroup": "required"}}, start=False)
    command = [sys.executable, "-m", "ocp_agentd", "--config", str(daemon.config)]
    checked = _without_cgroups([*command, "--check"])
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "cgroups: none (no cgroup filesystem is mounted)" in checked.stdout
    assert 'would refuse to start: cgroup = "required"' in checked.stdout
    refused = _without_cgroups(command)
    assert refused.returncode == 1
    assert 'cannot start: cgroup = "required" but no cgroup filesystem is mounted' in (
        refused.stderr
    )
    assert not daemon.socket.exists()
    daemon.config.write_text(daemon.config.read_text().replace('"required"', '"auto"'))
    checked = _without_cgroups([*command, "--check"])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "capped: memory_max 1 GiB not enforced: no cgroup" in checked.stdout
