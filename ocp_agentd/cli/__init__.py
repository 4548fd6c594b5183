"""ocp-agentctl: operate the local ocp-agentd from a shell (SPEC sections 7 and 12).

Modules, each with one job, none importing this package's ``__init__`` (nothing here):

- ``main``: the entry point (``ocp-agentctl = ocp_agentd.cli.main:main``);
- ``parser``: the argument parser, from which ``docs`` generates the man pages and the
  bash completion (``python -m ocp_agentd.cli.docs OUTDIR``);
- ``programs`` and ``tasks``: the commands;
- ``transport``: the API over http.client (unix socket, TCP, TLS);
- ``locate``: the socket from the config, read with tomllib;
- ``output``: tables, JSON, colours.

It imports neither aiohttp nor pydantic nor ``ocp_agentd.config``, so a command answers in
tens of milliseconds.
"""
