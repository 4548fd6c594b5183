"""Housekeeping looks at a log file again only once it changed: one-shot inotify watches
(logwatch.py), and a ticker that sleeps while nothing changes (ticker.py).

Real inotify on real files: a write, a rotation's rename, a file put in place of the log
and a link at the path; and a real event loop for the ticker, its interval shortened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from ocp_agentd import ticker
from ocp_agentd.supervision.logwatch import LogWatch
from ocp_agentd.systemd import Notifier

DEADLINE = 10.0  # seconds any awaited condition below gets


def _armed(watch: LogWatch, *paths: Path) -> None:
    """One housekeeping round over ``paths``: each is due, then armed."""
    assert sorted(watch.to_look_at(paths)) == sorted(paths)
    watch.armed([(path, watch.arm(path)) for path in paths])


def _empty_logs(folder: Path) -> tuple[Path, Path]:
    """Two empty log files in folder: a.log and b.log."""
    log, other = folder / "a.log", folder / "b.log"
    log.write_bytes(b"")
    other.write_bytes(b"")
    return log, other


def _with_loop(body):
    async def main() -> None:
        watch = LogWatch()
        try:
            await body(watch)
        finally:
            watch.close()

    asyncio.run(main())


def test_an_armed_file_is_quiet_until_written_and_says_so_once(tmp_path: Path) -> None:
    log, other = _empty_logs(tmp_path)
    calls: list[int] = []

    async def body(watch: LogWatch) -> None:
        watch.on_change = lambda: calls.append(1)
        _armed(watch, log, other)
        assert watch.to_look_at([log, other]) == []
        with log.open("ab") as handle:
            handle.write(b"x")
            handle.flush()
            handle.write(b"y")  # the watch is gone after the first write: one call
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while not calls:
            assert loop.time() < deadline, "no change reported for the written file"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        assert calls == [1]
        assert watch.to_look_at([log, other]) == [log]
        assert watch.to_look_at([log, other]) == [log]  # due until armed again
        watch.armed([(log, watch.arm(log))])
        assert watch.to_look_at([log, other]) == []

    _with_loop(body)


@pytest.mark.parametrize("change", ["rotated", "replaced", "unlinked", "chmod"])
def test_rotation_replacement_and_unlink_make_the_file_due(tmp_path: Path,
                                                           change: str) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"x")

    async def body(watch: LogWatch) -> None:
        _armed(watch, log)
        if change == "rotated":
            log.rename(tmp_path / "a.log.1")
        elif change == "replaced":
            (tmp_path / "new").write_bytes(b"")
            (tmp_path / "new").rename(log)
        elif change == "unlinked":
            log.unlink()
        else:
            log.chmod(0o600)
        assert watch.to_look_at([log]) == [log]

    _with_loop(body)


def test_a_file_that_cannot_be_watched_is_due_every_round(tmp_path: Path) -> None:
    missing = tmp_path / "missing.log"

    async def body(watch: LogWatch) -> None:
        for _ in range(3):
            assert watch.to_look_at([missing]) == [missing]
            watch.armed([(missing, watch.arm(missing))])

    _with_loop(body)


def test_a_link_at_the_path_is_watched_as_itself(tmp_path: Path) -> None:
    """IN_DONT_FOLLOW: the link planted at a log path is watched, not the file it names
    (writes there are not the log's); the look itself refuses the link (safefs)."""
    target, link = tmp_path / "target", tmp_path / "a.log"
    target.write_bytes(b"")
    link.symlink_to(target)

    async def body(watch: LogWatch) -> None:
        _armed(watch, link)
        target.write_bytes(b"elsewhere")
        assert watch.to_look_at([link]) == []
        link.unlink()
        assert watch.to_look_at([link]) == [link]

    _with_loop(body)


def test_a_change_before_the_watch_is_recorded_still_counts(tmp_path: Path) -> None:
    """The look runs on a worker thread: a write can come between the arming and the
    event loop recording the watch."""
    log = tmp_path / "a.log"
    log.write_bytes(b"")

    async def body(watch: LogWatch) -> None:
        assert watch.to_look_at([log]) == [log]
        wd = watch.arm(log)
        assert wd is not None
        log.write_bytes(b"written before the watch is recorded")
        watch._on_events()  # the loop reads the event first
        watch.armed([(log, wd)])
        assert watch.to_look_at([log]) == [log]

    _with_loop(body)


def test_forgotten_paths_are_due_again_when_named_again(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"")

    async def body(watch: LogWatch) -> None:
        _armed(watch, log)
        watch.forget(set())
        assert watch.to_look_at([log]) == [log]

    _with_loop(body)


def test_the_ticker_sleeps_until_a_change_asks_for_housekeeping(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A round that asks for no other is followed by none until want_housekeeping(), and
    then by one HOUSEKEEPING_SECONDS later; a round that asks for another gets it; a
    round that raised is retried."""
    monkeypatch.setattr(ticker, "HOUSEKEEPING_SECONDS", 0.05)
    rounds: list[float] = []
    answers = iter([False, True, False])

    async def housekeep() -> bool:
        rounds.append(asyncio.get_running_loop().time())
        answer = next(answers, False)
        if len(rounds) == 4:
            raise OSError("a failing round")
        return answer

    async def main() -> None:
        clock = ticker.Ticker(Notifier(env={}), housekeep, lambda _: None)
        clock._last_activity -= ticker.BUSY_SECONDS  # idle: no lag probes
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(clock.run())

        async def until(count: int) -> None:
            deadline = loop.time() + DEADLINE
            while len(rounds) < count:
                assert loop.time() < deadline, f"round {count} never came"
                await asyncio.sleep(0.01)

        try:
            await until(1)  # the first round, after start; it asks for no other
            await asyncio.sleep(10 * ticker.HOUSEKEEPING_SECONDS)
            assert len(rounds) == 1, "a round came with nothing changed"
            clock.want_housekeeping()
            clock.want_housekeeping()  # one round for both
            await until(2)  # it asks for another: the third comes by itself
            await until(3)
            assert rounds[1] - rounds[0] >= 10 * ticker.HOUSEKEEPING_SECONDS
            await asyncio.sleep(10 * ticker.HOUSEKEEPING_SECONDS)
            assert len(rounds) == 3
            clock.want_housekeeping()
            await until(5)  # the fourth raised: the fifth comes by itself
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())


def _inotify_descriptors() -> list[str]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                fds.append(name)
    return fds


def test_closing_the_watch_gives_back_its_descriptor(tmp_path: Path) -> None:
    """Compared with what the test process held before: other tests in the same worker
    may hold inotify descriptors of their own."""
    log = tmp_path / "a.log"
    log.write_bytes(b"")
    before = set(_inotify_descriptors())

    async def body(watch: LogWatch) -> None:
        _armed(watch, log)
        assert set(_inotify_descriptors()) - before == {str(watch._fd)}

    _with_loop(body)
    assert set(_inotify_descriptors()) == before


def test_a_change_before_the_watch_is_recorded_asks_for_a_round_and_leaks_nothing(
        tmp_path: Path) -> None:
    """The watch that fired before the event loop recorded it is gone (IN_ONESHOT): the
    change asks for a round, or a file written all the time stops being looked at once a
    write lands while housekeeping looks; and nothing is kept for the dead watch."""
    log = tmp_path / "a.log"
    log.write_bytes(b"")
    calls: list[int] = []

    async def body(watch: LogWatch) -> None:
        watch.on_change = lambda: calls.append(1)
        for round_ in range(1, 4):
            assert watch.to_look_at([log]) == [log]
            wd = watch.arm(log)
            assert wd is not None
            with log.open("ab") as handle:
                handle.write(b"written before the watch is recorded\n")
            watch._on_events()  # the loop reads the event (and IN_IGNORED) first
            watch.armed([(log, wd)])
            assert len(calls) == round_, "no round asked for the changed file"
        assert watch._path_of == {} and watch._early == set()

    _with_loop(body)


def test_a_path_named_again_whose_old_watch_fires_during_the_look_is_not_lost(
        tmp_path: Path) -> None:
    """A reload drops a program (its file's watch stays) and a later one names its log
    again: arming the same file gives back the old, still live watch descriptor. When
    that watch fires before the event loop records it, the path is still looked at again
    and later writes still count."""
    log = tmp_path / "a.log"
    log.write_bytes(b"")
    calls: list[int] = []

    async def body(watch: LogWatch) -> None:
        watch.on_change = lambda: calls.append(1)
        _armed(watch, log)
        watch.forget(set())  # reload: the program is gone
        assert watch.to_look_at([log]) == [log]  # reload: named again
        wd = watch.arm(log)
        with log.open("ab") as handle:
            handle.write(b"written before the watch is recorded\n")
        watch._on_events()
        watch.armed([(log, wd)])
        assert calls == [1], "no round asked for the changed file"
        _armed(watch, log)
        with log.open("ab") as handle:
            handle.write(b"a later write\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while watch.to_look_at([log]) != [log]:
            assert loop.time() < deadline, "a later write to the file was never seen"
            await asyncio.sleep(0.01)

    _with_loop(body)


@pytest.mark.parametrize("moved", ["log", "home"])
def test_a_directory_moved_aside_makes_its_files_due(tmp_path: Path, moved: str) -> None:
    """`mv log log.old; mkdir log` (or the same one level up): the watched file now lives
    elsewhere, and a new file at the path (a program appending by name creates it) has no
    watch; the directory's own watch makes the path due, or that file would never be
    looked at."""
    logs = tmp_path / "home" / "log"
    logs.mkdir(parents=True)
    log, other = _empty_logs(logs)
    calls: list[int] = []

    async def body(watch: LogWatch) -> None:
        watch.on_change = lambda: calls.append(1)
        _armed(watch, log, other)
        aside = logs if moved == "log" else logs.parent
        aside.rename(aside.with_name(aside.name + ".old"))
        logs.mkdir(parents=True)
        log.write_bytes(b"x" * 100)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while not calls:
            assert loop.time() < deadline, "no change reported for the moved directory"
            await asyncio.sleep(0.01)
        assert sorted(watch.to_look_at([log, other])) == sorted([log, other])

    _with_loop(body)
