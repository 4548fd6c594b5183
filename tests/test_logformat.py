"""The daemon's log lines (RFC 3339 time with its zone) and where they go: the file
<log_dir>/ocp_agentd.log only when not under systemd, unless configured.

Real daemons (tests/harness.py); "under systemd" is the environment systemd gives a
service (JOURNAL_STREAM), which is all the daemon looks at. On this machine journald's
socket is absent, so the daemon logs to stderr there (JournalHandler is tested in
test_systemd_notify.py).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from ocp_agentd.logformat import LOG_FORMAT, line_formatter, writes_log_file

# 2026-11-30T05:12:00.123+00:00 INFO ocp_agentd: ...
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR"
                  r"|CRITICAL) [\w.]+: ")
UNDER_SYSTEMD = {"JOURNAL_STREAM": "8:12345", "INVOCATION_ID": "0" * 32}


def daemon_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("--- harness")]


def test_time_is_rfc3339_with_the_hosts_offset():
    """In a process whose zone is Asia/Shanghai (UTC+8, no summer time) the offset is
    +08:00 and the wall time is that zone's."""
    script = (
        "import logging\n"
        "from ocp_agentd.logformat import line_formatter\n"
        "record = logging.LogRecord('x', logging.INFO, 'x.py', 1, 'hello', None, None)\n"
        "record.created = 1796015520.1234\n"  # 2026-11-30T05:12:00.123Z
        "print(line_formatter().format(record))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "TZ": "Asia/Shanghai"}).stdout
    assert out == "2026-11-30T13:12:00.123+08:00 INFO x: hello\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={**os.environ, "TZ": "UTC"}).stdout
    assert out == "2026-11-30T05:12:00.123+00:00 INFO x: hello\n"


def test_file_choice():
    assert writes_log_file("auto", {}) is True
    assert writes_log_file("auto", {"JOURNAL_STREAM": "8:1"}) is False
    assert writes_log_file("auto", {"INVOCATION_ID": "ab"}) is False
    assert writes_log_file("always", {"JOURNAL_STREAM": "8:1"}) is True
    assert writes_log_file("never", {}) is False


def test_daemon_writes_its_file_when_not_under_systemd(daemon_factory):
    runner = daemon_factory()
    path = runner.settings.agent.log_dir / "ocp_agentd.log"
    assert path.exists()
    for text in (path.read_text(), runner.log()):
        lines = daemon_lines(text)
        assert lines, text
        bad = [line for line in lines if not LINE.match(line) and not line.startswith(" ")]
        assert not bad, bad[:5]


def test_daemon_under_systemd_writes_no_file_unless_configured(daemon_factory):
    quiet = daemon_factory(env=UNDER_SYSTEMD)
    assert not (quiet.settings.agent.log_dir / "ocp_agentd.log").exists()
    assert any(LINE.match(line) for line in daemon_lines(quiet.log()))
    asked = daemon_factory(env=UNDER_SYSTEMD, overrides={"agent": {"daemon_log_file": "always"}})
    path = asked.settings.agent.log_dir / "ocp_agentd.log"
    assert path.exists() and LINE.match(daemon_lines(path.read_text())[0])


def test_formatter_keeps_the_message_and_exception():
    record = logging.LogRecord("ocp_agentd.x", logging.ERROR, __file__, 1, "boom %s", ("a",),
                               None)
    assert line_formatter().format(record).endswith(" ERROR ocp_agentd.x: boom a")


def test_a_record_is_formatted_once_for_every_handler_of_the_format():
    """The file and stderr handlers (and the file's rollover check) share one line."""
    made: list[str] = []

    class Counting(type(line_formatter())):  # type: ignore[misc]
        def formatTime(self, record, datefmt=None):
            made.append(record.getMessage())
            return super().formatTime(record, datefmt)

    record = logging.LogRecord("ocp_agentd.x", logging.INFO, __file__, 1, "state %s", ("x",),
                               None)
    first, second = Counting(LOG_FORMAT), Counting(LOG_FORMAT)
    assert first.format(record) == second.format(record) == first.format(record)
    assert made == ["state x"]
    other = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert other == "INFO state x"  # another format is made on its own
