"""The event loop's lag probes run while there is work and stop soon after it: each
request is work until its answer is made, a stream only until its headers are out, and
a program's state change is activity (ticker.py). Real app on a real unix socket, real
ticker on a real event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ocp_agentd import ticker
from ocp_agentd.api.app import collect_routes, create_app
from ocp_agentd.api.context import AppContext
from ocp_agentd.api.listeners import start_api
from ocp_agentd.api.models import OperationBody
from ocp_agentd.api.routes import Route
from ocp_agentd.config import Settings
from ocp_agentd.supervision import Supervisor
from ocp_agentd.systemd import Notifier

DEADLINE = 10.0


class CountingWatch:
    """A RequestWatch that counts; `busy` is how many requests are in work right now."""

    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    @property
    def busy(self) -> int:
        return self.started - self.ended

    def request_started(self) -> None:
        self.started += 1

    def request_ended(self) -> None:
        self.ended += 1


@contextlib.asynccontextmanager
async def served(tmp_path: Path, watch: CountingWatch,
                 *extra: Route) -> AsyncIterator[Path]:
    """The daemon's app with `extra` routes, served on a real unix socket (its path),
    telling `watch` of each request's work; no program."""
    sock = tmp_path / "run" / "a.sock"
    settings = Settings(api={"socket": str(sock)},
                        agent={"state_dir": str(tmp_path / "state"),
                               "log_dir": str(tmp_path / "log")})
    supervisor = Supervisor(settings)
    table = collect_routes()
    for route in extra:
        table.add(route)
    server = await start_api(create_app(AppContext(settings, supervisor, requests=watch),
                                        table), settings)
    try:
        yield sock
    finally:
        await server.close()
        await supervisor.close()


@contextlib.asynccontextmanager
async def running_ticker(probes: list[float]) -> AsyncIterator[ticker.Ticker]:
    """A real Ticker running on this loop, its lag observations appended to `probes`,
    past the activity of its start: no probe comes until something happens."""

    async def housekeep() -> bool:
        return False

    clock = ticker.Ticker(Notifier(env={}), housekeep, probes.append)
    task = asyncio.create_task(clock.run())
    try:
        await asyncio.sleep(10 * ticker.PROBE_SECONDS)  # the start's activity runs out
        quiet = len(probes)
        await asyncio.sleep(10 * ticker.PROBE_SECONDS)
        assert len(probes) == quiet, "probes with nothing going on"
        yield clock
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_request_is_work_until_answered_and_a_stream_until_its_headers(
        tmp_path: Path) -> None:
    """Every request that starts work ends it exactly once: an answer, an error, an
    unknown path, a client that went away mid-request (once its handler is done); an
    event stream ends it once its headers are out, while the stream stays open."""
    watch = CountingWatch()
    release = asyncio.Event()
    seen_busy: list[int] = []

    async def slow(request: Any) -> dict[str, str]:
        seen_busy.append(watch.busy)
        await release.wait()
        return {"ok": "yes"}

    async def broken(request: Any) -> None:
        raise RuntimeError("a handler that fails")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def settled(started: int) -> None:
            deadline = loop.time() + DEADLINE
            while watch.started < started or watch.busy:
                assert loop.time() < deadline, (watch.started, watch.ended)
                await asyncio.sleep(0.01)

        async with served(tmp_path, watch,
                          Route("GET", "/api/v1/test/slow", slow, None, "slow", hidden=True),
                          Route("GET", "/api/v1/test/broken", broken, None, "broken",
                                hidden=True)) as sock, contextlib.AsyncExitStack() as stack:
            stack.callback(release.set)  # the slow handler ends, whatever happens here
            connector = aiohttp.UnixConnector(path=str(sock))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get("http://agent/api/v1/status") as answer:
                    assert answer.status == 200
                await settled(1)
                async with http.get("http://agent/api/v1/no/such/thing") as answer:
                    assert answer.status == 404
                await settled(2)
                async with http.get("http://agent/api/v1/test/broken") as answer:
                    assert answer.status == 500
                await settled(3)

                # A client that goes away while its request is being worked on: the
                # handler goes on (aiohttp does not cancel it), and so does the work.
                gone = asyncio.create_task(http.get("http://agent/api/v1/test/slow"))
                deadline = loop.time() + DEADLINE
                while not seen_busy:
                    assert loop.time() < deadline, "the slow handler never ran"
                    await asyncio.sleep(0.01)
                assert seen_busy == [1]
                gone.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gone
                assert watch.busy == 1
                release.set()
                await settled(4)

                # An event stream: its work is over once the headers are out.
                async with http.get("http://agent/api/v1/events") as stream:
                    assert stream.status == 200
                    assert stream.headers["Content-Type"].startswith("text/event-stream")
                    await settled(5)
                    assert not stream.closed  # still open, and no longer work
                await settled(5)
                assert watch.ended == watch.started == 5

    asyncio.run(scenario())


