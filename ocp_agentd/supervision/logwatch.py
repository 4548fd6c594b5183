"""Which program log files may have grown since housekeeping last looked: inotify(7).

Housekeeping bounds log files that grow past the keeper (a program appending to its log
by name, one adopted from an older daemon). Looking at every file every round woke the
daemon on an idle host for nothing; instead each file it looked at gets a one-shot watch
(IN_ONESHOT) for a write, a rename or a link count or attribute change, and is looked at
again only once the watch fired. Its directory and their ancestors get one too, for a
rename or removal of the directory itself: a directory moved aside (`mv log log.old;
mkdir log`, an install home moved aside for a new one) puts another file at the path, one
no watch follows. A file written to all the time costs one event per round
(the watch is gone after the first); a quiet file costs nothing, and with every file quiet
housekeeping need not run at all.

    watch = LogWatch(on_change=ticker.want_housekeeping)
    due = watch.to_look_at(paths)          # event loop: never armed, or changed since
    def look():                            # a worker thread: arm first, then look
        return [(path, watch.arm(path)) for path in due if looked_at(path)]
    watch.armed(await asyncio.to_thread(look))  # event loop again

A path is armed before it is looked at, so a write after the look fires the watch.
Watch descriptors are recorded on the event loop's thread only, which also reads the
events: a watch that fires before its descriptor is recorded is gone (one-shot), so its
path is due again and asks for the next round then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from ocp_agentd import linux
from ocp_agentd.supervision.inotify_reader import InotifyReader

# A write, a rename of the file (rotation), a link count change (unlink, a rename over
# it) or an attribute change; one event, then the kernel drops the watch (IN_IGNORED).
# IN_DONT_FOLLOW: a link planted at the path is watched as itself, not followed.
WATCH_MASK = (linux.IN_MODIFY | linux.IN_ATTRIB | linux.IN_MOVE_SELF | linux.IN_DELETE_SELF
              | linux.IN_ONESHOT | linux.IN_DONT_FOLLOW)
# The file's directories up to /: renamed or removed themselves (not their entries: no
# event per file).
DIRECTORY_MASK = (linux.IN_MOVE_SELF | linux.IN_DELETE_SELF | linux.IN_ONESHOT
                  | linux.IN_DONT_FOLLOW | linux.IN_ONLYDIR)


class LogWatch(InotifyReader):
    """One inotify descriptor watching program log files for housekeeping.

    ``on_change()`` is called (on the event loop) when an armed file changed. Not
    thread-safe except ``arm``, which only makes the system call.
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.on_change = on_change
        # watch descriptor -> paths (a directory's covers every log in it)
        self._path_of: dict[int, set[Path]] = {}
        self._quiet: set[Path] = set()  # armed, and no event since
        # Watches that fired since the round started: among them those that fired before
        # ``armed`` recorded them (or a live watch arming gave back). Emptied when a round
        # starts, when no watch is being armed.
        self._early: set[int] = set()

    def to_look_at(self, paths: Iterable[Path]) -> list[Path]:
        """The paths among ``paths`` that housekeeping has to look at: never armed, or
        changed since. They count as changed until ``armed`` records their new watch."""
        self._start()
        self._on_events()  # what is waiting now counts, even before the loop reads it
        self._early.clear()
        due = [path for path in paths if path not in self._quiet]
        self._quiet.difference_update(due)
        return due

    def arm(self, path: Path) -> tuple[int, ...] | None:
        """Watches ``path`` (absolute) and its directories for one change (any thread);
        their watch descriptors, or None when the file cannot be watched (no such file,
        no inotify, out of watches): such a path is looked at every round."""
        if self._fd < 0:
            return None
        directories = []
        for directory in path.parents:
            with contextlib.suppress(OSError):  # a link (IN_DONT_FOLLOW) is left out
                directories.append(
                    linux.inotify_add_watch(self._fd, directory, DIRECTORY_MASK))
        try:
            return (*directories, linux.inotify_add_watch(self._fd, path, WATCH_MASK))
        except OSError:
            return None

    def armed(self, watches: Iterable[tuple[Path, tuple[int, ...] | None]]) -> None:
        """Records the watches ``arm`` made (event loop). A path whose watch fired before
        this is left to be looked at again, and ``on_change()`` is called for it: that
        one-shot watch is gone, and no other event would ask for the round."""
        watches = list(watches)
        fired = {wd for _, wds in watches for wd in wds or () if wd in self._early}
        self._early.difference_update(fired)
        changed: set[Path] = set()
        for path, wds in watches:
            if wds is None:
                continue
            if fired.intersection(wds):
                changed.add(path)
                continue
            for wd in wds:
                self._path_of.setdefault(wd, set()).add(path)
            self._quiet.add(path)
        # A later watch of the same path (armed again after a rotation) covers it.
        if changed - self._quiet and self.on_change is not None:
            self.on_change()

    def look_again(self, paths: Iterable[Path]) -> None:
        """``paths`` are looked at next round whatever their watches say (a standing
        problem: the look itself may succeed next time)."""
        self._quiet.difference_update(paths)

    def forget(self, keep: set[Path]) -> None:
        """Drops the paths not in ``keep`` (a program removed by reload); their watches
        stay until they fire or the file goes."""
        self._quiet.intersection_update(keep)

    def close(self) -> None:
        """Drops every watch and the inotify descriptor."""
        self._close_fd()
        self._path_of.clear()
        self._quiet.clear()
        self._early.clear()

    def _start(self) -> None:
        """The inotify descriptor, read from the running event loop; without one (out of
        descriptors or of inotify instances) every path is looked at every round."""
        with contextlib.suppress(OSError):
            self._open()

    def _on_events(self) -> None:
        if self._fd < 0:
            return
        changed = False
        for wd, mask in linux.inotify_read(self._fd):
            ignored = mask & linux.IN_IGNORED
            paths = self._path_of.pop(wd, set()) if ignored else self._path_of.get(wd, set())
            if paths & self._quiet:
                self._quiet.difference_update(paths)
                changed = True
            if not ignored:
                self._early.add(wd)  # it may be one being armed now (see armed)
        if changed and self.on_change is not None:
            self.on_change()
