"""How ocp-agentctl prints: tables for people, JSON for scripts, colours only on a terminal.

Colours follow https://no-color.org: none when ``NO_COLOR`` is set to anything non-empty,
none when standard output is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False  # typing itself is a tenth of the command's start-up
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from datetime import datetime
    from typing import Any, TextIO

PROG = "ocp-agentctl"

_COLOURS = {"green": "32", "yellow": "33", "red": "31", "bold": "1"}
STATE_COLOURS = {
    "RUNNING": "green", "SUCCESSFUL": "green",
    "STARTING": "yellow", "STOPPING": "yellow", "BACKOFF": "yellow", "READY": "yellow",
    "CANCELING": "yellow",
    "FATAL": "red", "EXITED": "red", "FAILED": "red",
}


def use_colour(stream: TextIO) -> bool:
    """True when ``stream`` is a terminal and NO_COLOR is unset or empty."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Output:
    """Prints an answer: ``data(value, human)`` prints ``value`` as JSON with --json, else
    calls ``human()``; ``table`` aligns columns; ``error`` goes to stderr."""

    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self.json = as_json
        self.stream = stream or sys.stdout
        self.colour = use_colour(self.stream)

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def error(self, text: str) -> None:
        sys.stderr.write(f"{PROG}: {text}\n")

    def dump(self, value: Any, indent: int | None = 2) -> None:
        self.line(json.dumps(value, indent=indent, ensure_ascii=False))

    def data(self, value: Any, human: Callable[[], None]) -> None:
        if self.json:
            self.dump(value)
        else:
            human()

    def paint(self, text: str, colour: str | None) -> str:
        if not self.colour or colour is None:
            return text
        return f"\033[{_COLOURS[colour]}m{text}\033[0m"

    def state(self, text: str) -> str:
        return self.paint(text, STATE_COLOURS.get(text))

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]],
              coloured: Sequence[int] = ()) -> None:
        """Columns padded to their widest cell; the columns in ``coloured`` hold states and
        are painted (after padding, so escape codes do not shift the columns)."""
        cells = [[str(c) for c in headers]] + [[cell(c) for c in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
        for number, row in enumerate(cells):
            parts = []
            for index, (text, width) in enumerate(zip(row, widths, strict=True)):
                padded = text.ljust(width)
                if number and index in coloured:
                    padded = self.state(text) + " " * (width - len(text))
                parts.append(padded)
            self.line("  ".join(parts).rstrip())


def cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def duration(seconds: float | None) -> str:
    """12s, 5m07s, 3h04m, 2d05h; ``-`` for None."""
    if seconds is None:
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def clock(timestamp: str | None, millis: bool = False, now: datetime | None = None) -> str:
    """An ISO 8601 time as the local wall clock: ``04:19:28`` (``04:19:28.123`` with
    ``millis``) today, ``11-28 04:19:28`` another day; the text unchanged when it does not
    parse."""
    if not timestamp:
        return ""
    # Imported here: only a table with times needs it (a fresh status has none).
    from datetime import datetime

    try:
        when = datetime.fromisoformat(timestamp).astimezone()
    except ValueError:
        return timestamp
    today = (now or datetime.now().astimezone()).date()
    text = when.strftime("%H:%M:%S" if when.date() == today else "%m-%d %H:%M:%S")
    return f"{text}.{when.microsecond // 1000:03d}" if millis else text


def last_exit(value: dict[str, Any] | None) -> str:
    """A program's last exit, said once: ``exit 1 at 04:19:28``, ``killed by SIGKILL at
    04:19:28``, ``cannot spawn /x: No such file or directory at 04:19:28``.

    The record's ``reason`` replaces the short form when it says more than the exit status
    or signal does: ``killed by the OOM killer (memory_max 60 MiB) at 06:37:27`` rather than
    ``killed by SIGKILL``, ``liveness failed: tcp_connect 8080 refused at ...``. A reason
    that only wraps the plain one (``stopped on request (exit code 0)``) keeps the short
    form."""
    if not value:
        return "-"
    reason = str(value.get("reason") or "")
    if value.get("signal"):
        what = f"killed by {value['signal']}"
        plain = what
    elif value.get("code") is not None:
        what = f"exit {value['code']}"
        plain = f"exit code {value['code']}"
    else:
        what = plain = reason or "exited"
    if plain not in reason:
        what = reason or what
    when = clock(value.get("at"))
    return f"{what} at {when}" if when else what
