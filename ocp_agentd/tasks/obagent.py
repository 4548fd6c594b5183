"""The subtasks of the OCP agent tasks, in the OCP server's class names.

Each one talks to the daemon only through the control API (`ctx.client`, an
AgentClient on the unix socket), exactly as a remote caller would, and is
idempotent: a retry, or a resume after the daemon died, runs it again safely.
What they learn is kept in the task context (listMap / stringMap), so a later
subtask, a retry or a rollback after a restart of the daemon still knows it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from ocp_agentd.client import AgentError, AgentUnavailable
from ocp_agentd.tasks.base import Subtask, SubtaskContext, SubtaskFailed
from ocp_agentd.tasks.model import CLASS_PREFIX

# Context keys.
OPERATION = "agent_operation"  # stringMap: "restart" | "stop"
POS_PROXY = "pos_proxy"  # stringMap: the pos_proxy program's name
WORKERS = "workers"  # listMap: the worker programs at Prepare
RUNNING_BEFORE = "workers_running_before"  # listMap: workers that ran at Prepare
PIDS_BEFORE = "pids_before"  # listMap: "name=pid" of every program at Prepare
PIDS_AFTER = "pids_after"  # listMap: "name=pid" at Finish

STOPPED_STATES = ("STOPPED", "EXITED", "FATAL")
# On the way between states, e.g. the daemon bringing back a program that crashed meanwhile.
MOVING_STATES = ("STARTING", "BACKOFF", "STOPPING")
SETTLE_SECONDS = 30.0
SETTLE_POLL_SECONDS = 0.1
VERIFY_PATIENCE_SECONDS = 10.0  # Finish judges again for this long before it fails
VERIFY_AGAIN_SECONDS = 0.5


def _client_error(exc: Exception) -> SubtaskFailed:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    details = [f"{e.get('target')}: {e.get('message')}" for e in getattr(exc, "sub_errors", [])]
    if details:
        message += " (" + "; ".join(details) + ")"
    return SubtaskFailed(f"control API answered {code}: {message}" if code else message)


def _pids(records: Iterable[dict[str, Any]]) -> list[str]:
    return [f"{r['name']}={r.get('pid') or ''}" for r in records]


class AgentSubtask(Subtask):
    """Waits for the control API, then runs `execute`; client errors become reasons."""

    async def run(self, ctx: SubtaskContext) -> None:
        await self._call(self._wait_for_daemon(ctx))
        await self._call(self.execute(ctx))

    async def rollback(self, ctx: SubtaskContext) -> None:
        await self._call(self._wait_for_daemon(ctx))
        await self._call(self.undo(ctx))

    async def execute(self, ctx: SubtaskContext) -> None:
        raise NotImplementedError

    async def undo(self, ctx: SubtaskContext) -> None:
        ctx.log("nothing to undo")

    @staticmethod
    async def _call(work: Any) -> Any:
        """Awaits work; a refusal or silence of the control API becomes SubtaskFailed."""
        try:
            return await work
        except (AgentError, AgentUnavailable) as exc:
            raise _client_error(exc) from None

    @staticmethod
    async def _wait_for_daemon(ctx: SubtaskContext) -> None:
        """A resumed task may run before the daemon's API listens: wait for it."""
        delay = 0.05
        while True:
            try:
                await ctx.client.status()
                return
            except AgentUnavailable:
                if ctx.remaining() < delay + 0.5:
                    raise
                ctx.log(f"the control API does not answer yet; trying again in {delay:.2f} s")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # ---- helpers shared by the subtasks --------------------------------------------------

    @staticmethod
    async def programs(ctx: SubtaskContext) -> list[dict[str, Any]]:
        return list(await ctx.client.processes())

    async def settled_programs(self, ctx: SubtaskContext) -> list[dict[str, Any]]:
        """Every program's record once none is moving between states, or as they are when
        the wait (at most SETTLE_SECONDS, and never the subtask's last 5 s) is over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(SETTLE_SECONDS, max(0.0, ctx.remaining() - 5.0))
        told: set[str] = set()
        while True:
            programs = await self.programs(ctx)
            moving = {p["name"]: p["state"] for p in programs if p["state"] in MOVING_STATES}
            if not moving or loop.time() >= deadline:
                return programs
            if not moving.keys() <= told:
                told |= moving.keys()
                ctx.log("waiting for " + ", ".join(f"{n} ({s})" for n, s in moving.items())
                        + " to settle")
            await asyncio.sleep(SETTLE_POLL_SECONDS)

    @staticmethod
    def workers(programs: list[dict[str, Any]]) -> list[str]:
        """The worker programs: operable and not pos_proxy, in config order."""
        return [p["name"] for p in programs if p.get("role") != "pos_proxy" and p["operable"]]

    @staticmethod
    def api_timeout(ctx: SubtaskContext) -> float:
        """What the daemon may spend on one call: most of this subtask's time left."""
        return round(max(1.0, ctx.remaining() - 1.0), 3)

    async def start_workers(self, ctx: SubtaskContext, names: list[str]) -> None:
        """Start-all when every worker is wanted, else one by one; verify each RUNNING."""
        if not names:
            ctx.log("no worker programs to start")
            return
        everyone = set(self.workers(await self.programs(ctx)))
        timeout = self.api_timeout(ctx)
        try:
            if set(names) >= everyone:
                ctx.log(f"start-all: {', '.join(sorted(everyone))}")
                await ctx.client.start_all(timeout=timeout)
            else:
                ctx.log(f"start, in parallel: {', '.join(names)}")
                for outcome in await asyncio.gather(
                    *(ctx.client.start(n, timeout=timeout) for n in names),
                    return_exceptions=True,
                ):
                    if isinstance(outcome, Exception):
                        raise outcome
        except AgentError as exc:
            ctx.log(f"start failed: {_client_error(exc)}")
        await self.verify_running(ctx, names)

    async def verify_running(self, ctx: SubtaskContext, names: list[str]) -> list[dict]:
        records = await asyncio.gather(*(ctx.client.process(n) for n in names))
        checks = await asyncio.gather(*(ctx.client.verify(n) for n in names))
        bad = []
        for record, check in zip(records, checks, strict=True):
            failed = [f"{c['name']}: {c['detail']}" for c in check["checks"] if not c["ok"]]
            if record["state"] == "RUNNING" and check["ok"]:
                ctx.log(f"{record['name']} RUNNING, pid {record['pid']}, verified")
            else:
                reason = "; ".join(failed) or "not verified"
                last = record.get("last_exit") or {}
                if last.get("reason"):
                    reason += f"; last exit: {last['reason']}"
                bad.append(f"{record['name']} is {record['state']} ({reason})")
        if bad:
            raise SubtaskFailed("not running: " + "; ".join(bad))
        return list(records)


