"""The floor: the least a supervisor can do, to show the physical limit of each figure.

    python -m bench.floor N PROGRAM [ARG...]

Spawns N copies of the program with os.posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK)
then exec, so a spawn has returned once the child runs the program), keeps a pidfd of
each, and reads one command a line on stdin, answering one line on stdout when done:

    start   spawn every program that is not running       -> "ok"
    stop    SIGTERM every program, then waitid each        -> "ok"
    status  every program's pid, as JSON {index: pid|null} -> the JSON
    quit    stop, then exit

A program that exits while not being stopped is reaped and spawned again at once
(pidfd readable -> waitid -> posix_spawn): the physical floor of "crash to new pid".
Between events it blocks in poll(2), so its idle CPU is the floor too. Nothing here is
what a real supervisor needs (no logs, no backoff, no state); it is a yardstick only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys


class Floor:
    """N programs, each with its pid and pidfd; ``stopping`` while a stop runs."""

    def __init__(self, n: int, argv: list[str]) -> None:
        self.argv = argv
        self.pids: list[int | None] = [None] * n
        self.fds: dict[int, int] = {}  # pidfd -> index
        self.poller = select.poll()
        self.devnull = os.open(os.devnull, os.O_RDWR)

    def spawn(self, index: int) -> None:
        pid = os.posix_spawn(
            self.argv[0],
            self.argv,
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, self.devnull, 0),
                (os.POSIX_SPAWN_DUP2, self.devnull, 1),
                (os.POSIX_SPAWN_DUP2, self.devnull, 2),
            ],
            setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGPIPE),
        )
        fd = os.pidfd_open(pid)
        self.pids[index] = pid
        self.fds[fd] = index
        self.poller.register(fd, select.POLLIN)

    def reap(self, fd: int) -> int:
        """Collects the exited child behind fd; answers its index."""
        index = self.fds.pop(fd)
        self.poller.unregister(fd)
        os.waitid(os.P_PIDFD, fd, os.WEXITED)
        os.close(fd)
        self.pids[index] = None
        return index

    def start(self) -> None:
        for index, pid in enumerate(self.pids):
            if pid is None:
                self.spawn(index)

    def stop(self) -> None:
        for pid in self.pids:
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        for fd in list(self.fds):
            self.reap(fd)

    def status(self) -> str:
        return json.dumps(dict(enumerate(self.pids)))

    def serve(self) -> None:
        stdin = sys.stdin.fileno()
        self.poller.register(stdin, select.POLLIN)
        buffered = b""
        while True:
            for fd, _ in self.poller.poll():
                if fd != stdin:
                    self.spawn(self.reap(fd))  # a crash: back at once
                    continue
                chunk = os.read(stdin, 4096)
                if not chunk:
                    self.stop()
                    return
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    command = line.decode().strip()
                    if command == "quit":
                        self.stop()
                        return
                    if command in ("start", "stop"):
                        getattr(self, command)()
                        reply = "ok"
                    elif command == "status":
                        reply = self.status()
                    else:
                        reply = f"error: unknown command {command!r}"
                    os.write(1, reply.encode() + b"\n")


def main(argv: list[str]) -> int:
    n, program = int(argv[0]), argv[1:]
    floor = Floor(n, program)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        floor.start()
        floor.serve()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        floor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
