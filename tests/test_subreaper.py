"""The daemon as child subreaper (SPEC section 3): orphans come back to it and are reaped,
while the exit status of its own children stays theirs to read.

Runs in a fresh Python process, since becoming a subreaper is for the life of a process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, subprocess
    from ocp_agentd.supervision.proctable import read_stat
    from ocp_agentd.supervision.subreaper import REAPER, is_subreaper

    async def until(pred, what):
        for _ in range(1000):
            if pred():
                return
            await asyncio.sleep(0.01)
        raise SystemExit(f"timed out waiting for {what}")

    def zombie(pid):
        entry = read_stat(pid)
        return entry is not None and entry.zombie

    async def main():
        REAPER.install()
        # A program's main: claimed, in a session of its own, exits 3 after leaving an
        # orphan that left the session too (the daemonizing pattern).
        main = subprocess.Popen(
            ["/bin/sh", "-c", "setsid /bin/sleep 0.3 & echo $!; exit 3"],
            stdout=subprocess.PIPE, start_new_session=True)
        REAPER.claim(main.pid)
        orphan = int(main.stdout.readline())
        # A helper of the daemon's own (same session, not claimed) exiting 5.
        helper = subprocess.Popen(["/bin/sh", "-c", "exit 5"])
        await until(lambda: zombie(main.pid) and zombie(helper.pid), "both exits")
        await asyncio.sleep(0.1)  # SIGCHLDs were handled: neither may have been taken
        codes = [main.poll(), helper.poll()]
        REAPER.release(main.pid)
        entry = read_stat(orphan)
        parent = entry.ppid if entry else None
        await until(lambda: read_stat(orphan) is None, "the orphan reaped")
        print(json.dumps({"subreaper": is_subreaper(), "self": os.getpid(),
                          "orphan_parent": parent, "codes": codes,
                          "reaped": REAPER.reaped}))

    asyncio.run(main())
    """
)


def test_orphans_come_to_the_subreaper_and_are_reaped_without_stealing_exit_codes():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["subreaper"] is True
    assert result["orphan_parent"] == result["self"]
    assert result["codes"] == [3, 5]
    assert result["reaped"] >= 1
