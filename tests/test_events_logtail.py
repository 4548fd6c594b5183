"""The event hub (publish/subscribe) and the log reader (tail, follow across rotation), on
real files and a real event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from ocp_agentd import events as events_module
from ocp_agentd.events import EventHub, TaskEvents
from ocp_agentd.logtail import LogFile, NotALogFile


def test_every_subscriber_gets_every_event_in_order() -> None:
    async def scenario() -> None:
        hub = EventHub()
        first, second = hub.subscribe(), hub.subscribe()
        hub.state_changed("ocp_exporter", "RUNNING", "BACKOFF", "killed by SIGKILL")
        hub.probe_failed("ocp_exporter", "tcp_connect 62889", "refused")
        hub.reloaded({"added": ["x"], "removed": [], "changed": [], "unchanged": ["y"]})
        first.close()
        hub.reloaded(None, "programs.x.command: field required")
        got = [await second.get() for _ in range(4)]
        assert [e["kind"] for e in got] == ["state", "probe", "reload", "reload"]
        assert got[0]["program"] == "ocp_exporter" and got[0]["from"] == "RUNNING"
        assert got[0]["to"] == "BACKOFF" and got[0]["reason"] == "killed by SIGKILL"
        assert got[1]["probe"] == "tcp_connect 62889" and got[1]["reason"] == "refused"
        assert got[2]["added"] == ["x"] and got[2]["reason"] == "added x"
        assert got[3]["error"].startswith("programs.x") and "time" in got[3]
        assert hub.subscribers == 1
        hub.close()
        assert await second.get() is None and hub.subscribers == 0
        late = hub.subscribe()
        assert await late.get() is None

    asyncio.run(scenario())


def test_a_reader_that_falls_behind_is_dropped_not_the_publisher(monkeypatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_LIMIT", 5)

    async def scenario() -> None:
        hub = EventHub()
        slow, fast = hub.subscribe(), hub.subscribe()
        for number in range(8):
            hub.state_changed(f"p{number}", "STOPPED", "STARTING")
            assert await fast.get() is not None
        received = [event async for event in slow]
        assert len(received) == 6 and received[-1]["kind"] == "lost"
        assert hub.subscribers == 1

    asyncio.run(scenario())


def test_publishing_from_another_thread_reaches_the_loop() -> None:
    async def scenario() -> None:
        hub = EventHub()
        subscription = hub.subscribe()
        worker = threading.Thread(target=hub.probe_failed, args=("a", "exec", "exit 1"))
        worker.start()
        worker.join()
        event = await asyncio.wait_for(subscription.get(), 10)
        assert event is not None and event["program"] == "a"

    asyncio.run(scenario())


def test_task_events_carry_from_and_to() -> None:
    async def scenario() -> None:
        hub = EventHub()
        subscription = hub.subscribe()
        adapter = TaskEvents(hub)
        sub = SimpleNamespace(id=7, name="Restart pos proxy")
        task = SimpleNamespace(id=3, name="Restart OCP agent")

        def change(subtask: object, old: str | None, new: str) -> SimpleNamespace:
            return SimpleNamespace(task=task, subtask=subtask, old=old, new=new, why="")

        adapter(change(None, None, "RUNNING"))
        adapter(change(sub, "PENDING", "RUNNING"))
        adapter(change(sub, "RUNNING", "SUCCESSFUL"))
        adapter(change(None, "RUNNING", "SUCCESSFUL"))
        hub.close()
        got = [(e["kind"], e.get("subtask"), e["from"], e["to"]) async for e in subscription]
        assert got == [("task", None, "", "RUNNING"), ("subtask", 7, "PENDING", "RUNNING"),
                       ("subtask", 7, "RUNNING", "SUCCESSFUL"),
                       ("task", None, "RUNNING", "SUCCESSFUL")]

    asyncio.run(scenario())


def tail(log: LogFile, lines: int | None) -> bytes:
    """The last ``lines`` lines as the logs endpoint sends them: seek_tail, then every
    read_new until there is nothing new."""
    log.seek_tail(lines)
    data = b""
    while piece := log.read_new():
        data += piece
    return data


@pytest.mark.parametrize(("content", "lines", "expected"), [
    (b"a\nb\nc\n", 2, b"b\nc\n"),
    (b"a\nb\nc", 2, b"b\nc"),
    (b"a\nb\n", 5, b"a\nb\n"),
    (b"a\nb\n", 0, b""),
    (b"", 3, b""),
])
def test_tail(tmp_path: Path, content: bytes, lines: int, expected: bytes) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(content)
    with LogFile.open(path) as log:
        assert tail(log, lines) == expected
        assert log.read_new() == b""


def test_tail_of_a_long_file(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"".join(b"line %d %s\n" % (n, b"x" * 100) for n in range(5000)))
    with LogFile.open(path) as log:
        last = tail(log, 1500).splitlines()
    assert len(last) == 1500 and last[0].startswith(b"line 3500 ")
    assert last[-1].startswith(b"line 4999 ")


@pytest.mark.parametrize("final", [b"", b"\n"])
def test_tail_of_lines_longer_than_a_chunk(tmp_path: Path, final: bytes) -> None:
    """Lines of several CHUNKs each: the tail starts at the right byte whichever chunk
    its newline is in."""
    a, b, c = b"A" * 100_000, b"B" * 150_000, b"C" * 70_000
    path = tmp_path / "x.log"
    path.write_bytes(a + b"\n" + b + b"\n" + c + final)
    with LogFile.open(path) as log:
        assert tail(log, 2) == b + b"\n" + c + final
        assert tail(log, 1) == c + final
        assert tail(log, 3) == tail(log, 9) == path.read_bytes()


def test_refuses_links_non_files_hard_links_and_strangers_files(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    (logs / "link.log").symlink_to(secret)
    os.mkfifo(logs / "fifo.log")
    os.link(secret, logs / "hard.log")
    (logs / "stranger.log").write_text("x\n")
    os.chown(logs / "stranger.log", 65534, 65534)
    for name in ("link.log", "fifo.log", "hard.log", "stranger.log", "missing.log"):
        with pytest.raises(NotALogFile) as caught:
            LogFile.open(logs / name)
        assert str(logs / name) in str(caught.value) or name in str(caught.value)
    # The program's own user may own its log (and its directory).
    with LogFile.open(logs / "stranger.log", owner=65534) as log:
        assert tail(log, 1) == b"x\n"
    # A directory others can write is refused, whoever asks.
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)
    (open_to_all / "p.log").write_text("y\n")
    with pytest.raises(NotALogFile, match="writable by others"):
        LogFile.open(open_to_all / "p.log")


def test_follow_across_both_kinds_of_rotation(tmp_path: Path) -> None:
    path = tmp_path / "p.stdout.log"
    path.write_bytes(b"old\n")

    async def scenario() -> bytes:
        received = bytearray()
        stop = asyncio.Event()

        async def reader() -> None:
            with LogFile.open(path) as log:
                tail(log, 0)
                async for chunk in log.follow(stop.is_set):
                    received.extend(chunk)

        async def until(text: bytes) -> None:
            async with asyncio.timeout(20):
                while text not in received:
                    await asyncio.sleep(0.01)

        task = asyncio.create_task(reader())
        await asyncio.sleep(0)
        with path.open("ab") as out:
            out.write(b"one\n")
        await until(b"one\n")
        # copy and truncate: the file shrinks in place, reading starts over
        with path.open("r+b") as out:
            out.truncate(0)
        with path.open("ab") as out:
            out.write(b"two\n")
        await until(b"two\n")
        # rename and create: the tail of the old file, then the new file
        with path.open("ab") as out:
            out.write(b"three\n")
        path.rename(tmp_path / "p.stdout.log.1")
        path.write_bytes(b"four\n")
        await until(b"four\n")
        stop.set()
        await asyncio.wait_for(task, 10)
        return bytes(received)

    assert asyncio.run(scenario()) == b"one\ntwo\nthree\nfour\n"


def test_recent_events_are_replayed_by_count_or_after_an_id() -> None:
    async def scenario() -> None:
        hub = EventHub()
        for number in range(5):
            hub.state_changed(f"p{number}", "STOPPED", "STARTING")
        last_two = hub.subscribe(last=2)
        after_three = hub.subscribe(after=3)
        nothing_old = hub.subscribe()
        hub.state_changed("p5", "STOPPED", "STARTING")
        hub.close()
        assert [e["id"] async for e in last_two] == [4, 5, 6]
        assert [e["program"] async for e in after_three] == ["p3", "p4", "p5"]
        assert [e["id"] async for e in nothing_old] == [6]

    asyncio.run(scenario())
