"""The status records (SPEC section 6) as JSON bytes, encoded once per change.

A program's record moves in three fields only between its changes: ``uptime`` (every
millisecond), ``cpu_seconds`` and ``memory_bytes`` (at most once per usage reading, see
Program.usage). So each program's record is encoded when it changes or its usage is read
again (:class:`RecordJson`: the bytes before and after the uptime), and the whole array is
a list of pieces between the uptimes that each answer fills in (:class:`RecordsJson`):
the uptimes are encoded together in one ``orjson.dumps`` of a list, which writes 1,000
floats in about a tenth of the time ``repr`` takes.

The bytes are the ones ``orjson.dumps`` gives for the record's dict (Program.record): the
same keys in the same order, the same values written the same way.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from ocp_agentd.config import ProgramSpec
from ocp_agentd.supervision.cgroups import Usage

if TYPE_CHECKING:
    from ocp_agentd.supervision.program import Program

UPTIME = "uptime"


@dataclass(frozen=True, slots=True, eq=False)
class RecordBase:
    """A program's record without its moving values, kept between its changes.

    ``fields``: ProcessInfo.as_dict() as it was when the record last changed (shared: read
    it, never change it); ``started``: time.monotonic() when the running main started, None
    when none ran then; ``spec``: the spec it was made from.
    """

    spec: ProgramSpec
    started: float | None
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True, eq=False)
class RecordJson:
    """A program's record as JSON: ``head`` ends with ``"uptime":``, ``tail`` follows the
    uptime's value to the closing brace. ``started`` (time.monotonic()) gives the uptime;
    None: no process ran when the record was made, and the uptime is null. ``read_at``: when
    the usage in ``tail`` was read; ``until``: when it is stale (time.monotonic(), inf when
    it cannot change before the record does). Compared by identity: a new object is a
    change."""

    base: RecordBase
    head: bytes
    tail: bytes
    read_at: float
    until: float

    @property
    def started(self) -> float | None:
        """The main's start (time.monotonic()); None: the uptime is null."""
        return self.base.started


def _members(fields: dict[str, Any]) -> bytes:
    """The members of the JSON object of ``fields``, without its braces."""
    return orjson.dumps(fields)[1:-1]


def encode_record(base: RecordBase, usage: Usage, read_at: float, until: float) -> RecordJson:
    """The record of ``base`` with ``usage`` in it, split around the uptime's value.

    Raises TypeError when a value is not JSON (a bug: ProcessInfo.as_dict() gives JSON
    values only)."""
    cpu = None if usage.cpu_seconds is None else round(usage.cpu_seconds, 3)
    record = base.fields | {"cpu_seconds": cpu, "memory_bytes": usage.memory_bytes}
    keys = list(record)
    at = keys.index(UPTIME)
    before = {key: record[key] for key in keys[:at]}
    after = {key: record[key] for key in keys[at + 1:]}
    head = b"{" + _members(before) + (b"," if before else b"") + b'"uptime":'
    tail = (b"," if after else b"") + _members(after) + b"}"
    return RecordJson(base, head, tail, read_at, until)


def uptime(now: float, started: float) -> float:
    """Seconds since ``started`` (both time.monotonic()), truncated to the millisecond."""
    return int((now - started) * 1000) / 1000


class RecordsJson:
    """Every program's record as one JSON array, re-assembled only when a record or a usage
    reading changed; in between, an answer costs the uptimes' formatting.

    One per Supervisor; ``encode`` is called on the event loop only.
    """

    def __init__(self) -> None:
        self._pieces: list[RecordJson | None] = []
        # The array's bytes between the uptimes (even indexes); each answer puts the
        # uptimes at the odd ones, in the order of _starts.
        self._parts: list[bytes] = [b"[]"]
        self._starts: tuple[float, ...] = ()
        self._until = -math.inf

    def encode(self, programs: Collection[Program], now: float) -> bytes:
        """The array of ``programs``' records, uptimes as at ``now`` (time.monotonic())."""
        # Each program drops its RecordJson when its record changes (cached_json is None
        # then), and makes a new one when it reads its usage again: the same objects in
        # the same order mean the same bytes.
        if now >= self._until or [p.cached_json for p in programs] != self._pieces:
            self._assemble(programs, now)
        parts = self._parts
        if self._starts:
            uptimes = [int((now - started) * 1000) / 1000 for started in self._starts]
            parts[1::2] = orjson.dumps(uptimes)[1:-1].split(b",")
        return b"".join(parts)

    def _assemble(self, programs: Collection[Program], now: float) -> None:
        # Once any reading is stale, every program reads its usage again, so the readings
        # go stale together: one assembly per usage period, not one per program.
        fresh = now >= self._until
        pieces = [p.record_json(now, fresh=fresh) for p in programs]
        parts: list[bytes] = []
        chunk: list[bytes] = [b"["]
        starts: list[float] = []
        for index, piece in enumerate(pieces):
            if index:
                chunk.append(b",")
            chunk.append(piece.head)
            if piece.started is None:
                chunk.append(b"null")
            else:
                parts += (b"".join(chunk), b"null")  # the uptime's place
                chunk = []
                starts.append(piece.started)
            chunk.append(piece.tail)
        chunk.append(b"]")
        parts.append(b"".join(chunk))
        self._parts = parts
        self._starts = tuple(starts)
        self._until = min((piece.until for piece in pieces), default=math.inf)
        self._pieces = list(pieces)
