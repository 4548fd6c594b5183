"""What a subtask and a task template are; the errors of task operations.

Kept apart from the engine so the subtasks (obagent.py) and the templates
depend on these few names only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ocp_agentd.client import AgentClient

# Error codes of SPEC section 4 that task operations answer with.
OPERATION_RUNNING = 2003
TASK_NOT_FOUND = 20000
WRONG_STATE = 20003
ROLLBACK_PROHIBITED = 20004


class TaskError(Exception):
    """A task operation refused; the API turns it into the envelope's error."""

    def __init__(self, code: int, message: str, target: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.target = target


class SubtaskFailed(Exception):
    """Raised by a subtask: the reason, for a person, ends up in its log."""


class SubtaskContext(Protocol):
    """What a running subtask can see and do (the engine provides it)."""

    task_id: int
    subtask_id: int
    host_id: int

    @property
    def client(self) -> AgentClient: ...

    @property
    def string_map(self) -> dict[str, str]: ...

    @property
    def list_map(self) -> dict[str, list[str]]: ...

    def log(self, line: str) -> None: ...

    def remaining(self) -> float: ...

    async def save_context(self) -> None: ...

    async def hold_lock(self) -> None: ...

    async def release_lock(self) -> None: ...


class Subtask:
    """One step of a task. Subclasses must be idempotent: a retry or a resume
    after a crash runs `run` again from the start."""

    class_name: ClassVar[str]
    name: ClassVar[str]
    description: ClassVar[str] = ""
    timeout: ClassVar[int] = 60
    prohibit_rollback: ClassVar[bool] = False

    async def run(self, ctx: SubtaskContext) -> None:
        raise NotImplementedError

    async def rollback(self, ctx: SubtaskContext) -> None:
        """Undo what `run` did; the default has nothing to undo."""
        ctx.log("nothing to undo")


@dataclass(frozen=True)
class Step:
    subtask: type[Subtask]
    upstreams: tuple[int, ...] = ()  # indexes of earlier steps in the template


@dataclass(frozen=True)
class Template:
    """A task definition: its subtasks as a DAG by step index."""

    name: str
    steps: tuple[Step, ...]
    lock_key: str | None = None  # tasks with the same key never run at once
    prohibit_rollback: bool = False

    @classmethod
    def chain(cls, name: str, subtasks: list[type[Subtask]], **kwargs: Any) -> Template:
        steps = tuple(
            Step(sub, (index - 1,) if index else ()) for index, sub in enumerate(subtasks)
        )
        return cls(name=name, steps=steps, **kwargs)
