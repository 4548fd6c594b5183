"""ocp-agentctl's task commands: agent restart|stop [--wait], task list|show|retry|rollback.

Registered into ocp_agentd.cli through its EXTENSIONS hook. ``--wait`` follows the task
and prints one line per state change of a subtask; the exit code is 0 only when the task
ends SUCCESSFUL.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from ocp_agentd.cli import EXIT_FAILED, EXIT_OK, Output
from ocp_agentd.client import AgentClient

TASKS = "/api/v2/tasks/instances"
POLL_SECONDS = 0.1


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    agent = subparsers.add_parser(
        "agent", parents=parents, help="restart or stop the OCP agent as an OCP task",
        description="Run the OCP agent tasks of this host: restart (Prepare -> Restart pos "
        "proxy -> Stop all -> Start all -> Finish) or stop (the workers; pos_proxy stays).",
    )
    actions = agent.add_subparsers(dest="agent_action", metavar="ACTION", required=True)
    for action, text in (("restart", "restart pos_proxy, then every worker"),
                         ("stop", "stop every worker process")):
        sub = actions.add_parser(action, parents=parents, help=text, description=text + ".")
        _wait_options(sub)
        sub.set_defaults(handler=cmd_agent, action=action)

    task = subparsers.add_parser(
        "task", parents=parents, help="show, retry or roll back an OCP task",
        description="Read the tasks this daemon ran and operate on a FAILED one.",
    )
    ops = task.add_subparsers(dest="task_action", metavar="ACTION", required=True)
    listing = ops.add_parser("list", parents=parents, help="the newest tasks")
    listing.add_argument("--size", type=int, default=10, help="how many (default 10)")
    listing.set_defaults(handler=cmd_list)
    show = ops.add_parser("show", parents=parents, help="a task and its subtasks")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--log", action="store_true", help="print every subtask's log too")
    show.set_defaults(handler=cmd_show)
    for action, text in (("retry", "re-run a FAILED task from its FAILED subtasks"),
                         ("rollback", "undo a FAILED task's done subtasks in reverse order")):
        sub = ops.add_parser(action, parents=parents, help=text, description=text + ".")
        sub.add_argument("id", type=int, metavar="ID")
        _wait_options(sub)
        sub.set_defaults(handler=cmd_task_operation, action=action)


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="follow the task until it ends; exit 1 unless SUCCESSFUL")
    parser.add_argument("--wait-timeout", type=float, default=3600.0, metavar="S",
                        help="give up following after S seconds (default 3600)")


# --- handlers -----------------------------------------------------------------------------


async def cmd_agent(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    host_id = (await client.status())["host_id"]
    task = await client.request("POST", f"/compute/hosts/{host_id}/agent/{args.action}")
    return await _started(args, client, out, task)


async def cmd_task_operation(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    task = await client.request("POST", f"{TASKS}/{args.id}/{args.action}")
    return await _started(args, client, out, task)


async def cmd_list(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    data = await client.request("GET", TASKS, params={"page": 1, "size": args.size})

    def human() -> None:
        out.table(["ID", "NAME", "STATUS", "OPERATION", "STARTED", "CREATOR"],
                  [[t["id"], t["name"], t["status"], t["operation"], t["startTime"],
                    t["creator"]] for t in data["contents"]])

    out.data(data, human)
    return EXIT_OK


async def cmd_show(args: argparse.Namespace, client: AgentClient, out: Output) -> int:
    task = await client.request("GET", f"{TASKS}/{args.id}")
    logs = {}
    for sub in task["subtasks"]:
        if args.log or sub["status"] == "FAILED":
            logs[sub["id"]] = (await _log(client, task["id"], sub["id"])).rstrip("\n")

    def human() -> None:
        print_task(out, task)
        for sub in task["subtasks"]:
            if sub["id"] in logs:
                out.line()
                out.line(f"--- {sub['name']} ({sub['id']}, {sub['status']})")
                text = logs[sub["id"]]
                out.line(text if args.log else text.splitlines()[-1] if text else "")

    out.data(task, human)
    return EXIT_OK if task["status"] != "FAILED" else EXIT_FAILED


# --- shared -------------------------------------------------------------------------------


def print_task(out: Output, task: dict[str, Any]) -> None:
    out.line(f"task {task['id']} {task['name']!r}: {task['status']} "
             f"(operation {task['operation']}, started {task['startTime']}, "
             f"by {task['creator']})")
    out.table(["ID", "SUBTASK", "STATUS", "OPERATION", "RUNS", "TIMEOUT"],
              [[s["id"], s["name"], s["status"], s["operation"], s["runTime"],
                f"{s['timeout']}s"] for s in task["subtasks"]])


async def _log(client: AgentClient, task_id: int, subtask_id: int) -> str:
    data = await client.request("GET", f"{TASKS}/{task_id}/subtasks/{subtask_id}/log")
    return str(data["log"])


async def _started(
    args: argparse.Namespace, client: AgentClient, out: Output, task: dict[str, Any]
) -> int:
    if not args.wait:
        out.data(task, lambda: print_task(out, task))
        return EXIT_OK
    if not out.json:
        out.line(f"task {task['id']} {task['name']!r} ({task['operation']})")
    task = await follow(client, out, task, args.wait_timeout)
    if out.json:
        out.data(task, lambda: None)
    else:
        out.line(f"task {task['id']} {task['status']}")
        for sub in task["subtasks"]:
            if sub["status"] == "FAILED":
                lines = (await _log(client, task["id"], sub["id"])).rstrip("\n").splitlines()
                out.line(f"  {sub['name']}: {lines[-1] if lines else 'FAILED'}")
    return EXIT_OK if task["status"] == "SUCCESSFUL" else EXIT_FAILED


async def follow(
    client: AgentClient, out: Output, task: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Poll the task until it is no longer RUNNING; one line per subtask state change."""
    seen: dict[int, tuple[str, str]] = {}
    started = time.monotonic()
    deadline = started + timeout
    while True:
        for sub in task["subtasks"]:
            state = (sub["status"], sub["operation"])
            if seen.get(sub["id"]) != state:
                seen[sub["id"]] = state
                if not out.json:
                    op = "" if sub["operation"] in ("EXECUTE",) else f" ({sub['operation']})"
                    out.line(f"  {time.monotonic() - started:7.2f}s  {sub['name']:<32} "
                             f"{sub['status']}{op}")
        if task["status"] != "RUNNING":
            return task
        if time.monotonic() > deadline:
            out.error(f"task {task['id']} still RUNNING after {timeout:g}s; stopped following")
            return task
        await asyncio.sleep(POLL_SECONDS)
        task = await client.request("GET", f"{TASKS}/{task['id']}")