# ---- Prepare ----------------------------------------------------------------------------


class _Prepare(AgentSubtask):
    operation = "restart"
    timeout = 60

    async def execute(self, ctx: SubtaskContext) -> None:
        await ctx.hold_lock()
        status = await ctx.client.status()
        ctx.log(f"daemon {status.get('version')} pid {status.get('pid')} "
                f"state {status.get('state')}, host {status.get('host_id')}")
        if status.get("host_id") not in (None, ctx.host_id):
            raise SubtaskFailed(
                f"the daemon answers for host {status.get('host_id')}, not {ctx.host_id}"
            )
        if status.get("state") in ("stopping", "STOPPING"):
            raise SubtaskFailed("the daemon is stopping")
        programs = await self.programs(ctx)
        proxies = [p["name"] for p in programs if p.get("role") == "pos_proxy"]
        if self.operation == "restart" and not proxies:
            raise SubtaskFailed("the configuration has no program with role pos_proxy")
        workers = self.workers(programs)
        running = [p["name"] for p in programs
                   if p["name"] in workers and p["state"] == "RUNNING"]
        ctx.string_map[OPERATION] = self.operation
        if proxies:
            ctx.string_map[POS_PROXY] = proxies[0]
        ctx.list_map[WORKERS] = workers
        ctx.list_map[RUNNING_BEFORE] = running
        ctx.list_map[PIDS_BEFORE] = _pids(programs)
        await ctx.save_context()
        for p in programs:
            ctx.log(f"{p['name']} ({p.get('role')}): {p['state']}, pid {p.get('pid')}")
        ctx.log(f"config checked: pos_proxy {proxies[0] if proxies else '-'}, "
                f"{len(workers)} worker(s); pids recorded")

    async def undo(self, ctx: SubtaskContext) -> None:
        await ctx.release_lock()


