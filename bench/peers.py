"""The peers on the host: supervisord 4.3 (quiet, and with a client polling it every
10 ms) and circus 0.19, both from PyPI in the bench's own venv (bench/.venv-peers).

Each is configured as its documentation ships it, plus what makes the programs the same
as ocp-agentd's: started once spawned (supervisord ``startsecs=0``, circus
``warmup_delay=0``), SIGTERM then 10 s before SIGKILL, restarted when they die
unexpectedly, output to files.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from circus.client import CircusClient

from bench.clients import xmlrpc_proxy
from bench.procs import Reaper
from bench.targets import CALL_TIMEOUT, PROGRAM_ARGV, States, Target

POLL_PERIOD = 0.01
# circus runs one exclusive command at a time (start, stop, ...) and refuses another
# meanwhile with this reason (circus.util.synchronized), e.g. a stop sent while the
# arbiter still runs the start of its watchers at launch, after status shows them active.
CIRCUS_BUSY = ("arbiter is already running", "arbiter is restarting")
CIRCUS_BUSY_PAUSE = 0.005


class Supervisord(Target):
    """supervisord, driven over its unix socket by XML-RPC on one keep-alive connection."""

    label = "supervisord"

    def __init__(self, workdir: Path, n: int, reaper: Reaper, venv: Path) -> None:
        super().__init__(workdir, n, reaper)
        self.venv = venv
        self.socket = workdir / "supervisor.sock"
        self.config = workdir / "supervisord.conf"
        self.rpc = xmlrpc_proxy(str(self.socket), CALL_TIMEOUT)

    def write_config(self) -> None:
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
            "user=root",
            "",
            "[supervisorctl]",
            f"serverurl=unix://{self.socket}",
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
        self.config.write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [str(self.venv / "bin" / "supervisord"), "-n", "-c", str(self.config)]

    def ping(self) -> None:
        if not self.socket.exists():
            raise ConnectionError("no socket yet")
        self.rpc.supervisor.getState()

    def states(self) -> States:
        infos = self.rpc.supervisor.getAllProcessInfo()
        return {i["name"]: (i["statename"], i["pid"] or None) for i in infos}

    def stop_all(self) -> None:
        self.rpc.supervisor.stopAllProcesses(True)

    def start_all(self) -> None:
        self.rpc.supervisor.startAllProcesses(True)

    def close_client(self) -> None:
        self.rpc("close")()

    def cli_status(self) -> list[str] | None:
        return [str(self.venv / "bin" / "supervisorctl"), "-c", str(self.config), "status"]


class PolledSupervisord(Target):
    """The same supervisord while a second client asks its state every 10 ms
    (``supervisor.getState``): each request wakes its loop, which otherwise sleeps up to
    1 s in poll(2) and does not wake for SIGCHLD."""

    label = "supervisord+poll"

    def __init__(self, quiet: Supervisord) -> None:
        self.quiet = quiet
        self.workdir, self.n, self.names, self.reaper = (
            quiet.workdir, quiet.n, quiet.names, quiet.reaper
        )
        self.poller: subprocess.Popen[bytes] | None = None

    @property
    def process(self):  # type: ignore[override]
        return self.quiet.process

    def supervisor_pids(self) -> list[int]:
        return self.quiet.supervisor_pids()

    def write_config(self) -> None:
        raise NotImplementedError("the quiet supervisord is launched instead")

    def argv(self) -> list[str]:
        return self.quiet.argv()

    def start(self) -> float:
        raise NotImplementedError("the quiet supervisord is launched instead")

    def ping(self) -> None:
        self.quiet.ping()

    def states(self) -> States:
        return self.quiet.states()

    def stop_all(self) -> None:
        self.quiet.stop_all()

    def start_all(self) -> None:
        self.quiet.start_all()

    def close_client(self) -> None:
        self.quiet.close_client()

    def begin_turn(self) -> None:
        self.poller = subprocess.Popen(
            [sys.executable, "-m", "bench.poller", str(self.quiet.socket), str(POLL_PERIOD)],
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).parent.parent,
        )

    def end_turn(self) -> None:
        if self.poller is not None:
            self.poller.terminate()
            self.poller.wait(10)
            self.poller = None

    def stop(self) -> None:
        self.end_turn()


class Circus(Target):
    """circusd, driven over its ZeroMQ endpoint by circus.client (one socket)."""

    label = "circus"

    def __init__(self, workdir: Path, n: int, reaper: Reaper, venv: Path) -> None:
        super().__init__(workdir, n, reaper)
        self.venv = venv
        self.endpoint = f"ipc://{workdir / 'circus.sock'}"
        self.config = workdir / "circus.ini"
        self._client: CircusClient | None = None

    @property
    def client(self) -> CircusClient:
        if self._client is None:
            self._client = CircusClient(endpoint=self.endpoint, timeout=CALL_TIMEOUT)
        return self._client

    def write_config(self) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        lines = [
            "[circus]",
            f"endpoint = {self.endpoint}",
            f"pubsub_endpoint = ipc://{self.workdir / 'circus-pub.sock'}",
            "statsd = false",
            "",
        ]
        for name in self.names:
            lines += [
                f"[watcher:{name}]",
                f"cmd = {PROGRAM_ARGV[0]}",
                f"args = {' '.join(PROGRAM_ARGV[1:])}",
                f"working_dir = {self.workdir}",
                "numprocesses = 1",
                "copy_env = true",
                "warmup_delay = 0",
                "graceful_timeout = 10",
                "stop_signal = TERM",
                "respawn = true",
                "stdout_stream.class = FileStream",
                f"stdout_stream.filename = {logs / (name + '.stdout.log')}",
                "stderr_stream.class = FileStream",
                f"stderr_stream.filename = {logs / (name + '.stderr.log')}",
                "",
            ]
        self.config.write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [str(self.venv / "bin" / "circusd"), str(self.config)]

    def _call(self, command: str, **properties: object) -> dict:
        """One command; sent again while the arbiter refuses it as busy with another
        exclusive command (CIRCUS_BUSY), up to CALL_TIMEOUT."""
        deadline = time.monotonic() + CALL_TIMEOUT
        while True:
            answer = self.client.call({"command": command, "properties": properties})
            if answer.get("status") == "ok":
                return answer
            busy = str(answer.get("reason", "")).startswith(CIRCUS_BUSY)
            if not busy or time.monotonic() > deadline:
                raise RuntimeError(f"circus {command}: {answer}")
            time.sleep(CIRCUS_BUSY_PAUSE)

    def ping(self) -> None:
        if not (self.workdir / "circus.sock").exists():
            raise ConnectionError("no socket yet")
        self._call("list")

    def states(self) -> States:
        # circus's one call for every watcher answers the state without the pids.
        statuses = self._call("status")["statuses"]
        return {
            name: ("RUNNING" if state == "active" else state.upper(), None)
            for name, state in statuses.items()
        }

    def stop_all(self) -> None:
        self._call("stop", waiting=True)

    def start_all(self) -> None:
        self._call("start", waiting=True)

    def close_client(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    def cli_status(self) -> list[str] | None:
        return [str(self.venv / "bin" / "circusctl"), "--endpoint", self.endpoint, "status"]
