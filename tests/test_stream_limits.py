"""Bounded streams: at most MAX_SUBSCRIBERS event streams and MAX_FOLLOWERS log followers
at once (one more is answered 429/1007), and an event reader that lags is disconnected
rather than holding events without bound."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import ExitStack, closing

import pytest
from harness import DaemonRunner, wait_for

from ocp_agentd import events as events_module
from ocp_agentd.events import MAX_FOLLOWERS, MAX_SUBSCRIBERS, QUEUE_LIMIT, EventHub


def _open(runner: DaemonRunner, path: str) -> tuple[socket.socket, int, bytes]:
    """A raw connection that asks for ``path`` and then reads only the answer's head (as a
    client that never reads its stream would); (socket, HTTP status, what was read)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(runner.socket))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, int(head.split(b" ", 2)[1]), head


def _refused_body(sock: socket.socket, head: bytes) -> dict:
    data = head.split(b"\r\n\r\n", 1)[1]
    while True:
        try:
            return json.loads(data)
        except ValueError:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk


def _hold(runner: DaemonRunner, path: str, count: int, stack: ExitStack) -> None:
    for _ in range(count):
        sock, status, head = _open(runner, path)
        stack.enter_context(closing(sock))
        assert status == 200, head


@pytest.mark.parametrize(("path", "limit"), [
    ("/api/v1/events", MAX_SUBSCRIBERS),
    ("/api/v1/processes/ocp_exporter/logs?follow=1", MAX_FOLLOWERS),
])
def test_one_stream_past_the_cap_is_refused_until_one_closes(
        demo_daemon: DaemonRunner, path: str, limit: int) -> None:
    with ExitStack() as stack:
        _hold(demo_daemon, path, limit - 1, stack)
        last, status, head = _open(demo_daemon, path)
        assert status == 200, head
        sock, status, head = _open(demo_daemon, path)
        with closing(sock):
            assert status == 429, head
            body = _refused_body(sock, head)
        assert body["successful"] is False and body["error"]["code"] == 1007, body
        assert f"{limit} " in body["error"]["message"], body
        # Other requests are served meanwhile, and the other kind of stream too.
        assert demo_daemon.get("/api/v1/processes").status == 200
        other = ("/api/v1/processes/ocp_exporter/logs?follow=1" if "events" in path
                 else "/api/v1/events")
        sock, status, head = _open(demo_daemon, other)
        sock.close()
        assert status == 200, head
        # A client that goes away frees its place (checked every GONE_CHECK_SECONDS).
        last.close()

        def admitted() -> bool:
            sock, status, _ = _open(demo_daemon, path)
            if status == 200:
                stack.enter_context(closing(sock))
            else:
                sock.close()
            return status == 200

        wait_for(admitted, timeout=20, message="a place freed by a closed stream")


def test_a_lagging_reader_is_disconnected_with_a_lost_event() -> None:
    async def main() -> None:
        hub = EventHub()
        for number in range(events_module.KEEP):
            hub.publish("state", f"old {number}", program="p", **{"from": "", "to": ""})
        # The replay of every kept event does not count as lag.
        reader = hub.subscribe(last=events_module.KEEP)
        for number in range(QUEUE_LIMIT):
            hub.publish("state", f"new {number}", program="p", **{"from": "", "to": ""})
        assert not reader.closed and hub.subscribers == 1
        hub.publish("state", "one too many", program="p", **{"from": "", "to": ""})
        assert reader.closed and hub.subscribers == 0
        received = [event async for event in reader]
        assert len(received) == events_module.KEEP + QUEUE_LIMIT + 1
        assert received[-1]["kind"] == "lost" and "lagged" in received[-1]["reason"]

    asyncio.run(main())


def test_subscriptions_past_the_cap_raise_and_a_closed_one_frees_its_place() -> None:
    async def main() -> None:
        hub = EventHub()
        held = [hub.subscribe() for _ in range(MAX_SUBSCRIBERS)]
        with pytest.raises(events_module.TooManySubscribers):
            hub.subscribe()
        held.pop().close()
        held.append(hub.subscribe())
        with hub.following():
            assert hub.followers == 1
        assert hub.followers == 0
        for subscription in held:
            subscription.close()

    asyncio.run(main())