class PrepareRestartOcpAgentTask(_Prepare):
    class_name = CLASS_PREFIX + "PrepareRestartOcpAgentTask"
    name = "Prepare restart OCP agent"


class PrepareStopOcpAgentTask(_Prepare):
    class_name = CLASS_PREFIX + "PrepareStopOcpAgentTask"
    name = "Prepare stop OCP agent"
    operation = "stop"


# ---- Restart pos proxy ------------------------------------------------------------------


class RestartPosProxyTask(AgentSubtask):
    class_name = CLASS_PREFIX + "RestartPosProxyTask"
    name = "Restart pos proxy"
    timeout = 60

    async def execute(self, ctx: SubtaskContext) -> None:
        name = ctx.string_map.get(POS_PROXY)
        if not name:
            raise SubtaskFailed("no pos_proxy recorded by the Prepare subtask")
        before = dict(item.split("=", 1) for item in ctx.list_map.get(PIDS_BEFORE, []))
        old_pid = before.get(name) or None
        current = await ctx.client.process(name)
        if (current["state"] == "RUNNING" and old_pid
                and str(current.get("pid")) != old_pid):
            # A run before a daemon restart already did it: do not restart twice.
            ctx.log(f"{name} already restarted by an earlier attempt: pid {old_pid} -> "
                    f"{current['pid']}")
        else:
            ctx.log(f"restart {name} (pid {current.get('pid')}, {current['state']})")
            current = await ctx.client.restart(name, timeout=self.api_timeout(ctx), force=True)
        check = await ctx.client.verify(name)
        for item in check["checks"]:
            ctx.log(f"check {item['name']}: {'ok' if item['ok'] else 'FAILED'} {item['detail']}")
        if current["state"] != "RUNNING" or not check["ok"]:
            raise SubtaskFailed(f"{name} is {current['state']} after the restart, "
                                f"verify ok={check['ok']}")
        if old_pid and str(current.get("pid")) == old_pid:
            raise SubtaskFailed(f"{name} still has its old pid {old_pid}")
        ctx.log(f"{name} RUNNING with new pid {current['pid']} (was {old_pid or 'none'})")

    async def undo(self, ctx: SubtaskContext) -> None:
        name = ctx.string_map.get(POS_PROXY)
        if not name:
            ctx.log("no pos_proxy recorded: nothing to undo")
            return
        record = await ctx.client.process(name)
        if record["state"] != "RUNNING":
            ctx.log(f"{name} is {record['state']}: starting it")
            record = await ctx.client.start(name, timeout=self.api_timeout(ctx), force=True)
        ctx.log(f"a restart cannot be undone; {name} is {record['state']}, pid {record['pid']}")


# ---- Stop all ---------------------------------------------------------------------------


