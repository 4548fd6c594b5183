"""Stop-all's sweep for orphans reads the process table only once some child of the
daemon ran outside every program cgroup (subreaper.Reaper.note_uncontained).

Until then every descendant ran in a program's cgroup, which its stop empties; the
sweep would read every process's stat file on the host (about 1,300 on a crowded one)
for nothing at each stop-all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from pathlib import Path

import pytest
from test_stop_all_pass import needs_cgroups
from test_supervision import World, kill_marked, marked, run, until

from ocp_agentd.config import Settings
from ocp_agentd.supervision import State, Supervisor, probes, tree, treeusage
from ocp_agentd.supervision.subreaper import REAPER

# A main whose grandchild leaves the session at once: an orphan of the daemon's, in the
# program's cgroup (the kernel keeps it there).
ESCAPES = "setsid /bin/sleep 1000 & exec /bin/sleep 1000"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The process-table snapshots the orphan sweep takes (the real one each time), from
    a daemon that has run nothing outside a cgroup yet."""
    taken: list[bool] = []
    real = tree.take_snapshot

    def counted(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        taken.append(True)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tree, "take_snapshot", counted)
    monkeypatch.setattr(REAPER, "uncontained", False)
    return taken


def test_with_every_program_in_a_cgroup_stop_all_reads_no_process_table(
    world: World, reads: list[bool]
) -> None:
    needs_cgroups(world)
    world.add("escapes", ["/bin/sh", "-c", ESCAPES], start_seconds=0.0)
    world.add("plain", ["/bin/sleep", "1000"], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 3, what="2 mains and an orphan")
        results = await sup.stop_all()
        assert {r.state for r in results.values()} == {State.STOPPED}  # type: ignore[union-attr]
        assert marked(world.state) == []  # the orphan went with its cgroup

    run(world, body)
    assert reads == []
    assert not REAPER.uncontained


class BareWorld(World):
    """A World whose daemon uses no cgroup (agent.cgroup = "off")."""

    def settings(self) -> Settings:
        settings = super().settings()
        settings.agent.cgroup = "off"
        return settings


def test_a_program_without_a_cgroup_makes_stop_all_look(
    tmp_path: Path, reads: list[bool]
) -> None:
    world = BareWorld(tmp_path)
    world.add("bare", ["/bin/sleep", "1000"], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 1, what="the program")
        assert sup.programs["bare"].cgroup is None
        await sup.stop_all()

    try:
        run(world, body)
    finally:
        kill_marked(world.state)
    assert REAPER.uncontained
    assert reads  # it looked for orphans


def test_a_probe_command_marks_the_daemon_uncontained(reads: list[bool]) -> None:
    result = asyncio.run(probes.run_command(["/bin/true"], 10.0))
    assert result.ok, result
    assert REAPER.uncontained


def test_the_process_table_sampler_resumes_when_a_bare_program_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no program outside a cgroup running, the usage sampler waits without a timer
    (an idle daemon does not wake every 5 s for it); a program started without a cgroup
    brings the timer back, so it is sampled without anyone asking for its status."""
    monkeypatch.setattr(treeusage, "SAMPLE_SECONDS", 0.3)
    world = BareWorld(tmp_path)
    world.add("bare", ["/bin/sleep", "1000"], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        await sup.adopt()  # starts the sampler; nothing runs to adopt
        assert sup.tree_usage.samples == 0
        await sup.start("bare")
        await until(lambda: sup.tree_usage.samples >= 1, timeout=10.0,
                    what="a sample on the timer, with no status asked")

    try:
        run(world, body, boot=False)
    finally:
        kill_marked(world.state)


def test_a_sweep_out_of_descriptors_leaves_stop_all_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The programs' own stops are done when the sweep runs: a sweep that cannot read the
    process table (EMFILE, made for real by lowering the soft descriptor limit to what is
    in use while it reads) is logged, and stop-all still answers every program STOPPED."""
    real = tree.take_snapshot

    def starved(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.dup(0)  # the limit bounds descriptor numbers: none free below it
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            return real(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    monkeypatch.setattr(tree, "take_snapshot", starved)
    world = BareWorld(tmp_path)
    world.add("bare", ["/bin/sleep", "1000"], start_seconds=0.0)

    async def body(sup: Supervisor) -> None:
        await until(lambda: len(marked(world.state)) == 1, what="the program")
        with caplog.at_level(logging.ERROR, logger="ocp_agentd.supervisor"):
            results = await sup.stop_all()
        assert {r.state for r in results.values()} == {State.STOPPED}  # type: ignore[union-attr]
        assert any("cannot look for orphaned processes" in r.getMessage()
                   and "Too many open files" in r.getMessage() for r in caplog.records)

    try:
        run(world, body)
    finally:
        kill_marked(world.state)
