"""The /compute/hosts/{hostId}/agent endpoints and the task routes' answers to bad input,
permissions and the /api/v2 prefix, on a real daemon."""

from __future__ import annotations

import hashlib
from typing import Any

from harness import ApiClient, DaemonRunner, free_port, wait_for

BASE = "/compute/hosts/2/agent"
TASKS = "/api/v2/tasks/instances"
PROCESS_KEYS = {"id", "hostId", "alias", "pid", "user", "startCommand", "ports", "elapsedTime",
                "lastActiveTime", "status", "operable", "logFilePattern", "createTime",
                "updateTime"}


def by_alias(daemon: DaemonRunner) -> dict[str, dict[str, Any]]:
    return {p["alias"]: p for p in daemon.get(f"{BASE}/processes?size=100").check()["contents"]}


def pids(daemon: DaemonRunner) -> dict[str, int]:
    return {r["name"]: r["pid"] for r in daemon.processes()}


def wait_task(daemon: DaemonRunner, task_id: int) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        task = daemon.get(f"{TASKS}/{task_id}").check()
        return task if task["status"] != "RUNNING" else None

    return wait_for(ended, 30, f"task {task_id} to end", interval=0.05)


def test_host_agent_and_its_processes(demo_daemon: DaemonRunner) -> None:
    agent = demo_daemon.get(BASE).check()
    assert set(agent) == {"id", "version", "installHome", "logHome", "lastAvailableTime",
                          "hostId", "hostInnerIpAddress", "status", "processes", "createTime",
                          "updateTime"}
    assert agent["hostId"] == 2 and agent["status"] == "STARTED"
    assert agent["logHome"] == str(demo_daemon.settings.agent.log_dir)
    first = agent["processes"][0]
    assert first["alias"] == "ocp_agentd" and first["operable"] is False
    assert first["pid"] == demo_daemon.pid and first["status"] == "STARTED"

    page = demo_daemon.get(f"{BASE}/processes?page=1&size=10").check()
    assert page["page"] == {"number": 1, "size": 10, "totalElements": 4, "totalPages": 1}
    contents = page["contents"]
    assert [p["alias"] for p in contents] == ["ocp_agentd", "pos_proxy", "ocp_exporter",
                                              "ob_logtailer"]
    records = {r["name"]: r for r in demo_daemon.processes()}
    for item in contents:
        assert set(item) == PROCESS_KEYS
        if item["alias"] != "ocp_agentd":
            record = records[item["alias"]]
            assert item["pid"] == record["pid"] and item["status"] == "STARTED"
            assert item["operable"] == record["operable"]
            assert item["ports"] == ",".join(str(p) for p in record["ports"])
    assert len({p["id"] for p in contents}) == 4
    second = demo_daemon.get(f"{BASE}/processes?page=2&size=3").check()
    assert [p["alias"] for p in second["contents"]] == ["ob_logtailer"]
    assert second["page"]["totalPages"] == 2

    # Ids are stable per program: the same after the daemon restarts.
    ids = {p["alias"]: p["id"] for p in contents}
    demo_daemon.restart()
    assert {a: p["id"] for a, p in by_alias(demo_daemon).items()} == ids
    # Every route is also under /api/v2.
    assert demo_daemon.get(f"/api/v2{BASE}").check()["hostId"] == 2


def test_restart_one_process_by_its_id(demo_daemon: DaemonRunner) -> None:
    processes = by_alias(demo_daemon)
    exporter = processes["ocp_exporter"]
    answer = demo_daemon.post(f"{BASE}/processes/{exporter['id']}/restart").check()
    assert answer["alias"] == "ocp_exporter" and answer["status"] == "STARTED"
    assert answer["pid"] != exporter["pid"] and answer["id"] == exporter["id"]
    assert demo_daemon.process("ocp_exporter")["pid"] == answer["pid"]
    for alias in ("pos_proxy", "ocp_agentd"):
        refused = demo_daemon.post(f"{BASE}/processes/{processes[alias]['id']}/restart")
        assert refused.status == 400 and refused.code == 2002, refused.text
    assert demo_daemon.process("pos_proxy")["pid"] == processes["pos_proxy"]["pid"]
    missing = demo_daemon.post(f"{BASE}/processes/12345/restart")
    assert missing.status == 404 and missing.code == 2001


def test_stop_task_stops_the_workers_and_keeps_pos_proxy(demo_daemon: DaemonRunner) -> None:
    proxy = demo_daemon.process("pos_proxy")["pid"]
    task = demo_daemon.post(f"/api/v2{BASE}/stop").check()
    assert task["name"] == "Stop OCP agent"
    assert [s["name"] for s in task["subtasks"]] == [
        "Prepare stop OCP agent", "Stop all OCP agent processes", "Finish OCP agent operation"]
    assert wait_task(demo_daemon, task["id"])["status"] == "SUCCESSFUL"
    states = {r["name"]: r["state"] for r in demo_daemon.processes()}
    assert states == {"pos_proxy": "RUNNING", "ocp_exporter": "STOPPED",
                      "ob_logtailer": "STOPPED"}
    assert demo_daemon.process("pos_proxy")["pid"] == proxy
    assert demo_daemon.get(BASE).check()["status"] == "STOPPED"


