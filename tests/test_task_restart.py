"""The restart task end to end: a real daemon, the demo programs, the control API.

The seed's sample response (tests/data/seed_restart_response.json, copied from
seeds/000_56e64bc58e0afbbd.txt: it is the product's contract) is compared with a real
answer key by key and type by type.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from harness import DaemonRunner, demo_command, free_port_block, wait_for, write_demo_config

SEED = Path(__file__).parent / "data" / "seed_restart_response.json"
RESTART = "/compute/hosts/2/agent/restart"
TASKS = "/api/v2/tasks/instances"
CHAIN = [
    ("Prepare restart OCP agent", "PrepareRestartOcpAgentTask", 60),
    ("Restart pos proxy", "RestartPosProxyTask", 60),
    ("Stop all OCP agent processes", "StopAllOcpAgentProcessesTask", 600),
    ("Start all OCP agent processes", "StartAllOcpAgentProcessesTask", 600),
    ("Finish OCP agent operation", "FinishOcpAgentOperationTask", 60),
]
PREFIX = "com.alipay.ocp.service.task.business.obagent."


# ---- helpers -----------------------------------------------------------------------------


def wait_task(daemon: DaemonRunner, task_id: int, timeout: float = 30.0) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        task = daemon.get(f"{TASKS}/{task_id}").check()
        return task if task["status"] != "RUNNING" else None

    return wait_for(ended, timeout, f"task {task_id} to end", interval=0.05)


def sub(task: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in task["subtasks"] if s["name"] == name)


def wait_subtask_running(
    daemon: DaemonRunner, task_id: int, name: str, timeout: float = 15.0,
) -> dict[str, Any]:
    """The subtask `name` of the task, once it is RUNNING."""

    def running() -> dict[str, Any] | None:
        subtask = sub(daemon.get(f"{TASKS}/{task_id}").check(), name)
        return subtask if subtask["status"] == "RUNNING" else None

    return wait_for(running, timeout, f"{name} RUNNING", interval=0.01)


def log_of(daemon: DaemonRunner, task: dict[str, Any], name: str) -> str:
    sid = sub(task, name)["id"]
    return daemon.get(f"{TASKS}/{task['id']}/subtasks/{sid}/log").check()["log"]


def chain(task: dict[str, Any]) -> list[dict[str, Any]]:
    """The subtasks in DAG order, following upstreams -> downstreams from the root."""
    by_id = {s["id"]: s for s in task["subtasks"]}
    roots = [s for s in task["subtasks"] if not s["upstreams"]]
    assert len(roots) == 1, roots
    ordered = [roots[0]]
    while ordered[-1]["downstreams"]:
        (nxt,) = ordered[-1]["downstreams"]
        assert by_id[nxt]["upstreams"] == [ordered[-1]["id"]]
        ordered.append(by_id[nxt])
    assert len(ordered) == len(task["subtasks"])
    return ordered


def same_shape(seed: Any, ours: Any, where: str = "$") -> None:
    kinds = (bool, int, float, str, list, dict, type(None))
    seed_kind = next(k for k in kinds if isinstance(seed, k))
    assert isinstance(ours, seed_kind), f"{where}: {type(ours).__name__}, seed {seed_kind}"
    if seed_kind is bool:
        assert isinstance(ours, bool)
    if seed_kind is int:
        assert not isinstance(ours, bool), where
    if isinstance(seed, dict):
        assert set(ours) == set(seed), f"{where}: keys {sorted(ours)} != {sorted(seed)}"
        for key in seed:
            same_shape(seed[key], ours[key], f"{where}.{key}")
    if isinstance(seed, list) and seed:  # upstreams may be empty where the seed's is not
        for index, item in enumerate(ours):
            same_shape(seed[0], item, f"{where}[{index}]")


def stubborn(stop_timeout: float) -> dict[str, Any]:
    """A program that ignores SIGTERM: stopping it takes its whole stop_timeout."""
    return {"command": demo_command("misbehave", "ignore-term"), "stop_timeout": stop_timeout}


def pids(daemon: DaemonRunner) -> dict[str, int]:
    return {p["name"]: p["pid"] for p in daemon.processes()}


def instances(daemon: DaemonRunner) -> dict[str, int]:
    """How many live top processes each program has (by its env marker)."""
    counts: dict[str, int] = {}
    for proc in daemon.leftovers():
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        try:
            parent = proc.parent()
            parent_env = parent.environ() if parent else {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            parent_env = {}  # an orphan adopted by init: a top process
        name = env.get("OCP_AGENTD_PROGRAM")
        if name and parent_env.get("OCP_AGENTD_PROGRAM") != name:
            counts[name] = counts.get(name, 0) + 1
    return counts


# ---- tests -------------------------------------------------------------------------------


def test_answer_has_the_seed_shape(demo_daemon: DaemonRunner) -> None:
    seed = json.loads(SEED.read_text())
    response = demo_daemon.post(RESTART)
    assert response.status == 200
    same_shape(seed, response.envelope)
    task = response.data
    assert task["status"] == "RUNNING" and task["operation"] == "EXECUTE"
    assert task["name"] == seed["data"]["name"] == "Restart OCP agent"
    assert task["context"] == seed["data"]["context"]  # host 2, as in the seed
    assert task["hostId"] == 2 and task["taskDefinitionId"] == -1 and task["type"] == "MANUAL"
    assert task["startTime"][19] == "." and task["startTime"][23] in "+-"
    assert len(task["subtasks"]) == len(seed["data"]["subtasks"]) == 5
    ordered = chain(task)
    seed_order = chain(seed["data"])
    expected = [(n, PREFIX + c, t) for n, c, t in CHAIN]
    assert [(s["name"], s["className"], s["timeout"]) for s in seed_order] == expected
    assert [(s["name"], s["className"], s["timeout"]) for s in ordered] == expected
    assert [s["status"] for s in ordered] == ["READY"] + ["PENDING"] * 4
    for ours, theirs in zip(ordered, seed_order, strict=True):
        for key in ("description", "nodeType", "operation", "parallelIdx",
                    "prohibitRollback", "runTime"):
            assert ours[key] == theirs[key], key
    wait_task(demo_daemon, task["id"])


def test_full_restart_gives_every_program_a_new_pid(demo_daemon: DaemonRunner) -> None:
    before = {p["name"]: p for p in demo_daemon.processes()}
    started = time.monotonic()
    response = demo_daemon.post(RESTART)
    answered = time.monotonic() - started
    assert response.status == 200 and response.envelope["duration"] < 100
    task = wait_task(demo_daemon, response.data["id"])
    took = time.monotonic() - started
    print(f"POST answered in {answered * 1000:.1f} ms; task done in {took:.2f} s")
    assert task["status"] == "SUCCESSFUL", task
    assert all(s["status"] == "SUCCESSFUL" and s["runTime"] == 1 for s in task["subtasks"])
    after = {p["name"]: p for p in demo_daemon.processes()}
    assert set(after) == set(before)
    for name, record in after.items():
        assert record["state"] == "RUNNING"
        assert record["pid"] != before[name]["pid"], name
    # pos_proxy was restarted (and verified) before any worker was stopped.
    proxy_log = log_of(demo_daemon, task, "Restart pos proxy")
    stop_log = log_of(demo_daemon, task, "Stop all OCP agent processes")
    proxy_done = next(line for line in proxy_log.splitlines() if "new pid" in line)
    stop_begun = next(line for line in stop_log.splitlines() if "stop-all:" in line)
    assert proxy_done.split()[0] < stop_begun.split()[0]
    workers = [n for n, r in after.items() if r["role"] != "pos_proxy"]
    assert all(after["pos_proxy"]["create_time"] <= after[w]["create_time"] for w in workers)
    # The pids Prepare recorded are the old ones; Finish recorded the new ones.
    listing = task["context"]["listMap"]
    assert sorted(listing["pids_before"]) == sorted(f"{n}={r['pid']}" for n, r in before.items())
    assert sorted(listing["pids_after"]) == sorted(f"{n}={r['pid']}" for n, r in after.items())
    assert took < 2.0 + 4 * 0.3 + 2.0  # 2 s beyond readiness, plus slack for a busy machine
    metrics = demo_daemon.get("/metrics").text
    assert 'ocp_agentd_tasks_total{name="Restart OCP agent",status="SUCCESSFUL"} 1.0' in metrics


def _flaky_script(directory: Path, broken: bool) -> Path:
    path = directory / "flaky.py"
    body = "raise SystemExit(3)\n" if broken else "import time\nwhile True:\n    time.sleep(1)\n"
    path.write_text(body)
    return path


def _flaky_program(directory: Path, backoff: float) -> dict[str, Any]:
    """`flaky`: runs the script (written working), restarted after `backoff` s once it exits."""
    script = _flaky_script(directory, broken=False)
    return {"command": [sys.executable, str(script)], "backoff_initial": backoff,
            "backoff_max": backoff}


def test_a_worker_that_cannot_start_fails_start_all_then_retry_after_config_fix(
    daemon_factory: Any, tmp_path: Path,
) -> None:
    flaky = _flaky_program(tmp_path, backoff=30.0)
    daemon = daemon_factory({"flaky": flaky}, wait_running=True)
    directory, port = daemon.config.parent, daemon.base_port
    # A bad command in the config, reloaded: the daemon cannot start flaky any more.
    bad = {**flaky, "command": [sys.executable, "-c", "raise SystemExit(3)"]}
    write_demo_config(directory, port, 2, {"flaky": bad})
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_state("flaky", "BACKOFF", "FATAL", "EXITED")
    task = wait_task(daemon, daemon.post(RESTART).check()["id"])
    assert task["status"] == "FAILED"
    assert [s["status"] for s in chain(task)] == ["SUCCESSFUL"] * 3 + ["FAILED", "PENDING"]
    assert "flaky" in log_of(daemon, task, "Start all OCP agent processes")
    assert "FAILED" in log_of(daemon, task, "Start all OCP agent processes")
    # Fix the config, reload, retry: the task ends SUCCESSFUL from where it failed.
    write_demo_config(directory, port, 2, {"flaky": flaky})
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_state("flaky", "RUNNING")
    retried = daemon.post(f"{TASKS}/{task['id']}/retry").check()
    assert retried["status"] == "RUNNING" and retried["operation"] == "RETRY"
    done = wait_task(daemon, task["id"])
    assert done["status"] == "SUCCESSFUL"
    assert [s["runTime"] for s in chain(done)] == [1, 1, 1, 2, 1]
    assert all(p["state"] == "RUNNING" for p in daemon.processes())


def test_rollback_of_a_failed_restart_starts_what_it_stopped(
    daemon_factory: Any, tmp_path: Path,
) -> None:
    daemon = daemon_factory({"flaky": _flaky_program(tmp_path, backoff=60.0)},
                            wait_running=True)
    _flaky_script(tmp_path, broken=True)  # flaky runs now, but will not start again
    run = daemon.ctl("agent", "restart", "--wait")  # follows it; exit 1 as it fails
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Start all OCP agent processes" in run.stdout and "FAILED" in run.stdout
    task = daemon.get(f"{TASKS}/{run.stdout.split()[1]}").check()
    assert task["status"] == "FAILED"
    assert daemon.process("flaky")["state"] != "RUNNING"
    _flaky_script(tmp_path, broken=False)
    answer = daemon.post(f"{TASKS}/{task['id']}/rollback").check()
    assert answer["operation"] == "ROLLBACK"
    done = wait_task(daemon, task["id"])
    assert done["status"] == "SUCCESSFUL" and done["operation"] == "ROLLBACK"
    undone = [s["name"] for s in chain(done) if s["operation"] == "ROLLBACK"]
    assert undone == [n for n, _, _ in CHAIN[:3]]
    assert "flaky" in log_of(daemon, done, "Stop all OCP agent processes")
    assert daemon.process("flaky")["state"] == "RUNNING"
    assert all(p["state"] == "RUNNING" for p in daemon.processes())
    again = daemon.post(f"{TASKS}/{task['id']}/rollback")
    assert again.status == 400 and again.code == 20003


def test_a_worker_never_ready_fails_start_all_with_the_reason(daemon_factory: Any) -> None:
    daemon = daemon_factory(wait_running=True)
    port = daemon.base_port + 1  # ocp_exporter's port; never listened on from now on
    write_demo_config(daemon.config.parent, daemon.base_port, 2, overrides={"programs": {
        "ocp_exporter": {"command": demo_command("misbehave", "never-ready", port),
                         "start_timeout": 1.0, "backoff_initial": 30.0}}})
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_state("ocp_exporter", "BACKOFF", "FATAL")
    started = time.monotonic()
    task = wait_task(daemon, daemon.post(RESTART).check()["id"])
    assert task["status"] == "FAILED"
    assert sub(task, "Start all OCP agent processes")["status"] == "FAILED"
    log = log_of(daemon, task, "Start all OCP agent processes")
    assert "ocp_exporter" in log and f"port {port}" in log, log
    assert time.monotonic() - started < 15


def test_concurrent_restarts_one_task_one_409_and_idempotency(
    demo_daemon: DaemonRunner,
) -> None:
    answers: list[Any] = []

    def post() -> None:
        answers.append(demo_daemon.post(RESTART))

    threads = [threading.Thread(target=post) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    codes = sorted(a.status for a in answers)
    assert codes == [200, 409], [a.text for a in answers]
    winner = next(a for a in answers if a.status == 200).data
    loser = next(a for a in answers if a.status == 409)
    assert loser.code == 2003 and loser.error["target"] == str(winner["id"])
    stop = demo_daemon.post("/compute/hosts/2/agent/stop")
    assert stop.code == 2003 and stop.error["target"] == str(winner["id"])
    wait_task(demo_daemon, winner["id"])

    key = {"X-OCP-Idempotency-Key": "restart-req-42"}
    first = demo_daemon.post(RESTART, headers=key).check()
    second = demo_daemon.post(RESTART, headers=key).check()
    assert second["id"] == first["id"]
    done = wait_task(demo_daemon, first["id"])
    assert done["status"] == "SUCCESSFUL"
    assert demo_daemon.post(RESTART, headers=key).check()["id"] == first["id"]
    other = demo_daemon.post("/compute/hosts/2/agent/stop", headers=key)
    assert other.code == 1000  # the key belongs to the restart task
    listed = demo_daemon.get(f"{TASKS}?size=50").check()
    assert listed["page"]["totalElements"] == 2


def test_daemon_killed_during_stop_all_resumes_the_task(daemon_factory: Any) -> None:
    daemon = daemon_factory({"stubborn": stubborn(1.5)}, wait_running=True)
    before = pids(daemon)
    task_id = daemon.post(RESTART).check()["id"]
    wait_subtask_running(daemon, task_id, "Stop all OCP agent processes")
    daemon.kill9()
    daemon.start()
    task = wait_task(daemon, task_id)
    if task["status"] == "FAILED":  # allowed: a reason, then a retry succeeds
        daemon.post(f"{TASKS}/{task_id}/retry").check()
        task = wait_task(daemon, task_id)
    assert task["status"] == "SUCCESSFUL", task
    stop_all = sub(task, "Stop all OCP agent processes")
    assert stop_all["runTime"] >= 2
    assert "running it again" in log_of(daemon, task, "Stop all OCP agent processes")
    after = pids(daemon)
    assert all(after[name] != before[name] for name in before)
    assert all(p["state"] == "RUNNING" for p in daemon.processes())
    assert instances(daemon) == dict.fromkeys(before, 1)
    listed = daemon.get(TASKS).check()
    assert [t["id"] for t in listed["contents"]] == [task_id]


def test_cancel_a_running_subtask_then_retry(daemon_factory: Any) -> None:
    daemon = daemon_factory({"stubborn": stubborn(1.5)}, wait_running=True)
    task_id = daemon.post(RESTART).check()["id"]
    sid = wait_subtask_running(daemon, task_id, "Stop all OCP agent processes")["id"]
    answer = daemon.post(f"{TASKS}/{task_id}/subtasks/{sid}/cancel").check()
    assert sub(answer, "Stop all OCP agent processes")["status"] in ("CANCELING", "FAILED")
    task = wait_task(daemon, task_id)
    assert task["status"] == "FAILED"
    assert sub(task, "Stop all OCP agent processes")["status"] == "FAILED"
    assert "canceled by the operator" in log_of(daemon, task, "Stop all OCP agent processes")
    again = daemon.post(f"{TASKS}/{task_id}/subtasks/{sid}/cancel")
    assert again.status == 400 and again.code == 20003
    daemon.post(f"{TASKS}/{task_id}/subtasks/{sid}/retry").check()
    done = wait_task(daemon, task_id)
    assert done["status"] == "SUCCESSFUL"
    assert sub(done, "Stop all OCP agent processes")["runTime"] == 2
    assert all(p["state"] == "RUNNING" for p in daemon.processes())


def test_local_operations_wait_out_a_running_task(daemon_factory: Any) -> None:
    """While a restart task holds the host lock, a local start or stop would undo one of its
    steps: it answers 2003 naming the task. The task's own calls (X-OCP-Task-ID) pass."""
    daemon = daemon_factory({"stubborn": stubborn(3.0)}, wait_running=True)
    task_id = daemon.post(RESTART).check()["id"]
    wait_subtask_running(daemon, task_id, "Stop all OCP agent processes")
    for path in ("/api/v1/processes/ocp_exporter/restart", "/api/v1/processes/ob_logtailer/start",
                 "/api/v1/agent/start-all", "/api/v1/agent/stop-all"):
        refused = daemon.post(path)
        assert (refused.status, refused.code) == (409, 2003), (path, refused.text)
        assert refused.error["target"] == str(task_id)
        assert f"task {task_id}" in refused.error["message"]
    other_task = daemon.post("/api/v1/processes/ocp_exporter/stop",
                             headers={"X-OCP-Task-ID": str(task_id + 1)})
    assert other_task.code == 2003
    own = daemon.post("/api/v1/processes/ocp_exporter/stop",
                      headers={"X-OCP-Task-ID": str(task_id)})
    assert own.status == 200 and own.data["state"] == "STOPPED", own.text

    assert wait_task(daemon, task_id)["status"] == "SUCCESSFUL"
    assert daemon.post("/api/v1/processes/ocp_exporter/restart").status == 200
    assert all(p["state"] == "RUNNING" for p in daemon.processes())


