"""ocp-agentctl over TLS: --url https://, --cacert, --cert/--key (mutual TLS), --token.

The server here is a standard-library HTTPS server with certificates made by openssl for
the test: it checks what the client sends (certificate, token) and answers the envelope of
GET /api/v1/status. It stands in for the daemon's own TLS listener, which another module
provides; what is tested is the client's side of the handshake, for real.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CTL = [sys.executable, "-m", "ocp_agentd.cli"]
TOKEN = "tls-test-token"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by it."""
    files = {name: folder / name for name in (
        "ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "client.key",
        "client.csr", "client.pem", "ext.cnf")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=test CA", "-keyout", str(files["ca.key"]),
            "-out", str(files["ca.pem"]))
    files["ext.cnf"].write_text("subjectAltName = IP:127.0.0.1\n")
    for who in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
                "-keyout", str(files[f"{who}.key"]), "-out", str(files[f"{who}.csr"]))
        openssl("x509", "-req", "-in", str(files[f"{who}.csr"]), "-CA", str(files["ca.pem"]),
                "-CAkey", str(files["ca.key"]), "-CAcreateserial", "-days", "2",
                "-extfile", str(files["ext.cnf"]), "-out", str(files[f"{who}.pem"]))
    return files


class _Status(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            body = {"successful": False, "status": 401, "traceId": "0" * 16,
                    "error": {"code": 1004, "message": "no or unknown credentials"}}
        else:
            peer = self.connection.getpeercert()  # type: ignore[attr-defined]
            subject = dict(x[0] for x in peer["subject"]) if peer else {}
            body = {"successful": True, "status": 200, "traceId": "1" * 16,
                    "data": {"version": "tls", "pid": 1, "client": subject.get("commonName")}}
        payload = json.dumps(body).encode()
        self.send_response(body["status"])
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, Path]]]:
    files = make_pki(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["server.pem"], files["server.key"])
    context.load_verify_locations(files["ca.pem"])
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCP_AGENT")}
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=60, env=env)


def test_mutual_tls_with_token(tls_server) -> None:
    url, files = tls_server
    mtls = ("--cacert", str(files["ca.pem"]), "--cert", str(files["client.pem"]),
            "--key", str(files["client.key"]))
    result = ctl("--url", url, *mtls, "--token", TOKEN, "version", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["daemon"] == "tls"

    # The server's certificate is not trusted without --cacert.
    result = ctl("--url", url, "--token", TOKEN, "version")
    assert result.returncode == 3 and "TLS" in result.stderr and "Traceback" not in result.stderr
    # No client certificate: the server refuses the handshake.
    result = ctl("--url", url, "--cacert", str(files["ca.pem"]), "--token", TOKEN, "version")
    assert result.returncode == 3 and "--cert and --key" in result.stderr
    # The token is checked after the handshake.
    result = ctl("--url", url, *mtls, "version")
    assert result.returncode == 1 and "code 1004" in result.stderr
    # TLS files without an https URL are a usage error.
    result = ctl("--cert", str(files["client.pem"]), "status")
    assert result.returncode == 2 and "--url" in result.stderr
