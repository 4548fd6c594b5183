"""ocp-agentctl's argument parser: every command, its help, its defaults (SPEC sections 7
and 12). The man page and the bash completion are generated from it (cli/docs.py).

A command's arguments are defined when that command is parsed (:class:`LazyCommand`):
defining all twenty of them took longer than running ``status``. ``build_parser()``
defines everything at once (for the docs and the tests); ``build_parser(lazy=True)`` is
what ``ocp-agentctl`` runs. Both parse, print help and fail alike.
"""

from __future__ import annotations

import argparse
import os
import sys

from ocp_agentd import __version__
from ocp_agentd.cli import programs, tasks
from ocp_agentd.cli.locate import DEFAULT_CONFIG, DEFAULT_SOCKET
from ocp_agentd.cli.output import PROG
from ocp_agentd.cli.transport import TOKEN_ENV

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

EPILOG = """\
examples:
  ocp-agentctl status
  ocp-agentctl restart ocp_exporter --timeout 30
  ocp-agentctl logs ocp_exporter -f
  ocp-agentctl agent restart --wait
  ocp-agentctl --json status | jq '.processes[] | [.name, .pid]'

exit status: 0 success, 1 the operation failed or was refused, 2 usage error,
3 ocp-agentd is not running (or cannot be reached).

environment: NO_COLOR (any value) turns colours off; they are used only on a terminal.
"""
EVENT_KINDS = ("state", "probe", "reload", "task", "subtask")
WAIT_DEFAULT = 3600.0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("seconds must be more than 0 and at most 86400")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _task_id(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("task ids start at 1")
    return value


def _terminal_columns() -> int:
    """The terminal's width as ``shutil.get_terminal_size()`` answers it ($COLUMNS, else the
    width of the terminal on standard output, else 80), without importing shutil: argparse
    asks for it each time an argument is added, and shutil is milliseconds of start-up."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, as wide as argparse makes it (the terminal's width less 2)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's RawDescriptionHelpFormatter, as wide as :class:`HelpFormatter`."""


class LazyCommand(argparse.ArgumentParser):
    """A (sub)command's parser whose arguments ``define(parser)`` adds when the parser is
    first used to parse (argparse hands a command's arguments to its parser only), or when
    :meth:`define_all` is called. Until then it carries its name, help and description,
    which is all that its parent's help and errors show of it."""

    def __init__(self, *args: Any,
                 define: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._define = define

    def define_all(self) -> None:
        """Adds the arguments now, and those of every command below this one."""
        if self._define is not None:
            define, self._define = self._define, None
            define(self)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if isinstance(sub, LazyCommand):
                        sub.define_all()

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        if self._define is not None:
            define, self._define = self._define, None
            define(self)
        return super().parse_known_args(args, namespace)


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """Options accepted before and after the command (SUPPRESS: a value given before the
    command is not overwritten by the subcommand's default)."""
    group = parser.add_argument_group("connection and output")
    # --socket and --url exclude each other (checked in main: an argparse mutually
    # exclusive group loses its section title when copied into the subcommands).
    group.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS,
        help=f"the daemon's unix socket (default: api.socket of the config, else "
        f"{DEFAULT_SOCKET})")
    group.add_argument(
        "--url", metavar="URL", default=argparse.SUPPRESS,
        help="talk TCP instead: http://HOST:PORT, or https://HOST:PORT for TLS (a token "
        "is needed on TCP; default: the unix socket)")
    group.add_argument(
        "--token", metavar="TOKEN", default=argparse.SUPPRESS,
        help=f"bearer token for --url (default: ${TOKEN_ENV})")
    group.add_argument(
        "--cacert", metavar="PEM", default=argparse.SUPPRESS,
        help="CA certificate(s) that sign the daemon's TLS certificate (default: the "
        "system's)")
    group.add_argument(
        "--cert", metavar="PEM", default=argparse.SUPPRESS,
        help="client certificate for mutual TLS (default: none)")
    group.add_argument(
        "--key", metavar="PEM", default=argparse.SUPPRESS,
        help="the client certificate's private key (default: in the --cert file)")
    group.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS,
        help=f"the daemon's config, to find its socket (default: $OCP_AGENTD_CONFIG, else "
        f"{DEFAULT_CONFIG})")
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print the answer as JSON, for scripts (default: tables)")


