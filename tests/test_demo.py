"""The demo programs, the misbehaving test programs and the demo config do what they claim."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import check_config, free_port, kill_marked, wait_for

from ocp_agentd.config import (
    AgentSection,
    ApiSection,
    LivenessSpec,
    ProgramSpec,
    load_settings,
)
from ocp_agentd.demo.config import PACKAGE_ROOT, demo_command, to_toml, write_demo_config

REPO = Path(__file__).resolve().parent.parent
MARK = "AGENTD_TEST_DEMO"


class Spawned:
    def __init__(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        self.proc, self.out = proc, out

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def announced(self, role: str) -> list[int]:
        """Pids of the processes that printed `misbehave <mode> <role> pid=...`."""
        return [
            int(line.split("pid=")[1].split()[0])
            for line in self.output().splitlines()
            if line.startswith("misbehave ") and line.split()[2] == role
        ]


@pytest.fixture
def spawn(tmp_path) -> Iterator[Callable[..., Spawned]]:
    """Starts `python -m ocp_agentd.demo.<module> ARGS` in its own session; kills its
    whole tree afterwards (found by an environment marker, even after setsid)."""
    marker = uuid.uuid4().hex
    count = [0]

    def start(module: str, *args: object) -> Spawned:
        count[0] += 1
        out = tmp_path / f"{module}-{count[0]}.out"
        with out.open("wb") as handle:
            proc = subprocess.Popen(
                demo_command(module, *args),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, MARK: marker, "PYTHONPATH": str(PACKAGE_ROOT)},
                start_new_session=True,
            )
        return Spawned(proc, out)

    yield start
    kill_marked(MARK, marker)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def listening_ports(pid: int) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


# --- the demo programs ---------------------------------------------------------------


def test_demo_modules_need_only_the_standard_library():
    modules = ["_serve", "pos_proxy", "exporter", "logtailer", "misbehave", "config"]
    code = "; ".join(f"import ocp_agentd.demo.{m}" for m in modules)
    # -S: no site-packages, so any third-party import fails
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(PACKAGE_ROOT), "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_pos_proxy_answers_health_and_exits_0_on_sigterm(spawn):
    port = free_port()
    proxy = spawn("pos_proxy", "--port", port)
    status, body = wait_for(lambda: http_get(port, "/health"), 10, "pos_proxy /health")
    assert status == 200
    health = json.loads(body)
    assert (health["status"], health["pid"]) == ("ok", proxy.proc.pid)
    assert http_get(port, "/nowhere")[0] == 404
    wait_for(lambda: "GET /health 200" in proxy.output(), 5, "the request logged to stdout")
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert "stopped on signal" in proxy.output()


def test_pos_proxy_on_a_busy_port_exits_nonzero_at_once(spawn):
    port = free_port()
    first = spawn("pos_proxy", "--port", port)
    wait_for(lambda: http_get(port, "/health")[0] == 200, 10, "first pos_proxy up")
    second = spawn("pos_proxy", "--port", port)
    assert second.proc.wait(10) == 1
    assert "cannot listen" in second.output()
    assert first.proc.poll() is None


def test_exporter_serves_metrics_and_health(spawn):
    port = free_port()
    exporter = spawn("exporter", "--port", port)
    status, body = wait_for(lambda: http_get(port, "/metrics"), 10, "exporter /metrics")
    assert status == 200
    lines = body.decode().splitlines()
    assert "ocp_exporter_up 1" in lines
    assert "ocp_exporter_scrapes_total 1" in lines
    assert any(line.startswith("ob_host_load1 ") for line in lines)
    assert http_get(port, "/metrics")[1].decode().count("ocp_exporter_scrapes_total 2") == 1
    status, body = http_get(port, "/health")
    assert (status, json.loads(body)["pid"]) == (200, exporter.proc.pid)
    exporter.proc.send_signal(signal.SIGTERM)
    assert exporter.proc.wait(10) == 0


def test_exporter_wedges_on_sigusr1_and_still_stops_on_sigterm(spawn):
    port = free_port()
    exporter = spawn("exporter", "--port", port)
    assert wait_for(lambda: http_get(port, "/health"), 10, "exporter /health")[0] == 200
    exporter.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "wedged" in exporter.output(), 10, "the wedge logged")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    with pytest.raises(TimeoutError):
        conn.request("GET", "/health")  # accepted, never answered
        conn.getresponse()
    conn.close()
    assert port in listening_ports(exporter.proc.pid)
    exporter.proc.send_signal(signal.SIGUSR1)
    assert http_get(port, "/health")[0] == 200
    exporter.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: exporter.output().count("wedged: requests") == 2, 10, "wedged again")
    exporter.proc.send_signal(signal.SIGTERM)
    assert exporter.proc.wait(10) == 0


def test_logtailer_prints_lines_has_no_port_and_exits_0_on_sigterm(spawn):
    tailer = spawn("logtailer", "--interval", "0.05")
    wait_for(lambda: tailer.output().count("tailed observer.log") >= 3, 10, "three lines")
    assert listening_ports(tailer.proc.pid) == set()
    tailer.proc.send_signal(signal.SIGTERM)
    assert tailer.proc.wait(10) == 0


# --- the misbehaving programs ----------------------------------------------------------


def sig_ignored(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    raise AssertionError("no SigIgn line")


def test_ignore_term_survives_sigterm(spawn):
    prog = spawn("misbehave", "ignore-term", "--tree", "2")
    wait_for(
        lambda: len(prog.announced("child")) == 2 and prog.announced("parent"),
        10,
        "parent and two children announced",
    )
    for pid in [prog.proc.pid, *prog.announced("child")]:
        assert sig_ignored(pid, signal.SIGTERM), pid
    prog.proc.send_signal(signal.SIGTERM)
    # an ignored signal is dropped when sent; a fatal one would already decide the exit
    prog.proc.kill()
    assert prog.proc.wait(10) == -signal.SIGKILL


def test_exit_now_exits_with_the_code(spawn):
    assert spawn("misbehave", "exit-now", "3").proc.wait(10) == 3
    assert spawn("misbehave", "exit-now").proc.wait(10) == 1


def test_tree_forks_n_children_in_its_group(spawn):
    prog = spawn("misbehave", "tree", "3")
    parent = psutil.Process(prog.proc.pid)
    children = wait_for(
        lambda: len(parent.children()) == 3 and parent.children(), 10, "three children"
    )
    assert {os.getpgid(c.pid) for c in children} == {os.getpgid(parent.pid)}
    wait_for(lambda: len(prog.announced("child")) == 3, 10, "children announced")
    assert sorted(prog.announced("child")) == sorted(c.pid for c in children)


def test_setsid_grandchild_leaves_the_session_but_stays_in_the_tree(spawn):
    prog = spawn("misbehave", "setsid-grandchild")
    wait_for(
        lambda: prog.announced("grandchild") and prog.announced("child"),
        10,
        "child and grandchild announced",
    )
    (child,) = prog.announced("child")
    (grandchild,) = prog.announced("grandchild")
    parent = psutil.Process(prog.proc.pid)
    assert [p.pid for p in parent.children(recursive=True)] == [child, grandchild]
    assert os.getsid(grandchild) == grandchild != os.getsid(parent.pid)
    assert os.getpgid(grandchild) != os.getpgid(parent.pid)
    assert os.getpgid(child) == os.getpgid(parent.pid)


def test_never_ready_runs_without_listening(spawn):
    prog = spawn("misbehave", "never-ready", "1")
    wait_for(lambda: prog.announced("parent"), 10, "announced")
    assert prog.proc.poll() is None
    assert listening_ports(prog.proc.pid) == set()


def test_listen_after_delay(spawn):
    port = free_port()
    prog = spawn("misbehave", "listen", port, "--delay", "1.5")
    wait_for(lambda: prog.announced("parent"), 10, "announced")
    assert port not in listening_ports(prog.proc.pid)
    status, body = wait_for(lambda: http_get(port, "/health"), 10, "listening after delay")
    assert status == 200 and json.loads(body)["pid"] == prog.proc.pid
    assert "waiting 1.5s before listening" in prog.output()
    prog.proc.send_signal(signal.SIGTERM)
    assert prog.proc.wait(10) == 0


def test_spam_writes_the_bytes_then_idles(spawn):
    prog = spawn("misbehave", "spam", "--bytes", "300000", "--line", "100")
    wait_for(lambda: prog.out.stat().st_size >= 300000, 20, "300 kB written")
    assert prog.proc.poll() is None
    assert prog.output().count("x" * 99 + "\n") == 3000


# --- the demo configuration ------------------------------------------------------------


def test_demo_config_loads_with_every_path_under_its_folder(tmp_path):
    path = write_demo_config(tmp_path / "demo", 40000, 7)
    settings = load_settings(path)
    root = (tmp_path / "demo").resolve()
    assert settings.agent.host_id == 7
    for p in (settings.agent.state_dir, settings.agent.log_dir, settings.api.socket):
        assert p.is_absolute() and root in p.parents
    assert list(settings.programs) == ["pos_proxy", "ocp_exporter", "ob_logtailer"]
    proxy, exporter, tailer = settings.programs.values()
    assert (proxy.role, proxy.operable, proxy.ports) == ("pos_proxy", False, [40000])
    assert (exporter.is_worker, exporter.ports) == (True, [40001])
    assert (tailer.is_worker, tailer.ports) == (True, [])
    for spec in settings.programs.values():
        assert spec.command[0] == sys.executable
        assert spec.start_seconds == 0.3 and spec.stop_timeout == 5
        assert root in spec.stdout_log.parents and root in spec.stderr_log.parents


def test_demo_config_extra_programs_and_overrides(tmp_path):
    path = write_demo_config(
        tmp_path,
        41000,
        3,
        extra_programs={
            "stubborn": {"command": demo_command("misbehave", "ignore-term"), "stop_timeout": 1.0}
        },
        overrides={
            "programs": {"ob_logtailer": None, "pos_proxy": {"stop_timeout": 2.5}},
            "api": {"tcp": "127.0.0.1:41005", "tokens": [{"name": "t", "sha256": "0" * 64}]},
        },
    )
    settings = load_settings(path)
    assert list(settings.programs) == ["pos_proxy", "ocp_exporter", "stubborn"]
    assert settings.programs["stubborn"].stop_timeout == 1.0
    assert settings.programs["stubborn"].start_seconds == 0.3
    assert settings.programs["stubborn"].env["PYTHONPATH"] == str(PACKAGE_ROOT)
    assert settings.programs["pos_proxy"].stop_timeout == 2.5
    assert settings.api.tcp == "127.0.0.1:41005"


def test_toml_writer_round_trips_awkward_values():
    document = {
        "agent": {"host_id": 9, "install_home": '/tmp/a "quoted" \\ päth\n'},
        "api": {
            "tokens": [{"name": "t", "sha256": "ab" * 32, "permissions": ["HOST_VIEWER"]}],
            "max_body_bytes": 2048,
        },
        "programs": {
            "p-1": {
                "command": ["/bin/x", "tab\there"],
                "env": {"A B": "1", "C": ""},
                "start_seconds": 1e-3,
                "operable": True,
            }
        },
    }
    assert tomllib.loads(to_toml(document)) == document


def test_demo_config_command_line_writes_and_prints(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ocp_agentd.demo.config",
            str(tmp_path / "d"),
            "--base-port",
            "45000",
            "--host-id",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    path = (tmp_path / "d" / "demo.toml").resolve()
    assert f"wrote {path}" in result.stdout
    assert "ocp-agentctl --socket" in result.stdout
    settings = load_settings(path)
    assert (settings.agent.host_id, settings.programs["pos_proxy"].ports) == (4, [45000])


# --- ocp-agentd --check on the demo and example configs ----------------------------------


def test_check_accepts_the_generated_demo_config(tmp_path):
    result = check_config(write_demo_config(tmp_path, free_port(), 2))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_accepts_the_example_config():
    """The example is a valid file; on a host without the OCP agent installed, --check
    also names (exit 1) the program keys this host cannot satisfy, and nothing else."""
    result = check_config(REPO / "examples" / "demo.toml")
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "pos_proxy" in result.stdout
    if result.returncode == 1:
        problems = result.stderr.splitlines()[1:]
        assert problems and all(line.strip().startswith("programs.") for line in problems)
        # The summary says so, and marks exactly the programs named on stderr.
        assert "this host cannot run all of it" in result.stdout.splitlines()[0]
        named = {line.strip().split(".")[1] for line in problems}
        marked = {line.split()[0] for line in result.stdout.splitlines()
                  if line.endswith("[cannot run here]")}
        assert marked == named, (marked, named)


def test_check_marks_the_programs_this_host_cannot_run(tmp_path):
    """A valid file with one program whose user is missing here: exit 1, that program
    alone marked in the summary, its key named on stderr."""
    path = write_demo_config(tmp_path, free_port(), 2, extra_programs={
        "stranger": {"command": ["/bin/sleep", "1000"], "user": "no-such-user-7f3a"}})
    result = check_config(path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].endswith("is valid; this host cannot run all of it (the problems "
                             "follow, on stderr)"), lines[0]
    marked = [line.split()[0] for line in lines if line.endswith("[cannot run here]")]
    assert marked == ["stranger"], result.stdout
    assert "programs.stranger.user: no user 'no-such-user-7f3a'" in result.stderr
    assert check_config(write_demo_config(tmp_path / "ok", free_port(), 2)).stdout.splitlines()[
        0].endswith("is valid")


def test_example_config_keys_and_defaults():
    """Every key of SPEC section 2 is in the example, and "" log paths mean the defaults."""
    path = REPO / "examples" / "demo.toml"
    document = tomllib.loads(path.read_text())
    proxy = document["programs"]["pos_proxy"]
    spec_keys = set(ProgramSpec.model_fields) - {"name", "liveness"}
    assert spec_keys <= set(proxy), spec_keys - set(proxy)
    # SPEC section 10: one probe kind is set, the other two are shown as comments.
    liveness = document["programs"]["ocp_exporter"]["liveness"]
    assert set(LivenessSpec.model_fields) - {"tcp_connect", "exec"} == set(liveness)
    assert "# tcp_connect = " in path.read_text() and "# exec = [" in path.read_text()
    assert set(AgentSection.model_fields) <= set(document["agent"])
    assert set(ApiSection.model_fields) <= set(document["api"])
    settings = load_settings(path)
    logs = Path("/var/log/ocp_agentd")
    pos_proxy = settings.programs["pos_proxy"]
    # SPEC section 2: stdout_log = "" means <log_dir>/<name>.stdout.log (not the config's folder)
    assert pos_proxy.stdout_log == logs / "pos_proxy.stdout.log"
    assert pos_proxy.stderr_log == logs / "pos_proxy.stderr.log"
    assert all(
        spec.command[0].startswith("/home/admin/ocp_agent/bin/")
        for spec in settings.programs.values()
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        (
            {"programs": {"ocp_exporter": {"stop_signal": "NOPE"}}},
            "programs.ocp_exporter.stop_signal",
        ),
        (
            {"programs": {"ob_logtailer": {"command": ["relative/bin"]}}},
            "programs.ob_logtailer.command",
        ),
        ({"agent": {"hots_id": 3}}, "agent.hots_id"),
        ({"programs": {"ocp_exporter": {"role": "pos_proxy"}}}, "programs"),
    ],
)
def test_check_rejects_a_bad_config_naming_the_key(tmp_path, override, key):
    result = check_config(write_demo_config(tmp_path, free_port(), 2, overrides=override))
    assert result.returncode != 0
    assert key in result.stderr, result.stderr


def test_check_refuses_before_touching_a_process(tmp_path):
    """A bad file never runs a program: the marker the program would write stays absent."""
    flag = tmp_path / "ran"
    path = write_demo_config(
        tmp_path,
        free_port(),
        2,
        extra_programs={"touch": {"command": ["/usr/bin/touch", str(flag)]}},
        overrides={"agent": {"bogus_key": 1}},
    )
    result = subprocess.run(
        [sys.executable, "-m", "ocp_agentd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert "agent.bogus_key" in result.stderr
    assert not flag.exists()
