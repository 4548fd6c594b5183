"""The control API over the standard library: HTTP/1.1 on the unix socket or TCP/TLS.

ocp-agentctl answers in a few tens of milliseconds because it imports neither aiohttp nor
pydantic (SPEC section 12), nor http.client (cli/http11.py speaks the HTTP it needs), nor
ssl unless the URL is https. One :class:`Transport` keeps one keep-alive connection, so a
command that makes several requests (``status``: two) connects once.

    transport = Transport(Target(socket_path="/run/ocp_agentd/agentd.sock"))
    data = transport.request("GET", "/api/v1/status")     # the envelope's data
    for line in transport.stream_lines("/api/v1/events"):  # a streamed answer, line by line
        ...

Errors: :class:`ApiError` for an error envelope (SPEC section 4), :class:`Unavailable` when
nothing answers (exit status 3).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time

from ocp_agentd.cli.http11 import Connection, ProtocolError, Response

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterator
    from typing import Any

TRACE_HEADER = "X-OCP-Trace-ID"
TOKEN_ENV = "OCP_AGENTCTL_TOKEN"
DEFAULT_TIMEOUT = 660.0  # seconds: stop-all of slow programs may take minutes
CONNECT_TIMEOUT = 5.0


class ApiError(Exception):
    """The daemon answered an error envelope: ``code``, ``message``, HTTP ``status``,
    ``target``, ``trace_id`` and ``sub_errors`` as in SPEC section 4."""

    def __init__(self, code: int, message: str, status: int, target: str | None = None,
                 trace_id: str | None = None,
                 sub_errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.status = status
        self.target = target
        self.trace_id = trace_id
        self.sub_errors = list(sub_errors or [])

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "status": self.status,
                "target": self.target, "traceId": self.trace_id, "subErrors": self.sub_errors}


class Unavailable(Exception):
    """Nothing answers: no socket, connection refused, permission denied, timeout."""


class Target:
    """Where the daemon listens: a unix socket path, or an http(s) URL with TLS files.

    ``cacert``: PEM bundle that signs the server's certificate (default: the system's);
    ``cert``/``key``: the client certificate for mTLS (SPEC section 11). A plain class:
    dataclasses would import inspect, a tenth of the command's start-up.
    """

    def __init__(self, socket_path: str | None = None, url: str | None = None,
                 token: str | None = None, cacert: str | None = None,
                 cert: str | None = None, key: str | None = None) -> None:
        self.socket_path = socket_path
        self.url = url
        self.token = token
        self.cacert = cacert
        self.cert = cert
        self.key = key

    @property
    def where(self) -> str:
        return self.url or str(self.socket_path)


def _no_daemon_at(path: str) -> str:
    """Why nothing answered on the unix socket at path, told apart by what is there: no
    socket (the daemon is not running, or the path is not its socket), something else
    than a socket, or a socket nobody listens on (left by a daemon that was killed)."""
    hint = "is --socket or --config right?"
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"ocp-agentd is not running (no socket at {path}; {hint})"
    if not stat.S_ISSOCK(mode):
        return f"ocp-agentd is not running ({path} is not a socket; {hint})"
    return f"ocp-agentd is not running (no answer on {path})"


class _Url:
    """The parts of an http(s) URL the transport uses."""

    def __init__(self, url: str) -> None:
        # Imported here: only --url needs it, and urllib.parse is milliseconds of start-up.
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--url must be http://HOST:PORT or https://HOST:PORT, "
                             f"got {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.base_path = parts.path.rstrip("/")
        if _unsafe(self.base_path):
            raise ValueError(f"--url must not hold spaces or control characters, got {url!r}")


def _unsafe(text: str) -> bool:
    """True when ``text`` cannot go into a request line or header as it is: a control
    character, a space or DEL (RFC 9112 sections 3 and 5)."""
    return any(ord(char) <= 0x20 or ord(char) == 0x7F for char in text)


def _with_query(path: str, query: dict[str, Any] | None) -> str:
    if not query:
        return path
    # Imported here: most commands send no query, and urllib.parse costs start-up.
    from urllib.parse import urlencode

    return f"{path}?{urlencode(query)}"


def _unix_socket(path: str, timeout: float | None) -> socket.socket:
    """A socket connected to ``path`` within CONNECT_TIMEOUT (or ``timeout`` when shorter).

    A unix socket's connect with a timeout fails at once with EAGAIN while the daemon's
    listen queue is full, where TCP would wait (connect(2)): it is tried again, with short
    pauses, until the connect timeout. Raises OSError (TimeoutError once it has passed).
    """
    limit = min(CONNECT_TIMEOUT, timeout or CONNECT_TIMEOUT)
    deadline = time.monotonic() + limit
    pause = 0.002
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(limit)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path}: the daemon's listen queue stayed full") from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)
            continue
        except OSError:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock


def _tls_context(target: Target) -> ssl.SSLContext:
    # Imported here: ssl is a fifth of the start-up, and only https URLs need it.
    import ssl

    context = ssl.create_default_context(cafile=target.cacert)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if target.cert:
        context.load_cert_chain(target.cert, target.key)
    return context


def _tls_failure(exc: BaseException, target: Target) -> str | None:
    """The message for a TLS failure, None when ``exc`` is not one."""
    ssl = sys.modules.get("ssl")  # loaded when TLS was used; else exc is not a TLS error
    if ssl is None or not isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return None
    hint = ""
    if not target.cert and not isinstance(exc, ssl.SSLCertVerificationError):
        hint = " (if the daemon requires a client certificate: --cert and --key)"
    return f"TLS with ocp-agentd on {target.where} failed: {exc}{hint}"


class Transport:
    """One keep-alive connection to the daemon (reopened when the daemon closed it).
    Raises ValueError for a ``target.url`` that is not http(s)://HOST[:PORT][/PATH], or a
    token that cannot go into a header."""

    def __init__(self, target: Target, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.target = target
        self.timeout = timeout
        self.last_trace_id: str | None = None
        self._conn: Connection | None = None
        self._url = _Url(target.url) if target.url else None
        self._base_path = self._url.base_path if self._url else ""
        if target.token and _unsafe(target.token):
            raise ValueError("the token must not hold spaces or control characters")

    # ---- connections ------------------------------------------------------------------

    def _connect(self, timeout: float | None) -> Connection:
        """A new connection; OSError (TLS errors included) when none can be made."""
        target, url = self.target, self._url
        if url is None:
            assert target.socket_path is not None
            return Connection(_unix_socket(str(target.socket_path), timeout), "ocp-agentd")
        context = None
        if url.tls:
            try:
                context = _tls_context(target)
            except (OSError, ValueError) as exc:
                raise Unavailable(f"cannot load the TLS files: {exc}") from None
        sock = socket.create_connection((url.host, url.port), timeout)
        # As http.client does: a request goes out at once, not held back for more (Nagle).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            try:
                sock = context.wrap_socket(sock, server_hostname=url.host)
            except BaseException:
                sock.close()
                raise
        return Connection(sock, url.host_header)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _headers(self, body: bytes | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def _unavailable(self, exc: BaseException) -> Unavailable:
        where = self.target.where
        if isinstance(exc, PermissionError):
            return Unavailable(
                f"cannot connect to ocp-agentd on {where}: permission denied (root or the "
                "socket's group may use it; or pass --url and --token)")
        if isinstance(exc, TimeoutError):
            return Unavailable(f"ocp-agentd did not answer in time on {where}")
        tls = _tls_failure(exc, self.target)
        if tls:
            return Unavailable(tls)
        if isinstance(exc, ConnectionResetError):  # Disconnected included
            return Unavailable(f"ocp-agentd closed the connection on {where}")
        if self.target.socket_path is not None and not self.target.url:
            return Unavailable(_no_daemon_at(self.target.socket_path))
        return Unavailable(f"ocp-agentd is not running (no answer on {where})")

    def _send(self, method: str, path: str, body: bytes | None, timeout: float | None,
              fresh: bool = False) -> Response:
        """Sends one request; a keep-alive connection the daemon closed meanwhile is
        reopened once (only before anything of the answer was read)."""
        headers = self._headers(body)
        for attempt in (0, 1):
            reused = self._conn is not None and not fresh
            try:
                if self._conn is None or fresh:
                    self.close()
                    self._conn = self._connect(timeout)
                conn = self._conn
                conn.sock.settimeout(timeout)
                return conn.request(method, self._base_path + path, headers, body)
            except (BrokenPipeError, ConnectionResetError) as exc:  # Disconnected is one
                self.close()
                if reused and attempt == 0:
                    continue
                raise self._unavailable(exc) from None
            except (OSError, ProtocolError) as exc:
                self.close()
                raise self._unavailable(exc) from None
        raise AssertionError("unreachable")

    # ---- requests ---------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None, wait: float | None = None) -> Any:
        """The envelope's ``data``. ``wait``: seconds the daemon may take to act (an
        operation's timeout); the socket waits that plus 30 s."""
        timeout = self.timeout if wait is None else max(self.timeout, wait + 30)
        raw = None if body is None else json.dumps(body).encode()
        response = self._send(method, _with_query(path, query), raw, timeout)
        try:
            payload = response.read()
        except (OSError, ProtocolError) as exc:
            self.close()
            raise self._unavailable(exc) from None
        if response.will_close:
            self.close()
        return self._data(response, payload)

    def _data(self, response: Response, payload: bytes) -> Any:
        status = response.status
        self.last_trace_id = response.getheader(TRACE_HEADER)
        try:
            envelope = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(5000, f"the daemon answered HTTP {status} without an envelope",
                           status, trace_id=self.last_trace_id) from None
        if not isinstance(envelope, dict) or "successful" not in envelope:
            if 200 <= status < 300:
                return envelope  # an unwrapped document (the OpenAPI description)
            raise ApiError(5000, f"the daemon answered HTTP {status}", status)
        if envelope.get("successful"):
            return envelope.get("data")
        error = envelope.get("error") or {}
        raise ApiError(int(error.get("code", 5000)), str(error.get("message", status)),
                       int(envelope.get("status", status)), target=error.get("target"),
                       trace_id=envelope.get("traceId", self.last_trace_id),
                       sub_errors=error.get("subErrors"))

    def open_stream(self, path: str, query: dict[str, Any] | None = None,
                    timeout: float | None = None) -> Response:
        """A streamed answer (logs, events) on a connection of its own, which closing the
        answer closes; ``timeout``: the longest wait for more of it (None: no limit).
        ApiError when the daemon answers an error envelope instead."""
        path = _with_query(path, query)
        response = self._send("GET", path, None, timeout, fresh=True)
        self._conn = None  # the connection now belongs to the stream
        content_type = response.getheader("Content-Type") or ""
        if response.status >= 400 or content_type.startswith("application/json"):
            try:
                payload = response.read()
            except (OSError, ProtocolError) as exc:
                raise self._unavailable(exc) from None
            finally:
                response.close()
            self._data(response, payload)  # raises the envelope's error
            raise ApiError(5000, f"{path} answered JSON instead of a stream",
                           response.status, trace_id=self.last_trace_id)
        return response

    def stream_lines(self, path: str, query: dict[str, Any] | None = None,
                     timeout: float | None = None) -> Iterator[bytes]:
        """Each line (with its newline) of a streamed answer, as it arrives."""
        response = self.open_stream(path, query, timeout)
        try:
            while True:
                try:
                    line = response.readline()
                except (OSError, ProtocolError) as exc:
                    raise self._unavailable(exc) from None
                if not line:
                    return
                yield line
        finally:
            response.close()
