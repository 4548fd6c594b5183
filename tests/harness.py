"""Test harness: real ocp-agentd daemons in subprocesses, and the helpers to wait on them.

Every suite (core, API, tasks, faults, bench) drives the daemon the way an operator
would: a real `python -m ocp_agentd --config X` process, real programs, the control API
over the unix socket. Nothing is mocked.

Waiting
    wait_for(predicate, timeout=10.0, message="...", interval=0.02) -> value
        Polls `predicate()` until it returns something truthy and returns that; on the
        deadline raises WaitTimeout (an AssertionError) naming `message` and the last
        value or error. OSError and http.client.HTTPException raised by the predicate
        count as "not yet". This is the only way tests wait: never a fixed sleep.
    free_port(host="127.0.0.1") -> int           a TCP port nobody listens on right now
    free_port_block(count, host=...) -> int      first of `count` consecutive free ports

Talking HTTP
    ApiClient(socket_path=None, host=None, port=None, token=None, timeout=30.0)
        .request(method, path, json=None, body=None, headers=None, timeout=None) -> Response
        .get(path, **kw), .post(path, json=None, **kw)
        One connection per request over the unix socket (socket_path) or TCP (host, port);
        `token` adds `Authorization: Bearer <token>`.
    Response: .status (HTTP), .headers (case-insensitive), .body (bytes), .text,
        .envelope (decoded JSON dict or None), .data, .error, .code (error code or None),
        .successful, and .check() -> data, raising ApiCallFailed unless successful.

Running the daemon
    DaemonRunner(config, *, log_path=None, python=sys.executable, env=None, socket=None)
        .start(timeout=20.0, wait=True) -> self   spawn; wait until GET /api/v1/status answers
        .wait_ready(timeout=20.0)                  the same wait on its own
        .stop(timeout=30.0) -> int                 SIGTERM, wait for exit, the exit status
        .kill9() -> None                           SIGKILL the daemon only (programs live on)
        .restart(timeout=20.0) -> self             stop() if running, then start()
        .send_signal(sig), .wait_exit(timeout) -> int, .running, .pid, .returncode
        .log() -> str                              the daemon's stdout+stderr so far
        .client (ApiClient on the socket), .request/.get/.post (shortcuts to it)
        .status() -> dict, .processes() -> list[dict], .process(name) -> dict
        .wait_state(name, *states, timeout=10.0) -> dict   the record once in a state
        .wait_all_running(timeout=20.0) -> list[dict]
        .program_log(name, stream="stdout") -> str  the program's log file
        .ctl(*args, timeout=30.0) -> CompletedProcess   ocp-agentctl --socket <sock> ...
        .leftovers() -> list[psutil.Process]      every process of this daemon's tree
        .cleanup()                                 kill the daemon and every leftover
        .settings (config.Settings or None), .config, .socket, .state_dir, .log_path
        .unretrieved() -> list[str]                 "Task exception was never retrieved"
                                                    reports in its log (DaemonPool.cleanup
                                                    fails the test on any)
    `nofile=(soft, hard)` starts the daemon under that RLIMIT_NOFILE.
    A process belongs to a runner when its environment has
    OCP_AGENTD_STATE_DIR=<state_dir> (set by the daemon for every program and inherited
    by their children, even after setsid) or the runner's private HARNESS_ENV marker
    (set on the daemon itself). cleanup() SIGKILLs all of them until none is left.

    check_config(path, python=sys.executable) -> CompletedProcess
        `python -m ocp_agentd --check --config path`, output captured as text.
    kill_marked(name, value, timeout=10.0) -> list[int]
        SIGKILLs every process whose environment has name=value; returns their pids.
    remove_cgroups(state_dir) -> None
        Kills what is in the program cgroups of the daemon of state_dir and removes them
        (DaemonRunner.cleanup calls it: a process that rewrote its environment has no
        marker, but it cannot leave its cgroup).

Fixtures (tests/conftest.py)
    daemon_factory(extra_programs=None, overrides=None, *, start=True, host_id=2,
                   env=None, wait_running=False, timeout=20.0) -> DaemonRunner
        Writes a demo config under tmp_path (write_demo_config with free ports: pos_proxy
        on `runner.base_port`, ocp_exporter on base_port + 1, plus `extra_programs`,
        then `overrides` deep-merged), starts the daemon (unless start=False) and
        cleans up every daemon it made after the test, pass or fail (printing the
        daemon's log tail when the test failed).
    demo_daemon -> DaemonRunner: the demo config, started, all programs RUNNING.

Programs to supervise in tests: `demo_command("misbehave", "ignore-term")` and the
rest of ocp_agentd.demo (see ocp_agentd/demo/misbehave.py for every mode).
"""

