"""ocp-agentd: wiring only. config -> Supervisor -> TaskEngine -> API -> systemd notify; signals."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ocp_agentd import __version__
from ocp_agentd.api.listeners import ApiStartError
from ocp_agentd.config import ConfigError, Settings, config_path, load_settings

log = logging.getLogger("ocp_agentd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_HANDOVER = 75  # the unit's RestartForceExitStatus: start the new version at once
HOUSEKEEPING_SECONDS = 15.0
# Idle, the daemon wakes only for what is due: the watchdog ping (half of WatchdogSec) and
# housekeeping. For BUSY_SECONDS after a request or a state change it also wakes every
# PROBE_SECONDS: how late each wake-up comes is the event loop's lag, so a stall that could
# make the watchdog miss its ping shows in ocp_agentd_event_loop_lag_seconds.
PROBE_SECONDS = 1.0
BUSY_SECONDS = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ocp-agentd",
        description=(
            "The OCP Agent daemon: supervises pos_proxy and the worker agents of this host "
            "and serves the OCP agent API on a unix socket (and optionally TCP)."
        ),
        epilog=(
            "Signals: TERM/INT stop every program and exit; HUP reloads the configuration; "
            f"USR2 hands over to a new daemon (exit {EXIT_HANDOVER}, programs keep running). "
            "The configuration path is --config, else $OCP_AGENTD_CONFIG, else "
            "/etc/ocp_agentd/config.toml; any key can be overridden as "
            "OCP_AGENTD_<SECTION>__<KEY>."
        ),
    )
    parser.add_argument("--config", metavar="PATH", help="the TOML configuration file")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration, print a summary, exit"
    )
    parser.add_argument("--version", action="version", version=f"ocp-agentd {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("OCP_AGENTD_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="daemon log level (default INFO, or $OCP_AGENTD_LOG_LEVEL)",
    )
    return parser.parse_args(argv)


def check_writable(directory: Path) -> str | None:
    """None if the daemon can create files in directory, else why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"{directory} is not writable: {exc.strerror or exc}"
    return None


