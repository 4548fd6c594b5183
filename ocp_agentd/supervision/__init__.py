"""Process supervision: knows processes, nothing of HTTP or tasks."""

from ocp_agentd.supervision.output import owner_of
from ocp_agentd.supervision.supervisor import ProgramNotFound, Supervisor
from ocp_agentd.supervision.types import (
    Check,
    ExitInfo,
    IllegalTransition,
    OperationFailed,
    ProcessInfo,
    State,
    VerifyResult,
)

__all__ = [
    "Check",
    "ExitInfo",
    "IllegalTransition",
    "OperationFailed",
    "ProcessInfo",
    "ProgramNotFound",
    "State",
    "Supervisor",
    "VerifyResult",
    "owner_of",
]
