"""The API's listeners: the unix socket (always) and TCP (when api.tcp is set).

Everything that reaches into aiohttp's internals is here: the per-connection handler
class swapped so protocol errors get the envelope too, and the TCP site's connection cap
and header deadline (which wraps aiohttp's protocol objects).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import grp
import ipaddress
import logging
import os
import resource
import socket
import ssl
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ocp_agentd import safefs
from ocp_agentd.api import envelope
from ocp_agentd.api.auth import AUTH
from ocp_agentd.api.context import APP_CTX
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.config import ApiSection, Settings
from ocp_agentd.descriptors import guard_listener
from ocp_agentd.headers import TRACE_HEADER
from ocp_agentd.logsafe import escape

log = logging.getLogger("ocp_agentd.api")


# --- protocol errors ----------------------------------------------------------------------


class _EnvelopeRequestHandler(RequestHandler):  # type: ignore[type-arg]
    """Answers what aiohttp rejects before any route or middleware runs (a request line or
    header that does not parse, a bad Content-Length) with the envelope too."""

    server_address = "127.0.0.1"

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was already partly sent")
        trace_id = envelope.new_trace_id()
        if status >= 500:
            log.error("internal error in the HTTP layer (trace %s)", trace_id, exc_info=exc,
                      extra={"TRACE_ID": trace_id})
            error = ApiError(ErrorCode.INTERNAL,
                             f"internal error; the daemon log has the details (trace {trace_id})")
        else:
            first_line = (message or "").strip().splitlines()[0:1]
            reason = first_line[0][:200] if first_line else "unreadable"
            log.debug("rejected a malformed request: %s (trace %s)", escape(reason), trace_id)
            code = ErrorCode.BODY_TOO_LARGE if status == 413 else ErrorCode.BAD_REQUEST
            error = ApiError(code, f"malformed HTTP request: {reason}", http_status=status)
        body = envelope.error(error, trace_id=trace_id, server=self.server_address, duration_ms=0)
        response = envelope.response(body, status)
        response.headers[TRACE_HEADER] = trace_id
        response.force_close()
        return response


class _EnvelopeServer(web.Server):
    def __call__(self) -> RequestHandler:  # type: ignore[type-arg]
        return _EnvelopeRequestHandler(self, loop=self._loop, **self._kwargs)


def _envelope_protocol_errors(runner: web.AppRunner, server_address: str) -> None:
    # aiohttp has no setting for the class of its per-connection handler; the server object
    # it built is switched to the subclass above, which only changes that class.
    server = runner.server
    if type(server) is web.Server:
        server.__class__ = _EnvelopeServer
        _EnvelopeRequestHandler.server_address = server_address


# --- listeners ----------------------------------------------------------------------------


class ApiStartError(Exception):
    """The API cannot listen (socket in use, bad path, port taken)."""


@dataclass
class ApiServer:
    runner: web.AppRunner
    socket_path: Path
    tcp_address: tuple[str, int] | None
    _socket_identity: tuple[int, int] | None = None
    tls: ssl.SSLContext | None = None

    def reload_tls(self, api: ApiSection) -> None:
        """Re-reads the certificate files into the live TLS context (new connections use
        them). Raises ssl.SSLError or OSError, leaving the context as it was only when the
        first file fails; a TLS setting turned on or off needs a restart."""
        if self.tls is not None and api.tls_cert is not None:
            load_tls(self.tls, api)

    async def close(self) -> None:
        """Stops listening and removes the socket file (when it is still ours)."""
        await self.runner.cleanup()
        with contextlib.suppress(OSError):
            st = os.lstat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._socket_identity:
                os.unlink(self.socket_path)


async def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiStartError(f"{path} exists and is not a socket; refusing to replace it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed stale API socket %s", path)
        return
    except (OSError, TimeoutError) as exc:
        raise ApiStartError(f"cannot check the existing socket {path}: {exc}") from exc
    writer.close()
    raise ApiStartError(f"another process already answers on {path}")


def socket_dir_problem(path: Path) -> str | None:
    """Why the socket's directory cannot be trusted (others could rename the socket and
    answer in its place), else None. A sticky directory owned by root is accepted."""
    return safefs.check_directory(path.parent, owner=os.getuid())


# Both listeners' queues of connections not yet accepted (the kernel caps them at
# net.core.somaxconn): a burst of clients while the daemon is busy must find room. While a
# unix socket's queue is full a client's connect fails at once with EAGAIN (connect(2)),
# and asyncio's clients then fail their first write with ENOTCONN (CPython gh-117208);
# while a TCP queue is full the kernel drops the handshake, and the client waits a second
# or more for its SYN to be sent again.
LISTEN_QUEUE = 4096
# Connections the event loop accepts per wake-up on the unix socket (asyncio also hands
# this number to listen(), which is why LISTEN_QUEUE is set again after it): a burst is
# served in turns with other work.
UNIX_ACCEPTS = 128


def _bind_unix(path: Path, mode: int, gid: int = -1) -> socket.socket:
    """A listening unix socket at ``path`` that has ``mode`` (and group ``gid``, -1 to keep
    the daemon's) before anyone can reach it.

    The socket is bound inside a fresh 0700 directory made next to ``path`` (no one else
    can enter it, so the chmod and chown cannot be turned against another file), then
    renamed into place. Raises safefs.UnsafePath when others can write the directory of
    ``path``, OSError when binding fails.
    """
    os.close(safefs.open_directory(path.parent, owner=os.getuid()))
    private = Path(tempfile.mkdtemp(prefix=".", dir=path.parent))
    temporary = private / "s"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chown(temporary, -1, gid, follow_symlinks=False)
        os.chmod(temporary, mode)
        os.rename(temporary, path)
        sock.listen(LISTEN_QUEUE)
    except OSError:
        sock.close()
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        os.rmdir(private)
    sock.setblocking(False)
    return sock


def tls_context(api: ApiSection) -> ssl.SSLContext | None:
    """The TCP listener's TLS context (TLS 1.2+; a client certificate signed by
    tls_client_ca required when that is set), or None without tls_cert. Raises
    ssl.SSLError or OSError when the files cannot be read."""
    if api.tls_cert is None or api.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_tls(context, api)
    return context


def load_tls(context: ssl.SSLContext, api: ApiSection) -> None:
    """(Re)reads the certificate, key and client CA into ``context``: connections made
    afterwards use them (SPEC section 11: certificates are re-read on reload)."""
    assert api.tls_cert is not None and api.tls_key is not None
    context.load_cert_chain(api.tls_cert, api.tls_key)
    if api.tls_client_ca is not None:
        context.load_verify_locations(cafile=api.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=LISTEN_QUEUE)
    sock.setblocking(False)
    return sock


# TCP connections held at once. Past it new ones are closed on arrival: clients that
# connect and send nothing cannot use up the daemon's file descriptors (programs could no
# longer be spawned or watched, and the unix socket would stop answering).
MAX_TCP_CONNECTIONS = 256
# A TCP client has this long to send its first request's headers (every client sends them
# with the connection; 3 s leaves room for a busy host), so slow or silent clients (a byte
# a second) cannot keep connections, and so every other TCP caller, out for long.
HEADER_SECONDS = 3.0
# The TLS handshake's own deadline (before a connection counts against the cap).
TLS_HANDSHAKE_SECONDS = 10.0
# Connections one peer address may hold while they have not sent their first request's
# headers (so have not authenticated). Loopback peers are exempt: every local client is
# 127.0.0.1, and a local user capping it would lock out the local callers; for them (and
# for many addresses) a full table closes the oldest of these connections instead.
MAX_PENDING_PER_PEER = 32
# An idle keep-alive connection is closed after this long (aiohttp's default is 75 s), so
# clients that make one request and then sit on the connection hold a slot briefly.
KEEPALIVE_SECONDS = 15.0


def _tcp_connection_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_TCP_CONNECTIONS
    return max(8, min(MAX_TCP_CONNECTIONS, soft // 4))


def peer_key(peername: Any) -> str | None:
    """The address a per-peer cap counts ``peername`` (a socket's ``getpeername()``) under:
    the IPv4 address, or the /64 network of an IPv6 one (one host usually holds a whole
    /64); None for loopback and anything unparsable (not capped per peer)."""
    try:
        address = ipaddress.ip_address(peername[0])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Counted(asyncio.Protocol):
    """Passes everything to aiohttp's handler; tells the site when the connection ends and
    drops it when its first request's headers are not complete within HEADER_SECONDS.

    Until those headers are complete the connection is *pending*: the site may close it
    to make room (:meth:`evict`), and counts it against its peer's MAX_PENDING_PER_PEER.
    """

    def __init__(self, inner: asyncio.Protocol, site: _CappedSite) -> None:
        self._inner = inner
        self._site = site
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._transport: asyncio.BaseTransport | None = None
        self._counted = False
        self.peer: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Counted once made: over TLS that is after the handshake, and a failed handshake
        # never calls connection_lost (its time is bounded by ssl_handshake_timeout).
        self.peer = peer_key(transport.get_extra_info("peername"))
        if not self._site.admit(self):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._transport = transport
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(
            HEADER_SECONDS, transport.abort  # type: ignore[attr-defined]
        )
        self._inner.connection_made(transport)

    def evict(self) -> None:
        """Closes this pending connection to make room for a new one; its slot is free at
        once."""
        self._release()
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]

    def _headers_done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._site.settled(self)

    def _release(self) -> None:
        self._headers_done()
        if self._counted:
            self._counted = False
            self._site.live -= 1

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._headers_done()
            self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self._transport is not None:
            self._inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _CappedSite(web.SockSite):
    """A listening socket site that holds at most ``limit`` connections at once.

    When it is full, a new connection closes the oldest connection that has not yet sent
    its first request's headers (so a caller that sends its request at once is served even
    while slow clients hold every slot), and is refused only when no such one is left. A
    non-loopback peer holds at most MAX_PENDING_PER_PEER of those pending connections.
    """

    def __init__(self, runner: web.AppRunner, sock: socket.socket, limit: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self.limit = limit
        self.live = 0
        # Pending connections, oldest first (dicts keep insertion order).
        self.pending: dict[_Counted, None] = {}
        self.pending_by_peer: collections.Counter[str] = collections.Counter()
        self.evicted = 0
        self._warned = False

    def _protocol(self) -> asyncio.Protocol:
        if self.live >= self.limit and not self._evict_oldest():
            if not self._warned:
                log.warning("API: %d TCP connections open, refusing more", self.live)
            self._warned = True
            return _Refused()
        self._warned = False
        server = self._runner.server
        assert server is not None
        return _Counted(server(), self)

    def _evict_oldest(self) -> bool:
        for connection in self.pending:
            connection.evict()
            self.evicted += 1
            return True
        return False

    def admit(self, connection: _Counted) -> bool:
        """Counts a new connection in, pending; False (not counted) when its peer holds
        MAX_PENDING_PER_PEER pending connections already."""
        if connection.peer is not None:
            if self.pending_by_peer[connection.peer] >= MAX_PENDING_PER_PEER:
                return False
            self.pending_by_peer[connection.peer] += 1
        self.pending[connection] = None
        self.live += 1
        return True

    def settled(self, connection: _Counted) -> None:
        """``connection`` is pending no more (its headers came, or it ended)."""
        if connection not in self.pending:
            return
        del self.pending[connection]
        if connection.peer is not None:
            self.pending_by_peer[connection.peer] -= 1
            if not self.pending_by_peer[connection.peer]:
                del self.pending_by_peer[connection.peer]

    async def start(self) -> None:
        await web.BaseSite.start(self)
        # The loop accepts up to `backlog` connections per wake-up before any is refused:
        # a small one keeps that burst of descriptors small too.
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, sock=self._sock, backlog=32, ssl=self._ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS if self._ssl_context else None,
        )
        self._sock.listen(LISTEN_QUEUE)  # the queue stays deep; see LISTEN_QUEUE


async def start_api(app: web.Application, settings: Settings) -> ApiServer:
    """Serves ``app`` on the unix socket (always) and on api.tcp (when set)."""
    api = settings.api
    path = Path(api.socket)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0,
                           keepalive_timeout=KEEPALIVE_SECONDS)
    await runner.setup()
    _envelope_protocol_errors(runner, app[APP_CTX].server_address)
    server: ApiServer | None = None
    try:
        problem = socket_dir_problem(path)
        if problem is not None:
            raise ApiStartError(f"api.socket: {problem}")
        await _remove_stale_socket(path)
        gid = grp.getgrnam(api.socket_group).gr_gid if api.socket_group else -1
        try:
            unix_sock = _bind_unix(path, api.socket_mode_int, gid)
        except OSError as exc:
            raise ApiStartError(f"cannot listen on {path}: {exc}") from exc
        st = os.stat(path)
        app[AUTH].socket_gid = st.st_gid
        server = ApiServer(runner, path, None, (st.st_dev, st.st_ino))
        # Guarded: out of descriptors, accepting pauses instead of spinning (descriptors.py).
        guarded = guard_listener(unix_sock)
        await web.SockSite(runner, guarded, backlog=UNIX_ACCEPTS).start()
        guarded.listen(LISTEN_QUEUE)
        log.info("API listening on %s (mode %s)", path, api.socket_mode)
        if api.tcp_host_port is not None:
            host, port = api.tcp_host_port
            try:
                tcp_sock = _bind_tcp(host, port)
            except OSError as exc:
                raise ApiStartError(f"cannot listen on {api.tcp}: {exc}") from exc
            server.tcp_address = tcp_sock.getsockname()[:2]
            limit = _tcp_connection_limit()
            try:
                server.tls = tls_context(api)
            except (OSError, ssl.SSLError) as exc:
                tcp_sock.close()
                raise ApiStartError(f"api.tls_cert/tls_key/tls_client_ca: {exc}") from exc
            await _CappedSite(runner, guard_listener(tcp_sock), limit, server.tls).start()
            log.info("API listening on %s:%s%s (at most %d connections)", *server.tcp_address,
                     " with TLS" + (" and client certificates" if api.tls_client_ca else "")
                     if server.tls else "", limit)
    except BaseException:
        if server is not None:
            await server.close()
        else:
            await runner.cleanup()
        raise
    return server
