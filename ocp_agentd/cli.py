"""ocp-agentctl: operate the local ocp-agentd from a shell, on AgentClient.

Exit codes: 0 success, 1 the operation failed (or the daemon refused it), 2 usage error,
3 the daemon is not running / cannot be reached.

Adding subcommands from another module (the task commands: ``agent restart [--wait]``,
``agent stop``, ``task show|retry|rollback ID``): write a module with

    def register(subparsers, parents):
        parser = subparsers.add_parser("task", parents=parents, help="...")
        ...
        parser.set_defaults(handler=show_task)      # async (args, client, out) -> exit code

    async def show_task(args, client: AgentClient, out: Output) -> int:
        task = await client.request("GET", f"/api/v2/tasks/instances/{args.id}")
        out.data(task, lambda: out.line(...))       # --json prints data, else the human form
        return EXIT_OK

and list its import name in ``EXTENSIONS`` below (a listed module that does not exist is
skipped). ``parents`` carries the common options (--socket, --url, --token, --config,
--json) so they work after the subcommand too. AgentError and AgentUnavailable raised by a
handler are reported here (exit 1 and 3).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from ocp_agentd import __version__
from ocp_agentd.client import (
    TOKEN_ENV,
    AgentClient,
    AgentError,
    AgentUnavailable,
    socket_from_config,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

# Modules that add subcommands through `register(subparsers, parents)`.
EXTENSIONS: tuple[str, ...] = ("ocp_agentd.tasks.cli",)

PROG = "ocp-agentctl"


class Output:
    """Prints for people (tables) or for scripts (--json: the data as JSON on stdout)."""

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.json = as_json
        self.stream = stream or sys.stdout

    def line(self, text: str = "") -> None:
        print(text, file=self.stream)

    def error(self, text: str) -> None:
        print(f"{PROG}: {text}", file=sys.stderr)

    def data(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            self.line(json.dumps(data, indent=2, ensure_ascii=False))
        else:
            human()

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        cells = [[str(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        for row in cells:
            self.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


Handler = Callable[[argparse.Namespace, AgentClient, Output], Awaitable[int]]


# --- formatting ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def duration(seconds: float | None) -> str:
    """12s, 5m07s, 3h04m, 2d05h."""
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def last_exit(value: dict[str, Any] | None) -> str:
    if not value:
        return "-"
    how = f"signal {value['signal']}" if value.get("signal") else f"code {value.get('code')}"
    when = str(value.get("at") or "")
    when = when[11:19] if len(when) >= 19 else when
    reason = value.get("reason") or ""
    text = f"{how} at {when}" if when else how
    return f"{text} ({reason})" if reason else text


PROCESS_HEADERS = ("NAME", "ROLE", "STATE", "PID", "UPTIME", "RESTARTS", "PORTS", "LAST EXIT")


def process_row(record: dict[str, Any]) -> list[Any]:
    uptime = record.get("uptime") if record.get("state") == "RUNNING" else None
    return [
        record.get("name"),
        record.get("role"),
        record.get("state"),
        record.get("pid"),
        duration(uptime),
        record.get("restarts"),
        ",".join(str(p) for p in record.get("ports") or []),
        last_exit(record.get("last_exit")),
    ]


def print_processes(out: Output, records: list[dict[str, Any]]) -> None:
    out.table(PROCESS_HEADERS, (process_row(r) for r in records))


def print_verify(out: Output, programs: list[dict[str, Any]]) -> None:
    rows = []
    for program in programs:
        for check in program.get("checks", []):
            rows.append([program["name"], check["name"], "ok" if check["ok"] else "FAILED",
                         check.get("detail")])
    out.table(("NAME", "CHECK", "RESULT", "DETAIL"), rows)


# --- commands -----------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    status = await client.status()
    processes = await client.processes()

    def human() -> None:
        counts = ", ".join(
            f"{n} {state}" for state, n in (status.get("counts") or {}).items() if n
        )
        out.line(
            f"ocp-agentd {status['version']}  pid {status['pid']}  "
            f"up {duration(status.get('uptime'))}  host {status.get('host_id')}  "
            f"{status.get('state')}  ({status.get('programs')} programs: {counts or 'none'})"
        )
        out.line()
        print_processes(out, processes)

    out.data({"daemon": status, "processes": processes}, human)
    return EXIT_OK


async def _operate(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    action: str = args.command
    if args.name == "all":
        if action == "restart":
            await client.stop_all(timeout=args.timeout)
            result = await client.start_all(timeout=args.timeout)
        elif action == "start":
            result = await client.start_all(timeout=args.timeout)
        else:
            result = await client.stop_all(timeout=args.timeout)
        out.data(result, lambda: print_processes(out, result["processes"]))
        return EXIT_OK
    operation = {"start": client.start, "stop": client.stop, "restart": client.restart}[action]
    record = await operation(args.name, timeout=args.timeout, force=args.force)
    out.data(record, lambda: print_processes(out, [record]))
    return EXIT_OK


async def cmd_verify(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    if args.name and args.name != "all":
        result = await client.verify(args.name)
        programs = [{"name": args.name, **result}]
    else:
        result = await client.verify_all()
        programs = result["programs"]
    out.data(result, lambda: print_verify(out, programs))
    if not result.get("ok"):
        failed = [p["name"] for p in programs if not p.get("ok")]
        out.error(f"verify failed for: {', '.join(failed)}")
        return EXIT_FAILED
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("seconds must be more than 0 and at most 86400")
    return value


def _common_options() -> argparse.ArgumentParser:
    """Options accepted before and after the subcommand (SUPPRESS: no default clobbering)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS,
        help="the daemon's unix socket (default: api.socket of the config, else "
        "/run/ocp_agentd/agentd.sock)",
    )
    where.add_argument(
        "--url", metavar="URL", default=argparse.SUPPRESS,
        help="talk TCP instead, e.g. http://127.0.0.1:62887 (needs a token)",
    )
    group.add_argument(
        "--token", metavar="TOKEN", default=argparse.SUPPRESS,
        help=f"bearer token (default: ${TOKEN_ENV})",
    )
    group.add_argument(
        "--config", metavar="PATH", default=argparse.SUPPRESS,
        help="the daemon's config, to find its socket (default: $OCP_AGENTD_CONFIG, "
        "else /etc/ocp_agentd/config.toml)",
    )
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print the answer's data as JSON (for scripts)",
    )
    return common


