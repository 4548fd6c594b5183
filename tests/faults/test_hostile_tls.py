"""Hostile input on the TLS listener (SPEC section 11): handshake garbage, handshakes that
never finish, client certificates from another CA or expired. The daemon refuses them,
keeps serving good clients and does not leak connection slots."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import Pki
from harness import DaemonPool, DaemonRunner, free_port, wait_for

pytestmark = pytest.mark.faults

TOKEN = "hostile-tls-token-77c2"


class TlsTarget:
    def __init__(self, runner: DaemonRunner, port: int, pki: Pki,
                 server_ca: tuple[Path, Path], client_ca: tuple[Path, Path]) -> None:
        self.runner = runner
        self.port = port
        self.pki = pki
        self.server_ca = server_ca
        self.client_ca = client_ca
        self.good = pki.leaf("good-client", client_ca, san="DNS:client")

    def get(self, cert: tuple[Path, Path] | None) -> int:
        """GET /api/v1/status over mTLS with ``cert``; the HTTP status."""
        context = ssl.create_default_context(cafile=str(self.server_ca[0]))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=15)
        try:
            conn.request("GET", "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[TlsTarget]:
    base = tmp_path_factory.mktemp("hostile-tls")
    pki = Pki(base / "pki")
    server_ca = pki.ca("server-ca")
    cert, key = pki.leaf("server", server_ca)
    client_ca = pki.ca("client-ca")
    pool = DaemonPool(base)
    port = free_port()
    tokens = [{"name": "ocp-server", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]
    try:
        runner = pool.make(overrides={"api": {
            "tcp": f"127.0.0.1:{port}", "tokens": tokens, "tls_cert": str(cert),
            "tls_key": str(key), "tls_client_ca": str(client_ca[0])}}, wait_running=True)
        yield TlsTarget(runner, port, pki, server_ca, client_ca)
        assert runner.running, "the daemon died of hostile TLS input"
    finally:
        pool.cleanup()


def test_foreign_and_expired_client_certificates_are_refused(target, figures):
    assert target.get(target.good) == 200
    stranger = target.pki.ca("stranger-ca")
    cases = {
        "no certificate": None,
        # Same subject and extensions as the good client, signed by another CA.
        "another CA": target.pki.leaf("impostor", stranger, san="DNS:client"),
        "expired": target.pki.leaf("expired", target.client_ca, san="DNS:client",
                                   start="20200101000000Z", end="20200102000000Z"),
        "not yet valid": target.pki.leaf("future", target.client_ca, san="DNS:client",
                                         start="20990101000000Z", end="20990102000000Z"),
    }
    refused = []
    for why, cert in cases.items():
        try:
            status = target.get(cert)
        except (ssl.SSLError, ConnectionError, http.client.HTTPException):
            refused.append(why)
            continue
        pytest.fail(f"a client with {why} got HTTP {status}")
    assert refused == list(cases)
    assert target.get(target.good) == 200
    figures["refused client certificates"] = ", ".join(refused)


def test_handshake_garbage_and_stalled_handshakes_leave_the_listener_serving(target, figures):
    garbage = [
        b"\x16\x03\x01\xff\xffnot-a-client-hello" * 20,
        b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x80\x2b\x01\x00\x02" + b"\x00" * 40,  # an SSLv2-style hello
        bytes(range(256)) * 8,
    ]
    sent = 0
    # More garbage handshakes than the listener holds connections (256): slots must come back.
    for round_ in range(300):
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", target.port), timeout=10) as raw:
            raw.sendall(garbage[round_ % len(garbage)])
            sent += 1
            raw.settimeout(10)
            with contextlib.suppress(OSError):
                assert not raw.recv(100).startswith(b"HTTP/")
    started = time.monotonic()
    assert target.get(target.good) == 200
    figures["garbage handshakes"] = sent
    # Handshakes that never finish hold a descriptor until the handshake deadline.
    stalled = [socket.create_connection(("127.0.0.1", target.port), timeout=10)
               for _ in range(50)]
    try:
        assert target.get(target.good) == 200
        wait_for(lambda: all(_closed(s) for s in stalled), timeout=30,
                 message="stalled handshakes dropped at the deadline")
        figures["50 stalled handshakes dropped after (s)"] = round(
            time.monotonic() - started, 1)
    finally:
        for sock in stalled:
            sock.close()
    assert target.get(target.good) == 200
    assert target.runner.status()["state"] == "running"


def _closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
