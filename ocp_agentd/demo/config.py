"""Writes a demo configuration whose every path lives under one folder (no root needed).

    python -m ocp_agentd.demo.config DIR [--base-port 62888] [--host-id 2]

writes DIR/demo.toml: the daemon's state, logs and socket under DIR, and three programs
run by this very Python: pos_proxy (port BASE), ocp_exporter (port BASE+1) and
ob_logtailer (no port). Tests build on `write_demo_config`, which also takes extra
programs and overrides.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Where the ocp_agentd package lives: programs get it on PYTHONPATH, so the demo runs
# from a checkout even with a Python that does not have the package installed.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent

# Short timings keep the demo and the tests quick; every extra program starts from these.
PROGRAM_DEFAULTS: dict[str, Any] = {
    "start_seconds": 0.3,
    "start_timeout": 15.0,
    "stop_timeout": 5.0,
}


def demo_command(module: str, *args: object) -> list[str]:
    """The command running `ocp_agentd.demo.<module>` with this interpreter."""
    return [sys.executable, "-m", f"ocp_agentd.demo.{module}", *(str(a) for a in args)]


def demo_document(directory: Path, base_port: int = 62888, host_id: int = 2) -> dict[str, Any]:
    """The demo configuration as a dict (the TOML document before it is written)."""
    directory = directory.resolve()
    env = {"PYTHONPATH": str(PACKAGE_ROOT)}
    proxy, exporter = base_port, base_port + 1
    return {
        "agent": {
            "host_id": host_id,
            "install_home": str(directory),
            "state_dir": str(directory / "state"),
            "log_dir": str(directory / "log"),
        },
        "api": {
            "socket": str(directory / "run" / "agentd.sock"),
            "socket_mode": "0660",
        },
        "programs": {
            "pos_proxy": {
                "role": "pos_proxy",
                "command": demo_command("pos_proxy", "--port", proxy),
                "env": env,
                "operable": False,
                "ports": [proxy],
                "health_url": f"http://127.0.0.1:{proxy}/health",
                **PROGRAM_DEFAULTS,
            },
            "ocp_exporter": {
                "command": demo_command("exporter", "--port", exporter),
                "env": env,
                "ports": [exporter],
                "health_url": f"http://127.0.0.1:{exporter}/health",
                **PROGRAM_DEFAULTS,
                # Wedge it (kill -USR1 <pid>): restarted within about 3 x 5 + 2 seconds.
                "liveness": {
                    "http_get": f"http://127.0.0.1:{exporter}/health",
                    "period": 5.0,
                    "timeout": 2.0,
                    "failure_threshold": 3,
                },
            },
            "ob_logtailer": {
                "command": demo_command("logtailer", "--interval", 5),
                "env": env,
                **PROGRAM_DEFAULTS,
            },
        },
    }


def merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges `changes` into `base` (in place): dicts merge, a value of None
    deletes the key, anything else replaces it."""
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def write_demo_config(
    dir: str | Path,
    base_port: int = 62888,
    host_id: int = 2,
    extra_programs: Mapping[str, Mapping[str, Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Writes DIR/demo.toml and returns its path.

    `extra_programs` maps a name to program keys (SPEC section 2); each starts from
    PROGRAM_DEFAULTS plus the demo's PYTHONPATH. `overrides` is deep-merged into the
    whole document last, e.g. {"programs": {"pos_proxy": {"stop_timeout": 1}},
    "api": {"tcp": "127.0.0.1:9999"}}; a None value removes a key or a program.
    """
    directory = Path(dir).resolve()
    document = demo_document(directory, base_port, host_id)
    for name, spec in (extra_programs or {}).items():
        program = {**PROGRAM_DEFAULTS, "env": {"PYTHONPATH": str(PACKAGE_ROOT)}}
        document["programs"][name] = merge(program, spec)
    merge(document, overrides or {})
    for sub in ("state", "log", "run"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    path = directory / "demo.toml"
    path.write_text(
        "# ocp-agentd demo configuration, written by `python -m ocp_agentd.demo.config`.\n"
        "# Every path is under this folder; see examples/demo.toml for every key explained.\n\n"
        + to_toml(document)
    )
    return path


# --- a small TOML writer: enough for this document (tables, arrays of tables, values) ---

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    """Sections and programs become [tables]; deeper dicts (env) stay inline."""
    as_table = len(path) < 2 or path[0] != "programs"
    sub_tables = {k: v for k, v in table.items() if isinstance(v, Mapping) and as_table}
    arrays = {k: v for k, v in table.items() if _is_table_array(v)}
    values = {k: v for k, v in table.items() if k not in sub_tables and k not in arrays}
    if path and (values or not sub_tables):
        lines.append(f"[{'.'.join(_key(p) for p in path)}]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in values.items())
    if path and (values or not sub_tables):
        lines.append("")
    for key, items in arrays.items():
        for item in items:
            lines.append(f"[[{'.'.join(_key(p) for p in [*path, key])}]]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in item.items())
            lines.append("")
    for key, sub in sub_tables.items():
        _table(lines, [*path, key], sub)


def to_toml(document: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _table(lines, [], document)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ocp_agentd.demo.config", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dir", type=Path, help="folder for the config, state, logs and socket")
    parser.add_argument("--base-port", type=int, default=62888, help="pos_proxy's port")
    parser.add_argument("--host-id", type=int, default=2,
                        help="agent.host_id of the config (the OCP host id the API answers for)")
    args = parser.parse_args(argv)
    path = write_demo_config(args.dir, args.base_port, args.host_id)
    print(path.read_text(), end="")
    socket = demo_document(args.dir, args.base_port, args.host_id)["api"]["socket"]
    print(f"# wrote {path}")
    print(f"# run:   ocp-agentd --config {path}")
    print(f"# query: ocp-agentctl --socket {socket} status")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
