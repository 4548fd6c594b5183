"""A tiny event-driven HTTP/1.0 server for the demo programs (standard library only).

Every demo program that has a port uses `run_http`: one asyncio loop, no timers, so an
idle program sleeps in epoll and costs no CPU. SIGTERM and SIGINT stop it cleanly
(exit status 0); SIGHUP is logged and changes nothing. Each request is logged to stdout,
one line each. A program may name a wedge signal: each time it arrives the server stops
answering (connections are accepted, requests hang, as in a deadlocked server) or, the
next time, answers again.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable

Reply = tuple[int, str, bytes]  # (status, content type, body)
Routes = dict[str, Callable[[], Reply]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


def log(name: str, message: str, stream=None) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = stream or sys.stdout
    out.write(f"{stamp} {name}[{os.getpid()}] {message}\n")  # one write, not print's two
    out.flush()


def json_reply(payload: object, status: int = 200) -> Reply:
    return status, "application/json", json.dumps(payload).encode() + b"\n"


def health_route() -> Callable[[], Reply]:
    """GET /health of a demo program: ok, its pid and how long it has run."""
    started = time.time()
    return lambda: json_reply({"status": "ok", "pid": os.getpid(),
                               "uptime": time.time() - started})


def text_reply(text: str, status: int = 200) -> Reply:
    return status, "text/plain; version=0.0.4; charset=utf-8", text.encode()


def _answer(routes: Routes, method: str, path: str) -> Reply:
    route = routes.get(path)
    if route is None:
        return json_reply({"error": f"no route {path}"}, 404)
    if method not in ("GET", "HEAD"):
        return json_reply({"error": f"method {method} not allowed"}, 405)
    try:
        return route()
    except Exception as exc:  # a demo must keep serving; say what broke
        return json_reply({"error": repr(exc)}, 500)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Reads a request's head (10 s per line); answers (method, path without the query),
    or ("", "") for a request line that is not one."""
    request = (await asyncio.wait_for(reader.readline(), 10)).decode("latin-1")
    while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
        pass  # headers are not needed
    parts = request.split()
    return (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")


async def _handle(
    name: str,
    routes: Routes,
    stop: asyncio.Event,
    answering: asyncio.Event,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """Answers one connection, once ``answering`` is set (it is clear while wedged)."""
    try:
        method, path = await _read_request(reader)
        await answering.wait()
        if stop.is_set():
            return  # released by the stop, not by the end of a wedge
        status, content_type, body = _answer(routes, method, path)
        head = (
            f"HTTP/1.0 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if method == "HEAD" else body))
        await writer.drain()
        log(name, f"{method} {path} {status}")
    except (TimeoutError, ConnectionError, UnicodeDecodeError):
        pass
    finally:
        writer.close()


async def _serve(
    name: str, host: str, port: int, routes: Routes, delay: float, wedge_signal: int | None
) -> int:
    stop = asyncio.Event()
    answering = asyncio.Event()
    answering.set()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # As real agents do on SIGHUP (re-open logs, re-read settings): say so, keep serving.
    loop.add_signal_handler(signal.SIGHUP, log, name, "SIGHUP received, carrying on")

    def toggle_wedge() -> None:
        if answering.is_set():
            answering.clear()
            log(name, "wedged: requests are accepted but no longer answered")
        else:
            answering.set()
            log(name, "unwedged: answering again")

    if wedge_signal is not None:
        loop.add_signal_handler(wedge_signal, toggle_wedge)
    if delay > 0:
        log(name, f"waiting {delay}s before listening on {host}:{port}")
        try:
            await asyncio.wait_for(stop.wait(), delay)
            log(name, "stopped before listening")
            return 0
        except TimeoutError:
            pass

    handle = functools.partial(_handle, name, routes, stop, answering)

    try:
        server = await asyncio.start_server(handle, host, port)
    except OSError as exc:
        log(name, f"cannot listen on {host}:{port}: {exc}", sys.stderr)
        return 1
    log(name, f"listening on {host}:{port}")
    await stop.wait()
    answering.set()  # wedged requests end unanswered (see handle)
    server.close()
    await server.wait_closed()
    log(name, "stopped on signal")
    return 0


def run_http(
    name: str,
    host: str,
    port: int,
    routes: Routes,
    delay: float = 0.0,
    wedge_signal: int | None = None,
) -> int:
    """Serves `routes` (path -> reply function) until SIGTERM; returns the exit status.

    wedge_signal (e.g. signal.SIGUSR1) toggles answering off and on."""
    return asyncio.run(_serve(name, host, port, routes, delay, wedge_signal))
