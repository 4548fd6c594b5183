"""A burst of clients while the daemon is busy: the listen queues of both listeners.

A unix socket's connect does not wait while the listener's queue is full, as TCP's does:
a non-blocking or timed connect fails at once with EAGAIN (connect(2)), and asyncio takes
that EAGAIN for a connect in progress, so an aiohttp client fails its first write with
ENOTCONN (CPython gh-117208). A full TCP queue drops the handshake instead, and the
client waits a second or more for its SYN to go again. The daemon therefore keeps deep
queues on both listeners, and both of its clients (ocp-agentctl's transport and
AgentClient, which the restart task uses) try again while the unix socket's queue stays
full, within their connect timeout.

The full queue is made for real: a listener frozen with SIGSTOP and connections that fill
its queue, then SIGCONT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import free_port, wait_for

from ocp_agentd.cli.transport import _unix_socket
from ocp_agentd.client import AgentClient, AgentUnavailable

BURST = 400  # local clients at once: well past the 128 of a default listen queue
STILL_TRYING = 0.3  # seconds a client must still be trying while the queue is full
HANDSHAKE_SECONDS = 0.5  # a loopback handshake with room in the queue takes microseconds
TOKEN = "listen-queue-viewer-token"
REQUEST = b"GET /api/v1/status HTTP/1.1\r\nHost: ocp-agentd\r\nConnection: close\r\n\r\n"

# A listener with a queue of one that answers every request with one success envelope.
TINY_SERVER = textwrap.dedent("""
    import socket, sys
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sys.argv[1])
    server.listen(1)
    print("ready", flush=True)
    body = b'{"successful": true, "status": 200, "data": {"answered": true}}'
    while True:
        conn, _ = server.accept()
        with conn:
            seen = b""
            while b"\\r\\n\\r\\n" not in seen:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                seen += chunk
            if seen:
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                             b"Connection: close\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(body)
                             + body)
""")


def _connect_nonblocking(path: Path) -> socket.socket:
    """A non-blocking unix connect, as an event loop makes it; OSError as connect(2)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped for real: a process still running could
    accept a connection meant to fill its queue."""
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED,
             timeout=10, message=f"pid {pid} stopped")


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.setblocking(True)
    sock.settimeout(timeout)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def _full_queue(path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A tiny server at ``path``, frozen, whose listen queue is full, and the call that
    frees the queue (closing the connections that fill it) and resumes the server. On
    leaving, the server is resumed and killed."""
    server = subprocess.Popen([sys.executable, "-c", TINY_SERVER, str(path)],
                              stdout=subprocess.PIPE)
    fillers: list[socket.socket] = []

    def resume() -> None:
        for sock in fillers:
            sock.close()
        server.send_signal(signal.SIGCONT)

    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        _freeze(server.pid)
        while True:
            try:
                fillers.append(_connect_nonblocking(path))
            except BlockingIOError:
                break
            assert len(fillers) < 64, "the tiny server's queue never filled"
        yield path, resume
    finally:
        resume()
        server.kill()
        server.wait(timeout=10)
        server.stdout.close()


def test_a_burst_of_local_clients_finds_room_while_the_daemon_is_frozen(daemon_factory):
    runner = daemon_factory()
    assert runner.pid is not None
    clients: list[socket.socket] = []
    refused = 0
    try:
        _freeze(runner.pid)
        for _ in range(BURST):
            try:
                clients.append(_connect_nonblocking(runner.socket))
            except BlockingIOError:
                refused += 1
        for sock in clients:
            sock.sendall(REQUEST)
    finally:
        runner.send_signal(signal.SIGCONT)
    try:
        assert refused == 0, f"{refused} of {BURST} connects found the listen queue full"
        answers = [_read_all(sock, timeout=30) for sock in clients]
    finally:
        for sock in clients:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)


