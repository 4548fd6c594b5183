"""The two supervisors under test, behind one small interface.

Both run the same N programs (``/bin/sleep 100000``, output to files, "started"
as soon as they are spawned: supervisord ``startsecs=0``, ocp-agentd
``start_seconds=0``, no ports) and are driven over their unix socket.
"""

from __future__ import annotations

import json
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path

from bench.clients import JsonUnixClient, xmlrpc_proxy
from bench.procs import Launched, Reaper, cmdline, wait_for

PROGRAM_ARGV = ["/bin/sleep", "100000"]
BOOT_TIMEOUT = 60.0

# program name -> (state, pid)
States = dict[str, tuple[str, int | None]]


def program_names(n: int) -> list[str]:
    return [f"p{i:02d}" for i in range(n)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    return env


class Target(ABC):
    label: str

    def __init__(self, workdir: Path, n: int, reaper: Reaper) -> None:
        self.workdir = workdir
        self.n = n
        self.names = program_names(n)
        self.reaper = reaper
        self.process: Launched | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @abstractmethod
    def start(self) -> None:
        """Launches the supervisor; returns once every program is RUNNING."""

    @abstractmethod
    def states(self) -> States:
        """One status request for every program."""

    @abstractmethod
    def stop_all(self) -> None: ...

    @abstractmethod
    def start_all(self) -> None: ...

    @abstractmethod
    def close_client(self) -> None: ...

    def restart_all(self) -> None:
        # Neither has a restart-all call; supervisorctl's restart all does exactly this.
        self.stop_all()
        self.start_all()

    def check_alive(self) -> None:
        if self.process is None or not self.process.alive():
            log = self.workdir / "supervisor.out"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{self.label} is not running; its output ends with:\n{tail}")

    def all_running(self, exclude_pids: set[int] = frozenset()) -> States | None:
        """The states if all N programs are RUNNING (with pids not in exclude_pids)."""
        self.check_alive()
        states = self.states()
        if len(states) != self.n:
            return None
        for state, pid in states.values():
            if state != "RUNNING" or pid is None or pid in exclude_pids:
                return None
        # Exec'd, not just forked: a signal that reaches a child before its exec is
        # lost (supervisord then waits stopwaitsecs), so no figure starts before this.
        if any(cmdline(pid) != PROGRAM_ARGV for _, pid in states.values() if pid):
            return None
        return states

    def wait_all_running(self, timeout: float = BOOT_TIMEOUT) -> States:
        return wait_for(self.all_running, timeout, f"{self.label}: all programs RUNNING", 0.02)

    def stop(self) -> None:
        self.close_client()
        if self.process is not None:
            self.process.stop()
            self.process = None


class Supervisord(Target):
    label = "supervisord"

    def __init__(self, workdir: Path, n: int, reaper: Reaper, venv: Path) -> None:
        super().__init__(workdir, n, reaper)
        self.venv = venv
        self.socket = workdir / "supervisor.sock"
        self.rpc = xmlrpc_proxy(str(self.socket))

    def write_config(self) -> Path:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        lines = [
            "[unix_http_server]",
            f"file={self.socket}",
            "chmod=0600",
            "",
            "[supervisord]",
            "nodaemon=true",
            f"logfile={self.workdir / 'supervisord.log'}",
            f"pidfile={self.workdir / 'supervisord.pid'}",
            f"childlogdir={logs}",
            "user=root" if os.geteuid() == 0 else "",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
        ]
        for name in self.names:
            lines += [
                f"[program:{name}]",
                f"command={' '.join(PROGRAM_ARGV)}",
                f"directory={self.workdir}",
                "autostart=true",
                "autorestart=unexpected",
                "startsecs=0",
                "stopsignal=TERM",
                "stopwaitsecs=10",
                f"stdout_logfile={logs / (name + '.stdout.log')}",
                f"stderr_logfile={logs / (name + '.stderr.log')}",
                "",
            ]
        path = self.workdir / "supervisord.conf"
        path.write_text("\n".join(lines))
        return path

    def start(self) -> None:
        config = self.write_config()
        argv = [str(self.venv / "bin" / "supervisord"), "-n", "-c", str(config)]
        self.process = self.reaper.launch(argv, self.workdir / "supervisor.out", _child_env())
        wait_for(self.socket.exists, BOOT_TIMEOUT, "supervisord's socket")
        self.wait_all_running()

    def states(self) -> States:
        infos = self.rpc.supervisor.getAllProcessInfo()
        return {i["name"]: (i["statename"], i["pid"] or None) for i in infos}

    def stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(True)

    def start_all(self) -> None:
        self.rpc.supervisor.startAllProcesses(True)

    def close_client(self) -> None:
        self.rpc("close")()


def _toml(value: object) -> str:
    # JSON strings, numbers, booleans and arrays are valid TOML values.
    return json.dumps(value)


class Agentd(Target):
    label = "ocp-agentd"

    def __init__(self, workdir: Path, n: int, reaper: Reaper, host_id: int = 1) -> None:
        super().__init__(workdir, n, reaper)
        self.host_id = host_id
        self.socket = workdir / "agentd.sock"
        self.api = JsonUnixClient(str(self.socket))

    def write_config(self) -> Path:
        logs = self.workdir / "logs"
        lines = [
            "[agent]",
            f"host_id = {self.host_id}",
            f"install_home = {_toml(str(self.workdir))}",
            f"state_dir = {_toml(str(self.workdir / 'state'))}",
            f"log_dir = {_toml(str(logs))}",
            "",
            "[api]",
            f"socket = {_toml(str(self.socket))}",
            'socket_mode = "0600"',
            "",
        ]
        for name in self.names:
            lines += [
                f"[programs.{name}]",
                f"command = {_toml(PROGRAM_ARGV)}",
                f"cwd = {_toml(str(self.workdir))}",
                "start_seconds = 0",
                'stop_signal = "TERM"',
                "stop_timeout = 10",
                'autorestart = "on-failure"',
                f"stdout_log = {_toml(str(logs / (name + '.stdout.log')))}",
                f"stderr_log = {_toml(str(logs / (name + '.stderr.log')))}",
                "",
            ]
        path = self.workdir / "agentd.toml"
        path.write_text("\n".join(lines))
        return path

    def start(self) -> None:
        config = self.write_config()
        self.launch(config)
        self.wait_all_running()

    def launch(self, config: Path) -> None:
        argv = [sys.executable, "-m", "ocp_agentd", "--config", str(config)]
        self.process = self.reaper.launch(argv, self.workdir / "supervisor.out", _child_env())
        wait_for(self._answers, BOOT_TIMEOUT, "ocp-agentd's API")

    def _answers(self) -> bool:
        self.check_alive()
        if not self.socket.exists():
            return False
        try:
            self.api.request("GET", "/api/v1/status")
        except OSError:
            self.api.close()
            return False
        return True

    def states(self) -> States:
        return {
            item["name"]: (item["state"], item.get("pid"))
            for item in self.api.request("GET", "/api/v1/processes")
            if item["name"] != "ocp_agentd"
        }

    def stop_all(self) -> None:
        self.api.request("POST", "/api/v1/agent/stop-all", {})

    def start_all(self) -> None:
        self.api.request("POST", "/api/v1/agent/start-all", {})

    def close_client(self) -> None:
        self.api.close()
