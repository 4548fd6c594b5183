"""background.Tasks on a real event loop: references kept, failures logged, close waits."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from ocp_agentd.background import Tasks


async def _fail() -> None:
    await asyncio.sleep(0)
    raise ValueError("boom-3c1d")


def test_a_failing_task_is_logged_with_its_exception(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.background")

    async def main() -> None:
        tasks = Tasks(log)
        task = tasks.spawn(_fail(), name="failing-one")
        del task
        gc.collect()  # the set holds the only reference: the task must still run
        for _ in range(100):
            if not len(tasks):
                break
            await asyncio.sleep(0.01)
        assert len(tasks) == 0

    with caplog.at_level(logging.ERROR, logger="test.background"):
        asyncio.run(main())
    failed = [r for r in caplog.records if r.name == "test.background"]
    assert len(failed) == 1
    assert "failing-one" in failed[0].getMessage()
    assert failed[0].exc_info is not None and "boom-3c1d" in str(failed[0].exc_info[1])


def test_close_cancels_and_waits_for_running_tasks(caplog: pytest.LogCaptureFixture) -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    async def main() -> None:
        tasks = Tasks(logging.getLogger("test.background"))
        tasks.spawn(forever("a"))
        tasks.spawn(forever("b"))
        await asyncio.sleep(0)
        assert len(tasks) == 2
        await tasks.close()
        assert len(tasks) == 0

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert sorted(ended) == ["a", "b"]
    assert not [r for r in caplog.records if r.name == "test.background"]  # cancelled != failed
