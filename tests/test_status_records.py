"""The status answer kept encoded (supervision/records_json.py) says what the records say.

Real supervisors over real processes: at every step the bytes GET /api/v1/processes sends
are the JSON of Program.record() at the same moment, byte for byte, and they validate as
the ProcessInfo model (every field, nothing more). Uptime, a state change, a crash, a
reload and a usage reading show in the very next answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import orjson
import pytest
from harness import remove_cgroups
from pydantic import TypeAdapter
from test_supervision import SH, World, kill_marked, run, sleeper, until

from ocp_agentd.supervision import ProcessInfo, Supervisor

RECORDS = TypeAdapter(list[ProcessInfo])
MOVING = ("uptime", "cpu_seconds", "memory_bytes")
# Characters the encoded template must carry through as they are: the template's own
# format marks, a backslash and a quote JSON escapes, and text outside ASCII.
ODD_ARGS = ["%s %a %% 100%", 'back\\slash "quoted"', "snow \u2603 \u00e9"]


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    w = World(tmp_path)
    yield w
    kill_marked(w.state)
    remove_cgroups(w.state)


def answer(sup: Supervisor) -> tuple[bytes, list[dict[str, Any]]]:
    """The status answer's data now, checked against the records at the same moment."""
    now = time.monotonic()
    encoded = sup.process_records_json(now)
    assert encoded == orjson.dumps(sup.process_records(now))
    parsed = json.loads(encoded)
    # The shape: every ProcessInfo field and nothing else, each of its declared type.
    validated = RECORDS.validate_json(encoded)
    assert RECORDS.dump_python(validated, mode="json") == parsed
    # The values: the records as Program.info() makes them, but what moves with the clock.
    frozen = {name: None for name in MOVING}
    assert [dataclasses.replace(v, **frozen) for v in validated] == [
        dataclasses.replace(info, **frozen) for info in sup.infos()
    ]
    return encoded, parsed


def by_name(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["name"]: record for record in records}


def test_the_encoded_answer_follows_every_change(world: World) -> None:
    world.add("plain", sleeper())
    world.add("odd", [SH, "-c", "exec sleep 1000", *ODD_ARGS], start_seconds=0.0)
    world.add("dropped", sleeper(), liveness={"exec": ["/bin/true"], "period": 0.05})

    async def body(sup: Supervisor) -> None:
        encoded, records = answer(sup)
        assert [r["name"] for r in records] == ["plain", "odd", "dropped"]

        # Each liveness probe's outcome shows in the next answer.
        def probed() -> str | None:
            probe = by_name(answer(sup)[1])["dropped"]["liveness"]["last_probe"]
            return probe["at"] if probe is not None else None

        await until(lambda: probed() is not None, what="a first probe")
        first_probe = probed()
        await until(lambda: probed() != first_probe, what="a later probe")
        encoded, records = answer(sup)
        assert all(r["state"] == "RUNNING" and r["uptime"] is not None for r in records)
        assert by_name(records)["odd"]["command"][3:] == ODD_ARGS
        assert "\u2603".encode() in encoded  # written as UTF-8, not escaped

        # The uptime moves from one answer to the next; nothing else does.
        first = by_name(records)["plain"]["uptime"]
        await until(lambda: by_name(answer(sup)[1])["plain"]["uptime"] > first + 0.05,
                    what="uptime moving")

        # A stop shows in the next answer.
        await sup.stop("plain")
        plain = by_name(answer(sup)[1])["plain"]
        assert (plain["state"], plain["pid"], plain["uptime"]) == ("STOPPED", None, None)

        # So does a start, with its new pid.
        started = await sup.start("plain")
        plain = by_name(answer(sup)[1])["plain"]
        assert plain["state"] == "RUNNING" and plain["pid"] == started.pid
        assert plain["uptime"] is not None

        # A crash: the restarted program's pid and restart count.
        crashed = by_name(answer(sup)[1])["odd"]["pid"]
        os.kill(crashed, signal.SIGKILL)
        await until(lambda: by_name(answer(sup)[1])["odd"]["pid"] not in (None, crashed)
                    and by_name(answer(sup)[1])["odd"]["state"] == "RUNNING",
                    what="odd restarted")
        assert by_name(answer(sup)[1])["odd"]["restarts"] == 1

        # A reload whose only edit needs no restart: nothing but the spec changes.
        running = by_name(answer(sup)[1])["plain"]["pid"]
        world.add("plain", sleeper(), operable=False)
        report = await sup.reload(world.settings())
        assert report["changed"] == ["plain"]
        plain = by_name(answer(sup)[1])["plain"]
        assert plain["operable"] is False and plain["pid"] == running

        # A reload that removes, adds and restarts: all of it in the very next answer.
        world.programs.pop("dropped")
        world.add("odd", [SH, "-c", "exec sleep 999", *ODD_ARGS], start_seconds=0.0)
        world.add("added", sleeper())
        report = await sup.reload(world.settings())
        assert report["added"] == ["added"] and report["removed"] == ["dropped"]
        records = answer(sup)[1]
        assert [r["name"] for r in records] == sup.names()
        assert set(sup.names()) == {"plain", "odd", "added"}
        assert by_name(records)["odd"]["command"][2] == "exec sleep 999"
        assert by_name(records)["added"]["state"] == str(sup.program("added").state)

        # Stopping everything leaves an answer without a single uptime to fill in.
        for name in sup.names():
            await sup.stop(name)
        records = answer(sup)[1]
        assert all(r["state"] == "STOPPED" and r["uptime"] is None for r in records)

    run(world, body)


def test_a_new_usage_reading_shows_in_the_answer(world: World) -> None:
    # Without cgroups the usage comes from the tree sampler: unknown (null) until its first
    # sample, then numbers; each reading is kept for USAGE_TTL.
    world.add("plain", sleeper())
    settings = world.settings

    def without_cgroups():  # type: ignore[no-untyped-def]
        made = settings()
        made.agent.cgroup = "off"
        return made

    world.settings = without_cgroups  # type: ignore[method-assign]

    async def body(sup: Supervisor) -> None:
        assert sup.program("plain").cgroup is None
        await until(lambda: answer(sup)[1][0]["memory_bytes"] is not None, timeout=20.0,
                    what="a memory reading in the answer")
        record = answer(sup)[1][0]
        assert record["memory_bytes"] > 0 and record["cpu_seconds"] is not None
        assert record["state"] == "RUNNING"

    run(world, body)
