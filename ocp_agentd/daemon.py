"""ocp-agentd: wiring only. config -> Supervisor -> TaskEngine -> API -> systemd notify; signals.

Preflight checks and the instance lock are in preflight.py, the periodic work in ticker.py,
the STATUS line in systemd.py, reload's diffing in Supervisor.reload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ocp_agentd import __version__, descriptors, safefs, signals
from ocp_agentd.api import AppContext, create_app, start_api
from ocp_agentd.api.envelope import host_address
from ocp_agentd.api.listeners import ApiServer, ApiStartError
from ocp_agentd.api.metrics import AgentMetrics
from ocp_agentd.api.tasks import count_outcomes
from ocp_agentd.background import Tasks
from ocp_agentd.client import AgentClient
from ocp_agentd.config import (
    ConfigError,
    Settings,
    config_path,
    load_settings,
    restart_only_changes,
    summary,
)
from ocp_agentd.events import EventHub, TaskEvents
from ocp_agentd.hostcheck import HostProblem, host_problems
from ocp_agentd.logformat import line_formatter, writes_log_file
from ocp_agentd.logqueue import handlers_off_the_loop
from ocp_agentd.preflight import check_writable, take_instance_lock
from ocp_agentd.supervision import Supervisor, cgroups
from ocp_agentd.supervision.cgroups import CgroupError
from ocp_agentd.supervision.intent import ticket
from ocp_agentd.supervision.program import limits_of
from ocp_agentd.supervision.supervisor import BootPlan
from ocp_agentd.systemd import Notifier, StatusReporter, journal_handler, status_text
from ocp_agentd.tasks.engine import TaskEngine
from ocp_agentd.tasks.store import Retention
from ocp_agentd.ticker import Ticker

if TYPE_CHECKING:  # the api package alone imports aiohttp.web at run time
    from aiohttp import web

log = logging.getLogger("ocp_agentd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_HANDOVER = 75  # the unit's RestartForceExitStatus: start the new version at once


def build_parser() -> argparse.ArgumentParser:
    """ocp-agentd's command line (also the source of its man page, cli/docs.py)."""
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
    parser.add_argument(
        "--config", metavar="PATH",
        help="the TOML configuration file (default: $OCP_AGENTD_CONFIG, else "
        "/etc/ocp_agentd/config.toml)")
    parser.add_argument(
        "--check", action="store_true",
        help="validate the configuration and what its programs need from this host (user, "
        "cwd, command), print a summary, exit: 0 valid, 1 this host lacks something (each "
        "key named), 2 invalid file (default: run)"
    )
    parser.add_argument("--version", action="version", version=f"ocp-agentd {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("OCP_AGENTD_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="daemon log level (default INFO, or $OCP_AGENTD_LOG_LEVEL)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def setup_logging(settings: Settings | None, level: str) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    logging.raiseExceptions = False  # a full disk must not turn logging into crashes
    journal = journal_handler()
    if journal is not None:
        root.addHandler(journal)
    else:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(line_formatter())
        root.addHandler(stream)
    if settings is not None and writes_log_file(settings.agent.daemon_log_file):
        path = settings.agent.log_dir / "ocp_agentd.log"
        with contextlib.suppress(OSError):
            handler = logging.handlers.RotatingFileHandler(
                path, maxBytes=50 * 1024 * 1024, backupCount=5
            )
            handler.setFormatter(line_formatter())
            root.addHandler(handler)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    handlers_off_the_loop(root)


class Daemon:
    """The running daemon: owns the supervisor, the task engine, the API and the ticker."""

    def __init__(self, settings: Settings, config_file: Path) -> None:
        self.settings = settings
        self.config_file = config_file
        self.events = EventHub()
        self.supervisor = Supervisor(settings, events=self.events)
        self.notifier = Notifier()
        self.status = StatusReporter(self.notifier, self._status_text)
        self.started_at = time.time()
        self.exit_code = EXIT_OK
        self._stop = asyncio.Event()
        self._handover = False
        self._reloading = asyncio.Lock()
        self._background = Tasks(log)
        self.server: ApiServer | None = None
        self.app: web.Application | None = None
        self.task_engine: TaskEngine | None = None
        self.metrics: AgentMetrics | None = None
        self.ctx: AppContext | None = None
        self.ticker = Ticker(self.notifier, self.supervisor.housekeep, self._record_lag)
        self.supervisor.log_watch.on_change = self.ticker.want_housekeeping
        self._booted = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        descriptors.quiet_accept_errors(loop)
        signals.install(loop, {
            signal.SIGTERM: self._request_stop,
            signal.SIGINT: self._request_stop,
            signal.SIGHUP: self._request_reload,
            signal.SIGUSR2: self._request_handover,
        })

        log.info(
            "ocp-agentd %s starting (pid %d, host_id %d, config %s)",
            __version__,
            os.getpid(),
            self.settings.agent.host_id,
            self.config_file,
        )
        self.supervisor.add_listener(lambda *_: self.status.changed())
        self.supervisor.add_listener(lambda *_: self.ticker.note_activity())
        # Adoption is quick; the API answers (state "starting") while the rest start.
        plan = await self.supervisor.adopt()

        address = host_address()
        engine = self.task_engine = self._make_task_engine(address)
        ctx = self.ctx = AppContext(
            settings=self.settings,
            supervisor=self.supervisor,
            started_at=self.started_at,
            task_engine=engine,
            server_address=address,
            state="starting",
            requests=self.ticker,
            events=self.events,
            reload=self.apply_reload,
        )
        count_outcomes(engine, ctx.metrics)
        engine.add_listener(TaskEvents(self.events))
        self.metrics = ctx.metrics
        self.app = create_app(ctx)
        self.server = await start_api(self.app, self.settings)
        # From here every operation is served: the initial starts go on in the background
        # and a caller's stop or start never waits behind their readiness waits.
        await engine.start()
        self._background.spawn(self.ticker.run(), name="ticker")
        self._background.spawn(self._boot(plan, ticket()), name="boot")
        await self._stop.wait()
        return await self._shutdown()

    async def _boot(self, plan: BootPlan, since: int) -> None:
        """The initial starts (requested at ticket `since`), then READY=1 and the state
        "running"."""
        try:
            await self.supervisor.start_pending(plan, since)
        finally:
            self._booted = True
            if self.ctx is not None and self.ctx.state == "starting":
                self.ctx.state = "running"
            self.notifier.ready(self._status_text())
            log.info("ready: %s", self._status_text())

    def _make_task_engine(self, executor: str) -> TaskEngine:
        settings = self.settings
        return TaskEngine(
            store_path=settings.agent.state_dir / "tasks.sqlite3",
            client_factory=lambda task_id: AgentClient(socket_path=settings.api.socket,
                                                       task_id=task_id),
            host_id=settings.agent.host_id,
            executor=executor,
            logger=logging.getLogger("ocp_agentd.tasks"),
            timeouts=settings.tasks.timeouts,
            retention=Retention(settings.tasks.keep_days, settings.tasks.keep_max,
                                settings.tasks.log_max_lines),
        )

    async def _shutdown(self) -> int:
        self.notifier.stopping()
        if self.ctx is not None:
            self.ctx.state = "stopping"
        await self._background.close()
        self.events.close()  # ends event streams and log followers: they must not hold the stop
        if self.task_engine is not None:
            try:
                await self.task_engine.close()
            except Exception:  # the programs must still be stopped or handed over
                log.exception("closing the task engine failed")
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
        self._background.spawn(self.reload(), name="reload")

    async def reload(self) -> dict[str, list[str]] | None:
        """SIGHUP: apply_reload, with a refused file logged; None when it was refused or
        applying it failed (logged)."""
        try:
            return await self.apply_reload()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays:\n%s", exc)
            return None
        except Exception:
            log.exception("reload failed; the programs keep their current state")
            return None

    async def apply_reload(self) -> dict[str, list[str]]:
        """Reads the configuration again and applies it (Supervisor.reload): answers
        {added, removed, changed, unchanged}. Raises ConfigError, with nothing changed,
        when the file is invalid (POST /api/v1/agent/reload answers 1006 with it).
        Whatever happens, the state leaves "reloading"; a caller's stop answered after
        the reload was requested is not undone by it."""
        since = ticket()
        async with self._reloading:
            self.notifier.reloading()
            self._set_api_state("reloading")
            try:
                settings = await asyncio.to_thread(load_settings, self.config_file)
                unchangeable = restart_only_changes(self.settings, settings)
                if unchangeable:
                    log.warning("reload: %s take effect only after a restart",
                                ", ".join(unchangeable))
                for problem in host_problems(settings):
                    log.error("reload: %s (that program cannot start until this is fixed)",
                              problem)
                report = await self.supervisor.reload(settings, since)
                self.settings.programs = settings.programs
                self.settings.api.tokens = settings.api.tokens
                self._reload_tls(settings)
            except ConfigError as exc:
                self.events.reloaded(None, " ".join(str(exc).split()))
                raise
            finally:
                if self.ctx is not None and self.ctx.state == "reloading":
                    self.ctx.state = "running" if self._booted else "starting"
                self.notifier.ready(self._status_text())
            log.info("reloaded: %s", {k: v for k, v in report.items() if v})
            self.events.reloaded(report)
            return report

    def _reload_tls(self, settings: Settings) -> None:
        if self.server is None or self.server.tls is None:
            return
        try:
            self.server.reload_tls(settings.api)
        except (OSError, ssl.SSLError) as exc:
            log.error("reload: cannot read the TLS files, the old certificate stays: %s", exc)
            return
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            setattr(self.settings.api, key, getattr(settings.api, key))
        log.info("reload: TLS certificate re-read from %s", settings.api.tls_cert)

    def _set_api_state(self, state: str) -> None:
        if self.ctx is not None:
            self.ctx.state = state

    # ---- wiring of the ticker and the status line ---------------------------------------------

    def _record_lag(self, lag: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_loop_lag(lag)

    def _status_text(self) -> str:
        return status_text(self.supervisor.counts())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = config_path(args.config)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"ocp-agentd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    problems = host_problems(settings)
    if args.check:
        return _report_check(settings, path, problems)
    try:
        lock_fd = _claim_host(settings)
    except (OSError, RuntimeError) as exc:
        print(f"ocp-agentd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return _run(settings, path, args.log_level, problems)
    finally:
        os.close(lock_fd)


def _report_check(settings: Settings, path: Path, problems: list[HostProblem]) -> int:
    """``--check``: the configuration's summary and what cgroups can enforce here on
    stdout, what this host lacks on stderr.

    Answers EXIT_OK, or EXIT_FAILURE for a valid file that this host cannot run as it is
    (an invalid file never gets here: it is EXIT_CONFIG)."""
    could_start, lines = cgroups.check_report(
        settings.agent.cgroup,
        settings.agent.state_dir,
        {name: limits_of(spec) for name, spec in settings.programs.items()},
    )
    cannot_run = {problem.key[len("programs."):problem.key.rindex(".")]
                  for problem in problems if problem.key.startswith("programs.")}
    try:
        print(summary(settings, path, cannot_run))
        print("\n".join(lines), flush=True)
    except BrokenPipeError:
        # The reader went away (`--check | head`): the rest, and the interpreter's final
        # flush, go to /dev/null; the exit status still says what the check found.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    if problems:
        print(f"ocp-agentd: {path} cannot run on this host:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if could_start else EXIT_FAILURE


def _claim_host(settings: Settings) -> int:
    """Checks that the state and log directories are writable and that no one but root
    can change them (safefs), then takes the instance lock.

    Answers the lock's descriptor (held until the daemon exits). Raises RuntimeError
    naming the directory and what is wrong with it, or what take_instance_lock raises
    (OSError; RuntimeError when another daemon holds the lock)."""
    for directory in (settings.agent.state_dir, settings.agent.log_dir):
        problem = check_writable(directory) or safefs.check_directory(directory, os.getuid())
        if problem:
            raise RuntimeError(problem)
    return take_instance_lock(settings.agent.state_dir)


def _run(settings: Settings, path: Path, log_level: str, problems: list[HostProblem]) -> int:
    """Logging and the descriptor limit set up, then the daemon until it stops; answers
    its exit status (EXIT_FAILURE when it cannot start or run)."""
    setup_logging(settings, log_level)
    for problem in problems:
        log.error("%s (that program cannot start until this is fixed)", problem)
    limits = descriptors.raise_nofile_limit()
    if limits.raised:
        log.info("descriptor limit raised from %d to %d (programs keep %d; %d kept for the API)",
                 limits.inherited[0], limits.soft, limits.inherited[0], limits.reserve)
    try:
        daemon = Daemon(settings, path)
    except CgroupError as exc:
        print(f"ocp-agentd: cannot start: {exc.strerror}", file=sys.stderr)
        log.error("cannot start: %s", exc.strerror)
        return EXIT_FAILURE
    try:
        return asyncio.run(daemon.run())
    except Exception as exc:
        # Programs keep running (as after a crash); the next daemon adopts them.
        log.error("cannot run: %s", exc, exc_info=not isinstance(exc, OSError | ApiStartError))
        return EXIT_FAILURE
