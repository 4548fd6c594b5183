"""The OCP task model: TaskInstance and SubtaskInstance in the seed's shape.

Each is one pydantic model (wire.OcpModel): the engine's object, the store's row, the
API's answer and the OpenAPI schema. On the wire they have exactly the fields of the
seed's sample response (seeds/000_56e64bc58e0afbbd.txt), camelCase; the daemon's own
fields are ``exclude``d, so a strict OCP client sees the shape it knows. Why a subtask
failed is in its log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import Field
from typing_extensions import TypedDict  # pydantic needs it, not typing's, before 3.12

from ocp_agentd.wire import OcpModel


class TaskStatus(StrEnum):
    RUNNING = "RUNNING"
    FAILED = "FAILED"
    SUCCESSFUL = "SUCCESSFUL"


class SubtaskStatus(StrEnum):
    PENDING = "PENDING"
    READY = "READY"
    RUNNING = "RUNNING"
    CANCELING = "CANCELING"
    FAILED = "FAILED"
    SUCCESSFUL = "SUCCESSFUL"


class Operation(StrEnum):
    EXECUTE = "EXECUTE"
    RETRY = "RETRY"
    ROLLBACK = "ROLLBACK"
    SKIP = "SKIP"
    CANCEL = "CANCEL"


CLASS_PREFIX = "com.alipay.ocp.service.task.business.obagent."
PROHIBIT_ROLLBACK = "prohibit_rollback"
HOST_ID = "host_id"


def iso_now() -> str:
    """Local time with milliseconds and the UTC offset: 2021-09-03T14:17:06.328+08:00."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


class SubtaskInstance(OcpModel):
    """One subtask of a task: the seed's SubtaskInstance (camelCase on the wire). The
    fields marked ``exclude`` are the daemon's own bookkeeping, stored but never sent."""

    class_name: str
    description: str
    downstreams: list[int] = Field(default_factory=list,
                                   description="Ids of the subtasks that wait for this one.")
    id: int
    name: str
    node_type: str = "JAVA_TASK"
    operation: Operation = Operation.EXECUTE
    parallel_idx: int = -1
    prohibit_rollback: bool = False
    run_time: int = Field(default=1,
                          description="How many times it has been run (a retry adds one).")
    series_id: int = Field(description="Its index in the task's template.")
    status: SubtaskStatus = SubtaskStatus.PENDING
    timeout: int = Field(description="Seconds one run may take.")
    upstreams: list[int] = Field(default_factory=list,
                                 description="Ids of the subtasks it waits for.")
    task_id: int = Field(exclude=True)
    start_time: str | None = Field(default=None, exclude=True)
    end_time: str | None = Field(default=None, exclude=True)

    def to_json(self) -> dict[str, Any]:
        """The wire shape: the seed's fields, camelCase."""
        return self.model_dump(mode="json")


class TaskContext(TypedDict):
    """A task's context (the seed's shape): ``stringMap`` holds ``host_id`` and
    ``prohibit_rollback`` ("true"/"false") and what the subtasks record."""

    listMap: dict[str, list[str]]
    parallel: bool
    parallelIdx: int
    stringMap: dict[str, str]


class TaskInstance(OcpModel):
    """A task: the seed's TaskInstance (camelCase on the wire; sample response in
    seeds/000_56e64bc58e0afbbd.txt). The fields marked ``exclude`` are the daemon's own."""

    context: TaskContext
    creator: str
    executor: str = Field(description="The address of the host that runs it.")
    host_id: int
    id: int
    name: str
    operation: Operation = Operation.EXECUTE
    start_time: str = Field(json_schema_extra={"format": "date-time"})
    status: TaskStatus = TaskStatus.RUNNING
    subtasks: list[SubtaskInstance] = Field(default_factory=list)
    task_definition_id: int = -1
    type: str = "MANUAL"
    template: str = Field(exclude=True)
    end_time: str | None = Field(default=None, exclude=True)
    lock_key: str | None = Field(default=None, exclude=True)
    idempotency_key: str | None = Field(default=None, exclude=True)

    @staticmethod
    def new_context(host_id: int, prohibit_rollback: bool) -> TaskContext:
        return {
            "listMap": {},
            "parallel": False,
            "parallelIdx": -1,
            "stringMap": {
                PROHIBIT_ROLLBACK: "true" if prohibit_rollback else "false",
                HOST_ID: str(host_id),
            },
        }

    @property
    def string_map(self) -> dict[str, str]:
        return self.context.setdefault("stringMap", {})

    @property
    def list_map(self) -> dict[str, list[str]]:
        return self.context.setdefault("listMap", {})

    @property
    def prohibit_rollback(self) -> bool:
        return self.string_map.get(PROHIBIT_ROLLBACK, "false") == "true"

    def subtask(self, subtask_id: int) -> SubtaskInstance | None:
        return next((s for s in self.subtasks if s.id == subtask_id), None)

    def copy(self) -> TaskInstance:  # type: ignore[override]
        """A deep copy (what the engine answers while it goes on changing its own)."""
        return self.model_copy(deep=True)

    def to_json(self) -> dict[str, Any]:
        """The wire shape: the seed's fields, camelCase."""
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class StatusChange:
    """One status move of a task (``subtask`` None) or of one of its subtasks, after the
    store committed it: what the engine's listeners receive.

    ``old`` is None when the task was just created; ``why`` is a short reason for people
    (e.g. "retry", "timed out after 30 s").
    """

    task: TaskInstance
    subtask: SubtaskInstance | None
    old: TaskStatus | SubtaskStatus | None
    new: TaskStatus | SubtaskStatus
    why: str
