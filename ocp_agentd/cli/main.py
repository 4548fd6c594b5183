"""ocp-agentctl's entry point: parse, find the daemon, run the command, report errors.

Exit status: 0 success, 1 the operation failed (or the daemon refused it), 2 usage error
(a missing --config file included), 3 the daemon is not running or cannot be reached,
130 interrupted. Output into a pipe that closes early (``| head``) ends quietly with 0.
"""

from __future__ import annotations

import argparse
import os
import sys

from ocp_agentd.cli.locate import ConfigMissing, clean_path, find_socket
from ocp_agentd.cli.output import Output
from ocp_agentd.cli.parser import build_parser
from ocp_agentd.cli.transport import TOKEN_ENV, ApiError, Target, Transport, Unavailable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130
# Commands whose normal end is Ctrl-C: interrupting them is success.
FOLLOWING = ("events",)

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    Handler = Callable[[argparse.Namespace, Transport, Output], int]


def _target(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Target, str]:
    """The daemon to talk to, and how its address was chosen (for messages)."""
    url = getattr(args, "url", None)
    if url and getattr(args, "socket", None):
        parser.error("give --socket or --url, not both")
    tls = {name: getattr(args, name, None) for name in ("cacert", "cert", "key")}
    if not url and any(tls.values()):
        parser.error("--cacert, --cert and --key go with --url https://...")
    if tls["key"] and not tls["cert"]:
        parser.error("--key needs --cert")
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    if url:
        return Target(url=url, token=token, **tls), "--url"
    socket_path = getattr(args, "socket", None)
    if socket_path:
        return Target(socket_path=clean_path(socket_path), token=token), "--socket"
    found = find_socket(getattr(args, "config", None))
    if found.warning:
        print(f"ocp-agentctl: {found.warning}", file=sys.stderr)
    return Target(socket_path=found.socket, token=token), found.how


def report(out: Output, error: ApiError) -> None:
    """An error envelope: its message and code on stderr (each sub-error below), and the
    error as JSON on stdout with --json."""
    if out.json:
        out.dump({"error": error.as_dict()})
    trace = f", trace {error.trace_id}" if error.trace_id else ""
    out.error(f"{error.message} [code {error.code}{trace}]")
    for sub in error.sub_errors:
        target = f"{sub.get('target')}: " if sub.get("target") else ""
        sys.stderr.write(f"  {target}{sub.get('message')}\n")


def _quiet_stdout() -> None:
    # The reader went away (`| head`): later writes, and the interpreter's final flush,
    # go to /dev/null instead of raising BrokenPipeError again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(lazy=True)
    args = parser.parse_args(argv)
    if getattr(args, "name", None) == "all" and getattr(args, "force", False):
        parser.error("--force applies to one program, not to all")
    out = Output(getattr(args, "json", False))
    try:
        target, how = _target(args, parser)
        api = Transport(target)
    except ConfigMissing as exc:
        out.error(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        parser.error(str(exc))
    handler: Handler = args.handler
    try:
        try:
            return handler(args, api, out)
        finally:
            api.close()
            sys.stdout.flush()
    except Unavailable as exc:
        message = str(exc)
        if how not in ("--url", "--socket") and "not running" in message:
            message += f"; that is {how}"
        out.error(message)
        return EXIT_UNAVAILABLE
    except ApiError as exc:
        report(out, exc)
        return EXIT_FAILED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        if args.command in FOLLOWING or getattr(args, "follow", False):
            return EXIT_OK
        out.error("interrupted")
        return EXIT_INTERRUPTED
