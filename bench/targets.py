"""The supervisors under test behind one small interface, with ocp-agentd and the floor.

Every target runs the same N programs (``/bin/sleep 100000``, output to files or
/dev/null, "started" as soon as they are spawned: no start delay, no ports) and is
driven through its own control interface. Whatever a target does, the bench judges the
effect from /proc (bench/watch.py); the target's own answers are reported beside it.
The peers (supervisord, circus) are in bench/peers.py, systemd in bench/systemd.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

import psutil

from bench.clients import JsonUnixClient
from bench.procs import ENV_MARK, Launched, Reaper, children, cpu_seconds, wait_for

PROGRAM_ARGV = ["/bin/sleep", "100000"]
BOOT_TIMEOUT = 120.0
CALL_TIMEOUT = 300.0

# How a held shell of ocp-agentd's (a standby: a program's next main, waiting in its
# other cgroup slot; ocp_agentd/supervision/standby.py) shows in its command line.
HELD_MARK = b": ocp-agentd held start;"
# settle(): the daemon makes a program's standby half a second after its start; once the
# count of standbys has not changed for STANDBY_STEADY seconds, the programs that have
# none get none (no cgroup, few descriptors).
STANDBY_STEADY = 1.0
SETTLE_TIMEOUT = 120.0

# program name -> (state, pid); pid None when the target's status does not carry it
States = dict[str, tuple[str, int | None]]


def program_names(n: int) -> list[str]:
    return [f"p{i:04d}" for i in range(n)]


def child_env() -> dict[str, str]:
    """The bench's environment without what would make a child think systemd runs it."""
    env = dict(os.environ)
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(key, None)
    return env


def _toml(value: object) -> str:
    # JSON strings, numbers, booleans and arrays are valid TOML values.
    return json.dumps(value)


class Target(ABC):
    """One supervisor with N programs. ``label`` names it in the tables."""

    label: str

    def __init__(self, workdir: Path, n: int, reaper: Reaper) -> None:
        self.workdir = workdir
        self.n = n
        self.names = program_names(n)
        self.reaper = reaper
        self.process: Launched | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def mark(self) -> str:
        """KEY=VALUE every program of this run carries in its environment."""
        return f"{ENV_MARK}={self.reaper.token}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def supervisor_pids(self) -> list[int]:
        """The processes whose CPU time is the supervisor's (not the programs')."""
        return [self.pid]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.supervisor_pids())

    def helper_pids(self) -> list[int]:
        """Processes the supervisor runs for itself beside its programs (ocp-agentd's log
        keepers); supervisord and circus keep their programs' output in their own
        process."""
        return []

    def start(self) -> float:
        """Launches the supervisor and waits until it answers; answers the seconds from
        launch to its first answer. Its programs start as configured (all of them)."""
        self.write_config()
        begin = time.monotonic()
        self.process = self.reaper.launch(
            self.argv(), self.workdir / "supervisor.out", child_env(), cwd=self.workdir
        )
        wait_for(self.answers, BOOT_TIMEOUT, f"{self.label}'s first answer", 0.001)
        return time.monotonic() - begin

    def answers(self) -> bool:
        """One cheap request; False while the supervisor cannot answer yet."""
        self.check_alive()
        try:
            self.ping()
        except (OSError, ConnectionError, EOFError):
            self.close_client()
            return False
        return True

    @abstractmethod
    def write_config(self) -> None: ...

    @abstractmethod
    def argv(self) -> list[str]: ...

    @abstractmethod
    def ping(self) -> None:
        """The cheapest request the supervisor answers (its own state)."""

    @abstractmethod
    def states(self) -> States:
        """One status request for every program."""

    @abstractmethod
    def stop_all(self) -> None:
        """Stops every program; returns when the supervisor says they are stopped."""

    @abstractmethod
    def start_all(self) -> None:
        """Starts every program; returns when the supervisor says they are started."""

    @abstractmethod
    def close_client(self) -> None: ...

    def cli_status(self) -> list[str] | None:
        """The operator's status command for this supervisor, or None."""
        return None

    def restart_all(self) -> None:
        # No target has one restart-all call for every program; supervisorctl's
        # "restart all" is exactly this pair.
        self.stop_all()
        self.start_all()

    def settle(self) -> None:  # noqa: B027 - most targets need nothing here
        """Returns once the work the target does by itself after its programs started
        is done, so that the next measured operation starts from a quiet target, as on a
        host where the programs have been running a while."""

    def begin_turn(self) -> None:  # noqa: B027 - most targets need nothing here
        """Before this target's measured turn (the poller variant starts its poller)."""

    def end_turn(self) -> None:  # noqa: B027
        """After this target's turn."""

    def check_alive(self) -> None:
        if self.process is None or not self.process.alive():
            log = self.workdir / "supervisor.out"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{self.label} is not running; its output ends with:\n{tail}")

    def reported_running(self, exclude_pids: set[int] | frozenset[int] = frozenset()) -> bool:
        """True when the target's own status shows all N programs RUNNING, with pids
        (where its status has them) that are not in exclude_pids."""
        self.check_alive()
        states = self.states()
        if len(states) != self.n:
            return False
        return all(
            state == "RUNNING" and (pid is None or pid not in exclude_pids)
            for state, pid in states.values()
        )

    def wait_reported(self, exclude_pids: set[int] | frozenset[int] = frozenset()) -> float:
        """Polls the status (back to back) until reported_running; answers the
        time.monotonic() of the answer that first showed it."""
        while True:
            if self.reported_running(exclude_pids):
                return time.monotonic()
            time.sleep(0.0005)

    def stop(self) -> None:
        self.close_client()
        if self.process is not None:
            self.process.stop()
            self.process = None


