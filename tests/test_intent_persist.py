"""Operator intent across a daemon restart (SPEC section 12): a program stopped on request,
or an exit left so by autorestart = "never", stays so under the next daemon of the same
boot (kill -9, handover, SIGTERM), but not under a daemon of another boot."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import struct
import uuid
from pathlib import Path

import orjson
import pytest
from harness import DaemonRunner, wait_for
from planted import names_within, plant_in_place
from test_daemon import instances

from ocp_agentd.demo.config import demo_command
from ocp_agentd.supervision.intent_records import RECORDS_FILE, IntentRecords, boot_id


def record_dir(runner: DaemonRunner):
    assert runner.state_dir is not None
    return runner.state_dir / "intent"


def recorded(runner: DaemonRunner) -> dict:
    """The records on disk, by program name ({} when there is no file)."""
    path = record_dir(runner) / RECORDS_FILE
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def plant(runner: DaemonRunner, record: dict) -> None:
    """Writes the records file with this one record, as a daemon would have."""
    (record_dir(runner) / RECORDS_FILE).write_bytes(orjson.dumps({record["name"]: record}))


def wait_booted(runner: DaemonRunner) -> None:
    """Until the daemon's initial starts are over (status state "running")."""
    wait_for(
        lambda: runner.status()["state"] == "running",
        timeout=20,
        message="daemon booted",
    )