class StopAllOcpAgentProcessesTask(AgentSubtask):
    class_name = CLASS_PREFIX + "StopAllOcpAgentProcessesTask"
    name = "Stop all OCP agent processes"
    timeout = 600

    async def execute(self, ctx: SubtaskContext) -> None:
        workers = self.workers(await self.programs(ctx))
        ctx.log(f"stop-all: {', '.join(workers) or 'no workers'}")
        await ctx.client.stop_all(timeout=self.api_timeout(ctx))
        records = await asyncio.gather(*(ctx.client.process(n) for n in workers))
        alive = [f"{r['name']} ({r['state']}, pid {r['pid']})" for r in records
                 if r["state"] not in STOPPED_STATES or r.get("pid")]
        if alive:
            raise SubtaskFailed("still running after stop-all: " + ", ".join(alive))
        for r in records:
            ctx.log(f"{r['name']} {r['state']}: process tree gone")

    async def undo(self, ctx: SubtaskContext) -> None:
        wanted = ctx.list_map.get(RUNNING_BEFORE)
        if wanted is None:
            wanted = self.workers(await self.programs(ctx))
        ctx.log(f"undo stop-all: starting {', '.join(wanted) or 'nothing'}")
        await self.start_workers(ctx, list(wanted))


# ---- Start all --------------------------------------------------------------------------


class StartAllOcpAgentProcessesTask(AgentSubtask):
    class_name = CLASS_PREFIX + "StartAllOcpAgentProcessesTask"
    name = "Start all OCP agent processes"
    timeout = 600

    async def execute(self, ctx: SubtaskContext) -> None:
        await self.start_workers(ctx, self.workers(await self.programs(ctx)))

    async def undo(self, ctx: SubtaskContext) -> None:
        workers = self.workers(await self.programs(ctx))
        ctx.log(f"undo start-all: stopping {', '.join(workers) or 'nothing'}")
        await ctx.client.stop_all(timeout=self.api_timeout(ctx))


# ---- Finish -----------------------------------------------------------------------------


class FinishOcpAgentOperationTask(AgentSubtask):
    class_name = CLASS_PREFIX + "FinishOcpAgentOperationTask"
    name = "Finish OCP agent operation"
    timeout = 60

    async def execute(self, ctx: SubtaskContext) -> None:
        loop = asyncio.get_running_loop()
        patience_until = loop.time() + min(VERIFY_PATIENCE_SECONDS,
                                           max(0.0, ctx.remaining() - 5.0))
        while True:
            programs = await self.settled_programs(ctx)
            bad = await self._judge(ctx, programs)
            if not bad:
                break
            if loop.time() >= patience_until:
                raise SubtaskFailed("verify failed: " + ", ".join(bad))
            # A program killed a moment ago still looks RUNNING until the daemon sees the
            # exit; give the daemon a moment to bring it back before judging again.
            ctx.log(f"verify failed ({', '.join(bad)}); checking again")
            await asyncio.sleep(VERIFY_AGAIN_SECONDS)
        ctx.list_map[PIDS_AFTER] = _pids(programs)
        await ctx.save_context()
        await ctx.release_lock()

    async def _judge(self, ctx: SubtaskContext, programs: list[dict[str, Any]]) -> list[str]:
        """What is wrong with the programs, one entry per program; empty when all is well."""
        operation = ctx.string_map.get(OPERATION, "restart")
        result = await ctx.client.verify_all()
        verdicts = {item["name"]: item for item in result["programs"]}
        workers = set(self.workers(programs))
        bad = []
        for record in programs:
            name = record["name"]
            verdict = verdicts.get(name, {"ok": False, "checks": []})
            if operation == "stop" and name in workers:
                fine = record["state"] in STOPPED_STATES and not record.get("pid")
                ctx.log(f"{name} {record['state']}: {'stopped' if fine else 'STILL RUNNING'}")
            else:
                fine = record["state"] == "RUNNING" and verdict["ok"]
                ctx.log(f"{name} {record['state']}, pid {record.get('pid')}: "
                        f"{'verified' if fine else 'FAILED verify'}")
            if not fine:
                details = "; ".join(c["detail"] for c in verdict["checks"] if not c["ok"])
                bad.append(f"{name} {record['state']} {details}".strip())
        return bad


def subtasks() -> list[type[Subtask]]:
    return [PrepareRestartOcpAgentTask, PrepareStopOcpAgentTask, RestartPosProxyTask,
            StopAllOcpAgentProcessesTask, StartAllOcpAgentProcessesTask,
            FinishOcpAgentOperationTask]
