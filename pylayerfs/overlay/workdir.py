"""The workdir: where copy-ups and whiteouts are built before they appear in the upper layer.

As in the kernel, the mount owns ``WORKDIR/work``: it is created (mode 0 when
running as root, as the kernel makes it) and emptied at every mount, so that
whatever a killed daemon left half-built there never becomes visible. Objects
are built under a temporary name (``#<pid>.<n>``) and then renamed into place:
a rename inside one filesystem is atomic, so no observer and no crash ever sees
a partial object.
"""

from __future__ import annotations

import contextlib
import itertools
import os

from pylayerfs.overlay import realfs

WORK_DIR = "work"


class Workdir:
    """The mount's ``WORKDIR/work``: prepared at mount (created, mode 0 as root, and emptied), then a place to build in.

    Raises ENOENT/ENOTDIR/EACCES opening ``root``, ELOOP when ``work`` is a symlink, ENOTDIR when it is not a directory,
    and the errors of removing what a killed daemon left there.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fd = self._prepare()
        self._names = itertools.count()

    def _prepare(self) -> int:
        """Create ``work/`` if needed and empty it; return an fd on it."""
        mode = 0 if os.geteuid() == 0 else 0o700
        with contextlib.suppress(FileExistsError):
            realfs.mkdir(self._root_fd, WORK_DIR, mode)
        fd = realfs.openat2(self._root_fd, WORK_DIR, os.O_RDONLY | os.O_DIRECTORY)
        for name in os.listdir(fd):
            realfs.rmtree(fd, name)
        return fd

    def temp_name(self) -> str:
        """A fresh temporary name in the workdir, ``#<pid>.<n>`` (both in hex), unique for the life of the mount."""
        return f"#{os.getpid():x}.{next(self._names):x}"

    def remove(self, name: str) -> None:
        """Remove ``name`` (a file, or a whole directory tree) from the workdir; raises ENOENT when it is not there."""
        realfs.rmtree(self.fd, name)

    def close(self) -> None:
        """Close the workdir's fds (``work/`` and the workdir itself)."""
        os.close(self.fd)
        os.close(self._root_fd)
