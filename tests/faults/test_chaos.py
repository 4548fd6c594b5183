"""Chaos soak: eight programs under random harm, then every promise checked.

    FAULTS_SEED=<n>            replay a run (the seed is printed at the start and in the figures)
    FAULTS_CHAOS_SECONDS=<s>   length of the harm phase (default 90)

Harm: kill -9 of programs, SIGSTOP then SIGCONT, kill -9 of the daemon (sometimes with a
program killed while no daemon watches) and start of a new one, a handover (SIGUSR2), a
full daemon restart (SIGTERM), a reload (SIGHUP), the daemon frozen (SIGSTOP) while a
program is killed, restarts through the API, restart tasks
when the task routes exist, and concurrent status requests all along. The seed fixes the
sequence of choices; what each choice hits also depends on the timing of the run.

At the end every program is RUNNING with exactly its own tree (counted by command line over
the whole process table), nothing of an earlier instance is left, there is no zombie, every
task is final, none was lost.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import psutil
import pytest
from faultlib import (
    by_cmdline,
    envelope_problem,
    environ_of,
    host_id,
    marked,
    python_sleeper,
    zombies,
)
from harness import ApiClient, DaemonRunner, demo_command, free_port, wait_for

pytestmark = pytest.mark.faults

CHAOS_SECONDS = float(os.environ.get("FAULTS_CHAOS_SECONDS", "90"))
STOP_TIMEOUT = 1.5


def tagged(command: list[str], tag: str) -> list[str]:
    """The command with `-X faults=<tag>` after the interpreter (Python ignores unknown -X
    options): a command line no other test's program has, to count by over the table."""
    return [command[0], "-X", f"faults={tag}", *command[1:]]


def chaos_programs(tag: str) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """Eight programs (the demo's three with their commands tagged, and five misbehaving
    ones), and the process count of each tree."""
    port = free_port()
    programs: dict[str, dict[str, Any]] = {
        "tree3": {"command": demo_command("misbehave", "tree", 3)},
        "grandkid": {"command": demo_command("misbehave", "setsid-grandchild")},
        "stubborn": {"command": demo_command("misbehave", "ignore-term", "--tree", 2)},
        "listener": {"command": demo_command("misbehave", "listen", port), "ports": [port]},
        "quiet": {"command": python_sleeper(f"quiet-{tag}")},
    }
    for spec in programs.values():
        spec["stop_timeout"] = STOP_TIMEOUT
        spec["command"] = tagged(spec["command"], tag)
    sizes = {"pos_proxy": 1, "ocp_exporter": 1, "ob_logtailer": 1, "tree3": 4, "grandkid": 3,
             "stubborn": 3, "listener": 1, "quiet": 1}
    return programs, sizes


def chaos_daemon(daemon_factory: Any, programs: dict[str, Any], tag: str) -> DaemonRunner:
    """A started daemon on `programs` plus the demo's three, whose commands (written by
    write_demo_config) get the same tag and short stops; every program RUNNING."""
    demo = {name: {"stop_timeout": STOP_TIMEOUT}
            for name in ("pos_proxy", "ocp_exporter", "ob_logtailer")}
    runner = daemon_factory(programs, {"programs": demo}, start=False)
    text = runner.config.read_text()
    for module in ("pos_proxy", "exporter", "logtailer"):
        plain = f'"-m", "ocp_agentd.demo.{module}"'
        assert plain in text
        text = text.replace(plain, f'"-X", "faults={tag}", {plain}')
    runner.config.write_text(text)
    runner.start(timeout=60)
    runner.wait_all_running(timeout=60)
    return runner


def _tree_problems(runner: DaemonRunner, sizes: dict[str, int]) -> list[str]:
    """What is wrong with the process table now (empty when every promise holds)."""
    problems: list[str] = []
    records = {r["name"]: r for r in runner.processes()}
    current_runs: dict[str, str] = {}
    for name, size in sizes.items():
        record = records.get(name)
        if record is None or record["state"] != "RUNNING":
            problems.append(f"{name}: not RUNNING ({record and record['state']})")
            continue
        found = by_cmdline(record["command"])
        pids = {p.pid for p in found}
        if len(found) != size or record["pid"] not in pids:
            problems.append(f"{name}: {len(found)} process(es) {sorted(pids)} with its command "
                            f"line, expected {size} with main pid {record['pid']}")
        env = environ_of(record["pid"]) or {}
        current_runs[name] = env.get("OCP_AGENTD_RUN_ID", "?")
    assert runner.state_dir is not None
    for pid, env in marked(str(runner.state_dir)):
        name = env.get("OCP_AGENTD_PROGRAM", "?")
        if current_runs.get(name) not in (None, env.get("OCP_AGENTD_RUN_ID")):
            problems.append(f"{name}: pid {pid} is left from an earlier instance")
    return problems


