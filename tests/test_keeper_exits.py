"""The log keepers' exit collector (supervision/keeper_exits.py), on real children."""

from __future__ import annotations

import json
import subprocess
import sys

# Run in a process of its own: it lowers its descriptor limit and uses a fresh collector,
# whose epoll descriptor is made at its first watch().
OUT_OF_DESCRIPTORS = r"""
import json, os, resource, subprocess, threading
from ocp_agentd.supervision.keeper_exits import KeeperExits

ended = threading.Event()
exits = KeeperExits(lambda child: ended.set())
child = subprocess.Popen(["/bin/cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
before = set(os.listdir("/proc/self/fd"))
fillers = []
while True:
    try:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
os.close(fillers.pop())  # one left: enough for the child's pidfd, not for more
error = None
try:
    exits.watch(child)
except OSError as exc:
    error = repr(exc)
for fd in fillers:
    os.close(fd)
child.stdin.close()  # the child ends
reaped = ended.wait(20)
# The descriptors the collector keeps: its epoll descriptor at most.
kept = len(set(os.listdir("/proc/self/fd")) - before)
print(json.dumps({"error": error, "reaped": reaped and child.returncode is not None,
                  "kept": kept}))
"""


def test_a_watch_without_descriptors_left_still_reaps_and_leaks_nothing() -> None:
    """Out of descriptors right after the child's pidfd (the collector's epoll descriptor
    cannot be made): the watch neither fails (the keeper runs already: a failed start
    would leave it unreaped) nor keeps the pidfd; the child's exit is still collected."""
    done = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS], capture_output=True,
                          text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result == {"error": None, "reaped": True, "kept": 0}, (result, done.stderr)
