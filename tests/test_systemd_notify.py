"""sd_notify without systemd: the test binds the NOTIFY_SOCKET datagram socket itself.

A real daemon subprocess (tests/harness.py) sends READY, STATUS, WATCHDOG, RELOADING
and STOPPING to it; the tests check their order and pacing. The Notifier and the
journald handler are also checked on their own, outside any daemon.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import socket
import statistics
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from harness import ApiClient, demo_command, short_socket_dir, wait_for

from ocp_agentd.demo.config import to_toml
from ocp_agentd.systemd import JournalHandler, Notifier, journal_handler

WATCHDOG_USEC = 2_000_000  # the daemon must ping every 1 s


@dataclass
class Datagram:
    at: float  # time.monotonic() when received
    text: str

    @property
    def fields(self) -> dict[str, str]:
        return dict(line.split("=", 1) for line in self.text.splitlines() if "=" in line)


class NotifySocket:
    """A bound AF_UNIX datagram socket that records every notification with its time.

    `on_ready` runs in the receiving thread the moment a READY=1 arrives, so a test
    can look at the daemon exactly then.
    """

    def __init__(self, path: Path, on_ready: Callable[[], object] | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: list[Datagram] = []
        self.on_ready = on_ready
        self.ready_observations: list[object] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            datagram = Datagram(time.monotonic(), data.decode(errors="replace"))
            if self.on_ready is not None and "READY" in datagram.fields:
                try:
                    self.ready_observations.append(self.on_ready())
                except Exception as exc:  # recorded, judged by the test
                    self.ready_observations.append(exc)
            with self._lock:
                self.received.append(datagram)

    def messages(self, key: str | None = None, since: int = 0) -> list[Datagram]:
        with self._lock:
            found = self.received[since:]
        return [d for d in found if key is None or key in d.fields]

    def wait(self, key: str, since: int = 0, timeout: float = 20.0, value: str | None = None
             ) -> Datagram:
        """The first datagram after index `since` that carries `key` (=value)."""

        def arrived() -> Datagram | None:
            for datagram in self.messages(key, since):
                if value is None or datagram.fields[key] == value:
                    return datagram
            return None

        return wait_for(arrived, timeout, f"{key}={value or '*'} on NOTIFY_SOCKET")

    def mark(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    directory = short_socket_dir()  # sun_path is short; tmp_path can be too deep
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


def _answers(client: ApiClient) -> bool:
    return client.get("/api/v1/status", timeout=5.0).status == 200


def _process_states(client: ApiClient) -> dict[str, str]:
    records = client.get("/api/v1/processes", timeout=5.0).check()
    return {record["name"]: record["state"] for record in records}


def test_daemon_notifies_ready_status_watchdog_reload_and_stopping(daemon_factory, notify_dir):
    runner = daemon_factory(
        start=False,
        env={"NOTIFY_SOCKET": str(notify_dir / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    client = ApiClient(socket_path=runner.socket, timeout=10.0)

    def at_ready() -> tuple[bool, dict[str, str]]:
        return _answers(client), _process_states(client)

    notify = NotifySocket(notify_dir / "notify", on_ready=at_ready)
    try:
        runner.start(wait=False)
        ready = notify.wait("READY", timeout=30.0)

        # READY=1 only once the API answers and the initial programs were started.
        assert notify.ready_observations, "READY=1 arrived but nothing was observed"
        observed = notify.ready_observations[0]
        assert not isinstance(observed, Exception), f"API not answering at READY=1: {observed!r}"
        answered, states = observed
        assert answered
        assert states and all(s == "RUNNING" for s in states.values()), states

        # STATUS= says how many programs run.
        status = ready.fields.get("STATUS") or notify.wait("STATUS").fields["STATUS"]
        assert re.search(rf"\b{len(states)}\b.*running", status), status

        # WATCHDOG=1 every half WATCHDOG_USEC (1 s): 6 pings, spaced about 1 s apart.
        first = notify.mark()
        wait_for(lambda: len(notify.messages("WATCHDOG", first)) >= 6, 20.0, "6 WATCHDOG=1")
        pings = [d.at for d in notify.messages("WATCHDOG", first)][:6]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        interval = WATCHDOG_USEC / 2 / 1e6
        assert 0.75 * interval <= statistics.median(gaps) <= 1.35 * interval, gaps
        assert max(gaps) < 2 * WATCHDOG_USEC / 1e6, f"a ping came too late for systemd: {gaps}"

        # SIGHUP with one program added: RELOADING=1, then READY=1 with the new count.
        document = tomllib.loads(runner.config.read_text())
        document["programs"]["extra_tailer"] = {
            "command": demo_command("logtailer", "--interval", 5),
            "env": document["programs"]["ob_logtailer"]["env"],
            "start_seconds": 0.3,
        }
        runner.config.write_text(to_toml(document))
        before = notify.mark()
        runner.send_signal(signal.SIGHUP)
        reloading = notify.wait("RELOADING", before, timeout=20.0)
        assert "MONOTONIC_USEC" in reloading.fields
        after = notify.wait("READY", before, timeout=30.0)
        assert after.at >= reloading.at
        assert notify.messages("READY", before)[0] is after
        assert "extra_tailer" in _process_states(client)
        wait_for(
            lambda: re.search(rf"\b{len(states) + 1}\b.*running", notify.messages("STATUS")[-1]
                              .fields["STATUS"]),
            20.0, "STATUS= with the added program running",
        )

        # An invalid config is refused: RELOADING=1 then READY=1 again, same programs.
        runner.config.write_text(runner.config.read_text() + "\n[agent]\nhost_id = -5\n")
        before = notify.mark()
        runner.send_signal(signal.SIGHUP)
        notify.wait("RELOADING", before)
        notify.wait("READY", before)
        assert set(_process_states(client)) == {*states, "extra_tailer"}

        # SIGTERM: STOPPING=1, then a clean exit.
        before = notify.mark()
        runner.send_signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING", before, timeout=30.0)
        assert runner.wait_exit(60) == 0
        assert all("READY" not in d.fields for d in notify.messages(since=before)
                   if d.at > stopping.at)
    finally:
        notify.close()


def test_stalled_daemon_stops_pinging_and_resumes(daemon_factory, notify_dir):
    runner = daemon_factory(
        start=False,
        env={"NOTIFY_SOCKET": str(notify_dir / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    notify = NotifySocket(notify_dir / "notify")
    try:
        runner.start(wait=False)
        notify.wait("READY", timeout=30.0)
        first = notify.mark()
        notify.wait("WATCHDOG", first, timeout=5.0)
        daemon = psutil.Process(runner.pid)
        interval = WATCHDOG_USEC / 2 / 1e6
        runner.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: daemon.status() == psutil.STATUS_STOPPED, 5.0, "daemon stopped")
            # A ping already in the socket may still be read just after the stop.
            stopped_at = time.monotonic() + 0.3
            # Nothing may come while the daemon is stopped: 3 intervals without a ping.
            with pytest.raises(AssertionError):
                wait_for(
                    lambda: [d for d in notify.messages("WATCHDOG") if d.at > stopped_at],
                    3 * interval, "a WATCHDOG=1 from a stopped daemon",
                )
        finally:
            runner.send_signal(signal.SIGCONT)
        resumed = wait_for(
            lambda: [d for d in notify.messages("WATCHDOG") if d.at > stopped_at],
            10.0, "WATCHDOG=1 after SIGCONT",
        )[0]
        assert resumed.at - stopped_at >= 3 * interval - 0.3
    finally:
        notify.close()


def test_daemon_without_notify_socket_runs_silently(daemon_factory, notify_dir):
    # The socket exists but the daemon is not told about it: nothing may arrive.
    notify = NotifySocket(notify_dir / "notify")
    try:
        runner = daemon_factory(env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
        assert runner.status()
        runner.send_signal(signal.SIGHUP)
        assert runner.stop() == 0
        assert notify.messages() == []
    finally:
        notify.close()


# ---- the Notifier and the journal handler on their own ----------------------------------------


def test_notifier_is_a_noop_without_notify_socket():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.status("x") is False
    assert notifier.ping() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False
    assert notifier.watchdog_interval() is None


def test_notifier_sends_to_path_and_abstract_sockets(notify_dir):
    notify = NotifySocket(notify_dir / "n")
    abstract_name = f"ocp-agentd-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0" + abstract_name)
    abstract.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(notify_dir / "n")})
        assert notifier.ready("2 of 2 programs running")
        assert notifier.status("1 of 2 programs running")
        assert notifier.stopping()
        got = [notify.wait(key).fields for key in ("READY", "STATUS", "STOPPING")]
        assert got[0] == {"READY": "1", "STATUS": "2 of 2 programs running"}
        assert notify.messages("STATUS")[1].fields["STATUS"] == "1 of 2 programs running"

        assert Notifier({"NOTIFY_SOCKET": "@" + abstract_name}).ping()
        assert abstract.recv(100) == b"WATCHDOG=1"

        # A socket that went away is not an error for the daemon.
        assert Notifier({"NOTIFY_SOCKET": str(notify_dir / "gone")}).ping() is False
    finally:
        abstract.close()
        notify.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert Notifier(env).watchdog_interval() == expected


def test_journal_handler_only_under_systemd():
    assert journal_handler({}) is None
    assert journal_handler({"TERM": "xterm"}) is None
    if not os.path.exists("/run/systemd/journal/socket"):
        assert journal_handler({"INVOCATION_ID": "abc"}) is None


def test_journal_handler_sends_structured_fields():
    sent: list[tuple[str, dict[str, str]]] = []
    handler = JournalHandler(sender=lambda message, **fields: sent.append((message, fields)))
    logger = logging.getLogger("ocp_agentd.test_journal")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("pos_proxy exited %s", 3,
                       extra={"PROGRAM": "pos_proxy", "TRACE_ID": "t-1", "TASK_ID": 42})
        logger.info("plain")
    finally:
        logger.removeHandler(handler)
    (message, fields), (plain, plain_fields) = sent
    assert message == "pos_proxy exited 3"
    assert fields["PROGRAM"] == "pos_proxy"
    assert fields["TRACE_ID"] == "t-1"
    assert fields["TASK_ID"] == "42"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "ocp-agentd"
    assert all(re.fullmatch(r"[A-Z0-9_]+", key) for key in fields), fields
    # What systemd.journal.send accepts: CODE_LINE an int, the rest strings.
    assert isinstance(fields.pop("CODE_LINE"), int)
    assert all(isinstance(value, str) for value in fields.values()), fields
    assert plain == "plain" and "PROGRAM" not in plain_fields and plain_fields["PRIORITY"] == "6"
