"""python -m ocp_agentd.cli: the same as ocp-agentctl."""

from ocp_agentd.cli.main import main

raise SystemExit(main())
