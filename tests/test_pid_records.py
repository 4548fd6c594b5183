"""PidRecords: changes noted at once, written by one thread into one file, the directory
made once, an earlier version's files read and folded in."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from planted import names_within, plant_in_place

from ocp_agentd.supervision import pid_records
from ocp_agentd.supervision.identity import PidRecord
from ocp_agentd.supervision.pid_records import RECORDS_FILE, PidRecords


def _record(name: str, pid: int) -> PidRecord:
    return PidRecord(name, pid, 1234, ["/bin/sleep", "9"], "run", "fp", 1.0, 2)


def _on_disk(directory: Path) -> dict:
    return json.loads((directory / RECORDS_FILE).read_text())


def test_saved_record_is_seen_at_once_and_on_disk_after_flush(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    records.save(_record("a", 10))
    assert records.load("a") == _record("a", 10)  # before the writer ran, or after
    assert records.names() == ["a"]
    assert records.flush()
    on_disk = _on_disk(tmp_path / "pids")["a"]
    assert on_disk["pid"] == 10 and on_disk["cmdline"] == ["/bin/sleep", "9"]
    assert PidRecords(tmp_path / "pids").load("a") == _record("a", 10)


def test_remove_wins_over_an_earlier_save(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    records.save(_record("a", 10))
    records.save(_record("b", 11))
    records.remove("a")
    assert records.load("a") is None
    assert records.names() == ["b"]
    assert records.flush()
    assert sorted(_on_disk(tmp_path / "pids")) == ["b"]
    assert [p.name for p in (tmp_path / "pids").iterdir()] == [RECORDS_FILE]


def test_newest_save_is_what_stays(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    for pid in range(100, 300):
        records.save(_record("a", pid))
    assert records.flush()
    assert _on_disk(tmp_path / "pids")["a"]["pid"] == 299


def test_removing_what_has_no_record_writes_nothing(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    records.remove("a")
    assert records.flush(timeout=0)  # nothing noted, nothing to wait for
    assert not (tmp_path / "pids").exists()


def test_directory_removed_under_it_is_made_again(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    records.save(_record("a", 10))
    assert records.flush()
    shutil.rmtree(tmp_path / "pids")
    records.save(_record("b", 11))
    assert records.flush()
    assert sorted(_on_disk(tmp_path / "pids")) == ["a", "b"]


def test_unreadable_records_are_ignored_and_rewritten(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / RECORDS_FILE).write_text('{"a": {"name": "a", "pid": ')
    records = PidRecords(tmp_path / "pids")
    assert records.load("a") is None
    records.save(_record("b", 11))
    assert records.flush()
    assert sorted(_on_disk(tmp_path / "pids")) == ["b"]


def test_a_record_of_the_wrong_shape_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    good = asdict(_record("b", 11))
    bad = {"name": 3, "pid": "x"}
    (tmp_path / "pids" / RECORDS_FILE).write_text(json.dumps({"a": bad, "b": good}))
    records = PidRecords(tmp_path / "pids")
    assert records.load("a") is None
    assert records.load("b") == _record("b", 11)
    assert records.flush()
    assert sorted(_on_disk(tmp_path / "pids")) == ["b"]


def test_an_earlier_versions_files_are_read_then_folded_in(tmp_path: Path) -> None:
    """One <name>.json per program (an earlier version's layout, e.g. before an upgrade's
    handover), and a temporary file a crash left: read, then gone at the next write."""
    directory = tmp_path / "pids"
    directory.mkdir()
    (directory / "a.json").write_text(json.dumps(asdict(_record("a", 10))))
    (directory / "b.json.tmp").write_text('{"name": "b"')
    records = PidRecords(directory)
    assert records.load("a") == _record("a", 10)
    assert records.names() == ["a"]
    records.save(_record("c", 12))
    assert records.flush()
    assert [p.name for p in directory.iterdir()] == [RECORDS_FILE]
    assert sorted(_on_disk(directory)) == ["a", "c"]


def test_a_link_in_place_of_the_file_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / RECORDS_FILE).symlink_to(victim)
    records = PidRecords(tmp_path / "pids")
    assert records.names() == []  # not read through the link either
    records.save(_record("a", 10))
    assert records.flush()
    assert victim.read_text() == "keep"
    assert not (tmp_path / "pids" / RECORDS_FILE).is_symlink()


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_fifo_or_directory_in_place_of_the_file_is_moved_aside(tmp_path: Path, kind) -> None:
    """Neither blocks the first read (a FIFO would block open(2) until a writer came: the
    daemon would never answer) nor every later write (rename(2) cannot replace a
    directory): it is moved aside and the records are written again."""
    directory = tmp_path / "pids"
    path = plant_in_place(directory, kind)
    records = PidRecords(directory)
    assert names_within(records, path) == []
    records.save(_record("a", 10))
    assert records.flush()
    assert path.is_file() and sorted(_on_disk(directory)) == ["a"]


class HeldWriter(PidRecords):
    """PidRecords whose writer stops inside _write until released (to look mid-write)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.writes = 0

    def _write(self, data: bytes, remove: list[Path]) -> None:
        self.writes += 1
        self.entered.set()
        self.release.wait(10)
        super()._write(data, remove)