def test_a_stop_survives_kill9_of_the_daemon_and_start_undoes_it(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/pos_proxy/stop", json={"force": True}).check()
    assert runner.process("pos_proxy")["state"] == "STOPPED"
    runner.kill9()
    runner.start()
    wait_booted(runner)
    assert runner.process("pos_proxy")["state"] == "STOPPED"
    assert instances(runner, "pos_proxy") == 0
    assert runner.process("ocp_exporter")["state"] == "RUNNING"
    second = runner.log().rsplit("--- harness: starting daemon", 1)[1]
    assert second.count("pos_proxy: left stopped, as requested at ") == 1
    assert "pos_proxy: STOPPED -> " not in second

    runner.post("/api/v1/processes/pos_proxy/start", json={"force": True}).check()
    assert runner.process("pos_proxy")["state"] == "RUNNING"
    assert "pos_proxy" not in recorded(runner)
    runner.kill9()
    runner.start()
    runner.wait_all_running()  # started, not left stopped: the start removed the record


def test_stop_all_survives_kill9_of_the_daemon(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/agent/stop-all").check()
    workers = [n for n, s in runner.settings.programs.items() if s.role == "worker"]
    assert workers
    runner.kill9()
    runner.start()
    wait_booted(runner)
    for name in workers:
        assert runner.process(name)["state"] == "STOPPED", name
        assert instances(runner, name) == 0, name
    assert runner.process("pos_proxy")["state"] == "RUNNING"
    runner.post("/api/v1/agent/start-all").check()
    for name in workers:
        assert runner.process(name)["state"] == "RUNNING", name
    assert recorded(runner) == {}


def test_a_record_of_another_boot_is_ignored(daemon_factory) -> None:
    runner = daemon_factory(start=False)
    directory = record_dir(runner)
    directory.mkdir(parents=True)
    other = str(uuid.uuid4())
    assert other != boot_id()
    record = {"name": "pos_proxy", "state": "STOPPED", "at": 1.0, "boot_id": other, "reason": ""}
    plant(runner, record)
    runner.start()
    runner.wait_all_running()
    assert "pos_proxy" not in recorded(runner)
    # The same record of this boot is obeyed (so the test above can fail).
    runner.kill9()
    plant(runner, {**record, "boot_id": boot_id()})
    runner.start()
    wait_booted(runner)
    assert runner.process("pos_proxy")["state"] == "STOPPED"
    assert instances(runner, "pos_proxy") == 0


@pytest.mark.parametrize("how", ["handover", "sigterm"])
def test_a_stop_survives_handover_and_a_full_stop(daemon_factory, how: str) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/ocp_exporter/stop").check()
    if how == "handover":
        runner.send_signal(signal.SIGUSR2)
        assert runner.wait_exit(30) == 75
    else:
        assert runner.stop() == 0
    runner.start()
    wait_booted(runner)
    assert runner.process("ocp_exporter")["state"] == "STOPPED"
    assert instances(runner, "ocp_exporter") == 0
    # The daemon's own stops (SIGTERM) are not a caller's: the others come back.
    assert runner.process("pos_proxy")["state"] == "RUNNING"
    assert runner.process("ob_logtailer")["state"] == "RUNNING"


def test_an_exit_left_so_stays_exited_after_kill9_of_the_daemon(daemon_factory) -> None:
    runner = daemon_factory(
        extra_programs={"once": {
            "command": demo_command("misbehave", "tree", "0"),
            "autorestart": "never",
            "start_seconds": 0.1,
        }},
        wait_running=True,
    )
    pid = runner.process("once")["pid"]
    os.kill(pid, signal.SIGKILL)  # it ends by itself, as far as the daemon knows
    runner.wait_state("once", "EXITED")
    # An exit nobody asked for is recorded by the writer thread a moment after the state
    # change (no caller waits for it): the daemon is killed once the record is on disk.
    wait_for(lambda: "once" in recorded(runner), timeout=10,
             message="the exit recorded")
    runner.kill9()
    runner.start()
    wait_booted(runner)
    assert runner.process("once")["state"] == "EXITED"
    assert instances(runner, "once") == 0
    runner.post("/api/v1/processes/once/start").check()
    assert runner.process("once")["state"] == "RUNNING"


def test_reload_leaves_a_program_stopped_on_request_stopped(daemon_factory) -> None:
    runner = daemon_factory(wait_running=True)
    runner.post("/api/v1/processes/ob_logtailer/stop").check()
    runner.kill9()
    runner.start()
    wait_booted(runner)
    text = runner.config.read_text()
    # Changed (the environment is part of its fingerprint) and unchanged programs alike.
    runner.config.write_text(text.replace("[programs.ob_logtailer]", (
        "[programs.ob_logtailer]\ncwd = \"/\""
    ), 1))
    runner.post("/api/v1/agent/reload").check()
    assert runner.process("ob_logtailer")["state"] == "STOPPED"
    runner.post("/api/v1/agent/reload").check()
    assert runner.process("ob_logtailer")["state"] == "STOPPED"
    assert instances(runner, "ob_logtailer") == 0


def test_records_are_not_followed_through_links(tmp_path) -> None:
    """A link where a record goes is replaced, never written through."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    records = IntentRecords(tmp_path / "intent")
    (tmp_path / "intent").mkdir()
    (tmp_path / "intent" / RECORDS_FILE).symlink_to(victim)
    assert records.load("p") is None  # a link is not read either
    records.save("p", "STOPPED")
    assert victim.read_text() == "keep"
    loaded = records.load("p")
    assert loaded is not None and loaded.state == "STOPPED" and loaded.boot_id == boot_id()
    records.remove("p")
    assert records.load("p") is None


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_directory_in_place_of_the_file_is_moved_aside(tmp_path, kind) -> None:
    """A FIFO where the file goes must not block the first read (open(2) of a FIFO waits
    for a writer: the daemon would never answer), nor a directory there fail every later
    write (an answered stop would not outlive a kill -9): either is moved aside."""
    directory = tmp_path / "intent"
    path = plant_in_place(directory, kind)
    records = IntentRecords(directory)
    answer = names_within(records, path)
    if answer is None:
        pytest.fail(f"reading the records blocked on a {kind} in place of the file")
    assert answer == []
    records.save("p", "STOPPED")
    assert path.is_file()
    loaded = IntentRecords(directory).load("p")
    assert loaded is not None and loaded.state == "STOPPED"


def test_a_write_cut_short_by_a_crash_leaves_no_file_for_good(tmp_path) -> None:
    """A daemon killed between writing the temporary file and renaming it leaves that file;
    the next daemon removes it with its first write (one more per crash otherwise)."""
    directory = tmp_path / "intent"
    directory.mkdir()
    leftover = directory / f".{RECORDS_FILE}.0123abcd.tmp"
    leftover.write_bytes(b'{"p": {"name": "p", "sta')
    records = IntentRecords(directory)
    assert records.names() == []
    records.save("q", "STOPPED")
    assert sorted(path.name for path in directory.iterdir()) == [RECORDS_FILE]


def test_an_earlier_versions_record_files_are_obeyed_then_folded_in(daemon_factory) -> None:
    """A daemon of an earlier version kept one <name>.json per program: after an upgrade
    the next daemon obeys them, and the next write of the one file removes them."""
    runner = daemon_factory(start=False)
    directory = record_dir(runner)
    directory.mkdir(parents=True)
    old = {"name": "ob_logtailer", "state": "STOPPED", "at": 1.0, "boot_id": boot_id(),
           "reason": "stopped on request"}
    (directory / "ob_logtailer.json").write_bytes(orjson.dumps(old))
    runner.start()
    wait_booted(runner)
    assert runner.process("ob_logtailer")["state"] == "STOPPED"
    assert instances(runner, "ob_logtailer") == 0
    runner.post("/api/v1/processes/ocp_exporter/stop").check()
    assert sorted(recorded(runner)) == ["ob_logtailer", "ocp_exporter"]
    assert not (directory / "ob_logtailer.json").exists()


IN_MOVED_TO = 0x80  # inotify(7)
INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then the name)


def renames_into(directory: Path, action) -> list[str]:
    """The names renamed into directory while action() ran, read from a real inotify
    watch (inotify(7), IN_MOVED_TO)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(directory), IN_MOVED_TO) >= 0
        action()
        names = []
        with contextlib.suppress(BlockingIOError):
            while True:
                data = os.read(fd, 65536)
                offset = 0
                while offset < len(data):
                    _, _, _, size = INOTIFY_EVENT.unpack_from(data, offset)
                    start = offset + INOTIFY_EVENT.size
                    names.append(data[start:start + size].rstrip(b"\0").decode())
                    offset = start + size
        return names
    finally:
        os.close(fd)


def test_one_write_of_the_file_holds_a_whole_stop_all(tmp_path) -> None:
    """N changes requested in one pass of the event loop are one write of the file."""
    directory = tmp_path / "intent"
    records = IntentRecords(directory)
    records.save("first", "STOPPED")  # the directory exists to be watched

    async def stop_all() -> None:
        await asyncio.gather(*(records.save_soon(f"p{i}", "STOPPED") for i in range(50)))

    assert renames_into(directory, lambda: asyncio.run(stop_all())) == [RECORDS_FILE]
    expected = sorted(["first", *(f"p{i}" for i in range(50))])
    assert sorted(orjson.loads((directory / RECORDS_FILE).read_bytes())) == expected
    assert [p.name for p in directory.iterdir()] == [RECORDS_FILE]
    assert IntentRecords(directory).names() == expected