class _Commands:
    """Adds commands to one subparsers action: each a :class:`LazyCommand` whose
    ``define`` first adds the common options (when ``common`` is true), then its own."""

    def __init__(self, commands: argparse._SubParsersAction, common: bool) -> None:
        self.commands = commands
        self.common = common

    def add(self, name: str, summary: str, description: str,
            define: Callable[[argparse.ArgumentParser], None] | None = None,
            **defaults: Any) -> None:
        def define_command(parser: argparse.ArgumentParser) -> None:
            if self.common:
                add_common_options(parser)
            if define is not None:
                define(parser)
            parser.set_defaults(**defaults)

        self.commands.add_parser(name, help=summary, description=description,
                                 define=define_command)


def _wait_options(parser: argparse.ArgumentParser, wait: bool = True) -> None:
    if wait:
        parser.add_argument("--wait", action="store_true",
                            help="follow the task live until it ends; exit 1 unless it ends "
                            "SUCCESSFUL (default: answer at once with the started task)")
    parser.add_argument("--wait-timeout", type=_positive_seconds, default=WAIT_DEFAULT,
                        metavar="S",
                        help=f"stop following after S seconds (default: {WAIT_DEFAULT:g})")


def _status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="program names (default: every program)")
    parser.add_argument("--names", dest="names_only", action="store_true",
                        help="print only the program names, one a line, for scripts and "
                        "shell completion (default: the table)")
    parser.add_argument("-l", "--long", action="store_true",
                        help="after the table, each program's command, user, cgroup, "
                        "limits, CPU and memory use, last liveness probe, log files and "
                        "last exit in full (default: the table alone)")


def _operate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME|all", help="a program name, or all (the workers)")
    parser.add_argument("--timeout", type=_positive_seconds, metavar="S",
                        help="seconds to wait for the outcome (default: the program's "
                        "start_timeout / stop_timeout)")
    parser.add_argument("--force", action="store_true",
                        help="act on a program that is not operable, e.g. pos_proxy "
                        "(default: refused with code 2002)")


def _verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", metavar="NAME", help="a program (default: all)")


def _logs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a program name")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new output (default: print and exit)")
    parser.add_argument("-n", "--lines", type=_count, default=10, metavar="N",
                        help="how many last lines to print first (default: 10)")
    parser.add_argument("--stderr", action="store_true",
                        help="the stderr log (default: stdout)")


def _events(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", action="append", choices=EVENT_KINDS, metavar="KIND",
                        help=f"only this kind, may be repeated: {', '.join(EVENT_KINDS)} "
                        "(default: every kind)")
    parser.add_argument("--last", type=_count, default=0, metavar="N",
                        help="start with the N most recent events, at most 1000 (default: "
                        "0, only new ones)")
    parser.add_argument("--count", type=_count, default=0, metavar="N",
                        help="exit after N events (default: 0, follow until interrupted)")


def _signal(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("signal", metavar="SIG", type=programs.signal_name,
                        help="a signal name or number: HUP, SIGUSR1, term, 9, ...")
    parser.add_argument("name", metavar="NAME", help="a program name")


def _subcommands(parser: argparse.ArgumentParser, dest: str, common: bool) -> _Commands:
    actions = parser.add_subparsers(dest=dest, metavar="ACTION", required=True,
                                    parser_class=LazyCommand)
    return _Commands(actions, common)


def _agent(common: bool) -> Callable[[argparse.ArgumentParser], None]:
    def define(parser: argparse.ArgumentParser) -> None:
        actions = _subcommands(parser, "agent_action", common)
        for action, summary in (("restart", "restart pos_proxy, then every worker"),
                                ("stop", "stop every worker process")):
            actions.add(action, summary, f"{summary[0].upper()}{summary[1:]} as an OCP "
                        "task; prints the task (or follows it with --wait).", _wait_options,
                        handler=tasks.cmd_agent, action=action)
    return define


def _task_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=_task_id, default=10, metavar="N",
                        help="tasks per page (default: 10)")
    parser.add_argument("--page", type=_task_id, default=1, metavar="N",
                        help="which page (default: 1)")


def _task_show(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=_task_id, metavar="ID", help="the task id")
    parser.add_argument("--log", action="store_true",
                        help="every subtask's whole log too (with --json: a log field in "
                        "each subtask; default: only FAILED subtasks' last line)")
    parser.add_argument("--follow", action="store_true",
                        help="follow a RUNNING task live until it ends (default: show it "
                        "now)")
    _wait_options(parser, wait=False)


