"""Certificates made by the tests with the openssl tool.

    pki = Pki(tmp_path)
    ca = pki.ca("server-ca")                         # -> (cert path, key path)
    cert, key = pki.leaf("server", ca, san="IP:127.0.0.1", server=True)
    cert, key = pki.leaf("old", ca, start="20200101000000Z", end="20200102000000Z")

Leaves are signed with `openssl ca` so that any validity window (an expired one too)
can be given.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_CA_CONFIG = """
[ca]
default_ca = local
[local]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
copy_extensions = copy
unique_subject = no
[anything]
commonName = supplied
[leaf]
basicConstraints = CA:FALSE
subjectAltName = $ENV::SAN
extendedKeyUsage = serverAuth, clientAuth
"""


def _openssl(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, env=env)


class Pki:
    def __init__(self, base: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("the openssl tool is not installed")
        self.base = base
        base.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str) -> tuple[Path, Path]:
        """A self-signed CA certificate and key."""
        cert, key = self.base / f"{name}.pem", self.base / f"{name}.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        return cert, key

    def leaf(self, name: str, ca: tuple[Path, Path], san: str = "IP:127.0.0.1",
             start: str | None = None, end: str | None = None) -> tuple[Path, Path]:
        """A certificate signed by ``ca`` (valid now for 2 days unless start/end given)."""
        cert, key = self.base / f"{name}.pem", self.base / f"{name}.key"
        request = self.base / f"{name}.csr"
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}")
        work = self.base / f"{name}.ca"
        work.mkdir()
        (work / "index.txt").write_text("")
        (work / "serial").write_text("1000\n")
        config = work / "ca.cnf"
        config.write_text(_CA_CONFIG.format(dir=work))
        window = ["-startdate", start, "-enddate", end] if start and end else ["-days", "2"]
        _openssl("ca", "-batch", "-config", str(config), "-extensions", "leaf",
                 "-cert", str(ca[0]), "-keyfile", str(ca[1]), "-in", str(request),
                 "-out", str(cert), "-notext", *window, env={"SAN": san, "PATH": "/usr/bin:/bin"})
        return cert, key
