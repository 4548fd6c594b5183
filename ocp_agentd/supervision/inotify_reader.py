"""One inotify descriptor (inotify(7)), read from the running event loop: the part the
cgroups' empty watch and housekeeping's log watch share."""

from __future__ import annotations

import asyncio
import contextlib
import os

from ocp_agentd import linux


class InotifyReader:
    """Holds ``_fd``, -1 until ``_open`` makes it; the running event loop then calls
    ``_on_events()`` whenever events wait. A subclass reads them (linux.inotify_read)."""

    def __init__(self) -> None:
        self._fd = -1

    def _open(self) -> int:
        """The descriptor (non-blocking, close-on-exec), made and handed to the running
        event loop on first use. Raises OSError when it cannot be made (out of
        descriptors, or of inotify instances: fs.inotify.max_user_instances)."""
        if self._fd < 0:
            self._fd = linux.inotify_init()
            asyncio.get_running_loop().add_reader(self._fd, self._on_events)
        return self._fd

    def _close_fd(self) -> None:
        """Stops the event loop reading the descriptor and closes it (with every watch)."""
        if self._fd >= 0:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _on_events(self) -> None:
        raise NotImplementedError
