"""ocp-agentctl's argument parser: every command, its help, its defaults (SPEC sections 7
and 12). The man page and the bash completion are generated from it (cli/docs.py).
"""

from __future__ import annotations

import argparse

from ocp_agentd import __version__
from ocp_agentd.cli import programs, tasks
from ocp_agentd.cli.locate import DEFAULT_CONFIG, DEFAULT_SOCKET
from ocp_agentd.cli.output import PROG
from ocp_agentd.cli.transport import TOKEN_ENV

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


def common_options() -> argparse.ArgumentParser:
    """Options accepted before and after the command (SUPPRESS: a value given before the
    command is not overwritten by the subcommand's default)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
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
    return common


def _command(commands: argparse._SubParsersAction, name: str,
             parents: list[argparse.ArgumentParser], summary: str, description: str,
             handler: object) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, parents=parents, help=summary, description=description)
    parser.set_defaults(handler=handler)
    return parser


def _wait_options(parser: argparse.ArgumentParser, wait: bool = True) -> None:
    if wait:
        parser.add_argument("--wait", action="store_true",
                            help="follow the task live until it ends; exit 1 unless it ends "
                            "SUCCESSFUL (default: answer at once with the started task)")
    parser.add_argument("--wait-timeout", type=_positive_seconds, default=WAIT_DEFAULT,
                        metavar="S",
                        help=f"stop following after S seconds (default: {WAIT_DEFAULT:g})")


def build_parser(common_in_commands: bool = True) -> argparse.ArgumentParser:
    """The whole command line of ocp-agentctl. The connection and output options are
    accepted after every command too, unless ``common_in_commands`` is false (the man page
    lists them once)."""
    common = common_options()
    parents = [common] if common_in_commands else []
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate the local OCP Agent daemon (ocp-agentd): show its programs,\n"
        "start, stop, restart, signal and verify them, read their logs, follow its\n"
        "events, reload its configuration and run the OCP agent tasks.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the client's version and exit (the daemon's: the "
                        "version command)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = _command(
        commands, "status", parents, "the daemon and its programs' states",
        "The daemon's version, pid and uptime, then one line per program: state, pid, "
        "uptime, restarts, ports and how it last exited. With NAMEs, only those programs.",
        programs.cmd_status)
    status.add_argument("names", nargs="*", metavar="NAME",
                        help="program names (default: every program)")
    status.add_argument("--names", dest="names_only", action="store_true",
                        help="print only the program names, one a line, for scripts and "
                        "shell completion (default: the table)")
    status.add_argument("-l", "--long", action="store_true",
                        help="after the table, each program's command, user, cgroup, "
                        "limits, CPU and memory use, last liveness probe, log files and "
                        "last exit in full (default: the table alone)")

    for action, summary in (
            ("start", "start a program (or every worker) and wait until RUNNING"),
            ("stop", "stop a program (or every worker) and wait until its tree is gone"),
            ("restart", "restart a program (or every worker) and wait until RUNNING")):
        sub = _command(commands, action, parents, summary,
                       f"{summary[0].upper()}{summary[1:]}. 'all' acts on every worker "
                       "(pos_proxy and programs with operable = false are left alone), in "
                       "parallel.", programs.cmd_operate)
        sub.add_argument("name", metavar="NAME|all", help="a program name, or all (the workers)")
        sub.add_argument("--timeout", type=_positive_seconds, metavar="S",
                         help="seconds to wait for the outcome (default: the program's "
                         "start_timeout / stop_timeout)")
        sub.add_argument("--force", action="store_true",
                         help="act on a program that is not operable, e.g. pos_proxy "
                         "(default: refused with code 2002)")

    verify = _command(
        commands, "verify", parents, "check programs: alive, ports, health URL",
        "Check one program, or every program without NAME: its state, its process, each "
        "port listening and its health URL. Exit 1 if a check fails.", programs.cmd_verify)
    verify.add_argument("name", nargs="?", metavar="NAME", help="a program (default: all)")

    logs = _command(
        commands, "logs", parents, "print a program's output log",
        "Print the last lines of a program's stdout (or stderr) log file, and with -f keep "
        "printing new output, across log rotation, until interrupted.", programs.cmd_logs)
    logs.add_argument("name", metavar="NAME", help="a program name")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing new output (default: print and exit)")
    logs.add_argument("-n", "--lines", type=_count, default=10, metavar="N",
                      help="how many last lines to print first (default: 10)")
    logs.add_argument("--stderr", action="store_true",
                      help="the stderr log (default: stdout)")

    events = _command(
        commands, "events", parents, "follow the daemon's events live",
        "Print one line per event as it happens: program state changes, probe failures, "
        "reloads, task and subtask status changes. --json prints one JSON object per line.",
        programs.cmd_events)
    events.add_argument("--kind", action="append", choices=EVENT_KINDS, metavar="KIND",
                        help=f"only this kind, may be repeated: {', '.join(EVENT_KINDS)} "
                        "(default: every kind)")
    events.add_argument("--last", type=_count, default=0, metavar="N",
                        help="start with the N most recent events, at most 1000 (default: "
                        "0, only new ones)")
    events.add_argument("--count", type=_count, default=0, metavar="N",
                        help="exit after N events (default: 0, follow until interrupted)")

    _command(commands, "reload", parents, "re-read the daemon's configuration",
             "Re-read the configuration as SIGHUP does: added programs start, removed ones "
             "stop, changed ones restart. Prints what was added, removed, changed and left "
             "alone; an invalid file changes nothing and each bad key is named (exit 1).",
             programs.cmd_reload)

    signal = _command(
        commands, "signal", parents, "send a signal to a program",
        "Send a signal to a running program's process tree (e.g. HUP to re-open its logs). "
        "Exit 1 when the program is not running.", programs.cmd_signal)
    signal.add_argument("signal", metavar="SIG", type=programs.signal_name,
                        help="a signal name or number: HUP, SIGUSR1, term, 9, ...")
    signal.add_argument("name", metavar="NAME", help="a program name")

    _command(commands, "version", parents, "the client's and the daemon's versions",
             "Print the version of ocp-agentctl and of the ocp-agentd that answers.",
             programs.cmd_version)

    agent = commands.add_parser(
        "agent", parents=parents, help="restart or stop the OCP agent as an OCP task",
        description="Run the OCP agent tasks of this host: restart (Prepare -> Restart pos "
        "proxy -> Stop all -> Start all -> Finish) or stop (the workers; pos_proxy stays).")
    actions = agent.add_subparsers(dest="agent_action", metavar="ACTION", required=True)
    for action, summary in (("restart", "restart pos_proxy, then every worker"),
                            ("stop", "stop every worker process")):
        sub = actions.add_parser(action, parents=parents, help=summary,
                                 description=f"{summary[0].upper()}{summary[1:]} as an OCP "
                                 "task; prints the task (or follows it with --wait).")
        _wait_options(sub)
        sub.set_defaults(handler=tasks.cmd_agent, action=action)

    task = commands.add_parser(
        "task", parents=parents, help="list, show, retry or roll back OCP tasks",
        description="Read the tasks this daemon ran and operate on a FAILED one.")
    ops = task.add_subparsers(dest="task_action", metavar="ACTION", required=True)
    listing = ops.add_parser("list", parents=parents, help="the newest tasks",
                             description="The tasks, newest first, one line each.")
    listing.add_argument("--size", type=_task_id, default=10, metavar="N",
                         help="tasks per page (default: 10)")
    listing.add_argument("--page", type=_task_id, default=1, metavar="N",
                         help="which page (default: 1)")
    listing.set_defaults(handler=tasks.cmd_list)
    show = ops.add_parser("show", parents=parents, help="a task and its subtasks",
                          description="A task and its subtasks; the last log line of each "
                          "FAILED subtask. Exit 1 when the task FAILED.")
    show.add_argument("id", type=_task_id, metavar="ID", help="the task id")
    show.add_argument("--log", action="store_true",
                      help="every subtask's whole log too (with --json: a log field in each "
                      "subtask; default: only FAILED subtasks' last line)")
    show.add_argument("--follow", action="store_true",
                      help="follow a RUNNING task live until it ends (default: show it now)")
    _wait_options(show, wait=False)
    show.set_defaults(handler=tasks.cmd_show)
    for action, summary in (("retry", "re-run a FAILED task from its FAILED subtasks"),
                            ("rollback", "undo a FAILED task's done subtasks in reverse order")):
        sub = ops.add_parser(action, parents=parents, help=summary,
                             description=f"{summary[0].upper()}{summary[1:]}.")
        sub.add_argument("id", type=_task_id, metavar="ID", help="the task id")
        _wait_options(sub)
        sub.set_defaults(handler=tasks.cmd_task_operation, action=action)
    return parser
