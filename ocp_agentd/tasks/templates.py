"""The task definitions: which subtasks, in what order.

Both templates take the host's agent-operation lock: one restart or stop at
a time on a host (a second one answers 2003 with the running task's id).
"""

from __future__ import annotations

from ocp_agentd.tasks.base import Template
from ocp_agentd.tasks.obagent import (
    FinishOcpAgentOperationTask,
    PrepareRestartOcpAgentTask,
    PrepareStopOcpAgentTask,
    RestartPosProxyTask,
    StartAllOcpAgentProcessesTask,
    StopAllOcpAgentProcessesTask,
)

AGENT_LOCK = "host_agent_operation"
RESTART_AGENT = "Restart OCP agent"
STOP_AGENT = "Stop OCP agent"

TEMPLATES: tuple[Template, ...] = (
    Template.chain(
        RESTART_AGENT,
        [
            PrepareRestartOcpAgentTask,
            RestartPosProxyTask,
            StopAllOcpAgentProcessesTask,
            StartAllOcpAgentProcessesTask,
            FinishOcpAgentOperationTask,
        ],
        lock_key=AGENT_LOCK,
    ),
    Template.chain(
        STOP_AGENT,
        [PrepareStopOcpAgentTask, StopAllOcpAgentProcessesTask, FinishOcpAgentOperationTask],
        lock_key=AGENT_LOCK,
    ),
)
