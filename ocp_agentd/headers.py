"""HTTP header names the daemon and its clients share."""

TRACE_HEADER = "X-OCP-Trace-ID"
# A task's own calls name it, so they pass the host lock that task holds (api/processes.py).
TASK_HEADER = "X-OCP-Task-ID"