def _our_zombies(ours: set[int]) -> list[tuple[int, int, str]]:
    return [z for z in zombies() if z[0] in ours or z[1] in ours]


class Requests:
    """Threads that ask for status and processes all along, and count the answers."""

    def __init__(self, runner: DaemonRunner, threads: int = 3) -> None:
        self.client = ApiClient(socket_path=runner.socket, timeout=15.0)
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True)
                         for i in range(threads)]
        self._lock = threading.Lock()

    def _loop(self, index: int) -> None:
        paths = ["/api/v1/status", "/api/v1/processes", "/api/v1/processes/tree3"]
        turn = index
        while not self._stop.is_set():
            path = paths[turn % len(paths)]
            turn += 1
            try:
                response = self.client.get(path)
            except Exception as exc:  # daemon down or dying
                with self._lock:
                    self.counts[f"unanswered ({type(exc).__name__})"] += 1
                self._stop.wait(0.05)
                continue
            problem = envelope_problem(response.status, response.envelope)
            with self._lock:
                self.counts["served"] += 1
                if problem:
                    self.problems.append(f"GET {path}: {problem}")

    def __enter__(self) -> Requests:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


class Chaos:
    def __init__(self, runner: DaemonRunner, sizes: dict[str, int], rng: random.Random) -> None:
        self.runner = runner
        self.sizes = sizes
        self.rng = rng
        self.faults: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.problems: list[str] = []
        self.daemon_restarts = 0
        self.tasks_created: list[str] = []
        self.ours: set[int] = {os.getpid()}
        self.stopped: dict[int, float] = {}
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.task_routes = self._has_task_routes()

    def _has_task_routes(self) -> bool:
        spec = self.runner.get("/api/v1/openapi.json")
        paths = (spec.envelope or {}).get("paths") or (spec.data or {}).get("paths") or {}
        return any(p.endswith("/agent/restart") for p in paths)

    # --- helpers -----------------------------------------------------------------------------

    def records(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in self.runner.processes()}

    def remember_pids(self) -> None:
        assert self.runner.state_dir is not None
        self.ours.update(pid for pid, _ in marked(str(self.runner.state_dir)))
        if self.runner.pid:
            self.ours.add(self.runner.pid)

    def steady(self, record: dict[str, Any]) -> bool:
        return record["state"] == "RUNNING" and (record.get("uptime") or 0) > 2.0

    def _in_background(self, body: Any, *args: Any) -> None:
        thread = threading.Thread(target=body, args=args, daemon=True)
        thread.start()
        self._workers = [t for t in self._workers if t.is_alive()] + [thread]

    def _check_answer(self, what: str, response: Any) -> None:
        problem = envelope_problem(response.status, response.envelope)
        if problem:
            with self._lock:
                self.problems.append(f"{what}: {problem}")

    # --- harm ----------------------------------------------------------------------------------

    def kill9_program(self) -> None:
        steady = [r for r in self.records().values() if self.steady(r)]
        if not steady:
            return
        victim = self.rng.choice(steady)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim["pid"], signal.SIGKILL)
            self.faults["kill -9 program"] += 1

    def stop_cont(self) -> None:
        steady = [r for r in self.records().values()
                  if self.steady(r) and r["pid"] not in self.stopped]
        if not steady:
            return
        pid = self.rng.choice(steady)["pid"]
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        self.stopped[pid] = time.monotonic() + self.rng.uniform(0.2, 2.0)
        self.faults["SIGSTOP+SIGCONT program"] += 1

    def resume_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        for pid, due in list(self.stopped.items()):
            if everything or due <= now:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                del self.stopped[pid]

    def kill9_daemon(self) -> None:
        self.remember_pids()
        mains = [r["pid"] for r in self.records().values() if r["pid"]]
        self.runner.kill9()
        self.faults["kill -9 daemon"] += 1
        if self.rng.random() < 0.5:
            # Harm while nobody watches: the next daemon must notice on its own. Main
            # processes only: a child killed under a live main is the program's own business.
            victims = [pid for pid in mains if self.rng.random() < 0.3]
            for pid in victims[:2]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.faults["kill -9 program while no daemon runs"] += 1
        self._start_daemon()

    def handover(self) -> None:
        self.remember_pids()
        self.runner.send_signal(signal.SIGUSR2)
        self._start_after_exit("handover", self.runner.wait_exit(30), 75, "handover (SIGUSR2)")

    def term_daemon(self) -> None:
        self.remember_pids()
        self._start_after_exit("SIGTERM", self.runner.stop(60), 0,
                               "daemon stop + start (SIGTERM)")

    def freeze_daemon(self) -> None:
        """SIGSTOP the daemon itself for up to 2 s: what it missed meanwhile (exits, requests)
        it must catch up on when it runs again."""
        assert self.runner.pid is not None
        steady = [r for r in self.records().values() if self.steady(r)]
        os.kill(self.runner.pid, signal.SIGSTOP)
        try:
            if steady:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.rng.choice(steady)["pid"], signal.SIGKILL)
                    self.faults["kill -9 program while the daemon is frozen"] += 1
            time.sleep(self.rng.uniform(0.3, 2.0))  # the length of the freeze being made
        finally:
            os.kill(self.runner.pid, signal.SIGCONT)
        self.faults["SIGSTOP+SIGCONT daemon"] += 1

    def reload(self) -> None:
        self.runner.send_signal(signal.SIGHUP)  # the same config: nothing may change
        self.faults["reload (SIGHUP)"] += 1

    def _start_daemon(self) -> None:
        self.runner.start(timeout=60)
        self.daemon_restarts += 1
        self.remember_pids()

    def _start_after_exit(self, what: str, code: int, expected: int, fault: str) -> None:
        """Notes an unexpected exit status of the daemon, counts the fault, starts a new one."""
        if code != expected:
            self.problems.append(f"{what} exit status {code}, expected {expected}")
        self.faults[fault] += 1
        self._start_daemon()

    def api_restart(self) -> None:
        name = self.rng.choice(list(self.sizes))
        body = {"force": True} if name == "pos_proxy" else None
        self.faults["restart through the API"] += 1

        def call() -> None:
            try:
                response = self.runner.post(f"/api/v1/processes/{name}/restart", json=body,
                                            timeout=60)
            except Exception as exc:
                with self._lock:
                    self.outcomes[f"API restart unanswered ({type(exc).__name__})"] += 1
                return
            self._check_answer(f"restart {name}", response)
            with self._lock:
                self.outcomes[f"API restart -> {response.status}"] += 1

        self._in_background(call)

    def restart_task(self) -> None:
        self.faults["restart task"] += 1
        response = self.runner.post(f"/compute/hosts/{host_id(self.runner)}/agent/restart",
                                    timeout=30)
        self._check_answer("restart task", response)
        if response.successful and isinstance(response.data, dict) and "id" in response.data:
            self.tasks_created.append(str(response.data["id"]))
            self.outcomes["restart task accepted"] += 1
        else:
            self.outcomes[f"restart task refused ({response.code})"] += 1

    # --- the run -------------------------------------------------------------------------------

    def run(self, seconds: float) -> None:
        harm = [
            (self.kill9_program, 6.0),
            (self.stop_cont, 3.0),
            (self.kill9_daemon, 1.2),
            (self.handover, 0.4),
            (self.term_daemon, 0.3),
            (self.api_restart, 1.5),
            (self.reload, 0.5),
            (self.freeze_daemon, 0.6),
        ]
        if self.task_routes:
            harm.append((self.restart_task, 1.0))
        actions, weights = zip(*harm, strict=True)
        deadline = time.monotonic() + seconds
        halfway = deadline - seconds / 2
        while time.monotonic() < deadline:
            self.resume_due()
            action = self.rng.choices(actions, weights)[0]
            if self.task_routes and not self.tasks_created and time.monotonic() > halfway:
                action = self.restart_task  # at least one task in the middle of it all
            action()
            self.remember_pids()
            pause = time.monotonic() + self.rng.uniform(0.1, 0.8)
            while time.monotonic() < pause:
                self.resume_due()
                time.sleep(0.05)  # the pace of the harm, not a wait on a condition
        self.resume_due(everything=True)
        for worker in self._workers:
            worker.join(90)


