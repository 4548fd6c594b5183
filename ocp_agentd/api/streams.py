"""SPEC section 12's streamed answers: a program's log, and the daemon's events (SSE).

- ``GET /api/v1/processes/{name}/logs?stream=stdout|stderr&tail=N&follow=1``: the log file
  as ``text/plain``, chunked; with ``follow=1`` new output keeps coming, across rotation,
  until the client goes away or the daemon stops.
- ``GET /api/v1/events``: ``text/event-stream``; headers at once, then one
  ``event: <kind>`` / ``data: <one-line JSON>`` block per event of the daemon's
  :class:`~ocp_agentd.events.EventHub`, and a comment line every 15 s as keep-alive
  (https://html.spec.whatwg.org/#server-sent-events).

Both end when the daemon stops (it closes the hub, ``EventHub.close``), so a follower
never holds the daemon's stop back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from ocp_agentd.api.context import app_context, work_ended
from ocp_agentd.api.envelope import ApiError, ErrorCode
from ocp_agentd.api.routes import Param, Route
from ocp_agentd.events import KEEP, MAX_FOLLOWERS, MAX_SUBSCRIBERS, QUEUE_LIMIT, TooManySubscribers
from ocp_agentd.headers import TRACE_HEADER
from ocp_agentd.logtail import LogFile, NotALogFile
from ocp_agentd.supervision import ProgramNotFound, owner_of

KEEPALIVE_SECONDS = 15.0
# How often a quiet event stream looks whether its client is still connected (seconds).
GONE_CHECK_SECONDS = 1.0
MAX_TAIL = 100_000


async def _start(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": content_type,
        "Cache-Control": "no-cache",
        TRACE_HEADER: request["trace_id"],
    })
    response.enable_chunked_encoding()
    await response.prepare(request)
    work_ended(request)  # from here the stream waits on events, not on work
    return response


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# --- logs -----------------------------------------------------------------------------------


def _log_file(request: web.Request, name: str, stream: str) -> tuple[Path, int | None]:
    """The log's path and the uid of the program's user (who may own its directory)."""
    ctx = app_context(request)
    try:
        info = ctx.supervisor.info(name)
    except ProgramNotFound:
        raise ApiError(ErrorCode.PROCESS_NOT_FOUND, f"no program named {name!r}",
                       target="name") from None
    spec = ctx.settings.programs.get(name)
    if spec is not None and spec.log_target == "journal":
        raise ApiError(ErrorCode.BAD_REQUEST,
                       f"{name} writes to the journal, not to files (log_target = "
                       f"\"journal\"): journalctl -t {name}", target="name")
    owner = None
    if spec is not None:
        with contextlib.suppress(KeyError):  # a user that is gone owns nothing here
            owner = owner_of(spec)[0]
    stdout, stderr = info.log_files[0], info.log_files[-1]
    return Path(stdout if stream == "stdout" else stderr), owner


@contextlib.contextmanager
def _place(held: contextlib.AbstractContextManager[None]) -> Iterator[None]:
    """Enters ``held`` (a stream place of the hub), answering 429/1007 when all are taken."""
    try:
        held.__enter__()
    except TooManySubscribers as exc:
        raise ApiError(ErrorCode.TOO_MANY_STREAMS, str(exc)) from None
    try:
        yield
    finally:
        held.__exit__(None, None, None)


async def process_logs(request: web.Request) -> web.StreamResponse:
    params = request["params"]
    path, owner = _log_file(request, params["name"], params["stream"])
    hub = app_context(request).events
    try:
        log = LogFile.open(path, owner)
    except NotALogFile as exc:
        if exc.errno == errno.ENOENT and not params["follow"]:
            # Never written yet (the program has not started): an empty log.
            response = await _start(request, "text/plain; charset=utf-8")
            await response.write_eof()
            return response
        raise ApiError(ErrorCode.BAD_REQUEST, exc.strerror or str(exc),
                       target="name") from None
    with log, _place(hub.following() if params["follow"] else contextlib.nullcontext()):
        response = await _start(request, "text/plain; charset=utf-8")
        try:
            log.seek_tail(params["tail"])  # sent CHUNK by CHUNK, however long the lines
            while data := log.read_new():
                await response.write(data)
            if params["follow"]:
                async for data in log.follow(lambda: hub.closed or _gone(request)):
                    await response.write(data)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
    return response


# --- events ---------------------------------------------------------------------------------


def sse(event: dict[str, Any]) -> bytes:
    """One event as its server-sent-events block (the data on one line)."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event['id']}\nevent: {event['kind']}\ndata: {data}\n\n".encode()


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID", "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) < 20):
        raise ApiError(ErrorCode.BAD_REQUEST, "header Last-Event-ID: expected an event id",
                       target="Last-Event-ID")
    return int(raw)