def test_a_record_being_written_is_still_seen(tmp_path: Path) -> None:
    records = HeldWriter(tmp_path / "pids")
    records.save(_record("a", 10))
    try:
        assert records.entered.wait(10)  # taken by the writer, not yet on disk
        assert not (tmp_path / "pids" / RECORDS_FILE).exists()
        assert records.load("a") == _record("a", 10)
        assert records.names() == ["a"]
        assert not records.flush(timeout=0.05)  # not on disk yet
    finally:
        records.release.set()
    assert records.flush()
    assert (tmp_path / "pids" / RECORDS_FILE).exists()


def test_changes_noted_during_a_write_go_in_one_next_write(tmp_path: Path) -> None:
    records = HeldWriter(tmp_path / "pids")
    records.save(_record("first", 1))
    try:
        assert records.entered.wait(10)
        records.entered.clear()
        for index in range(50):
            records.save(_record(f"p{index}", 100 + index))
    finally:
        records.release.set()
    assert records.flush()
    assert len(_on_disk(tmp_path / "pids")) == 51
    assert records.writes == 2


def test_a_directory_others_can_write_is_not_read(tmp_path: Path) -> None:
    """A record planted by another user could make the daemon adopt, then stop, a
    process that is not its: a records directory others can write is ignored."""
    directory = tmp_path / "pids"
    directory.mkdir(mode=0o700)
    (directory / RECORDS_FILE).write_text(json.dumps({"a": asdict(_record("a", 10))}))
    directory.chmod(0o777)
    assert PidRecords(directory).names() == []
    directory.chmod(0o700)
    assert PidRecords(directory).names() == ["a"]


def test_the_directory_is_made_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        records = PidRecords(tmp_path / "pids")
        records.save(_record("a", 10))
        assert records.flush()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pids").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "pids" / RECORDS_FILE).stat().st_mode) == 0o600


class CountingWriter(PidRecords):
    """PidRecords that counts its writes."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.writes = 0

    def _write(self, data: bytes, remove: list[Path]) -> None:
        self.writes += 1
        super()._write(data, remove)


def test_changes_that_come_close_together_share_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart of N programs notes about 2N changes, a few spawns apart: each on its
    own write cost O(N²). Gathered, they take a few writes; flush() does not wait for
    the gathering to end."""
    monkeypatch.setattr(pid_records, "GATHER", 2.0)
    monkeypatch.setattr(pid_records, "GATHER_MAX", 30.0)
    records = CountingWriter(tmp_path / "pids")
    for index in range(20):
        records.save(_record(f"p{index}", 100 + index))
        time.sleep(0.002)  # paced like spawns: each write (well under 2 ms) would be done
    assert records.flush(timeout=10.0)  # well before GATHER_MAX: flush cuts it short
    assert len(_on_disk(tmp_path / "pids")) == 20
    assert records.writes <= 2
