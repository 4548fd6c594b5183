"""Background asyncio tasks that are neither lost nor silently failed.

asyncio keeps only a weak reference to a task, so a task nobody holds may be collected
mid-flight (Python docs, asyncio.create_task); and an exception a task ends with is
reported only as "Task exception was never retrieved" when it is collected. Tasks keeps
the references and logs each failure when the task ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class Tasks:
    """A set of background tasks owned by one object (the daemon, a program, the engine)."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Runs coro as a task on the running loop; its failure is logged when it ends."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.error("background task %s failed", task.get_name(), exc_info=exc)

    def cancel(self) -> None:
        """Cancels every task still running (does not wait for them)."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Cancels every task still running and waits until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
