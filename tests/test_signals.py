"""The operator's signals reach the daemon even when a SIGCHLD burst has filled the event
loop's wakeup socket (ocp_agentd/signals.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from ocp_agentd import signals


def fill(fd: int) -> int:
    """Writes into the wakeup socket until it takes no more, as a burst of SIGCHLDs would;
    answers the bytes written."""
    sock = socket.socket(fileno=os.dup(fd))
    sock.setblocking(False)
    written = 0
    try:
        while True:
            written += sock.send(bytes([signal.SIGCHLD]))
    except BlockingIOError:
        return written
    finally:
        sock.close()


# The asyncio case prints the loss as an unraisable exception: that is what it shows.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("way", ["asyncio", "signals"])
def test_a_sigterm_arriving_on_a_full_wakeup_socket(way: str, capfd) -> None:
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, lambda: None)  # the daemon's reaper does
        if way == "asyncio":
            loop.add_signal_handler(signal.SIGUSR1, lambda: seen.append("USR1"))
        else:
            signals.install(loop, {signal.SIGUSR1: lambda: seen.append("USR1")})
        wakeup = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=way == "asyncio")
        try:
            assert fill(wakeup) > 0
            os.kill(os.getpid(), signal.SIGUSR1)
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.remove_signal_handler(signal.SIGCHLD)
            if way == "asyncio":
                loop.remove_signal_handler(signal.SIGUSR1)
            else:
                signals.uninstall([signal.SIGUSR1])

    asyncio.run(main())
    err = capfd.readouterr().err
    if way == "asyncio":
        # The loss this module exists for: the byte did not fit, the handler never ran.
        assert seen == [] and "signal wakeup fd" in err
    else:
        assert seen == ["USR1"]
        assert "signal wakeup fd" not in err