from __future__ import annotations

import contextlib
import http.client
import json as jsonlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import psutil

from ocp_agentd.config import ConfigError, Settings, load_settings
from ocp_agentd.demo.config import demo_command, write_demo_config
from ocp_agentd.supervision import cgroups

__all__ = [
    "HARNESS_ENV",
    "STATE_ENV",
    "ApiCallFailed",
    "ApiClient",
    "DaemonRunner",
    "Response",
    "WaitTimeout",
    "check_config",
    "demo_command",
    "free_port",
    "free_port_block",
    "kill_marked",
    "marked_processes",
    "remove_cgroups",
    "wait_for",
    "write_demo_config",
]

T = TypeVar("T")
STATE_ENV = "OCP_AGENTD_STATE_DIR"
HARNESS_ENV = "AGENTD_HARNESS_RUN"  # not OCP_AGENTD_*: that prefix is the daemon's config
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
# asyncio's report of a background task that failed and that nothing awaited: a defect.
UNRETRIEVED = "Task exception was never retrieved"


class WaitTimeout(AssertionError):
    """wait_for gave up: the condition did not hold before the deadline."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    message: str = "condition",
    interval: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException),
) -> T:
    """Polls predicate() until it is truthy; returns its value or raises WaitTimeout."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {message} (last: {last!r})")
        time.sleep(interval)


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive ports that are all free right now."""
    for _ in range(200):
        first = free_port(host)
        if first + count <= 65536 and all(_bindable(first + i, host) for i in range(1, count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")


# --- HTTP over the unix socket or TCP ---------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiCallFailed(AssertionError):
    def __init__(self, method: str, path: str, response: Response) -> None:
        super().__init__(f"{method} {path} -> HTTP {response.status}: {response.text[:500]}")
        self.response = response


@dataclass
class Response:
    status: int
    headers: Message
    body: bytes
    envelope: dict[str, Any] | None = field(default=None)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def data(self) -> Any:
        return (self.envelope or {}).get("data")

    @property
    def error(self) -> dict[str, Any] | None:
        return (self.envelope or {}).get("error")

    @property
    def code(self) -> int | None:
        return (self.error or {}).get("code")

    @property
    def successful(self) -> bool:
        return bool((self.envelope or {}).get("successful"))

    def check(self) -> Any:
        """The envelope's data; ApiCallFailed unless the call was successful."""
        if not self.successful:
            raise ApiCallFailed("request", "", self)
        return self.data