def test_finish_waits_for_a_program_the_daemon_is_bringing_back(daemon_factory: Any) -> None:
    """pos_proxy crashes while the workers start: the daemon restarts it, and Finish waits for
    that to settle instead of failing on a program that is still STARTING."""
    daemon = daemon_factory(
        {"slow_worker": {"command": ["/bin/sleep", "100000"], "start_seconds": 1.0}},
        {"programs": {"pos_proxy": {"start_seconds": 3.0}}},
        wait_running=True,
    )
    task_id = daemon.post(RESTART).check()["id"]
    wait_subtask_running(daemon, task_id, "Start all OCP agent processes", timeout=30)
    crashed = pids(daemon)["pos_proxy"]
    os.kill(crashed, signal.SIGKILL)
    task = wait_task(daemon, task_id)
    assert task["status"] == "SUCCESSFUL", log_of(daemon, task, "Finish OCP agent operation")
    finish_log = log_of(daemon, task, "Finish OCP agent operation")
    assert "waiting for pos_proxy (" in finish_log and "to settle" in finish_log, finish_log
    after = dict(item.split("=") for item in task["context"]["listMap"]["pids_after"])
    assert int(after["pos_proxy"]) not in (crashed, 0)
    assert int(after["pos_proxy"]) == pids(daemon)["pos_proxy"]


