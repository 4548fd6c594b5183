"""ocp-agentctl's task commands: agent restart|stop [--wait], task list|show|retry|rollback.

``--wait`` and ``task show --follow`` follow a task on the daemon's event stream
(``GET /api/v1/events``, SPEC section 12), opened before the task is started so no change
is missed: one line per subtask state change, the exit status 0 only when the task ends
SUCCESSFUL.
"""

from __future__ import annotations

import argparse
import json
import time

from ocp_agentd.cli.http11 import ProtocolError, Response
from ocp_agentd.cli.output import Output
from ocp_agentd.cli.programs import EXIT_FAILED, EXIT_OK, STREAM_READ_SECONDS, parse_sse
from ocp_agentd.cli.transport import Transport, Unavailable

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

TASKS = "/api/v2/tasks/instances"
FINAL = ("SUCCESSFUL", "FAILED")


def print_task(out: Output, task: dict[str, Any]) -> None:
    out.line(f"task {task['id']} {task['name']!r}: {out.state(task['status'])} "
             f"(operation {task['operation']}, started {task['startTime']}, "
             f"by {task['creator']})")
    out.table(["ID", "SUBTASK", "STATUS", "OPERATION", "RUNS", "TIMEOUT"],
              [[s["id"], s["name"], s["status"], s["operation"], s["runTime"],
                f"{s['timeout']}s"] for s in task["subtasks"]], coloured=(2,))


def subtask_log(api: Transport, task_id: int, subtask_id: int) -> str:
    data = api.request("GET", f"{TASKS}/{task_id}/subtasks/{subtask_id}/log")
    return str(data["log"]).rstrip("\n")


def cmd_list(args: argparse.Namespace, api: Transport, out: Output) -> int:
    data = api.request("GET", TASKS, query={"page": args.page, "size": args.size})

    def human() -> None:
        out.table(["ID", "NAME", "STATUS", "OPERATION", "STARTED", "CREATOR"],
                  [[t["id"], t["name"], t["status"], t["operation"], t["startTime"],
                    t["creator"]] for t in data["contents"]], coloured=(2,))

    out.data(data, human)
    return EXIT_OK


def cmd_show(args: argparse.Namespace, api: Transport, out: Output) -> int:
    stream = _open_events(api) if args.follow else None
    task = api.request("GET", f"{TASKS}/{args.id}")
    if stream is not None and task["status"] not in FINAL:
        if not out.json:
            out.line(f"task {task['id']} {task['name']!r} ({task['operation']})")
        task = follow(api, out, task, stream, args.wait_timeout)
        if not out.json:
            out.line()
    elif stream is not None:
        stream.close()
    logs = {s["id"]: subtask_log(api, task["id"], s["id"]) for s in task["subtasks"]
            if args.log or s["status"] == "FAILED"}

    def human() -> None:
        print_task(out, task)
        for sub in task["subtasks"]:
            if sub["id"] in logs:
                out.line()
                out.line(f"--- {sub['name']} ({sub['id']}, {sub['status']})")
                text = logs[sub["id"]]
                out.line(text if args.log else (text.splitlines() or [""])[-1])

    if args.log:
        shown = dict(task, subtasks=[dict(s, log=logs[s["id"]]) for s in task["subtasks"]])
    else:
        shown = task
    out.data(shown, human)
    return EXIT_OK if task["status"] != "FAILED" else EXIT_FAILED


def cmd_agent(args: argparse.Namespace, api: Transport, out: Output) -> int:
    host_id = api.request("GET", "/api/v1/status")["host_id"]
    stream = _open_events(api) if args.wait else None
    task = api.request("POST", f"/compute/hosts/{host_id}/agent/{args.action}")
    return _started(args, api, out, task, stream)


def cmd_task_operation(args: argparse.Namespace, api: Transport, out: Output) -> int:
    stream = _open_events(api) if args.wait else None
    task = api.request("POST", f"{TASKS}/{args.id}/{args.action}")
    return _started(args, api, out, task, stream)


def _open_events(api: Transport) -> Response:
    return api.open_stream("/api/v1/events", timeout=STREAM_READ_SECONDS)


def _started(args: argparse.Namespace, api: Transport, out: Output, task: dict[str, Any],
             stream: Response | None) -> int:
    if stream is None:
        out.data(task, lambda: print_task(out, task))
        return EXIT_OK
    if not out.json:
        out.line(f"task {task['id']} {task['name']!r} ({task['operation']})")
    task = follow(api, out, task, stream, args.wait_timeout)
    if out.json:
        out.dump(task)
    else:
        out.line(f"task {task['id']} {out.state(task['status'])}")
        for sub in task["subtasks"]:
            if sub["status"] == "FAILED":
                lines = subtask_log(api, task["id"], sub["id"]).splitlines()
                out.line(f"  {sub['name']}: {lines[-1] if lines else 'FAILED'}")
    return EXIT_OK if task["status"] == "SUCCESSFUL" else EXIT_FAILED


def follow(api: Transport, out: Output, task: dict[str, Any],
           stream: Response, timeout: float) -> dict[str, Any]:
    """Prints each subtask status change of ``task`` from the event stream until the task
    is no longer RUNNING (or ``timeout`` seconds passed); answers the task as it ended."""
    started = time.monotonic()
    names = {s["id"]: s["name"] for s in task["subtasks"]}
    seen: dict[int, str] = {}

    def show(subtask_id: int, status: str) -> None:
        if seen.get(subtask_id) == status:
            return
        seen[subtask_id] = status
        if not out.json:
            out.line(f"  {time.monotonic() - started:7.2f}s  "
                     f"{names.get(subtask_id, subtask_id)!s:<32} {out.state(status)}")
            out.flush()

    for sub in task["subtasks"]:
        show(sub["id"], sub["status"])
    ended = _watch(stream, task["id"], started + timeout, show) or task["status"] in FINAL
    final = api.request("GET", f"{TASKS}/{task['id']}")
    for sub in final["subtasks"]:
        show(sub["id"], sub["status"])
    if not ended and final["status"] not in FINAL:
        out.error(f"task {task['id']} still RUNNING after {timeout:g}s; stopped following")
    return dict(final)


def _watch(stream: Response, task_id: int, deadline: float,
           show: Callable[[int, str], None]) -> bool:
    """Passes each subtask change of the task to ``show`` until the task ends (answers True)
    or the stream ends or the deadline (monotonic) passes (answers False); closes the stream.
    Raises Unavailable if the stream breaks."""
    try:
        for event in _task_events(stream, task_id, deadline):
            if event.get("kind") == "subtask" and event.get("to"):
                show(int(event["subtask"]), str(event["to"]))
            elif event.get("kind") == "task" and event.get("to") in FINAL:
                return True
    except (OSError, ProtocolError) as exc:
        raise Unavailable(f"the event stream of ocp-agentd broke: {exc}") from None
    finally:
        stream.close()
    return False


def _task_events(stream: Response, task_id: int, deadline: float) -> Any:
    """The events of one task, until the stream ends or the deadline (monotonic) passes
    (checked at every line: keep-alive comments come every 15 s)."""

    def lines() -> Any:
        while time.monotonic() < deadline and (line := stream.readline()):
            yield line

    for _, data in parse_sse(lines()):
        try:
            event = json.loads(data)
        except ValueError:
            continue
        if event.get("task") == task_id:
            yield event
