"""The merged filesystem: POSIX operations on merged paths, with overlayfs semantics.

:class:`Overlay` is what a FUSE transport (and the tests, in-process) call. It
never imports a FUSE binding: every operation takes a merged path (relative,
``""`` is the root), returns plain values and raises :class:`OSError` with the
errno the caller should see. It is a facade over the mount's state
(:class:`~pylayerfs.overlay.state.OverlayState`, which it extends): namespace
operations live in :mod:`.namespace`, merged listing in :mod:`.readdir`,
xattrs in :mod:`.xattrs`, copy-up in :mod:`.copy_up`; attribute and file
operations, which are one or two calls each, are here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import Any

from pylayerfs.overlay import namespace, readdir, realfs, xattrs
from pylayerfs.overlay.copy_up import copy_up
from pylayerfs.overlay.file import OpenFile
from pylayerfs.overlay.inode import attributes, stat_dict
from pylayerfs.overlay.layers import split
from pylayerfs.overlay.state import Caller, OverlayState

__all__ = ["Caller", "Overlay"]

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


def _requested_time(t: int, current: int, now: int) -> int:
    """libfuse passes UTIME_NOW / UTIME_OMIT as the nanoseconds of a zero second."""
    return now if t == UTIME_NOW else current if t == UTIME_OMIT else t


class Overlay(OverlayState):
    """One mounted stack (see :class:`OverlayState` for the arguments), with its POSIX operations.

    Every operation raises what the kernel's overlayfs would return for it: ENOENT and ENOTDIR from
    the lookup, EROFS for a write on a stack without an upper layer, EXDEV for the rename of a lower
    or merged directory, and the upper filesystem's own errors (ENOSPC, EDQUOT, EPERM...).
    """

    # -- attributes ----------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        of = self.files.get(fh) if fh is not None else None
        if of is not None and not (of.metacopy and path):  # a metacopy handle's metadata are the upper file's
            st = os.stat(of.fd)
            return stat_dict(st, of.ino, st.st_nlink)
        node = self.lookup.lookup(path)
        if node.upper_fd >= 0:  # a cached directory: its times and link count move
            node.upper = os.stat(node.upper_fd)
        return attributes(node, self.inodes.of_node(node))

    def readlink(self, path: str) -> str:
        node = self.lookup.lookup(path)
        if not stat.S_ISLNK(node.st.st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        with self.real(node) as (fd, name):
            assert name is not None
            return os.readlink(name, dir_fd=fd)

    def chmod(self, path: str, mode: int) -> None:
        with self._upper_object(path) as (fd, name):
            realfs.chmod(fd, name, stat.S_IMODE(mode))

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._upper_object(path) as (fd, name):
            realfs.chown(fd, name, uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        node = self.lookup.lookup(path)
        now = time.time_ns()
        if times is None:
            times = (now, now)
        atime = _requested_time(times[0], node.st.st_atime_ns, now)
        mtime = _requested_time(times[1], node.st.st_mtime_ns, now)
        with self._upper_object(path) as (fd, name):
            realfs.utime(fd, name, (atime, mtime))

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None:
            realfs.truncate(self.files.get(fh).fd, length)
            return
        node = copy_up(self, path, with_data=length > 0)
        if node.is_dir:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        assert self.upper is not None
        fd = self.upper.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            realfs.truncate(fd, length)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _upper_object(self, path: str) -> Iterator[tuple[int, str | None]]:
        """Copy ``path`` up for a metadata change; yield ``(dirfd, name)`` of its upper object (name None: dirfd)."""
        node = copy_up(self, path, meta_only=True)
        if node.upper_fd >= 0:  # a directory: use its own fd, its name may be ""
            yield node.upper_fd, None
            return
        parent = self.lookup.lookup(split(path)[0])
        yield parent.upper_fd, split(path)[1]

    def statfs(self) -> dict[str, int]:
        top = self.upper if self.upper is not None else self.lowers[0]
        sv = os.statvfs(top.fd)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail")
        return {key: getattr(sv, key) for key in keys} | {"f_namemax": sv.f_namemax}

    # -- files -----------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        """Open a file of the merged view; returns a file handle. Writes copy the file up first."""
        node = self.lookup.lookup(path)
        wants_write = bool(flags & _WRITE_FLAGS)
        real_flags = (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_NOFOLLOW
        special = not (stat.S_ISREG(node.st.st_mode) or stat.S_ISDIR(node.st.st_mode))
        if wants_write and not special:  # FIFOs, sockets and devices are never copied up
            node = copy_up(self, path, with_data=not flags & os.O_TRUNC)
        ino = self.inodes.of_node(node)
        data = node.data  # a metacopy file's data is in a layer below it
        fd = (data[0] if data else self.top_layer(node)).open(path, real_flags)
        on_lower = (node.upper is None or node.metacopy) and stat.S_ISREG(node.st.st_mode)
        return self.files.add(OpenFile(fd, path, ino, on_lower, data is not None))

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return os.pread(self.files.get(fh).fd, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return os.pwrite(self.files.get(fh).fd, data, offset)

    def fsync(self, fh: int, datasync: bool) -> None:
        of = self.files.get(fh)
        if of.on_lower:
            return  # nothing of ours to sync: lower files are never written
        (os.fdatasync if datasync else os.fsync)(of.fd)

    def release(self, fh: int) -> None:
        self.files.release(fh)

    # -- namespace, listing and xattrs (see the modules) ------------------------

    # Every change of a name drops the cached listings of its directory and below it (see readdir).

    def create(self, path: str, mode: int, flags: int, caller: Caller) -> int:
        self.listings.forget(path)
        return namespace.create(self, path, mode, flags, caller)

    def mknod(self, path: str, mode: int, rdev: int, caller: Caller) -> None:
        self.listings.forget(path)
        namespace.mknod(self, path, mode, rdev, caller)

    def mkdir(self, path: str, mode: int, caller: Caller) -> None:
        self.listings.forget(path)
        namespace.mkdir(self, path, mode, caller)

    def symlink(self, path: str, target: str, caller: Caller) -> None:
        self.listings.forget(path)
        namespace.symlink(self, path, target, caller)

    def link(self, old: str, new: str) -> None:
        self.listings.forget(new)
        namespace.link(self, old, new)

    def unlink(self, path: str) -> None:
        self.listings.forget(path)
        namespace.unlink(self, path)

    def rmdir(self, path: str) -> None:
        self.listings.forget(path)
        namespace.rmdir(self, path)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.listings.forget(old)
        self.listings.forget(new)
        namespace.rename(self, old, new, flags)

    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """``(name, st_mode type bits, st_ino)`` of every entry, ``.`` and ``..`` first."""
        return self.listings.get(path, lambda: readdir.merged_entries(self, path))

    def listxattr(self, path: str) -> list[str]:
        return xattrs.listxattr(self, path)

    def getxattr(self, path: str, name: str) -> bytes:
        return xattrs.getxattr(self, path, name)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        xattrs.setxattr(self, path, name, value, flags)

    def removexattr(self, path: str, name: str) -> None:
        xattrs.removexattr(self, path, name)