EPILOG = """\
examples:
  ocp-agentctl status
  ocp-agentctl restart ocp_exporter --timeout 30
  ocp-agentctl stop all
  ocp-agentctl restart pos_proxy --force
  ocp-agentctl verify --json

exit status: 0 success, 1 the operation failed or was refused, 2 usage error,
3 ocp-agentd is not running (or cannot be reached).
"""


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Operate the local OCP Agent daemon (ocp-agentd): show its programs, "
        "start, stop, restart and verify them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = commands.add_parser(
        "status", parents=[common], help="the daemon and every program's state",
        description="The daemon's version, pid and uptime, then one line per program.",
    )
    status.set_defaults(handler=cmd_status)

    for action, text in (
        ("start", "start a program (or every worker: all) and wait until RUNNING"),
        ("stop", "stop a program (or every worker: all) and wait until its tree is gone"),
        ("restart", "restart a program (or every worker: all)"),
    ):
        sub = commands.add_parser(action, parents=[common], help=text, description=text + ".")
        sub.add_argument("name", metavar="NAME|all", help="a program name, or all (the workers)")
        sub.add_argument("--timeout", type=_positive_seconds, metavar="S",
                         help="seconds to wait for the outcome")
        sub.add_argument("--force", action="store_true",
                         help="act on a program that is not operable (e.g. pos_proxy)")
        sub.set_defaults(handler=_operate)

    verify = commands.add_parser(
        "verify", parents=[common], help="check programs: alive, ports, health URL",
        description="Check one program, or every program without NAME; exit 1 if a check "
        "fails.",
    )
    verify.add_argument("name", nargs="?", metavar="NAME", help="a program name (default: all)")
    verify.add_argument("--timeout", type=_positive_seconds, metavar="S", help=argparse.SUPPRESS)
    verify.add_argument("--force", action="store_true", help=argparse.SUPPRESS)
    verify.set_defaults(handler=cmd_verify)

    for module_name in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue
            raise
        module.register(commands, [common])
    return parser


async def _run(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    async with client:
        handler: Handler = args.handler
        return await handler(args, client, out)


def _report(out: Output, error: AgentError) -> None:
    if out.json:
        out.line(json.dumps({"error": error.as_dict()}, indent=2, ensure_ascii=False))
    trace = f", trace {error.trace_id}" if error.trace_id else ""
    out.error(f"{error.message} [code {error.code}{trace}]")
    for sub in error.sub_errors:
        target = f"{sub.get('target')}: " if sub.get("target") else ""
        print(f"  {target}{sub.get('message')}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("start", "stop", "restart") and args.name == "all" and args.force:
        parser.error("--force applies to one program, not to all")
    out = Output(getattr(args, "json", False))
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    url = getattr(args, "url", None)
    socket_path = getattr(args, "socket", None) or (
        None if url else socket_from_config(getattr(args, "config", None))
    )
    client = AgentClient(socket_path=socket_path, url=url, token=token)
    started = time.monotonic()
    try:
        return asyncio.run(_run(args, client, out))
    except AgentUnavailable as exc:
        out.error(str(exc))
        return EXIT_UNAVAILABLE
    except AgentError as exc:
        _report(out, exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        out.error(f"interrupted after {time.monotonic() - started:.1f}s")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