@pytest.fixture
def fast_probes(monkeypatch: pytest.MonkeyPatch) -> float:
    """Probe every 20 ms; the busy window after activity is one probe period."""
    monkeypatch.setattr(ticker, "PROBE_SECONDS", 0.02)
    monkeypatch.setattr(ticker, "BUSY_SECONDS", 0.02)
    return 0.02


def test_probes_run_while_a_request_is_in_work_and_stop_after(fast_probes: float) -> None:
    """A request in work keeps the probes going far past the busy window; once it ends,
    at most two more come (the one due, the one after the last activity), then none."""
    probes: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with running_ticker(probes) as clock:
            quiet = len(probes)
            clock.request_started()
            deadline = loop.time() + DEADLINE
            while len(probes) < quiet + 10:  # ten busy windows and more
                assert loop.time() < deadline, "no probes while a request was in work"
                await asyncio.sleep(fast_probes)
            clock.request_ended()
            ended = len(probes)
            await asyncio.sleep(10 * fast_probes)
            assert len(probes) - ended <= 2, "probes went on after the work was over"
            after = len(probes)
            await asyncio.sleep(10 * fast_probes)
            assert len(probes) == after

            clock.note_activity()  # a state change: one window of probes, then none
            deadline = loop.time() + DEADLINE
            while len(probes) == after:
                assert loop.time() < deadline, "no probe after a state change"
                await asyncio.sleep(fast_probes / 2)
            await asyncio.sleep(10 * fast_probes)
            settled = len(probes)
            assert settled - after <= 2
            await asyncio.sleep(10 * fast_probes)
            assert len(probes) == settled

    asyncio.run(main())


def test_a_stall_that_begins_as_work_arrives_on_an_idle_loop_is_measured(
        fast_probes: float) -> None:
    """The ticker is asleep (idle) when a request arrives and its handler computes for a
    while before it first yields, as a big answer made without an await does: the
    ticker's wake-up comes that much late, and that lateness is the loop's lag too. It
    must reach observe_lag, or a stall that begins on an idle daemon is never seen."""
    probes: list[float] = []
    stall = 0.3

    async def main() -> None:
        async with running_ticker(probes) as clock:
            quiet = len(probes)
            clock.request_started()
            time.sleep(stall)  # the handler's work, no await in it
            clock.request_ended()
            await asyncio.sleep(10 * fast_probes)
            assert max(probes[quiet:], default=0.0) >= stall * 0.9, probes[quiet:]

    asyncio.run(main())


def test_a_request_waiting_for_the_rest_of_its_body_is_not_work(tmp_path: Path) -> None:
    """A client that sends its headers and part of its body, then nothing: the handler
    waits on the client, as a stream waits on events, and must not keep the loop's probes
    going (once a second for as long as the client likes). When the rest comes, the
    request is work again until it is answered."""
    watch = CountingWatch()
    seen_busy: list[int] = []

    async def echo(request: Any) -> dict[str, Any]:
        seen_busy.append(watch.busy)
        return {"timeout": request["body"].timeout}

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        body = b'{"timeout": 7.5}'
        route = Route("POST", "/api/v1/test/body", echo, None, "body", hidden=True,
                      body=OperationBody)
        async with served(tmp_path, watch, route) as sock:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(b"POST /api/v1/test/body HTTP/1.1\r\nHost: agent\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
            await writer.drain()
            deadline = loop.time() + DEADLINE
            while not (watch.started == 1 and watch.busy == 0):
                assert loop.time() < deadline, ("still work while waiting on the client",
                                                watch.started, watch.ended)
                await asyncio.sleep(0.01)
            writer.write(body[5:])
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
            assert head.startswith(b"HTTP/1.1 200 "), head
            writer.close()
            await writer.wait_closed()
            deadline = loop.time() + DEADLINE
            while watch.busy:
                assert loop.time() < deadline, (watch.started, watch.ended)
                await asyncio.sleep(0.01)
            assert seen_busy == [1]  # the handler ran as work
            assert watch.ended == watch.started == 2

    asyncio.run(scenario())
