"""Keep-alive HTTP over a unix socket, for both supervisors.

Both clients are http.client on one persistent AF_UNIX connection: supervisord's
XML-RPC through an xmlrpc.client transport, ocp-agentd's JSON API directly. Same
weight on the client side, so the figures compare the servers.
"""

from __future__ import annotations

import http.client
import json
import socket
import xmlrpc.client
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """xmlrpc.client transport that keeps one HTTP/1.1 connection on a unix socket."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__()
        self.unix_path = path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, UnixHTTPConnection(self.unix_path, self.timeout)
        return self._connection[1]


def xmlrpc_proxy(path: str, timeout: float = 60.0) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy("http://localhost", transport=UnixTransport(path, timeout))


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class JsonUnixClient:
    """ocp-agentd's API: JSON envelopes over one keep-alive unix-socket connection."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self._conn: UnixHTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, url: str, body: Any = None) -> Any:
        """Answers the envelope's data; raises ApiError on an unsuccessful answer."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = UnixHTTPConnection(self.path, self.timeout)
            try:
                self._conn.request(method, url, body=payload, headers=headers)
                response = self._conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed an idle keep-alive connection: reconnect once.
                self.close()
                if attempt:
                    raise
                continue
            if response.will_close:
                self.close()
            envelope = json.loads(raw) if raw else {}
            if response.status >= 400 or not envelope.get("successful", True):
                raise ApiError(response.status, envelope.get("error", envelope))
            return envelope.get("data", envelope)
        raise AssertionError("unreachable")