def test_chaos_soak(daemon_factory, figures):
    seed = int(os.environ.get("FAULTS_SEED") or random.randrange(2**32))
    print(f"chaos seed {seed} (replay: FAULTS_SEED={seed})", file=sys.stderr)
    figures["seed"] = seed
    tag = uuid.uuid4().hex[:12]
    programs, sizes = chaos_programs(tag)
    runner = chaos_daemon(daemon_factory, programs, tag)
    assert not _tree_problems(runner, sizes), "the trees are not as expected before any harm"
    chaos = Chaos(runner, sizes, random.Random(seed))
    started = time.monotonic()
    with Requests(runner) as requests:
        try:
            chaos.run(CHAOS_SECONDS)
        finally:
            chaos.resume_due(everything=True)
        if not runner.running:
            runner.start(timeout=60)
        runner.wait_all_running(timeout=60)
    problems = list(chaos.problems) + requests.problems

    # Leftovers are swept in the background after an exit: give them a moment, no more.
    try:
        wait_for(lambda: not _tree_problems(runner, sizes), 20, "every tree as expected")
    except AssertionError:
        problems += _tree_problems(runner, sizes)
    chaos.remember_pids()
    try:
        wait_for(lambda: not _our_zombies(chaos.ours), 10, "no zombie of ours")
    except AssertionError:
        problems += [f"zombie {z}" for z in _our_zombies(chaos.ours)]

    tasks_listed: int | None = None
    task_outcomes: Counter[str] = Counter()
    if chaos.task_routes:
        found, tasks_listed, task_outcomes = _task_problems(runner, chaos.tasks_created)
        problems += found
    log = runner.log()
    for bad in ("Traceback", "internal error", "Task exception was never retrieved"):
        if bad in log:
            problems.append(f"daemon log shows {bad!r}")

    figures.update({
        "harm phase (s)": round(CHAOS_SECONDS, 1),
        "whole test (s)": round(time.monotonic() - started, 1),
        "faults injected": sum(chaos.faults.values()),
        "faults by kind": dict(chaos.faults),
        "daemon restarts survived": chaos.daemon_restarts,
        "tasks run": len(chaos.tasks_created) if chaos.task_routes else "task routes absent",
        "tasks listed": tasks_listed,
        "task outcomes": dict(task_outcomes),
        "operation outcomes": dict(chaos.outcomes),
        "requests served": requests.counts["served"],
        "requests unanswered while no daemon ran": sum(
            v for k, v in requests.counts.items() if k != "served"),
        "invariant violations": len(problems),
    })
    assert not problems, f"seed {seed}: " + "\n".join(problems[:40])


