"""The exits of the log keepers, collected by one thread for all of them.

A keeper ends by itself once its program's last writer closes the pipes, at any time and
whether or not an event loop runs (output.open_streams is also called outside one), so
its exit is collected by a thread rather than the loop. One thread waits on every
keeper's pidfd through one epoll descriptor (epoll_ctl(2) may add a descriptor while
another thread waits), instead of a thread blocked in wait(2) per keeper: a thousand
programs made a thousand threads, each with its stack and thread state in the daemon's
memory.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import threading
from collections.abc import Callable

Ended = Callable[[subprocess.Popen[bytes]], None]


class KeeperExits:
    """Reaps each watched child once it exits, then calls ``ended`` with it (in the
    watching thread). Thread-safe; the thread starts with the first watch()."""

    def __init__(self, ended: Ended) -> None:
        self._ended = ended
        self._lock = threading.Lock()
        self._watched: dict[int, subprocess.Popen[bytes]] = {}  # pidfd -> child
        self._epoll: select.epoll | None = None

    def watch(self, child: subprocess.Popen[bytes]) -> None:
        """Collects child's exit from now on. Where its pidfd cannot be had or watched
        (out of descriptors, or of epoll watches), a thread of its own waits for it
        instead: the child runs already, so this must not fail and leave it unreaped."""
        try:
            pidfd = os.pidfd_open(child.pid)
        except OSError:
            self._reap_in_thread(child)
            return
        try:
            with self._lock:
                if self._epoll is None:
                    epoll = select.epoll()
                    try:
                        threading.Thread(target=self._run, args=(epoll,), daemon=True,
                                         name="keeper-exits").start()
                    except BaseException:
                        epoll.close()
                        raise
                    self._epoll = epoll
                self._epoll.register(pidfd, select.EPOLLIN)
                self._watched[pidfd] = child
        except (OSError, RuntimeError):  # RuntimeError: no new thread can be started
            os.close(pidfd)
            self._reap_in_thread(child)

    def watching(self) -> int:
        """How many children are watched through the shared thread now."""
        with self._lock:
            return len(self._watched)

    def _run(self, epoll: select.epoll) -> None:
        while True:
            for pidfd, _ in epoll.poll():
                with self._lock:
                    child = self._watched.pop(pidfd, None)
                    with contextlib.suppress(OSError, ValueError):
                        epoll.unregister(pidfd)
                os.close(pidfd)
                if child is not None:
                    self._reap(child)

    def _reap_in_thread(self, child: subprocess.Popen[bytes]) -> None:
        threading.Thread(target=self._reap, args=(child,), daemon=True,
                         name=f"keeper-{child.pid}").start()

    def _reap(self, child: subprocess.Popen[bytes]) -> None:
        child.wait()  # its pidfd said it exited: this does not block (else: its thread)
        self._ended(child)