def test_a_burst_of_tcp_clients_completes_its_handshakes_while_the_daemon_is_frozen(
        daemon_factory):
    port = free_port()
    runner = daemon_factory(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": [
        {"name": "viewer", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
         "permissions": ["HOST_VIEWER"]}]}})
    request = REQUEST.replace(b"\r\n\r\n",
                              b"\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    clients: list[socket.socket] = []
    try:
        _freeze(runner.pid)
        for _ in range(BURST // 2):  # the daemon's TCP table holds 256 at most
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(sock)
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        poller = select.poll()
        for sock in clients:
            poller.register(sock, select.POLLOUT)
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        connected: set[int] = set()
        while len(connected) < len(clients) and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                poller.unregister(fd)
                connected.add(fd)
        for sock in clients:
            if sock.fileno() in connected:
                sock.sendall(request)
    finally:
        runner.send_signal(signal.SIGCONT)
    try:
        assert len(connected) == len(clients), (
            f"{len(clients) - len(connected)} of {len(clients)} handshakes waited for a "
            "full listen queue")
        answers = [_read_all(sock, timeout=30) for sock in clients]
    finally:
        for sock in clients:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)


def test_ctl_transport_tries_again_while_the_queue_is_full(tmp_path):
    with (_full_queue(tmp_path / "tiny.sock") as (path, _),
          pytest.raises(TimeoutError, match="listen queue stayed full")):
        _unix_socket(str(path), STILL_TRYING)

    with _full_queue(tmp_path / "second.sock") as (path, resume):
        async def connect_while_frozen() -> socket.socket:
            attempt = asyncio.create_task(asyncio.to_thread(_unix_socket, str(path), 30.0))
            done, _ = await asyncio.wait({attempt}, timeout=STILL_TRYING)
            assert not done, f"gave up while the queue was full: {attempt.exception()!r}"
            resume()
            return await attempt

        sock = asyncio.run(connect_while_frozen())
        with sock:
            sock.sendall(REQUEST)
            assert _read_all(sock, timeout=30).startswith(b"HTTP/1.1 200 ")


def test_agent_client_tries_again_while_the_queue_is_full(tmp_path):
    with _full_queue(tmp_path / "tiny.sock") as (path, resume):
        async def request_while_frozen() -> object:
            async with AgentClient(socket_path=path, timeout=30, connect_timeout=30) as client:
                attempt = asyncio.create_task(client.request("GET", "/api/v1/status"))
                done, _ = await asyncio.wait({attempt}, timeout=STILL_TRYING)
                assert not done, f"gave up while the queue was full: {attempt.exception()!r}"
                resume()
                return await attempt

        assert asyncio.run(request_while_frozen()) == {"answered": True}


def test_a_never_connected_socket_fails_its_first_write_with_enotconn(tmp_path):
    """The kernel's side of the case above, so the clients' reading of ENOTCONN stays
    right: after EAGAIN the socket has no peer, and a write says so."""
    with _full_queue(tmp_path / "tiny.sock") as (path, _):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        with sock:
            with pytest.raises(BlockingIOError):
                sock.connect(str(path))
            with pytest.raises(OSError) as failed:
                sock.send(b"x")
            assert failed.value.errno == errno.ENOTCONN


@pytest.mark.parametrize("down", ["no socket", "refused"])
def test_a_daemon_that_is_down_fails_both_clients_at_once(tmp_path, down):
    """Trying again is for a full queue only: no socket, or one nobody listens on (a
    daemon killed with SIGKILL leaves it), fails at once, not after the connect timeout."""
    path = tmp_path / "agentd.sock"
    if down == "refused":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(str(path))  # bound, never listening: connect(2) says ECONNREFUSED
    expected = FileNotFoundError if down == "no socket" else ConnectionRefusedError
    with pytest.raises(expected):
        _unix_socket(str(path), 60.0)  # a TimeoutError would mean it kept trying

    async def request() -> float:
        loop = asyncio.get_running_loop()
        async with AgentClient(socket_path=path, timeout=60, connect_timeout=60) as client:
            started = loop.time()
            with pytest.raises(AgentUnavailable):
                await client.request("POST", "/api/v1/programs/x/restart")
            return loop.time() - started

    assert asyncio.run(request()) < 30, "the client kept trying a daemon that is down"


def test_a_request_the_daemon_received_is_never_sent_again(tmp_path):
    """Only a socket that never connected is tried again: a POST that reached the daemon
    and whose connection then broke (the daemon killed mid-request) fails, sent once."""
    path = tmp_path / "agentd.sock"
    received: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(8)
        server.settimeout(30)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                received.append(_read_request(conn))

        async def post() -> None:
            async with AgentClient(socket_path=path, timeout=30, connect_timeout=30) as client:
                with pytest.raises(AgentUnavailable):
                    await client.request("POST", "/api/v1/programs/x/restart",
                                         json={"reason": "test"})

        accepting = threading.Thread(target=serve, daemon=True)
        accepting.start()
        asyncio.run(post())
        accepting.join(30)
        # A unix connect is queued by the time it returns: one sent again is waiting here.
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()[0].close()
    assert [r.split(b"\r\n", 1)[0] for r in received] == [
        b"POST /api/v1/programs/x/restart HTTP/1.1"]


def _read_request(conn: socket.socket) -> bytes:
    """The request's head, read a byte at a time: its body stays unread, so the close
    that follows resets the connection (the client's read fails with ECONNRESET)."""
    seen = b""
    while not seen.endswith(b"\r\n\r\n"):
        byte = conn.recv(1)
        if not byte:
            break
        seen += byte
    return seen