def _task_problems(
    runner: DaemonRunner, created: list[str]
) -> tuple[list[str], int, Counter[str]]:
    """What is wrong with the tasks, how many of the created ones are listed, outcomes."""
    problems: list[str] = []
    outcomes: Counter[str] = Counter()

    def final(task_id: str) -> dict[str, Any] | None:
        task = runner.get(f"/api/v2/tasks/instances/{task_id}").data
        return task if task and task.get("status") in ("SUCCESSFUL", "FAILED") else None

    for task_id in created:
        try:
            task = wait_for(lambda task_id=task_id: final(task_id), 120, f"task {task_id} final")
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        outcomes[task["status"]] += 1
        if task["status"] == "FAILED":
            # Why a subtask failed is in its log (tasks/model.py).
            failed = [s for s in task.get("subtasks", []) if s.get("status") == "FAILED"]
            if not failed:
                problems.append(f"task {task_id} FAILED without a failed subtask")
            for sub in failed:
                log = runner.get(
                    f"/api/v2/tasks/instances/{task_id}/subtasks/{sub['id']}/log").data or {}
                text = str(log.get("log", "")).strip()
                if not text:
                    problems.append(f"task {task_id}: subtask {sub['name']} FAILED, no reason")
                else:
                    last = text.splitlines()[-1][:160]
                    outcomes[f"FAILED in {sub['name']!r}: {last}"] += 1
    listed = runner.get(
        f"/api/v2/tasks/instances?page=1&size=1000&hostId={host_id(runner)}").data or {}
    ids = {str(t.get("id")) for t in listed.get("contents", [])}
    lost = [t for t in created if t not in ids]
    if lost:
        problems.append(f"task records lost: {lost}")
    return problems, len(created) - len(lost), outcomes


@pytest.mark.parametrize("name", ["tree3", "stubborn", "grandkid"])
def test_tree_killed_while_no_daemon_runs(daemon_factory, name):
    """The main process of a tree dies while no daemon watches: the next daemon must end
    the orphaned rest of that tree and start one fresh instance, not adopt a child."""
    tag = uuid.uuid4().hex[:12]
    programs, sizes = chaos_programs(tag)
    runner = chaos_daemon(daemon_factory, {name: programs[name]}, tag)
    wanted = {name: sizes[name]}
    assert not _tree_problems(runner, wanted)
    before = runner.process(name)
    runner.kill9()
    os.kill(before["pid"], signal.SIGKILL)
    psutil.wait_procs([p for p in by_cmdline(before["command"]) if p.pid == before["pid"]],
                      timeout=5)
    runner.start()
    runner.wait_all_running(timeout=30)
    wait_for(lambda: not _tree_problems(runner, wanted), 15,
             f"{name}: one fresh tree, nothing of the old one")
    assert runner.process(name)["pid"] != before["pid"]
