"""Where ocp-agentctl finds the daemon: --socket / --url, else the config's api.socket.

The config is read with tomllib for its ``[api] socket`` only (not validated: the daemon
does that), so the command line tool works while the rest of the file is being edited and
never imports pydantic. The path rules are the daemon's (SPEC section 2): ``--config``,
else ``$OCP_AGENTD_CONFIG``, else ``/etc/ocp_agentd/config.toml``;
``$OCP_AGENTD_API__SOCKET`` overrides the key as it does for the daemon.

Paths are strings handled with os.path (pathlib would add milliseconds to every command),
written as pathlib writes them (:func:`clean_path`).
"""

from __future__ import annotations

import os

DEFAULT_CONFIG = "/etc/ocp_agentd/config.toml"
DEFAULT_SOCKET = "/run/ocp_agentd/agentd.sock"
CONFIG_ENV = "OCP_AGENTD_CONFIG"
SOCKET_ENV = "OCP_AGENTD_API__SOCKET"


class ConfigMissing(Exception):
    """A config file that was asked for (--config or $OCP_AGENTD_CONFIG) cannot be read."""


def clean_path(path: str) -> str:
    """``path`` as ``str(pathlib.PurePosixPath(path))`` writes it: repeated slashes and
    ``.`` parts dropped (``..`` kept), no trailing slash, ``.`` for nothing."""
    root = "//" if path.startswith("//") and not path.startswith("///") else (
        "/" if path.startswith("/") else "")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return root + "/".join(parts) or "."


class Found:
    """The socket, and how it was chosen, e.g. ``api.socket of /etc/ocp_agentd/config.toml``
    (said when the daemon does not answer there)."""

    def __init__(self, socket: str, how: str, warning: str = "") -> None:
        self.socket = socket
        self.how = how
        self.warning = warning  # for stderr: the socket was found despite a damaged file


def _api_table(text: str) -> dict[str, object] | None:
    """The ``[api]`` table of a config that does not parse as a whole (being edited):
    its own lines parsed alone; None when they do not parse either."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        header = line.strip()
        if header.startswith("["):
            inside = header == "[api]"
            continue
        if inside:
            lines.append(line)
    if not lines:
        return None
    import tomllib  # see find_socket

    try:
        return tomllib.loads("\n".join(lines))
    except ValueError:
        return None


def find_socket(config: str | None) -> Found:
    """The daemon's socket. Raises ConfigMissing when the named config cannot be read or
    parsed; a missing default config is not an error (the default socket is used)."""
    override = os.environ.get(SOCKET_ENV)
    if override:
        return Found(clean_path(override), f"the socket comes from ${SOCKET_ENV}")
    path, named = _config_path(config)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read()
    except OSError as exc:
        return _unreadable(path, named, exc)
    # Imported here, once a config is there to parse: tomllib is milliseconds of start-up
    # that --socket, --url and a host without a config do without.
    import tomllib

    warning = ""
    try:
        data = tomllib.loads(text)
    except ValueError as exc:
        # A file half-way through an edit must not lock the operator out of the daemon,
        # which still runs on the configuration it read last.
        api_table = _api_table(text)
        if api_table is None:
            return _unparsable(path, named, exc)
        data = {"api": api_table}
        warning = (f"warning: {path} does not parse ({exc}); the daemon keeps running on "
                   "the configuration it read last (ocp-agentd --check names the problem)")
    return _socket_of(path, data, warning)


def _config_path(config: str | None) -> tuple[str, str]:
    """The config's path and what named it (``--config``, ``$OCP_AGENTD_CONFIG``, or ""
    for the default)."""
    if config:
        return clean_path(config), "--config"
    if os.environ.get(CONFIG_ENV):
        return clean_path(os.environ[CONFIG_ENV]), f"${CONFIG_ENV}"
    return DEFAULT_CONFIG, ""


def _unreadable(path: str, named: str, exc: OSError) -> Found:
    """The default socket when the default config cannot be read; ConfigMissing for a
    config that was named."""
    missing = isinstance(exc, FileNotFoundError)
    if named and missing:
        raise ConfigMissing(f"configuration file {path} (from {named}) does not exist") from None
    if named:
        raise ConfigMissing(f"cannot read configuration file {path} (from {named}): "
                            f"{exc.strerror or exc}") from None
    why = "does not exist" if missing else "cannot be read"
    return Found(DEFAULT_SOCKET, f"the default socket, as {path} {why}")


def _unparsable(path: str, named: str, exc: ValueError) -> Found:
    """The default socket when the default config does not parse, not even its [api]
    table; ConfigMissing for a config that was named."""
    if named:
        raise ConfigMissing(
            f"cannot parse configuration file {path} (from {named}): {exc}; "
            "name the daemon's socket with --socket") from None
    return Found(DEFAULT_SOCKET, f"the default socket, as {path} does not parse")


def _socket_of(path: str, data: dict[str, object], warning: str) -> Found:
    """``api.socket`` of the parsed config at ``path`` (relative to the file's folder),
    else the default socket."""
    api = data.get("api")
    value = api.get("socket") if isinstance(api, dict) else None
    if not isinstance(value, str) or not value:
        return Found(DEFAULT_SOCKET, f"the default socket, as {path} sets no api.socket",
                     warning)
    socket_path = clean_path(value)
    if not socket_path.startswith("/"):
        folder = os.path.dirname(os.path.realpath(path))
        socket_path = os.path.realpath(os.path.join(folder, socket_path))
    return Found(socket_path, f"api.socket of {path}", warning)
