"""Misbehaving programs for tests: each mode breaks one rule a supervisor must cope with.

    python -m ocp_agentd.demo.misbehave MODE [ARGS]

    ignore-term [--tree N]     ignores SIGTERM (and so do its N children) and sleeps
    exit-now [CODE]            exits at once with CODE (default 1)
    tree N [--ignore-term]     forks N children that sleep; sleeps too
    setsid-grandchild [--ignore-term]
                               a child forks a grandchild that calls setsid (leaves the
                               process group) and sleeps; all three sleep
    never-ready [PORT]         runs but never listens on its port
    listen PORT [--delay S] [--sick-file PATH]
                               listens on PORT after S seconds, answers GET /health
                               (503 while PATH exists)
    spam [--bytes N] [--line N] [--stderr]
                               writes lines as fast as it can (N bytes, default: forever),
                               then sleeps

Every process of a mode prints `misbehave <mode> <role> pid=<pid> pgid=<pgid> sid=<sid>`
when it starts, so a test can read the pids from the log. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def announce(mode: str, role: str) -> None:
    pid = os.getpid()
    line = f"misbehave {mode} {role} pid={pid} pgid={os.getpgid(0)} sid={os.getsid(0)}\n"
    # one write: processes of a tree share the file, and print() may write twice
    sys.stdout.write(line)
    sys.stdout.flush()


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def fork(body) -> int:
    """Runs body() in a child process that never returns into the caller's code."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def _sleeping_tree(mode: str, children: int, ignore_term: bool) -> None:
    """Sleeps with `children` sleeping children; all ignore SIGTERM when asked."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(children):
        fork(lambda: (announce(mode, "child"), sleep_forever()))
    announce(mode, "parent")
    sleep_forever()


def ignore_term(args: argparse.Namespace) -> None:
    _sleeping_tree("ignore-term", args.tree, ignore_term=True)


def tree(args: argparse.Namespace) -> None:
    _sleeping_tree("tree", args.n, args.ignore_term)


def setsid_grandchild(args: argparse.Namespace) -> None:
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def grandchild() -> None:
        os.setsid()
        announce("setsid-grandchild", "grandchild")
        sleep_forever()

    def child() -> None:
        fork(grandchild)
        announce("setsid-grandchild", "child")
        sleep_forever()

    fork(child)
    announce("setsid-grandchild", "parent")
    sleep_forever()


def never_ready(args: argparse.Namespace) -> None:
    announce("never-ready", f"parent port={args.port} (never listening)")
    sleep_forever()


def listen(args: argparse.Namespace) -> int:
    # Only this mode serves HTTP: the other modes skip importing asyncio (about 28 ms,
    # python -X importtime) and fork their trees without it.
    from ocp_agentd.demo._serve import json_reply, run_http

    announce("listen", f"parent port={args.port} delay={args.delay}")

    def health() -> tuple[int, str, bytes]:
        if args.sick_file and os.path.exists(args.sick_file):
            return json_reply({"status": "sick", "pid": os.getpid()}, 503)
        return json_reply({"status": "ok", "pid": os.getpid()})

    routes = {"/health": health}
    return run_http("misbehave-listen", args.host, args.port, routes, delay=args.delay)


def spam(args: argparse.Namespace) -> None:
    announce("spam", "parent")
    stream = sys.stderr if args.stderr else sys.stdout
    line = ("x" * max(args.line - 1, 0)) + "\n"
    written = 0
    while args.bytes is None or written < args.bytes:
        stream.write(line)
        written += len(line)
    stream.flush()
    sleep_forever()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="misbehave", description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    mode = modes.add_parser("ignore-term")
    mode.add_argument("--tree", type=int, default=0, help="children that ignore it too")
    mode.set_defaults(run=ignore_term)
    mode = modes.add_parser("exit-now")
    mode.add_argument("code", type=int, nargs="?", default=1)
    mode.set_defaults(run=lambda a: sys.exit(a.code))
    mode = modes.add_parser("tree")
    mode.add_argument("n", type=int)
    mode.add_argument("--ignore-term", action="store_true")
    mode.set_defaults(run=tree)
    mode = modes.add_parser("setsid-grandchild")
    mode.add_argument("--ignore-term", action="store_true")
    mode.set_defaults(run=setsid_grandchild)
    mode = modes.add_parser("never-ready")
    mode.add_argument("port", type=int, nargs="?", default=0)
    mode.set_defaults(run=never_ready)
    mode = modes.add_parser("listen")
    mode.add_argument("port", type=int)
    mode.add_argument("--delay", type=float, default=0.0)
    mode.add_argument("--host", default="127.0.0.1")
    mode.add_argument("--sick-file", default=None, help="/health answers 503 while it exists")
    mode.set_defaults(run=listen)
    mode = modes.add_parser("spam")
    mode.add_argument("--bytes", type=int, default=None)
    mode.add_argument("--line", type=int, default=100, help="bytes per line")
    mode.add_argument("--stderr", action="store_true")
    mode.set_defaults(run=spam)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
