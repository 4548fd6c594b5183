"""Process supervision: knows processes, nothing of HTTP or tasks."""

from ocp_agentd.supervision.program import (
    Check,
    OperationFailed,
    ProcessInfo,
    State,
    VerifyResult,
)
from ocp_agentd.supervision.supervisor import ProgramNotFound, Supervisor

__all__ = [
    "Check",
    "OperationFailed",
    "ProcessInfo",
    "ProgramNotFound",
    "State",
    "Supervisor",
    "VerifyResult",
]