class Agentd(Target):
    """ocp-agentd, run from the project's venv (``python``) on a config written here."""

    label = "ocp-agentd"

    def __init__(
        self, workdir: Path, n: int, reaper: Reaper, python: str, ctl: list[str] | None = None,
        host_id: int = 1, cgroup: str | None = None,
    ) -> None:
        super().__init__(workdir, n, reaper)
        self.python = python
        self.cgroup = cgroup  # [agent] cgroup (SPEC section 9); None: the default
        if cgroup is not None:
            self.label = f"{Agentd.label}, cgroup {cgroup}"
        self.ctl = ctl
        self.host_id = host_id
        self.socket = workdir / "agentd.sock"
        self.config = workdir / "agentd.toml"
        self.api = JsonUnixClient(str(self.socket), CALL_TIMEOUT)

    def helper_pids(self) -> list[int]:
        """The daemon's log keepers (one per program: `python -m ocp_agentd.logkeeper`)."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return []
        found = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if "ocp_agentd.logkeeper" in child.cmdline():
                    found.append(child.pid)
        return found

    def write_config(self) -> None:
        logs = self.workdir / "logs"
        lines = [
            "[agent]",
            f"host_id = {self.host_id}",
            f"install_home = {_toml(str(self.workdir))}",
            f"state_dir = {_toml(str(self.workdir / 'state'))}",
            f"log_dir = {_toml(str(logs))}",
            *([f"cgroup = {_toml(self.cgroup)}"] if self.cgroup is not None else []),
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
        self.config.write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [self.python, "-m", "ocp_agentd", "--config", str(self.config)]

    def ping(self) -> None:
        if not self.socket.exists():
            raise ConnectionError("no socket yet")
        self.api.request("GET", "/api/v1/status")

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

    def standbys(self) -> int:
        """The daemon's held shells (standbys) that exist now."""
        count = 0
        for pid in children(self.pid):
            with contextlib.suppress(OSError):
                if HELD_MARK in Path(f"/proc/{pid}/cmdline").read_bytes():
                    count += 1
        return count

    def settle(self) -> None:
        """Waits until every running program has its standby (made half a second
        after its start, in the background), or their count has stopped growing short of
        N (no cgroup: none are made). A settled daemon is what an operator's stop-all or
        restart-all meets on a host whose programs have run a while."""
        if self.cgroup == "off":
            return  # standbys live in cgroup slots: none without a cgroup
        begin = changed = time.monotonic()
        last = -1
        while True:
            count = self.standbys()
            now = time.monotonic()
            if count >= self.n or now - begin > SETTLE_TIMEOUT:
                return
            if count != last:
                last, changed = count, now
            elif now - changed >= STANDBY_STEADY:
                return
            time.sleep(0.01)

    def cli_status(self) -> list[str] | None:
        return None if self.ctl is None else [*self.ctl, "status", "--socket", str(self.socket)]


class Floor(Target):
    """The minimal spawner of bench/floor.py, driven over its stdin and stdout."""

    label = "floor"

    def __init__(
        self, workdir: Path, n: int, reaper: Reaper, program: list[str] = PROGRAM_ARGV
    ) -> None:
        super().__init__(workdir, n, reaper)
        self.program = program
        self.pipe: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        pass

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.floor", str(self.n), *self.program]

    def start(self) -> float:
        env = dict(child_env(), **{ENV_MARK: self.reaper.token})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                          env.get("PYTHONPATH")]))
        begin = time.monotonic()
        self.process = self.reaper.launch(
            self.argv(), self.workdir / "supervisor.out", env, pipes=True
        )
        self.pipe = self.process.proc
        self.ping()
        return time.monotonic() - begin

    def _ask(self, command: str) -> str:
        assert self.pipe is not None and self.pipe.stdin and self.pipe.stdout
        self.pipe.stdin.write(command.encode() + b"\n")
        self.pipe.stdin.flush()
        line = self.pipe.stdout.readline()
        if not line:
            self.check_alive()
            raise EOFError("the floor closed its stdout")
        return line.decode().strip()

    def ping(self) -> None:
        self._ask("status")

    def states(self) -> States:
        pids = json.loads(self._ask("status"))
        return {
            name: ("RUNNING" if pid else "STOPPED", pid)
            for name, pid in zip(self.names, pids.values(), strict=True)
        }

    def stop_all(self) -> None:
        self._ask("stop")

    def start_all(self) -> None:
        self._ask("start")

    def close_client(self) -> None:
        pass

    def cli_status(self) -> list[str] | None:
        return ["/bin/true"]  # the floor of any command: one exec of a process that exits
