"""The API's transport as SPEC section 11 has it: log lines are data, the audit line, the
socket's directory and group, TCP refusals, TLS and mTLS (certificates made by the test)."""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from certs import Pki
from harness import ApiClient, check_config, free_port, wait_for, write_demo_config
from unixuser import reachable_dir, unix_user

TOKEN = "transport-token-5e1f"
TOKENS = [{"name": "ocp-server", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]
FORGED = "2026-01-01 00:00:00,000 INFO ocp_agentd.api: POST /api/v1/agent/stop-all -> 200"


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_no_request_can_start_a_line_of_the_daemon_log(daemon_factory):
    port = free_port()
    daemon = daemon_factory(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": TOKENS}})
    forged_path = "/api/v1/x%0A" + FORGED.replace(" ", "%20") + "%00%0D%1B[31m"
    for method in ("POST", "GET"):
        answer = raw_request(port, (
            f"{method} {forged_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            "Connection: close\r\n\r\n").encode())
        assert b" 401 " in answer.split(b"\r\n", 1)[0]
    wait_for(lambda: daemon.log().count("credential refused") >= 2, message="audit lines")
    log = daemon.log()
    assert not any(line.startswith(FORGED[:10]) and "stop-all -> 200" in line
                   for line in log.splitlines())
    assert "\x00" not in log and "\x1b" not in log
    assert "\\n2026-01-01" in log  # the newline is in the line, escaped


def test_audit_lines_name_who_what_trace_and_outcome(daemon_factory):
    port = free_port()
    daemon = daemon_factory(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": TOKENS}},
                            wait_running=True)
    answer = daemon.post("/api/v1/processes/ocp_exporter/verify",
                         headers={"X-OCP-Trace-ID": "a1b2c3d4e5f60718"})
    assert answer.status == 200
    tcp = ApiClient(host="127.0.0.1", port=port, token=TOKEN)
    assert tcp.post("/api/v1/processes/ocp_exporter/verify").status == 200
    assert ApiClient(host="127.0.0.1", port=port, token="nope").post(
        "/api/v1/agent/stop-all").status == 401

    def lines() -> list[str]:
        return [line for line in daemon.log().splitlines() if "audit: " in line]

    wait_for(lambda: len(lines()) >= 3, message="three audit lines")
    socket_line, token_line, refused_line = lines()[-3:]
    assert "POST /api/v1/processes/ocp_exporter/verify -> 200" in socket_line
    assert "by uid 0 pid " in socket_line and "(trace a1b2c3d4e5f60718)" in socket_line
    assert "INFO" in socket_line
    assert "by token ocp-server from address 127.0.0.1:" in token_line
    assert "POST /api/v1/agent/stop-all -> 401 code 1004" in refused_line
    assert "unauthenticated address 127.0.0.1:" in refused_line
    assert "credential refused" in refused_line


@pytest.mark.parametrize("level", ["DEBUG", "INFO"])
def test_reads_are_audited_at_debug_only(daemon_factory, level):
    daemon = daemon_factory(env={"OCP_AGENTD_LOG_LEVEL": level}, wait_running=True)
    assert daemon.get("/api/v1/processes", headers={"X-OCP-Trace-ID": "read-0f1e"}).status == 200
    # An action after the read: once its line is written, the read's would be there too.
    assert daemon.post("/api/v1/processes/ocp_exporter/verify").status == 200
    wait_for(lambda: "audit: POST /api/v1/processes/ocp_exporter/verify" in daemon.log(),
             message="the action's audit line")
    reads = [line for line in daemon.log().splitlines() if "audit: GET /api/v1/processes " in line]
    ours = [line for line in reads if "(trace read-0f1e)" in line]
    if level == "INFO":
        assert reads == []
    else:
        assert len(ours) == 1 and "DEBUG" in ours[0]
        assert "-> 200 in " in ours[0] and "by uid 0 pid " in ours[0]


@pytest.mark.parametrize(("api", "reason"), [
    ({"tcp": "0.0.0.0:62887", "tokens": TOKENS}, "not a loopback address"),
    ({"tcp": "127.0.0.1:62887"}, "needs at least one [[api.tokens]]"),
])
def test_check_refuses_an_unsafe_tcp_naming_it(tmp_path, api, reason):
    config = write_demo_config(tmp_path, free_port(), overrides={"api": api})
    result = check_config(config)
    assert result.returncode != 0
    assert "api.tcp" in result.stderr + result.stdout
    assert reason in result.stderr + result.stdout


def test_a_socket_directory_others_can_write_is_refused(daemon_factory):
    with reachable_dir() as base:
        shared = base / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        daemon = daemon_factory(overrides={"api": {"socket": str(shared / "a.sock")}},
                                start=False)
        with pytest.raises(RuntimeError):
            daemon.start(timeout=20)
        assert f"{shared}: directory writable by others" in daemon.log()
        assert not (shared / "a.sock").exists()
        # Sticky and owned by root (as /tmp): others cannot rename what is in it.
        shared.chmod(0o1777)
        daemon.start(timeout=20)
        assert daemon.status()["state"] in ("starting", "running")


def test_socket_group_owns_the_socket_and_its_members_are_let_in(daemon_factory):
    with unix_user() as user, reachable_dir() as base:
        daemon = daemon_factory(overrides={"api": {
            "socket": str(base / "agentd.sock"), "socket_group": user.name,
            "socket_mode": "0660"}})
        st = (base / "agentd.sock").stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (user.gid, 0o660)
        assert stat.S_ISSOCK(st.st_mode)
        script = ("import socket\ns = socket.socket(socket.AF_UNIX)\n"
                  f"s.connect({str(base / 'agentd.sock')!r})\n"
                  "s.sendall(b'GET /api/v1/status HTTP/1.0\\r\\n\\r\\n')\n"
                  "print(s.recv(100).split(b'\\r\\n')[0].decode())\n")
        answer = user.run("/usr/bin/python3", "-c", script)
        assert " 200 " in answer.stdout
        assert daemon.status()["state"] in ("starting", "running")


# --- TLS ----------------------------------------------------------------------------------


def https(port: int, ca: Path, cert: tuple[Path, Path] | None = None,
          path: str = "/api/v1/status") -> http.client.HTTPResponse:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
    return conn.getresponse()


def served_certificate(port: int) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_tls_only_on_tcp_and_certificates_are_re_read_on_reload(daemon_factory, tmp_path):
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("server-ca")
    cert, key = pki.leaf("server", ca)
    port = free_port()
    daemon = daemon_factory(overrides={"api": {
        "tcp": f"0.0.0.0:{port}", "tokens": TOKENS, "tls_cert": str(cert), "tls_key": str(key)}})
    answer = https(port, ca[0])
    assert answer.status == 200 and json.loads(answer.read())["successful"]
    # Plain HTTP gets no HTTP answer from a TLS listener.
    try:
        plain: int | None = ApiClient(host="127.0.0.1", port=port, token=TOKEN,
                                      timeout=5).get("/api/v1/status").status
    except (OSError, http.client.HTTPException):
        plain = None
    assert plain is None
    before = served_certificate(port)
    renewed, renewed_key = pki.leaf("renewed", ca)
    cert.write_bytes(renewed.read_bytes())
    key.write_bytes(renewed_key.read_bytes())
    daemon.send_signal(signal.SIGHUP)
    wait_for(lambda: served_certificate(port) != before, message="the renewed certificate")
    assert https(port, ca[0]).status == 200


def test_mtls_refuses_missing_foreign_and_expired_client_certificates(daemon_factory, tmp_path):
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("server-ca")
    cert, key = pki.leaf("server", ca)
    clients = pki.ca("client-ca")
    stranger = pki.ca("stranger-ca")
    port = free_port()
    daemon = daemon_factory(overrides={"api": {
        "tcp": f"127.0.0.1:{port}", "tokens": TOKENS, "tls_cert": str(cert),
        "tls_key": str(key), "tls_client_ca": str(clients[0])}})
    good = pki.leaf("client", clients, san="DNS:client")
    assert https(port, ca[0], good).status == 200
    refused = {
        "no certificate": None,
        "another CA": pki.leaf("foreign", stranger, san="DNS:client"),
        "expired": pki.leaf("expired", clients, san="DNS:client",
                            start="20200101000000Z", end="20200102000000Z"),
    }
    for why, client in refused.items():
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https(port, ca[0], client).read()
            pytest.fail(f"answered a client with {why}")
    # Garbage instead of a handshake: the connection ends, the daemon goes on.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x05garbage-not-a-hello" * 50)
        try:
            reply = raw.recv(100)
        except ConnectionError:
            reply = b""
        assert not reply.startswith(b"HTTP/")  # at most a TLS alert, then the end
    assert https(port, ca[0], good).status == 200
    assert daemon.status()["state"] == "running"


def test_ocp_agentctl_talks_to_the_daemon_over_mtls(daemon_factory, tmp_path):
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("server-ca")
    cert, key = pki.leaf("server", ca)
    clients = pki.ca("client-ca")
    client = pki.leaf("client", clients, san="DNS:client")
    port = free_port()
    daemon_factory(overrides={"api": {
        "tcp": f"127.0.0.1:{port}", "tokens": TOKENS, "tls_cert": str(cert),
        "tls_key": str(key), "tls_client_ca": str(clients[0])}}, wait_running=True)
    base = [sys.executable, "-m", "ocp_agentd.cli", "--url", f"https://127.0.0.1:{port}",
            "--cacert", str(ca[0]), "--token", TOKEN]
    ok = subprocess.run([*base, "--cert", str(client[0]), "--key", str(client[1]),
                         "status", "--json"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert {p["name"] for p in json.loads(ok.stdout)["processes"]} >= {"pos_proxy"}
    refused = subprocess.run([*base, "status", "--json"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0