def _task_operation(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", type=_task_id, metavar="ID", help="the task id")
    _wait_options(parser)


def _task(common: bool) -> Callable[[argparse.ArgumentParser], None]:
    def define(parser: argparse.ArgumentParser) -> None:
        ops = _subcommands(parser, "task_action", common)
        ops.add("list", "the newest tasks", "The tasks, newest first, one line each.",
                _task_list, handler=tasks.cmd_list)
        ops.add("show", "a task and its subtasks", "A task and its subtasks; the last log "
                "line of each FAILED subtask. Exit 1 when the task FAILED.", _task_show,
                handler=tasks.cmd_show)
        for action, summary in (
                ("retry", "re-run a FAILED task from its FAILED subtasks"),
                ("rollback", "undo a FAILED task's done subtasks in reverse order")):
            ops.add(action, summary, f"{summary[0].upper()}{summary[1:]}.", _task_operation,
                    handler=tasks.cmd_task_operation, action=action)
    return define


def build_parser(common_in_commands: bool = True, lazy: bool = False) -> LazyCommand:
    """The whole command line of ocp-agentctl. The connection and output options are
    accepted after every command too, unless ``common_in_commands`` is false (the man page
    lists them once). ``lazy``: each command's arguments are defined only when it is
    parsed (see :class:`LazyCommand`); otherwise all are defined here."""
    parser = LazyCommand(
        prog=PROG,
        description="Operate the local OCP Agent daemon (ocp-agentd): show its programs,\n"
        "start, stop, restart, signal and verify them, read their logs, follow its\n"
        "events, reload its configuration and run the OCP agent tasks.",
        epilog=EPILOG, formatter_class=RawDescriptionHelpFormatter)
    add_common_options(parser)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the client's version and exit (the daemon's: the "
                        "version command)")
    commands = _Commands(parser.add_subparsers(dest="command", metavar="COMMAND",
                                               required=True, parser_class=LazyCommand),
                         common_in_commands)
    commands.add("status", "the daemon and its programs' states",
                 "The daemon's version, pid and uptime, then one line per program: state, "
                 "pid, uptime, restarts, ports and how it last exited. With NAMEs, only "
                 "those programs.", _status, handler=programs.cmd_status)
    for action, summary in (
            ("start", "start a program (or every worker) and wait until RUNNING"),
            ("stop", "stop a program (or every worker) and wait until its tree is gone"),
            ("restart", "restart a program (or every worker) and wait until RUNNING")):
        commands.add(action, summary, f"{summary[0].upper()}{summary[1:]}. 'all' acts on "
                     "every worker (pos_proxy and programs with operable = false are left "
                     "alone), in parallel.", _operate, handler=programs.cmd_operate)
    commands.add("verify", "check programs: alive, ports, health URL",
                 "Check one program, or every program without NAME: its state, its process, "
                 "each port listening and its health URL. Exit 1 if a check fails.", _verify,
                 handler=programs.cmd_verify)
    commands.add("logs", "print a program's output log",
                 "Print the last lines of a program's stdout (or stderr) log file, and with "
                 "-f keep printing new output, across log rotation, until interrupted.",
                 _logs, handler=programs.cmd_logs)
    commands.add("events", "follow the daemon's events live",
                 "Print one line per event as it happens: program state changes, probe "
                 "failures, reloads, task and subtask status changes. --json prints one "
                 "JSON object per line.", _events, handler=programs.cmd_events)
    commands.add("reload", "re-read the daemon's configuration",
                 "Re-read the configuration as SIGHUP does: added programs start, removed "
                 "ones stop, and a changed one restarts only when how it runs changed "
                 "(command, cwd, env, user, its logs); other changes (limits, liveness, "
                 "timeouts, backoff) apply in place and keep its pid. Prints what was "
                 "added, removed, changed and left alone; an invalid file changes nothing "
                 "and each bad key is named (exit 1).", handler=programs.cmd_reload)
    commands.add("signal", "send a signal to a program",
                 "Send a signal to a running program's process tree (e.g. HUP to re-open "
                 "its logs). Exit 1 when the program is not running.", _signal,
                 handler=programs.cmd_signal)
    commands.add("version", "the client's and the daemon's versions",
                 "Print the version of ocp-agentctl and of the ocp-agentd that answers.",
                 handler=programs.cmd_version)
    commands.add("agent", "restart or stop the OCP agent as an OCP task",
                 "Run the OCP agent tasks of this host: restart (Prepare -> Restart pos "
                 "proxy -> Stop all -> Start all -> Finish) or stop (the workers; pos_proxy "
                 "stays).", _agent(common_in_commands))
    commands.add("task", "list, show, retry or roll back OCP tasks",
                 "Read the tasks this daemon ran and operate on a FAILED one.",
                 _task(common_in_commands))
    if not lazy:
        parser.define_all()
    return parser
