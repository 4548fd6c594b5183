"""Process identity is pid plus start time (SPEC section 3): title and environment are not
evidence, a reused pid never matches, a pinned process is signalled through its pidfd."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import DaemonRunner, wait_for

from ocp_agentd.supervision import identity
from ocp_agentd.supervision.identity import pin, same_process, start_ticks, starttime_of

# A program may rewrite what /proc shows of it: this one overwrites its argv (the title,
# /proc/PID/cmdline) and its environment strings (/proc/PID/environ, where the daemon's run
# markers are) through /proc/self/mem, at the addresses /proc/self/stat gives (fields 48-51,
# proc(5)), then sleeps.
CLOBBER = """
import sys, time
raw = open("/proc/self/stat", "rb").read()
fields = raw[raw.rfind(b")") + 2:].split()
arg_start, arg_end, env_start, env_end = (int(f) for f in fields[45:49])
with open("/proc/self/mem", "r+b", buffering=0) as mem:
    mem.seek(arg_start)
    mem.write(sys.argv[1].encode().ljust(arg_end - arg_start - 1, b" ")[: arg_end - arg_start - 1])
    mem.seek(env_start)
    mem.write(bytes(env_end - env_start))
time.sleep(100000)
"""


def retitle_command(token: str = "renamed") -> list[str]:
    return [sys.executable, "-c", CLOBBER, token]


RETITLE = retitle_command()


def stat_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat (proc(5)), read without psutil."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rfind(b")") + 2 :].split()[19])


def retitled_as(process: psutil.Process, token: str) -> bool:
    """The process shows the title it gave itself (the rewrite is done)."""
    cmdline = process.cmdline()
    return bool(cmdline) and cmdline[0].startswith(token)


@pytest.fixture
def retitled() -> Iterator[psutil.Popen]:
    process = psutil.Popen(RETITLE, env={"MARK": "m" * 64})
    wait_for(lambda: retitled_as(process, "renamed"), timeout=10,
             message="the title rewritten")
    yield process
    process.kill()
    process.wait()


def test_start_ticks_are_the_kernel_start_time(retitled: psutil.Popen) -> None:
    assert start_ticks(psutil.Process(retitled.pid)) == stat_ticks(retitled.pid)
    # The spawn path's own read agrees with psutil's, a command name with ") " included.
    assert starttime_of(retitled.pid) == start_ticks(psutil.Process(retitled.pid))


def test_the_start_time_of_a_process_named_with_parentheses(tmp_path: Path) -> None:
    odd = tmp_path / "a) b (c"
    odd.symlink_to("/bin/sleep")
    process = psutil.Popen([str(odd), "100"])
    try:
        assert starttime_of(process.pid) == start_ticks(process) == stat_ticks(process.pid)
    finally:
        process.kill()
        process.wait()
    assert starttime_of(process.pid) is None


def test_a_rewritten_title_and_environment_do_not_change_identity(
    retitled: psutil.Popen,
) -> None:
    assert b"MARK" not in Path(f"/proc/{retitled.pid}/environ").read_bytes()
    ticks = stat_ticks(retitled.pid)
    handle = pin(retitled.pid, ticks, cmdline=["/something/else"])
    assert handle is not None and handle.alive()
    handle.close()


def test_another_start_time_is_another_process(retitled: psutil.Popen) -> None:
    ticks = stat_ticks(retitled.pid)
    assert pin(retitled.pid, ticks - 1, cmdline=RETITLE) is None
    assert not same_process(retitled.pid, ticks + 1)


def test_a_handle_signals_only_its_process_and_sees_it_exit() -> None:
    process = psutil.Popen(["/bin/sleep", "100000"])
    ticks = stat_ticks(process.pid)
    handle = pin(process.pid, ticks)
    assert handle is not None and handle.alive()
    assert handle.send(signal.SIGTERM)
    process.wait(10)
    assert not handle.alive() and not handle.send(signal.SIGTERM)
    handle.close()
    assert pin(process.pid, ticks) is None


def test_a_zombie_is_not_the_process() -> None:
    process = subprocess.Popen(["/bin/true"])
    wait_for(lambda: psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE, timeout=10,
             message="a zombie")
    assert not same_process(process.pid, stat_ticks(process.pid))
    process.wait()


def test_the_command_line_decides_only_without_a_start_time(
    retitled: psutil.Popen, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mocked: root can read every process's start time here, so psutil's AccessDenied (a
    hardened /proc, another platform) cannot happen for real."""

    def denied(self: psutil.Process) -> float:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(identity.psutil.Process, "create_time", denied)
    current = psutil.Process(retitled.pid).cmdline()
    assert same_process(retitled.pid, 0, cmdline=current)
    assert not same_process(retitled.pid, 0, cmdline=RETITLE)
    assert not same_process(retitled.pid, 0)


def kill_titled(token: str) -> None:
    for process in psutil.process_iter(["cmdline"]):
        if token in " ".join(process.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_a_retitled_program_is_adopted_by_the_next_daemon(daemon_factory) -> None:
    token = f"renamed-{uuid.uuid4().hex}"
    try:
        runner: DaemonRunner = daemon_factory(
            {"retitled": {"command": retitle_command(token), "start_seconds": 0.2}}
        )
        before = runner.wait_state("retitled", timeout=30)
        original = psutil.Process(before["pid"])
        wait_for(lambda: retitled_as(original, token), timeout=10,
                 message="the title rewritten")
        runner.send_signal(signal.SIGUSR2)
        assert runner.wait_exit(30) == 75
        runner.start()
        after = runner.wait_state("retitled", timeout=30)
        assert after["pid"] == before["pid"] and after["restarts"] == 0, after
        assert original.is_running()
        assert runner.pid is not None
        second = [child.pid for child in psutil.Process(runner.pid).children(recursive=True)
                  if token in " ".join(child.cmdline())]
        assert second == [], "a second copy was started"
    finally:
        kill_titled(token)
