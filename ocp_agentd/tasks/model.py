"""The OCP task model: TaskInstance and SubtaskInstance in the seed's shape.

`to_json()` gives exactly the fields of the seed's sample response
(seeds/000_56e64bc58e0afbbd.txt); nothing more, so a strict OCP client sees
the shape it knows. Why a subtask failed is in its log.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


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


@dataclass
class SubtaskInstance:
    id: int
    task_id: int
    class_name: str
    name: str
    description: str
    timeout: int
    series_id: int
    upstreams: list[int] = field(default_factory=list)
    downstreams: list[int] = field(default_factory=list)
    status: SubtaskStatus = SubtaskStatus.PENDING
    operation: Operation = Operation.EXECUTE
    run_time: int = 1
    prohibit_rollback: bool = False
    parallel_idx: int = -1
    node_type: str = "JAVA_TASK"
    start_time: str | None = None
    end_time: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "className": self.class_name,
            "description": self.description,
            "downstreams": list(self.downstreams),
            "id": self.id,
            "name": self.name,
            "nodeType": self.node_type,
            "operation": str(self.operation),
            "parallelIdx": self.parallel_idx,
            "prohibitRollback": self.prohibit_rollback,
            "runTime": self.run_time,
            "seriesId": self.series_id,
            "status": str(self.status),
            "timeout": self.timeout,
            "upstreams": list(self.upstreams),
        }


@dataclass
class TaskInstance:
    id: int
    name: str
    template: str
    host_id: int
    creator: str
    executor: str
    start_time: str
    status: TaskStatus = TaskStatus.RUNNING
    operation: Operation = Operation.EXECUTE
    context: dict[str, Any] = field(default_factory=dict)
    subtasks: list[SubtaskInstance] = field(default_factory=list)
    end_time: str | None = None
    lock_key: str | None = None
    idempotency_key: str | None = None
    task_definition_id: int = -1
    type: str = "MANUAL"

    @staticmethod
    def new_context(host_id: int, prohibit_rollback: bool) -> dict[str, Any]:
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

    def copy(self) -> TaskInstance:
        return copy.deepcopy(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "context": copy.deepcopy(self.context),
            "creator": self.creator,
            "executor": self.executor,
            "hostId": self.host_id,
            "id": self.id,
            "name": self.name,
            "operation": str(self.operation),
            "startTime": self.start_time,
            "status": str(self.status),
            "subtasks": [s.to_json() for s in self.subtasks],
            "taskDefinitionId": self.task_definition_id,
            "type": self.type,
        }


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