def test_bad_input_answers_its_code_and_changes_nothing(demo_daemon: DaemonRunner) -> None:
    before = pids(demo_daemon)
    for host in ("abc", "0", "-1", "9223372036854775808", "1.5"):
        for method, path in (("POST", f"/compute/hosts/{host}/agent/restart"),
                             ("GET", f"/compute/hosts/{host}/agent"),
                             ("GET", f"/api/v2/compute/hosts/{host}/agent/processes")):
            answer = demo_daemon.request(method, path)
            assert answer.status == 400 and answer.code == 1000, (path, answer.text)
            assert answer.error["target"] == "hostId"
    for path in ("/compute/hosts/3/agent/restart", "/compute/hosts/3/agent/stop",
                 "/compute/hosts/9223372036854775807/agent/processes/1/restart"):
        answer = demo_daemon.post(path)
        assert answer.status == 404 and answer.code == 2000, answer.text
    assert demo_daemon.get("/compute/hosts/3/agent").code == 2000
    for query in ("page=0", "size=0", "size=abc", "size=100000"):
        answer = demo_daemon.get(f"{BASE}/processes?{query}")
        assert answer.code == 1000, query
        assert demo_daemon.get(f"{TASKS}?{query}").code == 1000, query
    long_key = {"X-OCP-Idempotency-Key": "k" * 200}
    assert demo_daemon.post(f"{BASE}/restart", headers=long_key).code == 1000
    for method, path in (("GET", f"{TASKS}/999"), ("POST", f"{TASKS}/999/retry"),
                         ("POST", f"{TASKS}/999/rollback"),
                         ("POST", f"{TASKS}/999/subtasks/1/skip"),
                         ("POST", f"{TASKS}/999/subtasks/1/cancel"),
                         ("GET", f"{TASKS}/999/subtasks/1/log")):
        answer = demo_daemon.request(method, path)
        assert answer.status == 404 and answer.code == 20000, (path, answer.text)
    assert demo_daemon.get(f"{TASKS}/abc").code == 1000
    # Nothing was created, nothing was touched.
    assert demo_daemon.get(TASKS).check()["page"]["totalElements"] == 0
    assert pids(demo_daemon) == before

    task = wait_task(demo_daemon, demo_daemon.post(f"{BASE}/restart").check()["id"])
    first = task["subtasks"][0]["id"]
    for action in ("retry", "rollback"):
        answer = demo_daemon.post(f"{TASKS}/{task['id']}/{action}")
        assert answer.status == 400 and answer.code == 20003, answer.text
    for action in ("retry", "skip", "cancel"):
        answer = demo_daemon.post(f"{TASKS}/{task['id']}/subtasks/{first}/{action}")
        assert answer.status == 400 and answer.code == 20003, answer.text
    assert demo_daemon.post(f"{TASKS}/{task['id']}/subtasks/999999/retry").code == 20000


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_permissions_on_tcp_tokens(daemon_factory: Any) -> None:
    port = free_port()
    tokens = [
        {"name": "viewer", "sha256": _sha("view-token"),
         "permissions": ["HOST_VIEWER", "TASK_VIEWER"]},
        {"name": "ocp-server", "sha256": _sha("manage-token"),
         "permissions": ["HOST_VIEWER", "HOST_MANAGER", "TASK_VIEWER", "TASK_MANAGER"]},
    ]
    daemon = daemon_factory(overrides={"api": {"tcp": f"127.0.0.1:{port}", "tokens": tokens}},
                            wait_running=True)
    anonymous = ApiClient(host="127.0.0.1", port=port)
    viewer = ApiClient(host="127.0.0.1", port=port, token="view-token")
    manager = ApiClient(host="127.0.0.1", port=port, token="manage-token")
    assert anonymous.get(BASE).code == 1004
    assert anonymous.post(f"{BASE}/restart").code == 1004
    assert viewer.get(BASE).check()["hostId"] == 2
    assert viewer.get(TASKS).check()["contents"] == []
    refused = viewer.post(f"{BASE}/restart")
    assert refused.status == 403 and refused.code == 1005
    assert viewer.post(f"{TASKS}/1/retry").code == 1005
    assert daemon.get(TASKS).check()["page"]["totalElements"] == 0
    task = manager.post(f"{BASE}/restart").check()
    assert task["creator"] == "ocp-server"
    assert wait_task(daemon, task["id"])["status"] == "SUCCESSFUL"
    assert viewer.get(f"{TASKS}/{task['id']}").check()["id"] == task["id"]


def test_openapi_documents_the_task_routes(demo_daemon: DaemonRunner) -> None:
    paths = demo_daemon.get("/api/v1/openapi.json").envelope["paths"]
    for path in ("/compute/hosts/{hostId}/agent/restart", "/api/v2/compute/hosts/{hostId}/agent",
                 "/compute/hosts/{hostId}/agent/processes/{agentProcessId}/restart",
                 "/api/v2/tasks/instances/{id}/rollback",
                 "/api/v2/tasks/instances/{id}/subtasks/{subtaskId}/log"):
        assert path in paths, path


def test_agentctl_agent_restart_wait_and_task_commands(demo_daemon: DaemonRunner) -> None:
    before = pids(demo_daemon)
    run = demo_daemon.ctl("agent", "restart", "--wait")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "Restart pos proxy" in run.stdout and lines[-1].endswith("SUCCESSFUL")
    assert any("Finish OCP agent operation" in line and "SUCCESSFUL" in line for line in lines)
    after = pids(demo_daemon)
    assert all(after[n] != before[n] for n in before)
    task_id = lines[0].split()[1]
    show = demo_daemon.ctl("task", "show", task_id, "--log")
    assert show.returncode == 0 and "new pid" in show.stdout
    as_json = demo_daemon.ctl("task", "show", task_id, "--json")
    assert '"status": "SUCCESSFUL"' in as_json.stdout
    refused = demo_daemon.ctl("task", "retry", task_id)
    assert refused.returncode == 1 and "20003" in refused.stderr
    assert demo_daemon.ctl("task", "rollback", "999").returncode == 1
