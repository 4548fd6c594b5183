"""The operator's signals (SIGTERM, SIGINT, SIGHUP, SIGUSR2), never lost in a SIGCHLD burst.

asyncio's ``add_signal_handler`` learns of a signal only from the byte that Python's C-level
handler writes to the event loop's wakeup socket (signal.set_wakeup_fd). When hundreds of
programs exit at once, their SIGCHLDs fill that socket; a byte that does not fit is
dropped, with "Exception ignored when trying to write to the signal wakeup fd" on stderr
(about 6,400 lines in one start-all of 1,000 programs here), and a SIGTERM whose byte was
dropped would never reach the daemon's handler: systemd would have to SIGKILL it.

So these signals get a Python-level handler (signal.signal) instead. Python runs it in the
main thread at its next bytecode, whatever became of the byte (signal(2) sets a flag the
interpreter checks; the full socket wakes the loop anyway), and it only hands the daemon's
callback to the loop (call_soon_threadsafe). The wakeup socket stays for SIGCHLD (the
reaper, which re-checks on its own, so a dropped byte costs nothing), without the warning.
Python docs: signal, "Execution of Python signal handlers" and set_wakeup_fd().
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType


def install(loop: asyncio.AbstractEventLoop, handlers: dict[int, Callable[[], None]]) -> None:
    """Runs each callback on `loop` when its signal arrives (call from the main thread).
    Raises ValueError from another thread (signal.signal's rule)."""
    for signum, callback in handlers.items():
        signal.signal(signum, _forwarder(loop, callback))
    quiet_wakeup()


def uninstall(signums: list[int]) -> None:
    """Gives the signals their default action back."""
    for signum in signums:
        signal.signal(signum, signal.SIG_DFL)


def quiet_wakeup() -> None:
    """Keeps the wakeup socket asyncio set (if any) but without a warning on stderr for each
    byte that does not fit in it."""
    fd = signal.set_wakeup_fd(-1)
    if fd != -1:
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)


def _forwarder(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> Callable[[int, FrameType | None], None]:
    def forward(signum: int, frame: FrameType | None) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(callback)

    return forward