def setup_logging(settings: Settings | None, level: str) -> None:
    from ocp_agentd.systemd import journal_handler

    root = logging.getLogger()
    root.setLevel(level)
    logging.raiseExceptions = False  # a full disk must not turn logging into crashes
    journal = journal_handler()
    if journal is not None:
        root.addHandler(journal)
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(stream)
    if settings is not None:
        path = settings.agent.log_dir / "ocp_agentd.log"
        with contextlib.suppress(OSError):
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=50 * 1024 * 1024, backupCount=5
            )
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            root.addHandler(handler)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Daemon:
    def __init__(self, settings: Settings, config_file: Path) -> None:
        from ocp_agentd.supervision import Supervisor
        from ocp_agentd.systemd import Notifier

        self.settings = settings
        self.config_file = config_file
        self.supervisor = Supervisor(settings)
        self.notifier = Notifier()
        self.started_at = time.time()
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._handover = False
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.server: Any = None
        self.app: Any = None
        self.task_engine: Any = None
        self.metrics: Any = None
        self.ctx: Any = None
        self._status_pending = False
        self._status_sent = ""
        self._last_activity = time.monotonic()
        self._wake = asyncio.Event()  # set by activity; ends the ticker's long idle sleep

    async def run(self) -> int:
        from ocp_agentd.api import AppContext, create_app, start_api
        from ocp_agentd.api.envelope import host_address

        loop = asyncio.get_running_loop()
        for signum, handler in (
            (signal.SIGTERM, self._request_stop),
            (signal.SIGINT, self._request_stop),
            (signal.SIGHUP, self._request_reload),
            (signal.SIGUSR2, self._request_handover),
        ):
            loop.add_signal_handler(signum, handler)

        log.info(
            "ocp-agentd %s starting (pid %d, host_id %d, config %s)",
            __version__,
            os.getpid(),
            self.settings.agent.host_id,
            self.config_file,
        )
        self.supervisor.add_listener(lambda *_: self._status_changed())
        self.supervisor.add_listener(lambda *_: self._note_activity())
        # Adoption is quick; the API answers (state "starting") while the rest start.
        plan = await self.supervisor.adopt()

        address = host_address()
        self.task_engine = self._make_task_engine(address)
        ctx = self.ctx = AppContext(
            settings=self.settings,
            supervisor=self.supervisor,
            started_at=self.started_at,
            task_engine=self.task_engine,
            server_address=address,
            state="starting",
            on_request=self._note_activity,
        )
        if self.task_engine is not None:
            from ocp_agentd.api.tasks import count_outcomes

            count_outcomes(self.task_engine, ctx.metrics)
        self.metrics = ctx.metrics
        self.app = create_app(ctx)
        self.server = await start_api(self.app, self.settings)
        await self.supervisor.start_pending(plan)
        if self.task_engine is not None:
            await self.task_engine.start()
        self.notifier.ready(self._status_text())
        log.info("ready: %s", self._status_text())

        self.ctx.state = "running"
        self._background(self._tick())
        await self._stop.wait()
        return await self._shutdown()

    def _make_task_engine(self, executor: str) -> Any:
        try:
            from ocp_agentd.client import AgentClient
            from ocp_agentd.tasks.engine import TaskEngine
        except ImportError as exc:
            log.warning("task engine unavailable: %s", exc)
            return None

        settings = self.settings
        return TaskEngine(
            store_path=settings.agent.state_dir / "tasks.sqlite3",
            client_factory=lambda task_id: AgentClient(socket_path=settings.api.socket,
                                                       task_id=task_id),
            host_id=settings.agent.host_id,
            executor=executor,
            logger=logging.getLogger("ocp_agentd.tasks"),
            timeouts=settings.tasks.timeouts,
        )

    async def _shutdown(self) -> int:
        self.notifier.stopping()
        if self.ctx is not None:
            self.ctx.state = "stopping"
        if self.task_engine is not None:
            with contextlib.suppress(Exception):
                await self.task_engine.close()
        if self.server is not None:
            await self.server.close()
        if self._handover:
            log.info("handing over: leaving %d program(s) running", len(self.supervisor.names()))
            await self.supervisor.close()
            return EXIT_HANDOVER
        log.info("stopping every program")
        await self.supervisor.shutdown()
        log.info("stopped")
        return self.exit_code

    # ---- signals -------------------------------------------------------------------------------

    def _request_stop(self) -> None:
        log.info("stop requested")
        self._stop.set()

    def _request_handover(self) -> None:
        log.info("handover requested")
        self._handover = True
        self._stop.set()

    def _request_reload(self) -> None:
        self._background(self.reload())

    async def reload(self) -> dict[str, list[str]] | None:
        async with self._reloading:
            self.notifier.reloading()
            if self.ctx is not None:
                self.ctx.state = "reloading"
            try:
                settings = await asyncio.to_thread(load_settings, self.config_file)
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays:\n%s", exc)
                if self.ctx is not None:
                    self.ctx.state = "running"
                self.notifier.ready(self._status_text())
                return None
            unchangeable = [
                key
                for key, old, new in (
                    ("agent.state_dir", self.settings.agent.state_dir, settings.agent.state_dir),
                    ("api.socket", self.settings.api.socket, settings.api.socket),
                    ("api.tcp", self.settings.api.tcp, settings.api.tcp),
                )
                if old != new
            ]
            if unchangeable:
                log.warning("reload: %s take effect only after a restart", ", ".join(unchangeable))
            report = await self.supervisor.reload(settings)
            self.settings.programs = settings.programs
            self.settings.api.tokens = settings.api.tokens
            log.info("reloaded: %s", {k: v for k, v in report.items() if v})
            if self.ctx is not None:
                self.ctx.state = "running"
            self.notifier.ready(self._status_text())
            return report

    # ---- periodic work ---------------------------------------------------------------------------

    def _note_activity(self) -> None:
        self._last_activity = time.monotonic()
        self._wake.set()

    async def _tick(self) -> None:
        """Loop-lag measurement, watchdog pings and log rotation, all from the event loop."""
        loop = asyncio.get_running_loop()
        watchdog = self.notifier.watchdog_interval()
        now = loop.time()
        next_ping = now if watchdog else float("inf")
        next_housekeeping = now + HOUSEKEEPING_SECONDS
        while True:
            now = loop.time()
            due = min(next_ping, next_housekeeping)
            busy = time.monotonic() - self._last_activity < BUSY_SECONDS
            if busy:
                due = min(due, now + PROBE_SECONDS)
                await asyncio.sleep(due - now)
                woken = False
            else:
                self._wake.clear()
                try:
                    async with asyncio.timeout_at(due):
                        await self._wake.wait()
                    woken = True
                except TimeoutError:
                    woken = False
            now = loop.time()
            if not woken:  # a timer wake-up: its lateness is the loop's lag
                self._record_lag(max(0.0, now - due))
            if now >= next_ping:
                self.notifier.ping()
                next_ping = now + watchdog
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_SECONDS
                try:
                    await self.supervisor.housekeep()
                except Exception:
                    log.exception("housekeeping failed")

    def _record_lag(self, lag: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_loop_lag(lag)

    def _status_changed(self) -> None:
        # Transitions come in bursts (a restart of 50 programs makes 200): counting every
        # program for each of them cost O(N^2) and one datagram each. Now one STATUS per
        # loop iteration at most, and only when its text changed.
        if self._status_pending or not self.notifier.enabled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send_status()
            return
        self._status_pending = True
        loop.call_soon(self._send_status)

    def _send_status(self) -> None:
        self._status_pending = False
        text = self._status_text()
        if text != self._status_sent:
            self._status_sent = text
            self.notifier.status(text)

    def _status_text(self) -> str:
        counts = self.supervisor.counts()
        total = sum(counts.values())
        text = f"{counts.get('RUNNING', 0)} of {total} programs running"
        troubled = [
            f"{n} {s.lower()}" for s, n in counts.items() if n and s in ("FATAL", "BACKOFF")
        ]
        return f"{text} ({', '.join(troubled)})" if troubled else text

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def take_instance_lock(state_dir: Path) -> int:
    """One daemon per state_dir: a second one would adopt and start the same programs.

    Returns the locked descriptor (kept open for the daemon's life; not inherited by
    programs). Raises RuntimeError naming the holder if another daemon has it.
    """
    path = state_dir / "ocp_agentd.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"another ocp-agentd (pid {holder}) already runs with state_dir {state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = config_path(args.config)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"ocp-agentd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"configuration {path} is valid")
        print(f"  host_id {settings.agent.host_id}, state_dir {settings.agent.state_dir}")
        print(
            f"  socket {settings.api.socket}"
            + (f", tcp {settings.api.tcp}" if settings.api.tcp else "")
        )
        for spec in settings.programs.values():
            kind = (
                "pos_proxy"
                if spec.role == "pos_proxy"
                else ("worker" if spec.is_worker else "fixed")
            )
            print(f"  {spec.name:<20} {kind:<9} {' '.join(spec.command)}")
        return EXIT_OK
    for directory in (settings.agent.state_dir, settings.agent.log_dir):
        problem = check_writable(directory)
        if problem:
            print(f"ocp-agentd: cannot start: {problem}", file=sys.stderr)
            return EXIT_FAILURE
    try:
        lock_fd = take_instance_lock(settings.agent.state_dir)
    except (OSError, RuntimeError) as exc:
        print(f"ocp-agentd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    setup_logging(settings, args.log_level)
    daemon = Daemon(settings, path)
    try:
        return asyncio.run(daemon.run())
    except Exception as exc:
        # Programs keep running (as after a crash); the next daemon adopts them.
        log.error("cannot run: %s", exc, exc_info=not isinstance(exc, OSError | ApiStartError))
        return EXIT_FAILURE
    finally:
        os.close(lock_fd)
