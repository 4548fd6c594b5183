"""TCP connection slots under slow or silent clients (SPEC section 11, the TCP listener):
a full table makes room by closing the oldest connection that has sent no request yet, a
non-loopback peer holds a bounded number of those, and a refused credential closes its
connection."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import uuid

import pytest
from aiohttp import web
from harness import ApiClient, free_port

from ocp_agentd.api import listeners
from ocp_agentd.api.envelope import host_address
from ocp_agentd.api.listeners import MAX_PENDING_PER_PEER, peer_key

TOKEN = uuid.uuid4().hex * 2


def _tcp_daemon(daemon_factory, nofile: tuple[int, int] | None = None) -> int:
    """A daemon with TCP on loopback and one token; its port."""
    port = free_port()
    daemon_factory(overrides={"api": {
        "tcp": f"127.0.0.1:{port}",
        "tokens": [{"name": "ops", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                    "permissions": ["HOST_VIEWER"]}]}}, nofile=nofile)
    return port


def test_silent_clients_holding_every_slot_do_not_turn_callers_away(daemon_factory) -> None:
    # RLIMIT_NOFILE 64: the daemon allows 64 // 4 = 16 TCP connections.
    port = _tcp_daemon(daemon_factory, nofile=(64, 64))
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        client = ApiClient(host="127.0.0.1", port=port, token=TOKEN, timeout=10)
        # Each request comes while the silent ones hold every slot (HEADER_SECONDS is 3 s,
        # so some may also be dropped meanwhile): each is served on its first try.
        for _ in range(5):
            assert client.get("/api/v1/status").successful
        closed = 0
        for sock in silent:
            sock.settimeout(10)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
        assert closed == len(silent)  # evicted or past the header deadline: all gone
    finally:
        for sock in silent:
            sock.close()


def test_a_refused_credential_closes_the_connection(daemon_factory) -> None:
    port = _tcp_daemon(daemon_factory)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):  # ends when the daemon closes the connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"Connection: close" in answer


@pytest.mark.parametrize(("peer", "key"), [
    (("127.0.0.1", 5), None), (("::1", 5, 0, 0), None), (("::ffff:127.0.0.2", 5, 0, 0), None),
    (("192.0.2.7", 5), "192.0.2.7"), (("::ffff:192.0.2.7", 5, 0, 0), "192.0.2.7"),
    (("fd00::2:3:4:5", 5, 0, 0), "fd00::/64"), (None, None), ("", None),
])
def test_peer_key(peer, key) -> None:
    assert peer_key(peer) == key


def test_one_remote_peer_holds_at_most_its_share_of_pending_connections() -> None:
    host = host_address()
    if host == "127.0.0.1":
        pytest.skip("no non-loopback IPv4 address on this host")

    async def main() -> None:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        sock = socket.create_server((host, 0))
        sock.setblocking(False)
        site = listeners._CappedSite(runner, sock, limit=200)
        await site.start()
        port = sock.getsockname()[1]
        held = []
        try:
            for _ in range(MAX_PENDING_PER_PEER):
                _, writer = await asyncio.open_connection(host, port)
                held.append(writer)
            await asyncio.wait_for(_until(lambda: site.live == MAX_PENDING_PER_PEER), 10)
            reader, writer = await asyncio.open_connection(host, port)
            held.append(writer)
            assert await asyncio.wait_for(reader.read(1), 10) == b""  # closed on arrival
            assert site.live == MAX_PENDING_PER_PEER
            # A request from the same peer settles a connection: room for one more.
            held[0].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(_until(lambda: len(site.pending) < MAX_PENDING_PER_PEER),
                                   10)
            _, writer = await asyncio.open_connection(host, port)
            held.append(writer)
            await asyncio.wait_for(_until(lambda: len(site.pending) == MAX_PENDING_PER_PEER),
                                   10)
        finally:
            for writer in held:
                writer.close()
            await runner.cleanup()

    asyncio.run(main())


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


