"""ocp-agentctl's LAST EXIT column: the short form, unless the reason says more."""

from __future__ import annotations

from datetime import datetime

import pytest

from ocp_agentd.cli.output import last_exit

AT = datetime.now().astimezone().replace(hour=6, minute=37, second=27).isoformat()


@pytest.mark.parametrize(("record", "shown"), [
    ({"code": None, "signal": "SIGKILL", "at": AT, "reason": "killed by SIGKILL"},
     "killed by SIGKILL at 06:37:27"),
    ({"code": 1, "signal": None, "at": AT, "reason": "exit code 1"}, "exit 1 at 06:37:27"),
    ({"code": None, "signal": "SIGKILL", "at": AT,
      "reason": "killed by the OOM killer (memory_max 60 MiB)"},
     "killed by the OOM killer (memory_max 60 MiB) at 06:37:27"),
    ({"code": None, "signal": "SIGTERM", "at": AT,
      "reason": "liveness failed: tcp_connect 8080 refused"},
     "liveness failed: tcp_connect 8080 refused at 06:37:27"),
    ({"code": None, "signal": None, "at": AT,
      "reason": "cannot spawn /x: No such file or directory"},
     "cannot spawn /x: No such file or directory at 06:37:27"),
    ({"code": 0, "signal": None, "at": None, "reason": ""}, "exit 0"),
    ({"code": 0, "signal": None, "at": AT, "reason": "stopped on request (exit code 0)"},
     "exit 0 at 06:37:27"),
    ({"code": None, "signal": "SIGTERM", "at": AT,
      "reason": "stopped on request (killed by SIGTERM)"}, "killed by SIGTERM at 06:37:27"),
    (None, "-"),
])
def test_last_exit_names_the_oom_killer_and_liveness(record, shown) -> None:
    assert last_exit(record) == shown
