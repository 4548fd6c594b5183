"""PidRecords: changes noted at once, written by one thread, the directory made once."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from ocp_agentd.supervision.identity import PidRecord, PidRecords


def _record(name: str, pid: int) -> PidRecord:
    return PidRecord(name, pid, 1234, ["/bin/sleep", "9"], "run", "fp", 1.0, 2)


def test_saved_record_is_seen_at_once_and_on_disk_after_flush(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    records.save(_record("a", 10))
    assert records.load("a") == _record("a", 10)  # before the writer ran, or after
    assert records.names() == ["a"]
    assert records.flush()
    on_disk = json.loads((tmp_path / "pids" / "a.json").read_text())
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
    assert sorted(p.name for p in (tmp_path / "pids").iterdir()) == ["b.json"]


def test_newest_save_is_what_stays(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    for pid in range(100, 300):
        records.save(_record("a", pid))
    assert records.flush()
    assert json.loads((tmp_path / "pids" / "a.json").read_text())["pid"] == 299


def test_directory_removed_under_it_is_made_again(tmp_path: Path) -> None:
    records = PidRecords(tmp_path / "pids")
    records.save(_record("a", 10))
    assert records.flush()
    shutil.rmtree(tmp_path / "pids")
    records.save(_record("b", 11))
    assert records.flush()
    assert (tmp_path / "pids" / "b.json").exists()


def test_unreadable_record_is_ignored_and_removed(tmp_path: Path) -> None:
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "a.json").write_text('{"name": "a", "pid": ')
    records = PidRecords(tmp_path / "pids")
    assert records.load("a") is None
    assert records.flush()
    assert not (tmp_path / "pids" / "a.json").exists()



class HeldWriter(PidRecords):
    """PidRecords whose writer stops inside _write until released (to look mid-write)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered = threading.Event()
        self.release = threading.Event()

    def _write(self, name: str, data: bytes) -> None:
        self.entered.set()
        self.release.wait(10)
        super()._write(name, data)


def test_a_record_being_written_is_still_seen(tmp_path: Path) -> None:
    records = HeldWriter(tmp_path / "pids")
    records.save(_record("a", 10))
    try:
        assert records.entered.wait(10)  # taken by the writer, not yet on disk
        assert not (tmp_path / "pids" / "a.json").exists()
        assert records.load("a") == _record("a", 10)
        assert records.names() == ["a"]
        assert not records.flush(timeout=0.05)  # not on disk yet
    finally:
        records.release.set()
    assert records.flush()
    assert (tmp_path / "pids" / "a.json").exists()
