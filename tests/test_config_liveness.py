"""[programs.<name>.liveness] (SPEC section 10): defaults, kinds, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocp_agentd.config import ConfigError, LivenessSpec, load_settings


def _load(tmp_path: Path, liveness: str) -> Exception | LivenessSpec:
    path = tmp_path / "c.toml"
    path.write_text(f'[programs.p]\ncommand = ["/bin/true"]\n[programs.p.liveness]\n{liveness}\n')
    try:
        spec = load_settings(path).programs["p"].liveness
    except ConfigError as exc:
        return exc
    assert spec is not None
    return spec


def test_liveness_config_defaults_and_kinds(tmp_path: Path) -> None:
    spec = _load(tmp_path, "tcp_connect = 62889")
    assert isinstance(spec, LivenessSpec)
    assert (spec.kind, spec.tcp_address) == ("tcp_connect", ("127.0.0.1", 62889))
    assert (spec.period, spec.timeout, spec.failure_threshold, spec.initial_delay) == (
        10.0, 2.0, 3, 0.0)
    spec = _load(tmp_path, 'tcp_connect = "[::1]:80"\nperiod = 0.5')
    assert isinstance(spec, LivenessSpec) and spec.tcp_address == ("::1", 80)
    spec = _load(tmp_path, 'exec = ["/bin/true", "x"]')
    assert isinstance(spec, LivenessSpec) and spec.kind == "exec"


@pytest.mark.parametrize(
    ("body", "key", "says"),
    [
        ('http_get = "http://x/"\nexec = ["/bin/true"]', "programs.p.liveness",
         "exactly one of http_get, tcp_connect, exec is needed, found http_get, exec"),
        ("period = 1", "programs.p.liveness", "found none"),
        ('http_get = "ftp://x/"', "programs.p.liveness.http_get", "http://"),
        ("tcp_connect = 70000", "programs.p.liveness.tcp_connect", "1..65535"),
        ('exec = ["check"]', "programs.p.liveness.exec", "absolute"),
        ('tcp_connect = 1\ntimeout = 0', "programs.p.liveness.timeout", "greater than 0"),
        ('tcp_connect = 1\nfailure_threshold = 0', "programs.p.liveness.failure_threshold",
         "greater than or equal to 1"),
        ('tcp_connect = 1\nperod = 3', "programs.p.liveness.perod", "unknown key"),
    ],
)
def test_liveness_config_errors_name_the_key(
    tmp_path: Path, body: str, key: str, says: str
) -> None:
    error = _load(tmp_path, body)
    assert isinstance(error, ConfigError), error
    line = next((ln for ln in str(error).splitlines() if ln.strip().startswith(key + ":")), "")
    assert says in line, str(error)
