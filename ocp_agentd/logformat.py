"""The daemon's own log lines on stderr and in <log_dir>/ocp_agentd.log, and whether
that file is written at all.

A line is ``<time> <LEVEL> <logger>: <message>``; the time is RFC 3339 with milliseconds
and the host's UTC offset, e.g. ``2026-11-30T05:12:00.123+00:00`` (RFC 3339 section 5.6,
the form journalctl -o short-iso-precise and most log shippers read without a pattern).

Under systemd every line already reaches journald (JournalHandler, or stderr captured
by the unit), so the file would only repeat the journal: it is written when the daemon
does not run under systemd (``agent.daemon_log_file = "auto"``, the default), or
always, or never, as that key says.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime

from ocp_agentd.systemd import under_systemd

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Rfc3339Formatter(logging.Formatter):
    """logging.Formatter whose %(asctime)s is RFC 3339 local time with its UTC offset,
    to the millisecond (``datefmt`` is ignored)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created).astimezone()
        return moment.isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        """The line, made once per record and format: the file and stderr handlers each
        format every record, and RotatingFileHandler formats it a second time to size it
        (shouldRollover), so a state change was formatted three times."""
        made = record.__dict__.get("_line")
        if made is not None and made[0] == (type(self), self._fmt):
            return made[1]
        line = super().format(record)
        record._line = ((type(self), self._fmt), line)
        return line


def line_formatter() -> logging.Formatter:
    """The formatter of the daemon's stderr and file lines."""
    return Rfc3339Formatter(LOG_FORMAT)


def writes_log_file(configured: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the daemon writes <log_dir>/ocp_agentd.log: `configured` is
    agent.daemon_log_file, "always", "never" or "auto" (only when not under systemd:
    no JOURNAL_STREAM / INVOCATION_ID, see systemd.under_systemd)."""
    if configured != "auto":
        return configured == "always"
    return not under_systemd(env)
