"""Settings and ProgramSpec: the TOML file plus OCP_AGENTD_* environment overrides."""

from __future__ import annotations

import grp
import hashlib
import ipaddress
import json
import os
import signal
import threading
import tomllib
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_PATH = Path("/etc/ocp_agentd/config.toml")
ENV_CONFIG_PATH = "OCP_AGENTD_CONFIG"
PERMISSIONS = ("HOST_VIEWER", "HOST_MANAGER", "TASK_VIEWER", "TASK_MANAGER")


class ConfigError(Exception):
    """The configuration cannot be used; the message names each key path and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentSection(_Strict):
    host_id: int = Field(default=1, gt=0, lt=2**63)
    install_home: Path = Path("/home/admin/ocp_agent")
    state_dir: Path = Path("/var/lib/ocp_agentd")
    log_dir: Path = Path("/var/log/ocp_agentd")
    # SPEC section 9: "auto" uses a writable cgroup tree when there is one, "required"
    # refuses to start without one, "off" finds process trees from the process table.
    cgroup: Literal["auto", "required", "off"] = "auto"
    # <log_dir>/ocp_agentd.log: "auto" = only when not under systemd (journald has it all).
    daemon_log_file: Literal["auto", "always", "never"] = "auto"


class TasksSection(_Strict):
    # Per-subtask timeout overrides in seconds, by class name (short form), e.g.
    # {StartAllOcpAgentProcessesTask = 900}; the seed's timeouts apply to the others.
    timeouts: dict[str, int] = Field(default_factory=dict)
    # Retention (SPEC section 11): finished tasks older than keep_days, or past the newest
    # keep_max, are deleted; a subtask keeps its last log_max_lines lines.
    keep_days: float = Field(default=30, ge=0, le=36500)
    keep_max: int = Field(default=1000, ge=1, le=10_000_000)
    log_max_lines: int = Field(default=2000, ge=10, le=1_000_000)

    @field_validator("timeouts")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        for name, seconds in value.items():
            if not 0 < seconds <= 86400:
                raise ValueError(f"timeout of {name} must be 1 to 86400 seconds")
        return value


class TokenSpec(_Strict):
    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    permissions: list[str] = Field(default_factory=lambda: list(PERMISSIONS))

    @field_validator("permissions")
    @classmethod
    def _known_permissions(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(PERMISSIONS))
        if unknown:
            raise ValueError(f"unknown permission(s) {unknown}; known: {list(PERMISSIONS)}")
        return value


class ApiSection(_Strict):
    socket: Path = Path("/run/ocp_agentd/agentd.sock")
    socket_mode: str = Field(default="0660", pattern=r"^0?[0-7]{3}$")
    socket_group: str = ""
    tcp: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_body_bytes: int = Field(default=65536, ge=1024, le=64 * 1024 * 1024)
    tokens: list[TokenSpec] = Field(default_factory=list)

    @field_validator("tcp")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:62887")
        return value

    @field_validator("tls_cert", "tls_key", "tls_client_ca", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("socket_group")
    @classmethod
    def _known_group(cls, value: str) -> str:
        if value:
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"no group named {value!r} on this host") from None
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        problem = self.tcp_problem()
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def tcp_problem(self) -> str | None:
        """Why api.tcp must not be used as configured (SPEC section 11), else None."""
        address = self.tcp_host_port
        if address is None:
            return None
        if not self.tokens:
            return f"api.tcp: {self.tcp} needs at least one [[api.tokens]] entry"
        if not self.tls and not is_loopback(address[0]):
            return (f"api.tcp: {self.tcp} is not a loopback address; "
                    "set api.tls_cert and api.tls_key to serve it over TLS")
        return None

    @property
    def socket_mode_int(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def tcp_host_port(self) -> tuple[str, int] | None:
        if not self.tcp:
            return None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)


class LivenessSpec(_Strict):
    """``[programs.<name>.liveness]`` (SPEC section 10): how to tell a RUNNING program is alive.

    Exactly one probe kind: ``http_get`` (a URL that must answer 2xx), ``tcp_connect`` (a
    port on 127.0.0.1, or "HOST:PORT", that must accept a connection) or ``exec`` (an argv
    run as the program's user, in its cwd, with its env; exit status 0 = alive). Times are
    seconds. Raises ValueError naming the keys when none or several kinds are set.
    """

    http_get: str = ""
    tcp_connect: int | str | None = None
    exec: list[str] | None = None
    period: float = Field(default=10.0, gt=0, le=86400)
    timeout: float = Field(default=2.0, gt=0, le=3600)
    failure_threshold: int = Field(default=3, ge=1, le=1000)
    initial_delay: float = Field(default=0.0, ge=0, le=86400)

    @field_validator("http_get")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("http_get must start with http:// or https://")
        return value

    @field_validator("tcp_connect")
    @classmethod
    def _port_or_address(cls, value: int | str | None) -> int | str | None:
        if value is None:
            return value
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # from the environment every value is a string
        host, _, port = ("127.0.0.1", "", str(value)) if isinstance(value, int) else (
            value.rpartition(":"))
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected a port (1..65535) or HOST:PORT, e.g. 62889")
        return value

    @field_validator("exec")
    @classmethod
    def _absolute_exec(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not os.path.isabs(value[0])):
            raise ValueError("exec needs an argv whose program path is absolute")
        return value

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> LivenessSpec:
        kinds = [k for k in ("http_get", "tcp_connect", "exec") if getattr(self, k)]
        if len(kinds) != 1:
            found = ", ".join(kinds) or "none"
            raise ValueError(f"exactly one of http_get, tcp_connect, exec is needed, found {found}")
        return self

    @property
    def kind(self) -> str:
        """"http_get", "tcp_connect" or "exec"."""
        return "http_get" if self.http_get else "tcp_connect" if self.tcp_connect else "exec"

    @property
    def tcp_address(self) -> tuple[str, int]:
        """(host, port) of tcp_connect; a bare port means 127.0.0.1."""
        if isinstance(self.tcp_connect, int):
            return "127.0.0.1", self.tcp_connect
        host, _, port = str(self.tcp_connect).rpartition(":")
        return host.strip("[]"), int(port)


class ProgramSpec(_Strict):
    name: str = ""
    role: Literal["pos_proxy", "worker"] = "worker"
    command: list[str] = Field(min_length=1)
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    user: str = ""
    operable: bool | None = None
    ports: list[int] = Field(default_factory=list)
    health_url: str = ""
    start_seconds: float = Field(default=1.0, ge=0, le=3600)
    start_timeout: float = Field(default=30.0, gt=0, le=86400)
    stop_signal: str = "TERM"
    stop_timeout: float = Field(default=10.0, gt=0, le=3600)
    autorestart: Literal["always", "on-failure", "never"] = "on-failure"
    backoff_initial: float = Field(default=0.5, gt=0, le=3600)
    backoff_max: float = Field(default=30.0, gt=0, le=86400)
    max_quick_exits: int = Field(default=5, ge=1, le=1000)
    stdout_log: Path | None = None
    stderr_log: Path | None = None
    log_max_bytes: int = Field(default=52428800, ge=0)
    log_backups: int = Field(default=5, ge=0, le=100)
    log_target: Literal["file", "journal"] = "file"
    # Resource limits (SPEC section 9), enforced through the program's cgroup.
    cpu_quota: float = Field(default=0.0, ge=0, le=4096)  # CPUs; 0 = no limit
    memory_max: int | None = None  # bytes; "512M" in the file; "" = no limit
    memory_high: int | None = None
    pids_max: int = Field(default=0, ge=0, le=4194304)  # 0 = no limit
    liveness: LivenessSpec | None = None

    @field_validator("memory_max", "memory_high", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value)

    @field_validator("cwd", "stdout_log", "stderr_log", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        # SPEC: "" means the default (install_home; <log_dir>/<name>.stdout.log ...).
        return None if value == "" else value

    @field_validator("command")
    @classmethod
    def _absolute_command(cls, value: list[str]) -> list[str]:
        if not value[0] or not os.path.isabs(value[0]):
            raise ValueError(f"the program path must be absolute, got {value[0]!r}")
        return value

    @field_validator("ports")
    @classmethod
    def _valid_ports(cls, value: list[int]) -> list[int]:
        for port in value:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is outside 1..65535")
        return value

    @field_validator("stop_signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if (
            name not in signal.Signals.__members__
            and f"SIG{name}" not in signal.Signals.__members__
        ):
            raise ValueError(f"unknown signal {value!r}")
        return name

    @field_validator("health_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("health_url must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> ProgramSpec:
        if self.operable is None:
            self.operable = self.role != "pos_proxy"
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self

    @property
    def is_worker(self) -> bool:
        return self.role != "pos_proxy" and bool(self.operable)

    @property
    def signal_number(self) -> int:
        return int(signal.Signals[f"SIG{self.stop_signal}"])

    def fingerprint(self) -> str:
        """A stable hash of everything that changes how the program runs.

        Reload restarts a program whose fingerprint changed; the pid record keeps
        it, so a daemon started on an edited config restarts what changed too.
        """
        fields = self.model_dump(
            mode="json",
            include={"command", "cwd", "env", "user", "stdout_log", "stderr_log", "log_target"},
        )
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int | None:
    """A byte count from an int or a string with an optional K/M/G/T suffix (binary
    units, as systemd's MemoryMax= and the kernel read them; "512M" = 536870912).

    "" and None mean no limit (None). Raises ValueError (named by pydantic with its key)
    for anything else, or for a size under 4 KiB (the kernel would round it to a page).
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512M")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
        digits = text[: len(text) - len(unit)].strip()
        try:
            number = int(float(digits) * _SIZE_UNITS[unit]) if digits else -1
        except ValueError:
            number = -1
        if number < 0:
            raise ValueError(f"expected a size such as 512M (K, M, G suffixes), got {value!r}")
    else:
        raise ValueError("expected a size such as 512M")
    if number < 4096:
        raise ValueError(f"size {value!r} is below 4K")
    return number


class _TomlSource(threading.local):
    """The tables of the file load_settings() is reading (parsed once, there: pydantic-
    settings' TomlConfigSettingsSource would parse it again); Settings() alone reads no
    file."""

    data: dict[str, Any] | None = None


_toml_source = _TomlSource()

# Settings from the environment: OCP_AGENTD_AGENT__HOST_ID=7 sets agent.host_id.
ENV_PREFIX = "OCP_AGENTD_"
ENV_DELIMITER = "__"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        case_sensitive=False,
    )

    agent: AgentSection = Field(default_factory=AgentSection)
    api: ApiSection = Field(default_factory=ApiSection)
    tasks: TasksSection = Field(default_factory=TasksSection)
    programs: dict[str, ProgramSpec] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_source.data is not None:
            # What TomlConfigSettingsSource makes of the file: its tables as init values.
            sources.append(InitSettingsSource(settings_cls, init_kwargs=_toml_source.data))
        return tuple(sources)

    @field_validator("programs")
    @classmethod
    def _programs(cls, programs: dict[str, ProgramSpec]) -> dict[str, ProgramSpec]:
        for name, spec in programs.items():
            if not name.replace("_", "").replace("-", "").isalnum() or name == "ocp_agentd":
                raise ValueError(
                    f"program name {name!r} must be letters, digits, '_' or '-' "
                    "and not 'ocp_agentd'"
                )
            spec.name = name
        proxies = [name for name, spec in programs.items() if spec.role == "pos_proxy"]
        if len(proxies) > 1:
            raise ValueError(f"exactly one program may have role 'pos_proxy', found {proxies}")
        return programs

    @property
    def pos_proxy(self) -> ProgramSpec | None:
        return next((s for s in self.programs.values() if s.role == "pos_proxy"), None)

    def resolve_paths(self, base: Path) -> None:
        """Relative paths in the file are taken from the file's own folder."""
        agent = self.agent
        agent.install_home = _absolute(agent.install_home, base)
        agent.state_dir = _absolute(agent.state_dir, base)
        agent.log_dir = _absolute(agent.log_dir, base)
        self.api.socket = _absolute(self.api.socket, base)
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self.api, key)
            if value is not None:
                setattr(self.api, key, _absolute(value, base))
        for spec in self.programs.values():
            spec.cwd = _absolute(spec.cwd, base) if spec.cwd else agent.install_home
            spec.stdout_log = _absolute(
                spec.stdout_log or agent.log_dir / f"{spec.name}.stdout.log", base
            )
            spec.stderr_log = _absolute(
                spec.stderr_log or agent.log_dir / f"{spec.name}.stderr.log", base
            )


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (SPEC section 11)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _absolute(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else (base / path).resolve()


def config_path(cli_value: str | os.PathLike[str] | None) -> Path:
    if cli_value:
        return Path(cli_value)
    if os.environ.get(ENV_CONFIG_PATH):
        return Path(os.environ[ENV_CONFIG_PATH])
    return DEFAULT_CONFIG_PATH


def _describe(error: ValidationError, path: Path) -> str:
    lines = [f"invalid configuration {path}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        variable = _environment_source(item["loc"])
        if variable is not None:
            message += f" (set by the environment variable {variable})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _environment_source(loc: tuple[int | str, ...]) -> str | None:
    """The environment variable that set the key at ``loc`` or one of its sections
    (Settings reads OCP_AGENTD_<SECTION>__<KEY>, any case), else None: the error is the
    file's."""
    names = {name.upper(): name for name in os.environ}
    for depth in range(len(loc), 0, -1):
        wanted = (ENV_PREFIX + ENV_DELIMITER.join(str(part) for part in loc[:depth])).upper()
        if wanted in names:
            return names[wanted]
    return None


def load_settings(path: Path, **overrides: Any) -> Settings:
    """Reads and validates the file; raises ConfigError naming every bad key."""
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist or is not a file")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc}") from None
    _toml_source.data = data
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    finally:
        _toml_source.data = None
    settings.resolve_paths(path.resolve().parent)
    return settings


def summary(settings: Settings, path: Path, cannot_run: Collection[str] = ()) -> str:
    """What `ocp-agentd --check` prints for a valid configuration: one line per program;
    the programs named in `cannot_run` (host problems, told on stderr) are marked."""
    verdict = "; this host cannot run all of it (the problems follow, on stderr)"
    lines = [
        f"configuration {path} is valid" + (verdict if cannot_run else ""),
        f"  host_id {settings.agent.host_id}, state_dir {settings.agent.state_dir}",
        f"  socket {settings.api.socket}"
        + (f", tcp {settings.api.tcp}" if settings.api.tcp else ""),
    ]
    for spec in settings.programs.values():
        kind = "worker" if spec.is_worker else "fixed"
        if spec.role == "pos_proxy":
            kind = "pos_proxy"
        mark = "  [cannot run here]" if spec.name in cannot_run else ""
        lines.append(f"  {spec.name:<20} {kind:<9} {' '.join(spec.command)}{mark}")
    return "\n".join(lines)


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """The keys that differ between old and new but take effect only after a restart
    (a reload keeps the old value)."""
    return [
        key
        for key, before, after in (
            ("agent.state_dir", old.agent.state_dir, new.agent.state_dir),
            ("api.socket", old.api.socket, new.api.socket),
            ("api.tcp", old.api.tcp, new.api.tcp),
            ("api.socket_group", old.api.socket_group, new.api.socket_group),
            ("api.tls (on or off)", old.api.tls, new.api.tls),
        )
        if before != after
    ]
