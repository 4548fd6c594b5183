"""ocp-agentctl: operate the local ocp-agentd from a shell (SPEC sections 7 and 12).

Modules, each with one job, none importing this package's ``__init__`` (nothing here):

- ``main``: the entry point (``ocp-agentctl = ocp_agentd.cli.main:main``);
- ``parser``: the argument parser, from which ``docs`` generates the man pages and the
  bash completion (``python -m ocp_agentd.cli.docs OUTDIR``); a command's arguments are
  defined only when that command runs;
- ``programs`` and ``tasks``: the commands;
- ``transport``: the API (unix socket, TCP, TLS) over ``http11``, the HTTP/1.1 it needs;
- ``locate``: the socket from the config, read with tomllib;
- ``output``: tables, JSON, colours.

It imports neither aiohttp nor pydantic nor ``ocp_agentd.config``, and of the standard
library only what the command uses (no http.client, no typing; ssl for https, tomllib when
a config is read), so ``status`` answers in about the time the interpreter takes to start.
"""
