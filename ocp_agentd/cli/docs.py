"""Man pages and bash completion, generated from the argument parsers.

    python -m ocp_agentd.cli.docs OUTDIR

writes ``OUTDIR/ocp-agentd.8``, ``OUTDIR/ocp-agentctl.1`` and ``OUTDIR/ocp-agentctl.bash``
(the packages install them as /usr/share/man/man8/ocp-agentd.8,
/usr/share/man/man1/ocp-agentctl.1 and
/usr/share/bash-completion/completions/ocp-agentctl). The roff comes from
argparse-manpage and the completion script from shtab (both build-time dependencies, in
the ``dev`` extra); program names complete from the running daemon
(``ocp-agentctl status --names``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from ocp_agentd import __version__
from ocp_agentd.cli.parser import build_parser
from ocp_agentd.daemon import build_parser as build_daemon_parser

PROJECT = "ocp-agentd"
NAMES_COMMAND = "ocp-agentctl status --names 2>/dev/null"
PATH_OPTIONS = {"--config", "--socket", "--cacert", "--cert", "--key"}

CTL_SEE_ALSO = ".BR ocp-agentd (8),\n.BR systemctl (1),\n.BR journalctl (1)\n"
CTL_FILES = (
    ".TP\n/etc/ocp_agentd/config.toml\nthe daemon's configuration; its api.socket names the "
    "socket\n.TP\n/run/ocp_agentd/agentd.sock\nthe API socket when the configuration "
    "names none\n")
DAEMON_FILES = (
    ".TP\n/etc/ocp_agentd/config.toml\nthe configuration\n"
    ".TP\n/var/lib/ocp_agentd\npid records and the task database\n"
    ".TP\n/var/log/ocp_agentd\nthe programs' logs\n"
    ".TP\n/run/ocp_agentd/agentd.sock\nthe API socket\n")
DAEMON_SEE_ALSO = ".BR ocp-agentctl (1),\n.BR systemd.service (5)\n"


def _manpage(parser: argparse.ArgumentParser, section: int, summary: str,
             extra: dict[str, str]) -> str:
    page = Manpage(parser, {"manual_section": section, "version": __version__,
                            "project_name": PROJECT, "manual_title": f"{PROJECT} manual",
                            "description": summary})
    for heading, content in extra.items():
        page.add_section(heading, "=", content)
    return str(page)


def ctl_manpage() -> str:
    """ocp-agentctl(1), roff."""
    return _manpage(build_parser(common_in_commands=False), 1,
                    "operate the local OCP Agent daemon",
                    {"files": CTL_FILES, "see also": CTL_SEE_ALSO})


def daemon_manpage() -> str:
    """ocp-agentd(8), roff."""
    return _manpage(build_daemon_parser(), 8, "the OCP Agent daemon of an OceanBase host",
                    {"files": DAEMON_FILES, "see also": DAEMON_SEE_ALSO})


def _mark_completions(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_completions(sub)
        elif action.dest in ("name", "names"):
            action.complete = shtab.cmd(NAMES_COMMAND)  # type: ignore[attr-defined]
        elif PATH_OPTIONS & set(action.option_strings):
            action.complete = shtab.FILE  # type: ignore[attr-defined]


def ctl_completion() -> str:
    """The bash completion script of ocp-agentctl."""
    parser = build_parser()
    _mark_completions(parser)
    return str(shtab.complete(parser, shell="bash"))


def write_all(outdir: Path) -> list[Path]:
    """Writes the three files into ``outdir`` (made if missing); answers their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("ocp-agentd.8", daemon_manpage()),
                       ("ocp-agentctl.1", ctl_manpage()),
                       ("ocp-agentctl.bash", ctl_completion())):
        path = outdir / name
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ocp_agentd.cli.docs",
        description="Write the man pages of ocp-agentd (8) and ocp-agentctl (1) and the "
        "bash completion of ocp-agentctl, generated from their argument parsers.")
    parser.add_argument("outdir", type=Path, help="where to write them (made if missing)")
    args = parser.parse_args(argv)
    for path in write_all(args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
