"""ocp-agentd: the OCP Agent daemon of an OceanBase host."""

__version__ = "0.1.0"
