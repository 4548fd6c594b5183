"""The part of HTTP/1.1 (RFC 9112) that ocp-agentctl speaks, over one connected socket.

http.client would do, but it parses headers with the ``email`` package, which alone costs
more start-up than the rest of a command; this module needs nothing beyond the socket.

    connection = Connection(sock, host="ocp-agentd")  # a connected unix, TCP or TLS socket
    response = connection.request("GET", "/api/v1/status", {"Accept": "application/json"})
    response.status, response.getheader("Content-Type"), response.read()

An answer is framed as RFC 9112 section 6.3 says: chunked transfer coding, else
Content-Length, else it lasts until the server closes (and so does an HTTP/1.0 answer
without ``Connection: keep-alive``: ``will_close``). One answer is read at a time, in full,
before the next request on the same connection (no pipelining).

Errors: :class:`Disconnected` (a ConnectionResetError) when the server closes before the
status line, :class:`ProtocolError` for anything that is not an HTTP/1.x answer, or a body
cut short; socket errors (OSError, TimeoutError) pass through.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping

MAX_LINE = 65536  # bytes of a status line, a header line or a chunk-size line
MAX_HEADERS = 100
# RFC 9110 section 9.3: these methods carry a body; without one, say so (Content-Length: 0).
BODY_METHODS = ("POST", "PUT", "PATCH")


class ProtocolError(Exception):
    """The answer is not HTTP/1.x, or it ended before its body did."""


class Disconnected(ConnectionResetError):
    """The server closed the connection without answering (e.g. an idle keep-alive
    connection it had closed meanwhile)."""


class Connection:
    """One connection: ``request`` sends a request and answers its :class:`Response`,
    whose head is read and whose body is not; read it (or close) before the next request.
    ``host``: the Host header (RFC 9112 section 3.2)."""

    def __init__(self, sock: socket.socket, host: str) -> None:
        self.sock = sock
        self.host = host
        self._reader = sock.makefile("rb")

    def request(self, method: str, target: str, headers: Mapping[str, str],
                body: bytes | None = None) -> Response:
        """Sends one request; answers the response once its head arrived."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in BODY_METHODS:
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sock.sendall(head + (body or b""))
        return Response(self, method)

    def readline(self) -> bytes:
        """One line of the answer (with its line end), at most MAX_LINE bytes."""
        line = self._reader.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ProtocolError("an answer line is longer than 64 KiB")
        return line

    def close(self) -> None:
        self._reader.close()
        self.sock.close()


class Response:
    """An answer: ``status`` (int), ``version`` ("HTTP/1.1"), ``getheader(name)``,
    ``will_close`` (the server ends the connection after it), and its body through
    ``read()`` (all of it), ``read1(n)`` (what has arrived, up to n bytes) and ``readline()``.
    ``close()`` closes the connection."""

    def __init__(self, connection: Connection, method: str) -> None:
        self._connection = connection
        self._reader = connection._reader
        self.version, self.status = _status_line(connection)
        while 100 <= self.status < 200 and self.status != 101:  # interim answers
            _headers(connection)
            self.version, self.status = _status_line(connection)
        self.headers = _headers(connection)
        self._chunked = "chunked" in self._tokens("transfer-encoding")
        self._left = 0  # bytes left: of the body (Content-Length) or of the current chunk
        self._chunk_read = False  # a chunk's data was read: a CRLF follows it
        self._length: int | None = None
        self._done = False
        if method == "HEAD" or self.status in (204, 304):
            self._done = True
        elif not self._chunked and self.getheader("Content-Length") is not None:
            self._length = self._left = _content_length(self.getheader("Content-Length"))
            self._done = self._left == 0
        connection_tokens = self._tokens("connection")
        self.will_close = "close" in connection_tokens or (
            self.version == "HTTP/1.0" and "keep-alive" not in connection_tokens) or (
            not self._done and not self._chunked and self._length is None)

    def getheader(self, name: str, default: str | None = None) -> str | None:
        """The header's value (repeated headers joined by ", "), or ``default``."""
        return self.headers.get(name.lower(), default)

    def _tokens(self, name: str) -> list[str]:
        value = self.getheader(name) or ""
        return [token.strip().lower() for token in value.split(",")]

    def close(self) -> None:
        """Closes the connection (the answer's rest is not read)."""
        self._done = True
        self._connection.close()

    def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := self.read1(MAX_LINE):
            parts.append(chunk)
        return b"".join(parts)

    def read1(self, size: int = MAX_LINE) -> bytes:
        """Up to ``size`` bytes of the body, from at most one read of the socket; b"" at
        its end."""
        available = self._available()
        if available == 0:
            return b""
        data = self._reader.read1(min(size, available) if available > 0 else size)
        return self._consumed(data)

    def readline(self) -> bytes:
        """The body's next line (with its newline; without one at the body's end)."""
        parts: list[bytes] = []
        while True:
            available = self._available()
            if available == 0:
                break
            line = self._consumed(self._reader.readline(available if available > 0 else -1))
            parts.append(line)
            if line.endswith(b"\n"):
                break
        return b"".join(parts)

    def _available(self) -> int:
        """Bytes that may be read now without crossing the body's (or the chunk's) end:
        0 at the end of the body, -1 for a body that lasts until the server closes."""
        if self._done:
            return 0
        if self._chunked:
            if self._left == 0:
                self._next_chunk()
            return self._left
        return self._left if self._length is not None else -1

    def _consumed(self, data: bytes) -> bytes:
        if not data:
            if self._chunked or self._length is not None:
                raise ProtocolError("the connection closed in the middle of the answer")
            self._done = True  # the end of a body framed by the connection's end
            return data
        if self._chunked or self._length is not None:
            self._left -= len(data)
            self._chunk_read = True
            if not self._chunked and self._left == 0:
                self._done = True
        return data

    def _next_chunk(self) -> None:
        """Reads the next chunk's size line (RFC 9112 section 7.1), after the CRLF that
        ends the previous chunk's data; at the last chunk, the trailers too."""
        if self._chunk_read:
            if self._connection.readline() not in (b"\r\n", b"\n"):
                raise ProtocolError("a chunk is not followed by CRLF")
            self._chunk_read = False
        line = self._connection.readline()
        if not line:
            raise ProtocolError("the connection closed in the middle of the answer")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
        if size < 0:
            raise ProtocolError(f"bad chunk size line {line[:40]!r}")
        if size == 0:
            _headers(self._connection)  # the trailer section, ignored
            self._done = True
        self._left = size


def _status_line(connection: Connection) -> tuple[str, int]:
    line = connection.readline()
    if not line:
        raise Disconnected("the server closed the connection without answering")
    parts = line.decode("latin-1").rstrip("\r\n").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit() \
            or len(parts[1]) != 3:
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:40]!r}")
    return parts[0], int(parts[1])


def _headers(connection: Connection) -> dict[str, str]:
    """The header section up to its empty line: lower-cased names, repeated ones joined."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = connection.readline()
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise ProtocolError("the connection closed in the middle of the answer's head")
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip():
            raise ProtocolError(f"bad header line {line[:40]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise ProtocolError(f"more than {MAX_HEADERS} headers")


def _content_length(text: str | None) -> int:
    # Repeated identical values ("5, 5") are allowed (RFC 9110 section 8.6).
    values = {part.strip() for part in (text or "").split(",")}
    if len(values) != 1 or not (value := values.pop()).isdigit():
        raise ProtocolError(f"bad Content-Length {text!r}")
    return int(value)