async def events(request: web.Request) -> web.StreamResponse:
    hub = app_context(request).events
    # Subscribed before the headers go out: nothing after them is missed.
    try:
        subscription = hub.subscribe(last=request["params"]["last"],
                                     after=_last_event_id(request))
    except TooManySubscribers as exc:
        raise ApiError(ErrorCode.TOO_MANY_STREAMS, str(exc)) from None
    with subscription:
        response = await _start(request, "text/event-stream")
        try:
            await response.write(b": ocp-agentd events\n\n")
            keepalive = asyncio.get_running_loop().time() + KEEPALIVE_SECONDS
            while True:
                try:
                    event = await asyncio.wait_for(subscription.get(), GONE_CHECK_SECONDS)
                except TimeoutError:
                    # A client that went away frees its place now, not at the next write.
                    if _gone(request):
                        break
                    if asyncio.get_running_loop().time() >= keepalive:
                        await response.write(b": keep-alive\n\n")
                        keepalive = asyncio.get_running_loop().time() + KEEPALIVE_SECONDS
                    continue
                if event is None:
                    break
                await response.write(sse(event))
                keepalive = asyncio.get_running_loop().time() + KEEPALIVE_SECONDS
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
    return response


_NAME = Param("name", "path", "string", description="The program name from the config")


def routes() -> list[Route]:
    return [
        Route("GET", "/api/v1/processes/{name}/logs", process_logs, "HOST_VIEWER",
              "A program's log file, and with follow=1 its new output as it comes",
              operation_id="getProcessLogs",
              description="text/plain, chunked. With follow=1 the answer goes on (across "
              "log rotation, by rename or by copy and truncate) until the client closes "
              f"the connection or the daemon stops. At most {MAX_FOLLOWERS} followers are "
              "open at once; one more is answered 429/1007.",
              params=(_NAME,
                      Param("stream", "query", "string", enum=("stdout", "stderr"),
                            default="stdout", description="Which log"),
                      Param("tail", "query", "integer", minimum=0, maximum=MAX_TAIL,
                            description="Start with the last N lines (default: the whole "
                            "file)"),
                      Param("follow", "query", "boolean", default=False,
                            description="Keep streaming new output")),
              errors=(ErrorCode.PROCESS_NOT_FOUND, ErrorCode.TOO_MANY_STREAMS),
              tags=("processes",), raw=True,
              content_type="text/plain"),
        Route("GET", "/api/v1/events", events, "HOST_VIEWER",
              "The daemon's events as server-sent events", operation_id="streamEvents",
              description="Headers at once, a comment line every 15 s as keep-alive, then "
              "for each program state change, probe failure, reload, task and subtask "
              "status change: 'event: <kind>' and 'data: <one-line JSON>' with time, kind "
              "(state, probe, reload, task, subtask), program or task/subtask, from, to, "
              f"reason; each with its 'id:'. The last {KEEP:,} events are kept: last=N starts "
              "with the N most recent, a Last-Event-ID header with those after it. A "
              f"reader that falls {QUEUE_LIMIT} events behind gets a 'lost' event and the "
              f"stream ends. At most {MAX_SUBSCRIBERS} streams are open at once; one more "
              "is answered 429/1007.",
              params=(Param("last", "query", "integer", minimum=0, maximum=1000, default=0,
                            description="Start with the N most recent events"),),
              errors=(ErrorCode.TOO_MANY_STREAMS,), tags=("processes",), raw=True,
              content_type="text/event-stream"),
    ]