class ApiClient:
    """A small synchronous HTTP client for tests (unix socket or TCP)."""

    def __init__(
        self,
        socket_path: str | Path | None = None,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if socket_path is None and (host is None or port is None):
            raise ValueError("give socket_path, or host and port")
        self.socket_path = str(socket_path) if socket_path is not None else None
        self.host, self.port, self.token, self.timeout = host, port, token, timeout

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(self.socket_path, timeout)
        return http.client.HTTPConnection(self.host or "", self.port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        all_headers = {"Connection": "close"}
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        if json is not None:
            body = jsonlib.dumps(json).encode()
            all_headers["Content-Type"] = "application/json"
        all_headers.update(headers or {})
        conn = self._connection(self.timeout if timeout is None else timeout)
        try:
            conn.request(method, path, body=body, headers=all_headers)
            raw = conn.getresponse()
            payload = raw.read()
            envelope = None
            with contextlib.suppress(ValueError):
                decoded = jsonlib.loads(payload) if payload else None
                envelope = decoded if isinstance(decoded, dict) else None
            return Response(raw.status, raw.headers, payload, envelope)
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Response:
        return self.request("POST", path, json=json, **kwargs)


# --- finding and killing what a test started ----------------------------------------


def marked_processes(markers: Iterable[tuple[str, str]]) -> list[psutil.Process]:
    """Live processes whose environment holds any of the (name, value) markers."""
    wanted = list(markers)
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            environ = proc.environ()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.Error, OSError):
            continue
        if any(environ.get(name) == value for name, value in wanted):
            found.append(proc)
    return found


def _dead_or_zombie(proc: psutil.Process) -> bool:
    """Whether nothing is left to kill of proc (reaping a zombie is its parent's job)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_all(find: Callable[[], list[psutil.Process]], timeout: float) -> list[int]:
    """SIGKILLs what find() returns, again and again (forks race us) until none is left."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        procs = find()
        if not procs:
            return sorted(killed)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.add(proc.pid)
        # Not psutil.wait_procs: a killed program whose parent died is reparented and may
        # stay a zombie for a while, and wait_procs would wait out its whole timeout on it.
        with contextlib.suppress(WaitTimeout):
            wait_for(lambda procs=procs: all(_dead_or_zombie(p) for p in procs), 1.0,
                     "the killed processes to die", interval=0.01)
        if time.monotonic() >= deadline:
            left = [p.pid for p in find()]
            if left:
                raise RuntimeError(f"processes survived SIGKILL: {left}")
            return sorted(killed)


def kill_marked(name: str, value: str, timeout: float = 10.0) -> list[int]:
    """SIGKILLs every process whose environment has name=value; returns their pids."""
    return _kill_all(lambda: marked_processes([(name, value)]), timeout)


def check_config(path: str | Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    """Runs `python -m ocp_agentd --check --config path` (no daemon is left running)."""
    return subprocess.run(
        [python, "-m", "ocp_agentd", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
    )


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without OCP_AGENTD_* (they would reconfigure the daemon)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCP_AGENTD_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra or {})
    return env


# --- the daemon ---------------------------------------------------------------------


class DaemonRunner:
    """One ocp-agentd daemon subprocess on one config; see the module docstring."""

    def __init__(
        self,
        config: str | Path,
        *,
        log_path: str | Path | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        socket: str | Path | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.config = Path(config).resolve()
        self.nofile = nofile
        self.python = python
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else self.config.parent / "daemon.log"
        self.marker = uuid.uuid4().hex
        self.base_port: int | None = None  # set by daemon_factory
        self.settings: Settings | None
        try:
            self.settings = load_settings(self.config)
        except ConfigError:
            self.settings = None  # a test of a bad config; give socket= to talk to it
        if socket is None and self.settings is None:
            socket = self.config.parent / "run" / "agentd.sock"
        self.socket = Path(socket) if socket else self.settings.api.socket  # type: ignore[union-attr]
        self.state_dir = self.settings.agent.state_dir if self.settings else None
        self.client = ApiClient(socket_path=self.socket, timeout=30.0)
        self.proc: subprocess.Popen[bytes] | None = None

    # lifecycle

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def start(self, timeout: float = 20.0, wait: bool = True) -> DaemonRunner:
        if self.running:
            raise RuntimeError(f"daemon already running as pid {self.pid}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = _clean_env({HARNESS_ENV: self.marker, "PYTHONUNBUFFERED": "1", **self.extra_env})
        with self.log_path.open("ab") as log:
            log.write(f"--- harness: starting daemon at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [self.python, "-m", "ocp_agentd", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=self._limits() if self.nofile else None,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def _limits(self) -> Callable[[], None]:
        limits = self.nofile

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)

        return apply

    def _answers(self) -> bool:
        if not self.running:
            raise RuntimeError(
                f"daemon exited with status {self.returncode} before answering; "
                f"its log:\n{self.log()[-4000:]}"
            )
        response = self.client.get("/api/v1/status", timeout=5.0)
        # The API listens before the task engine has resumed: ready means "running".
        return response.status == 200 and (response.data or {}).get("state") == "running"

    def wait_ready(self, timeout: float = 20.0) -> None:
        wait_for(self._answers, timeout, f"GET /api/v1/status on {self.socket}")

    def send_signal(self, sig: int) -> None:
        if not self.running:
            raise RuntimeError("daemon is not running")
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None, "daemon was never started"
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (stops every program) and wait; returns the exit status."""
        if self.proc is None:
            raise RuntimeError("daemon was never started")
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill9(self) -> None:
        """SIGKILL the daemon alone: its programs keep running, for adoption tests."""
        if self.proc is None:
            raise RuntimeError("daemon was never started")
        if self.running:
            self.proc.kill()
        self.proc.wait(10)

    def restart(self, timeout: float = 20.0) -> DaemonRunner:
        if self.running:
            self.stop()
        return self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def unretrieved(self) -> list[str]:
        """Each "Task exception was never retrieved" report in the log, with what follows."""
        text = self.log()
        found = []
        start = text.find(UNRETRIEVED)
        while start >= 0:
            found.append(text[start : start + 1500])
            start = text.find(UNRETRIEVED, start + 1)
        return found

    # the control API

    def request(self, method: str, path: str, **kwargs: Any) -> Response:
        return self.client.request(method, path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.client.get(path, **kwargs)

    def post(self, path: str, json: Any = None, **kwargs: Any) -> Response:
        return self.client.post(path, json=json, **kwargs)

    def _data(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.client.request(method, path, **kwargs)
        if not response.successful:
            raise ApiCallFailed(method, path, response)
        return response.data

    def status(self) -> dict[str, Any]:
        return self._data("GET", "/api/v1/status")

    def processes(self) -> list[dict[str, Any]]:
        return self._data("GET", "/api/v1/processes")

    def process(self, name: str) -> dict[str, Any]:
        return self._data("GET", f"/api/v1/processes/{name}")

    def wait_state(self, name: str, *states: str, timeout: float = 10.0) -> dict[str, Any]:
        wanted = states or ("RUNNING",)

        def reached() -> dict[str, Any] | None:
            record = self.process(name)
            return record if record.get("state") in wanted else None

        return wait_for(reached, timeout, f"{name} in {'/'.join(wanted)}")

    # A deadline, not a wait: it costs nothing when the daemon is quick, and a 2-core
    # machine running several suites at once (load 15 and more) was seen to need over 20 s.
    def wait_all_running(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        def all_running() -> list[dict[str, Any]] | None:
            records = self.processes()
            return records if all(r.get("state") == "RUNNING" for r in records) else None

        return wait_for(all_running, timeout, "every program RUNNING")

    def program_log(self, name: str, stream: str = "stdout") -> str:
        if self.settings is None:
            raise RuntimeError("no valid settings to find the log in")
        spec = self.settings.programs[name]
        path = spec.stdout_log if stream == "stdout" else spec.stderr_log
        try:
            return Path(path).read_text(errors="replace")  # type: ignore[arg-type]
        except FileNotFoundError:
            return ""

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Runs `ocp-agentctl --socket <socket> ARGS` and captures its output."""
        script = Path(self.python).parent / "ocp-agentctl"
        command = [str(script)] if script.exists() else [self.python, "-m", "ocp_agentd.cli"]
        return subprocess.run(
            [*command, "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
        )

    # cleanup

    def _markers(self) -> list[tuple[str, str]]:
        markers = [(HARNESS_ENV, self.marker)]
        if self.state_dir is not None:
            markers.append((STATE_ENV, str(self.state_dir)))
            real = os.path.realpath(self.state_dir)
            if real != str(self.state_dir):
                markers.append((STATE_ENV, real))
        return markers

    def leftovers(self) -> list[psutil.Process]:
        """Every live process of this daemon's tree: the daemon and all programs."""
        return marked_processes(self._markers())

    def cleanup(self) -> list[int]:
        """SIGKILLs the daemon and every process it or its programs started."""
        if self.proc is not None and self.running:
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        killed = _kill_all(self.leftovers, 15.0)
        if self.state_dir is not None:
            remove_cgroups(self.state_dir)
        return killed


def remove_cgroups(state_dir: Path) -> None:
    """Kills whatever is in the program cgroups of the daemon of state_dir (a process
    that rewrote its environment has no marker) and removes those cgroups."""
    host = cgroups.detect(state_dir)
    if not host.usable or host.layout == cgroups.Layout.V2_DELEGATED:
        return
    assert host.membership is not None
    bases = [host.membership, *host.controllers.values()]
    if not any(base.exists() for base in bases):
        return
    names = {p.name for base in bases if base.exists() for p in base.iterdir() if p.is_dir()}
    for name in names:
        program = host.open(name)
        if program.membership.exists():
            program.kill()
            wait_for(lambda program=program: not program.members(), 15, f"{name} empty")
        program.remove()
    host.remove()


def short_socket_dir() -> Path:
    """A short folder for a unix socket when tmp_path is too deep for sun_path."""
    return Path(tempfile.mkdtemp(prefix="agentd-", dir="/tmp"))


class DaemonPool:
    """What daemon_factory hands out: builds configs and runners, cleans them all up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runners: list[DaemonRunner] = []
        self._short_dirs: list[Path] = []

    def make(
        self,
        extra_programs: dict[str, dict[str, Any]] | None = None,
        overrides: dict[str, Any] | None = None,
        *,
        start: bool = True,
        host_id: int = 2,
        env: dict[str, str] | None = None,
        wait_running: bool = False,
        timeout: float = 20.0,
        nofile: tuple[int, int] | None = None,
    ) -> DaemonRunner:
        directory = self.base / f"daemon{len(self.runners)}"
        merged: dict[str, Any] = dict(overrides or {})
        if len(str(directory / "run" / "agentd.sock")) > MAX_SOCKET_PATH and not (
            merged.get("api", {}).get("socket")
        ):
            short = short_socket_dir()
            self._short_dirs.append(short)
            merged["api"] = {**merged.get("api", {}), "socket": str(short / "agentd.sock")}
        base_port = free_port_block(2)
        config = write_demo_config(directory, base_port, host_id, extra_programs, merged)
        runner = DaemonRunner(config, env=env, nofile=nofile)
        runner.base_port = base_port
        self.runners.append(runner)
        if start:
            runner.start(timeout)
            if wait_running:
                runner.wait_all_running(timeout)
        return runner

    def cleanup(self) -> None:
        """Kills every daemon and leftover; then fails if a daemon's log reports a task
        exception that was never retrieved."""
        errors: list[BaseException] = []
        for runner in self.runners:
            try:
                runner.cleanup()
            except Exception as exc:
                errors.append(exc)
            reports = runner.unretrieved()
            if reports:
                errors.append(AssertionError(
                    f"{runner.log_path}: {len(reports)} background task(s) ended with an "
                    f"exception nothing retrieved; the first:\n{reports[0]}"
                ))
        for short in self._short_dirs:
            for child in short.iterdir():
                with contextlib.suppress(OSError):
                    child.unlink()
            with contextlib.suppress(OSError):
                short.rmdir()
        if errors:
            raise errors[0]