def test_finish_judges_again_before_it_fails(daemon_factory: Any, tmp_path: Path) -> None:
    """A check that fails at Finish is looked at again for a while (a program killed a moment
    ago still looks RUNNING); the task fails only if it stays wrong."""
    sick = tmp_path / "sick"
    port = free_port_block(1)
    steady = {"command": demo_command("misbehave", "listen", port, "--sick-file", sick),
              "operable": False, "ports": [port],
              "health_url": f"http://127.0.0.1:{port}/health"}
    daemon = daemon_factory({"steady": steady}, wait_running=True)
    sick.touch()  # only Finish looks at steady's health from here on: the task leaves it alone
    task_id = daemon.post(RESTART).check()["id"]

    def judged_twice() -> bool:
        task = daemon.get(f"{TASKS}/{task_id}").check()
        return "checking again" in log_of(daemon, task, "Finish OCP agent operation")

    wait_for(judged_twice, 30, "Finish to judge again")
    sick.unlink()
    task = wait_task(daemon, task_id)
    assert task["status"] == "SUCCESSFUL", log_of(daemon, task, "Finish OCP agent operation")

    sick.touch()
    started = time.monotonic()
    task = wait_task(daemon, daemon.post(RESTART).check()["id"], timeout=60)
    assert task["status"] == "FAILED"
    finish = sub(task, "Finish OCP agent operation")
    assert finish["status"] == "FAILED"
    assert "steady" in log_of(daemon, task, "Finish OCP agent operation")
    assert time.monotonic() - started < 40
