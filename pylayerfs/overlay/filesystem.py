"""The merged filesystem: POSIX operations on merged paths, with overlayfs semantics.

:class:`Overlay` is what the FUSE adapter (and the tests, in-process) call. It
never imports the FUSE binding: every operation takes a merged path (relative,
``""`` is the root), returns plain values and raises :class:`OSError` with the
errno the caller should see. Namespace operations live in :mod:`pylayerfs.overlay.namespace`,
merged listing in :mod:`pylayerfs.overlay.readdir`, xattrs in :mod:`pylayerfs.overlay.xattrs`;
this module holds the mount's state, the inode and file operations.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pylayerfs.overlay import namespace as dir_ops
from pylayerfs.overlay import readdir, xattrs
from pylayerfs.overlay.copy_up import copy_up
from pylayerfs.overlay.file import OpenFile, OpenFiles
from pylayerfs.overlay.inode import InodeNumbers, attributes, stat_dict
from pylayerfs.overlay.layers import Layer, LowerLayer, split
from pylayerfs.overlay.lookup import Lookup, Node
from pylayerfs.overlay.markers import TRUSTED_PREFIX, USER_PREFIX, Markers
from pylayerfs.overlay.workdir import Workdir

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: new objects are owned by the caller, as in the kernel."""

    uid: int
    gid: int

    @classmethod
    def me(cls) -> Caller:
        return cls(os.geteuid(), os.getegid())


def _requested_time(t: int, current: int, now: int) -> int:
    """libfuse passes UTIME_NOW / UTIME_OMIT as the nanoseconds of a zero second."""
    return now if t == UTIME_NOW else current if t == UTIME_OMIT else t


def erofs(path: str) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), path)


class Overlay:
    """One mounted stack: an optional upper layer with its workdir, and lower layers top-first."""

    def __init__(
        self,
        lowerdirs: list[str],
        upperdir: str | None = None,
        workdir: str | None = None,
        *,
        userxattr: bool = False,
        metacopy: bool = False,
    ) -> None:
        if (upperdir is None) != (workdir is None):
            raise ValueError("upperdir and workdir go together")
        self.markers = Markers(USER_PREFIX if userxattr else TRUSTED_PREFIX)
        self.upper = Layer(0, upperdir) if upperdir is not None else None
        self.lowers = [LowerLayer(i, d, self.markers) for i, d in enumerate(lowerdirs, start=1)]
        self.workdir = Workdir(workdir) if workdir is not None else None
        self.metacopy = metacopy
        self.lookup = Lookup(self.upper, self.lowers, self.markers, metacopy)
        layer_fds = ([self.upper.fd] if self.upper else []) + [layer.fd for layer in self.lowers]
        self.inodes = InodeNumbers(layer_fds)
        self.files = OpenFiles()
        self.listings = readdir.Listings()

    def close(self) -> None:
        """Close every fd the overlay holds (idempotent)."""
        if self.files is None:
            return
        self.files.close_all()
        self.lookup.invalidate_all()
        for layer in [self.upper, *self.lowers]:
            if layer is not None:
                layer.close()
        if self.workdir is not None:
            self.workdir.close()
        self.files = None  # type: ignore[assignment]

    # -- helpers shared by the operation modules ---------------------------------

    def writable(self, path: str) -> tuple[Layer, Workdir]:
        """The upper layer and workdir, or EROFS on a read-only (lowers only) mount."""
        if self.upper is None or self.workdir is None:
            raise erofs(path)
        return self.upper, self.workdir

    def copy_up(self, path: str, *, with_data: bool = True, meta_only: bool = False) -> Node:
        self.writable(path)
        return copy_up(self, path, with_data=with_data, meta_only=meta_only)

    def top_layer(self, node: Node) -> Layer:
        """The layer whose object the merged view shows for ``node``."""
        if node.upper is not None:
            assert self.upper is not None
            return self.upper
        return node.lower.hits[0][0]

    @contextlib.contextmanager
    def real(self, node: Node) -> Iterator[tuple[int, str | None]]:
        """``(dirfd, name)`` naming the top real object of ``node`` (name None: the directory itself)."""
        if node.upper_fd >= 0:
            yield node.upper_fd, None
            return
        layer = self.top_layer(node)
        if not node.path:
            yield layer.fd, None
            return
        if node.upper is not None:  # in an upper directory: its cached node holds an fd on it
            parent_path, name = split(node.path)
            parent = self.lookup.lookup(parent_path)
            if parent.upper_fd >= 0:
                yield parent.upper_fd, name
                return
        with layer.parent(node.path) as (fd, name):
            yield fd, name

    def upper_parent(self, path: str) -> tuple[Node, str]:
        """Copy up the parent directory of ``path``; return it and the last component."""
        parent_path, name = split(path)
        parent = self.lookup.lookup(parent_path)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        return self.copy_up(parent_path), name

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
            os.chmod(name, stat.S_IMODE(mode), dir_fd=fd, follow_symlinks=False)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self._upper_object(path) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        node = self.lookup.lookup(path)
        now = time.time_ns()
        if times is None:
            times = (now, now)
        atime = _requested_time(times[0], node.st.st_atime_ns, now)
        mtime = _requested_time(times[1], node.st.st_mtime_ns, now)
        with self._upper_object(path) as (fd, name):
            os.utime(name, ns=(atime, mtime), dir_fd=fd, follow_symlinks=False)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None:
            os.ftruncate(self.files.get(fh).fd, length)
            return
        node = self.copy_up(path, with_data=length > 0)
        if node.is_dir:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        assert self.upper is not None
        fd = self.upper.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _upper_object(self, path: str) -> Iterator[tuple[int, str]]:
        """Copy ``path`` up for a metadata change; yield ``(parent fd, name)`` of its upper object (``*at`` calls)."""
        node = self.copy_up(path, meta_only=True)
        if node.upper_fd >= 0:  # a directory: use its own fd, its name may be ""
            yield node.upper_fd, "."
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
            node = self.copy_up(path, with_data=not flags & os.O_TRUNC)
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
        return dir_ops.create(self, path, mode, flags, caller)

    def mknod(self, path: str, mode: int, rdev: int, caller: Caller) -> None:
        self.listings.forget(path)
        dir_ops.mknod(self, path, mode, rdev, caller)

    def mkdir(self, path: str, mode: int, caller: Caller) -> None:
        self.listings.forget(path)
        dir_ops.mkdir(self, path, mode, caller)

    def symlink(self, path: str, target: str, caller: Caller) -> None:
        self.listings.forget(path)
        dir_ops.symlink(self, path, target, caller)

    def link(self, old: str, new: str) -> None:
        self.listings.forget(new)
        dir_ops.link(self, old, new)

    def unlink(self, path: str) -> None:
        self.listings.forget(path)
        dir_ops.unlink(self, path)

    def rmdir(self, path: str) -> None:
        self.listings.forget(path)
        dir_ops.rmdir(self, path)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        self.listings.forget(old)
        self.listings.forget(new)
        dir_ops.rename(self, old, new, flags)

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
