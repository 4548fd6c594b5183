"""ocp-agentctl's HTTP/1.1 client (cli/http11.py) and its Transport, against a real unix
socket server that answers exact bytes: the framings of RFC 9112 section 6.3 (chunked,
Content-Length, until close), HTTP/1.0, interim answers, keep-alive reuse and reconnect,
and answers that are cut short or are not HTTP at all.

The daemon (aiohttp) answers only well-formed HTTP, so the odd answers come from a small
server here that writes canned bytes: what is tested is the client's reading of them.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocp_agentd.cli.http11 import Connection, Disconnected, ProtocolError
from ocp_agentd.cli.transport import Target, Transport, Unavailable


class CannedServer:
    """A unix socket server: connection N reads one request per canned answer in
    ``answers[N]``, records it, writes the answer, and closes after the last one."""

    def __init__(self, path: Path, answers: list[list[bytes]]) -> None:
        self.path = path
        self.answers = answers
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.listener.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for answers in self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                for answer in answers:
                    self.requests.append(_read_request(conn))
                    conn.sendall(answer)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return data


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers: list[CannedServer] = []

    def start(*connections: list[bytes]) -> CannedServer:
        server = CannedServer(tmp_path / f"s{len(servers)}.sock", list(connections))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def connect(server: CannedServer) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(server.path))
    return Connection(sock, "ocp-agentd")


def test_content_length_keep_alive_and_the_request_sent(serve) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Twice: a\r\n"
                    b"x-twice: b\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
                    b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"])
    conn = connect(server)
    first = conn.request("GET", "/api/v1/status", {"Accept": "application/json"})
    assert (first.status, first.version, first.will_close) == (200, "HTTP/1.1", False)
    assert first.getheader("content-type") == "application/json"
    assert first.getheader("X-TWICE") == "a, b"
    assert first.getheader("X-None", "-") == "-"
    assert first.read() == b'{"a":1}'
    assert first.read() == b""
    second = conn.request("POST", "/api/v1/agent/reload", {})  # same connection
    assert (second.status, second.read()) == (201, b"ok")
    conn.close()
    get, post = server.requests
    assert get.startswith(b"GET /api/v1/status HTTP/1.1\r\nHost: ocp-agentd\r\n")
    assert b"Accept: application/json\r\n" in get and b"Content-Length" not in get
    # A POST without a body says so (RFC 9110 section 8.6), as http.client does.
    assert b"Content-Length: 0\r\n" in post


def test_chunked_lines_cross_chunks_and_read1_stays_in_one(serve) -> None:
    body = (b"4;ext=1\r\nab\nc\r\n6\r\nd\nefgh\r\n3\r\nij\n\r\n0\r\nTrailer: x\r\n\r\n")
    server = serve([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body] * 2)
    conn = connect(server)
    response = conn.request("GET", "/logs", {})
    assert response.will_close is False
    assert [response.readline() for _ in range(5)] == [b"ab\n", b"cd\n", b"efghij\n", b"", b""]
    again = conn.request("GET", "/logs", {})  # the trailer was read: the next answer parses
    assert again.read1(100) == b"ab\nc"  # no further than the chunk
    assert again.read() == b"d\nefghij\n"
    conn.close()


def test_until_close_http10_and_bodiless_answers(serve) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\n\r\nall of it"],
                   [b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"],
                   [b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\ny",
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"])
    conn = connect(server)
    response = conn.request("GET", "/", {})
    assert response.will_close is True and response.read() == b"all of it"
    conn.close()
    conn = connect(server)
    response = conn.request("GET", "/", {})
    assert response.will_close is True and response.read() == b"x"
    conn.close()
    conn = connect(server)
    response = conn.request("GET", "/", {})
    assert response.will_close is False and response.read() == b"y"
    response = conn.request("GET", "/", {})
    assert (response.status, response.read(), response.will_close) == (204, b"", False)
    conn.close()


@pytest.mark.parametrize(("answer", "error"), [
    (b"", Disconnected),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 OK\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nabcde", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n", ProtocolError),
])
def test_answers_that_are_cut_short_or_not_http(serve, answer: bytes, error: type) -> None:
    server = serve([answer])
    conn = connect(server)
    try:
        with pytest.raises(error):
            conn.request("GET", "/", {}).read()
    finally:
        conn.close()


def test_transport_reconnects_once_when_the_daemon_closed_a_kept_connection(serve) -> None:
    envelope = b'{"successful": true, "status": 200, "data": %d}'
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d"
              b"\r\n\r\n")
    first, second = (answer % len(envelope % n) + envelope % n for n in (1, 2))
    # The first connection answers once and closes without saying so (an idle timeout).
    server = serve([first], [second])
    transport = Transport(Target(socket_path=str(server.path)))
    try:
        assert transport.request("GET", "/api/v1/status") == 1
        assert transport.request("GET", "/api/v1/status") == 2
    finally:
        transport.close()
    assert len(server.requests) == 2


def test_transport_says_what_went_wrong(serve, tmp_path: Path) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"], [b""])
    transport = Transport(Target(socket_path=str(server.path)))
    with pytest.raises(Unavailable, match="ocp-agentd is not running"):
        transport.request("GET", "/api/v1/status")  # a body cut short
    with pytest.raises(Unavailable, match="ocp-agentd closed the connection on "):
        transport.request("GET", "/api/v1/status")
    missing = Transport(Target(socket_path=str(tmp_path / "none.sock")))
    with pytest.raises(Unavailable, match=r"not running \(no socket at .*none.sock; "):
        missing.request("GET", "/api/v1/status")
    with pytest.raises(ValueError, match="--url must be"):
        Transport(Target(url="ftp://host"))
    # Nothing the operator types may split the request line or a header.
    with pytest.raises(ValueError, match="--url must not hold spaces"):
        Transport(Target(url="http://host:1/a b"))
    with pytest.raises(ValueError, match="token must not hold"):
        Transport(Target(url="http://host:1", token="t\r\nX-Forged: 1"))
