"""Who is calling, and what may they do.

On the unix socket the kernel tells who the peer is (SO_PEERCRED): root, the daemon's own
user and members of the socket file's group hold every permission. Anyone else on the
socket, and every TCP caller, sends ``Authorization: Bearer <token>``; the token's sha256 is
compared with every configured token in constant time (no early exit), and that token's
permissions apply.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from aiohttp import web

from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.config import PERMISSIONS, ApiSection
from ocp_agentd.logsafe import escape

ALL_PERMISSIONS = frozenset(PERMISSIONS)
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a description for the log and its permissions."""

    who: str
    permissions: frozenset[str]
    token: str | None = None  # the token's name, when a token authenticated the caller


# Where a request keeps its peer's credentials once read (the key of a request's state).
_PEER_KEY = "ocp_agentd_peer"


def peer_credentials(request: web.Request) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix socket peer; None for TCP. As read_peer() read it for
    this request (authentication does, first), else read now."""
    try:
        return request[_PEER_KEY]  # type: ignore[no-any-return]
    except KeyError:
        return read_peer(request)


def read_peer(request: web.Request) -> tuple[int, int, int] | None:
    """peer_credentials() from the kernel: SO_PEERCRED, the peer's credentials when it
    connected (socket(7)); kept in the request for its audit line."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        peer = None
    else:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        peer = _PEERCRED.unpack(raw)
    request[_PEER_KEY] = peer
    return peer


def describe_peer(request: web.Request) -> str:
    """Who is at the other end, for the audit line: "uid U pid P" on the unix socket,
    "address HOST:PORT" on TCP (SPEC section 11)."""
    peer = peer_credentials(request)
    if peer is not None:
        return f"uid {peer[1]} pid {peer[0]}"
    transport = request.transport
    address = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(address, tuple) and len(address) >= 2:
        return f"address {address[0]}:{address[1]}"
    return "address unknown"


class Authenticator:
    """Reads ``api.tokens`` on every request, so a reload that replaces them takes effect."""

    def __init__(self, api: ApiSection) -> None:
        self._api = api
        self.daemon_uid = os.getuid()
        # The socket file's group; set by start_api once the socket exists.
        self.socket_gid: int | None = None

    def _trusted_peer(self, uid: int, gid: int) -> bool:
        if uid in (0, self.daemon_uid):
            return True
        group = self.socket_gid
        if group is None:
            return False
        if gid == group:
            return True
        try:
            user = pwd.getpwuid(uid).pw_name
            return user in grp.getgrgid(group).gr_mem
        except KeyError:
            return False

    def _token(self, header: str | None, peer: str) -> Caller:
        scheme, _, token = (header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                ErrorCode.UNAUTHENTICATED,
                "credentials required: send 'Authorization: Bearer <token>'",
            )
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest().encode()
        found: tuple[str, frozenset[str]] | None = None
        for spec in self._api.tokens:
            # Every token is compared, whatever matched before: the time taken does not
            # tell which (or whether a) token matched.
            expected = spec.sha256.lower().encode("ascii")
            if hmac.compare_digest(digest, expected) and found is None:
                found = (spec.name, frozenset(spec.permissions))
        if found is None:
            raise ApiError(ErrorCode.UNAUTHENTICATED, "unknown token")
        return Caller(f"token {escape(found[0])} from {peer}", found[1], found[0])

    def authenticate(self, request: web.Request) -> Caller:
        """The caller (``who`` names it for the audit line: peer uid and pid on the socket,
        token name and peer address otherwise), or ApiError 1004."""
        peer = read_peer(request)
        if peer is not None:
            pid, uid, gid = peer
            if self._trusted_peer(uid, gid):
                return Caller(f"uid {uid} pid {pid}", ALL_PERMISSIONS)
        return self._token(request.headers.get("Authorization"), describe_peer(request))

    @staticmethod
    def authorize(caller: Caller, permission: str | None) -> None:
        """ApiError 1005 unless the caller holds ``permission`` (None: any caller)."""
        if permission is not None and permission not in caller.permissions:
            raise ApiError(
                ErrorCode.FORBIDDEN,
                f"{caller.who} lacks the {permission} permission",
                target=permission,
            )


# The app's Authenticator (set by app.create_app; start_api gives it the socket's group).
AUTH: web.AppKey[Authenticator] = web.AppKey("ocp_agentd_auth")
