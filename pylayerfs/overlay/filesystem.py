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
from collections.abc import Iterable, Iterator
from typing import Any

from pylayerfs.overlay import namespace, readdir, realfs, xattrs
from pylayerfs.overlay.copy_up import CopyUp, copy_up, start_copy_up
from pylayerfs.overlay.file import OpenFile
from pylayerfs.overlay.inode import attributes, stat_dict
from pylayerfs.overlay.layers import Entry, split
from pylayerfs.overlay.lookup import Node
from pylayerfs.overlay.state import Caller, OverlayState

__all__ = ["Caller", "Overlay"]

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


def _requested_time(t: int, current: int, now: int) -> int:
    """libfuse passes UTIME_NOW / UTIME_OMIT as the nanoseconds of a zero second."""
    return now if t == UTIME_NOW else current if t == UTIME_OMIT else t


def _identity(st: os.stat_result | Entry) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Overlay(OverlayState):
    """One mounted stack (see :class:`OverlayState` for the arguments), with its POSIX operations.

    Every operation raises what the kernel's overlayfs would return for it: ENOENT and ENOTDIR from the lookup, EROFS
    for a write on a stack without an upper layer, EXDEV for the rename of a lower or merged directory, and the upper
    filesystem's own errors (ENOSPC, EDQUOT, EPERM...). The lookup also answers EPERM for a metacopy file without
    ``metacopy=on`` and EIO for one whose data is in no layer. A file handle ``fh`` that is not open raises KeyError (a
    caller's bug: the FUSE adapter answers EIO).
    """

    # -- attributes ----------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        """The ``struct stat`` of ``path``: a dict of ``st_*`` fields, times in nanoseconds (see ``inode.attributes``).

        With an open handle ``fh``, those of the open file (its ``fstat``, with the handle's ``st_ino``). Raises
        ENOENT/ENOTDIR as the lookup does, EPERM/EIO for a metacopy file the mount may not follow.
        """
        of = self.files.get(fh) if fh is not None else None
        if of is not None and not (of.metacopy and path):  # a metacopy handle's metadata are the upper file's
            st = os.stat(of.fd)
            return stat_dict(st, of.ino, 1 if of.merged_dir else st.st_nlink)
        return self._attributes(self.lookup.lookup(path))

    def getattr_entries(self, directory: str, names: Iterable[str]) -> Iterator[dict[str, Any] | None]:
        """:meth:`getattr` of each of ``names`` in ``directory`` (READDIRPLUS), the directory looked up once.

        Yields None for a name the merged view no longer has (or cannot look up: any OSError), so that one
        entry gone since the listing was made does not fail the rest. Raises ENOENT/ENOTDIR for ``directory``
        as the lookup does.
        """
        parent = self.lookup.lookup(directory)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
        for name in names:
            try:
                node = self.lookup.child(parent, name)
                attrs = None if node is None else self._attributes(node)
            except OSError:
                attrs = None
            yield attrs

    def _attributes(self, node: Node) -> dict[str, Any]:
        if node.upper_fd >= 0:  # a cached directory: its times and link count move
            node.upper = os.stat(node.upper_fd)
        return attributes(node, self.inodes.of_node(node))

    def readlink(self, path: str, fh: int | None = None) -> str:
        """The target of the symlink ``path`` (or of the one held as ``fh``: :meth:`hold`), as stored (never resolved).

        Raises EINVAL when ``path`` is not a symlink, ENOENT/ENOTDIR as the lookup does.
        """
        if fh is not None:
            return os.readlink("", dir_fd=self.files.get(fh).fd)  # readlinkat(2) of an O_PATH fd, empty path
        node = self.lookup.lookup(path)
        if not stat.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        with self.real(node) as (fd, name):
            assert name is not None
            return os.readlink(name, dir_fd=fd)

    def chmod(self, path: str, mode: int, fh: int | None = None) -> None:
        """Set the permission bits of ``path`` (``mode``'s, setuid/setgid/sticky included), copying it up first.

        The copy-up is of the metadata only with ``metacopy=on``. With an open handle ``fh``, those of the open file,
        which may have no name left (:meth:`upper_object_of`). Raises EOPNOTSUPP for a symlink (before any copy-up, as
        the kernel's VFS refuses it), EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup does, and the upper
        filesystem's errors (EPERM...).
        """
        if fh is not None:
            realfs.chmod(self.upper_object_of(fh), None, stat.S_IMODE(mode))
            return
        if stat.S_ISLNK(self.lookup.lookup(path).mode):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), path)
        with self._upper_object(path) as (fd, name):
            realfs.chmod(fd, name, stat.S_IMODE(mode))

    def chown(self, path: str, uid: int, gid: int, fh: int | None = None) -> None:
        """Set the owner and group of ``path`` (-1 keeps one), copying it up first (metadata only with ``metacopy=on``).

        With an open handle ``fh``, those of the open file (see :meth:`chmod`). Raises EROFS on a read-only stack,
        ENOENT/ENOTDIR as the lookup does, and the upper filesystem's errors (EPERM...).
        """
        if fh is not None:
            realfs.chown(self.upper_object_of(fh), None, uid, gid)
            return
        with self._upper_object(path) as (fd, name):
            realfs.chown(fd, name, uid, gid)

    def utimens(self, path: str, times: tuple[int, int] | None = None, fh: int | None = None) -> None:
        """Set atime and mtime of ``path``, copying it up first (metadata only with ``metacopy=on``).

        ``times`` = ``(atime, mtime)`` in nanoseconds, UTIME_NOW/UTIME_OMIT as libfuse passes them; None: both now.
        With an open handle ``fh``, those of the open file (see :meth:`chmod`). Raises EROFS on a read-only stack,
        ENOENT/ENOTDIR as the lookup does, and the upper filesystem's errors.
        """
        now = time.time_ns()
        if times is None:
            times = (now, now)
        if fh is not None:
            fd = self.upper_object_of(fh)
            st = os.stat(fd)
            realfs.utime(
                fd,
                None,
                (_requested_time(times[0], st.st_atime_ns, now), _requested_time(times[1], st.st_mtime_ns, now)),
            )
            return
        node = self.lookup.lookup(path)
        atime = _requested_time(times[0], node.st.st_atime_ns, now)
        mtime = _requested_time(times[1], node.st.st_mtime_ns, now)
        with self._upper_object(path) as (fd, name):
            realfs.utime(fd, name, (atime, mtime))

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        """Set the size of ``path`` to ``length`` bytes, through the open handle ``fh`` if one is given.

        With ``fh`` it is the open file's ``ftruncate``, which sets mtime and ctime in any case. Without, ``path`` is
        copied up with its data, as the kernel does, and the upper file gets ``truncate(2)`` (``realfs.truncate_at``):
        whether its times change when its size does not is the upper filesystem's decision, as under the kernel's
        overlayfs. Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup does, EISDIR for a directory (after
        its copy-up), and the upper filesystem's errors (EFBIG, ENOSPC...); with ``fh``, EINVAL for a handle not open
        for writing. The VFS refuses other non-regular files (EINVAL) before asking.
        """
        if fh is not None:
            of = self.files.get(fh)
            if of.held:  # truncate(2) of /proc/self/fd/N: the object itself, an upper one only
                os.truncate(realfs.fd_path(self.upper_object_of(fh)), length)
            else:
                realfs.truncate(of.fd, length)
            return
        node = copy_up(self, path)
        if node.is_dir:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        with self.real(node) as (fd, name):
            assert name is not None
            realfs.truncate_at(fd, name, length)

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
        """``statvfs`` of the upper layer's filesystem (the top lower layer's on a read-only stack), as a dict.

        ``f_bsize``, ``f_frsize`` (bytes), ``f_blocks``/``f_bfree``/``f_bavail`` (in ``f_frsize`` units),
        ``f_files``/``f_ffree``/``f_favail``, ``f_namemax``; raises ``statvfs(2)``'s errors (EIO).
        """
        top = self.upper if self.upper is not None else self.lowers[0]
        sv = os.statvfs(top.fd)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail")
        return {key: getattr(sv, key) for key in keys} | {"f_namemax": sv.f_namemax}

    # -- files -----------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        """Open ``path`` with the ``open(2)`` ``flags``; return the file handle (the real fd's number).

        An open for writing (``O_WRONLY``, ``O_RDWR``, ``O_TRUNC``) copies a regular file or directory up first (without
        data for ``O_TRUNC``); FIFOs, sockets and devices are opened where they are. ``O_CREAT``/``O_EXCL`` are dropped
        (creating is :meth:`create`'s). Raises ENOENT/ENOTDIR as the lookup does, EROFS for a write open on a read-only
        stack (FIFOs, sockets and devices aside), EISDIR for a directory opened for writing, ELOOP for a symlink (the
        VFS follows them before asking), and ``open(2)``'s errors on the real file (ENXIO for a FIFO without a reader
        and ``O_NONBLOCK``...).
        """
        node = self.lookup.lookup(path)
        wants_write = bool(flags & _WRITE_FLAGS)
        real_flags = (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_NOFOLLOW
        special = not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode))
        if wants_write and not special:  # FIFOs, sockets and devices are never copied up
            node = copy_up(self, path, with_data=not flags & os.O_TRUNC)
        ino = self.inodes.of_node(node)
        data = node.data  # a metacopy file's data is in a layer below it
        layer, real_path = (data.layer, data.path) if data else self.top_object(node)
        fd = layer.open(real_path, real_flags)
        on_lower = (node.upper is None or node.metacopy) and stat.S_ISREG(node.mode)
        return self.files.add(OpenFile(fd, path, ino, on_lower, data is not None))

    def hold(self, path: str) -> int:
        """Keep the object at ``path`` reachable after its names are gone; return a handle on it.

        The handle holds an ``O_PATH`` fd on the object's real upper or lower object (its metadata: ``getattr``,
        ``chmod``... with ``fh``; :meth:`reopen` opens it again), as the kernel's dentry holds its inode: the FUSE
        transport holds a node the kernel still knows before removing or replacing its last name, so that an
        ``O_PATH`` descriptor, a ``/proc/self/fd/N`` reopened, or a process opening the name while another renames a
        file over it still reach the old object. The fd also keeps the object's ``st_ino`` from being reused while
        held. :meth:`release` drops it. Raises ENOENT/ENOTDIR as the lookup does.
        """
        node = self.lookup.lookup(path)
        layer, real_path = self.top_object(node)
        fd = layer.open(real_path, os.O_PATH | os.O_NOFOLLOW)
        on_lower = node.upper is None or node.metacopy
        held = OpenFile(fd, path, self.inodes.of_node(node), on_lower, node.metacopy, held=True,
                        merged_dir=node.is_merged and node.is_dir)  # fmt: skip
        return self.files.add(held, named=False)

    def reopen(self, fh: int, flags: int) -> int:
        """Open the object held as ``fh`` (:meth:`hold`) again with the ``open(2)`` ``flags``; return the new handle.

        Through the fd's ``/proc/self/fd`` link, as the kernel opens ``/proc/self/fd/N`` of an ``O_PATH`` descriptor. An
        upper object opens for reading and writing; a lower one (never copied up) only for reading: its copy-up without
        a name fails, and the kernel's overlayfs answers EEXIST there (its copy-up meets the whiteout), as this does.
        Raises EEXIST so, ENOENT for a metacopy file (its data have no name left), and ``open(2)``'s errors (ELOOP for a
        symlink, EISDIR...). Raises KeyError for a handle that is not open.
        """
        of = self.files.get(fh)
        if of.metacopy:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), of.path)
        if of.on_lower and flags & _WRITE_FLAGS:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), of.path)
        fd = os.open(realfs.fd_path(of.fd), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW) | os.O_CLOEXEC)
        return self.files.add(OpenFile(fd, of.path, of.ino, of.on_lower), named=False)

    def open_copy_up(self, path: str, flags: int, min_size: int = 0) -> CopyUp | None:
        """The data copy-up :meth:`open` of ``path`` with ``flags`` would make, begun (see :meth:`copy_up_ahead`).

        None when the open copies no data: not for writing, ``O_TRUNC``, not a regular file, already in the upper
        layer, or fewer than ``min_size`` bytes. Raises as :meth:`copy_up_ahead`.
        """
        if not flags & _WRITE_FLAGS or flags & os.O_TRUNC:
            return None
        return self.copy_up_ahead(path, min_size=min_size)

    def copy_up_ahead(self, path: str, *, meta_only: bool = False, min_size: int = 0) -> CopyUp | None:
        """The data copy-up a change of ``path`` makes before anything else, begun (see :class:`CopyUp`); else None.

        For a transport that runs the data copy off its loop: it calls :meth:`CopyUp.copy_data` (any thread),
        :meth:`CopyUp.install` (here), then the change itself, which finds the upper copy. ``meta_only`` is the
        change's kind (True for a metadata change: chmod, chown, times, xattrs; False for one that needs the data:
        open for writing, truncate, link, rename). None, with nothing begun, when the change copies no data: not a
        regular file, already in the upper layer (a metacopy file for a data change apart), a metadata change with
        ``metacopy=on``, or fewer than ``min_size`` bytes to copy. Raises ENOENT/ENOTDIR as the lookup does, EROFS
        on a read-only stack, and what copy-up raises for the ancestors.
        """
        node = self.lookup.lookup(path)
        if not stat.S_ISREG(node.mode) or (node.upper is not None and (meta_only or not node.metacopy)):
            return None  # nothing to copy (the rule of copy_up's own first step, without looking it up again)
        if (meta_only and self.metacopy) or node.st.st_size < min_size:
            return None
        return start_copy_up(self, path, meta_only=meta_only)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes of the open file ``fh`` from byte ``offset`` (fewer at its end, ``b""`` past it).

        Raises EBADF for a handle opened write-only, EISDIR for a directory, and ``pread(2)``'s errors (EIO...).
        """
        return os.pread(self.files.get(fh).fd, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        """Write ``data`` to the open file ``fh`` at byte ``offset``; return the number of bytes written.

        Raises EBADF for a handle opened read-only, and the upper filesystem's errors (ENOSPC, EDQUOT, EFBIG...).
        """
        return os.pwrite(self.files.get(fh).fd, data, offset)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` on the open file ``fh``: ``mode`` (0, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE...) and range.

        A handle open for writing is on the upper file (the open copied it up). Raises EBADF for a handle on a lower
        file (opened read-only: the kernel refuses before asking), EOPNOTSUPP for a mode the upper filesystem does not
        support, EINVAL, ENOSPC, EFBIG.
        """
        of = self.files.get(fh)
        if of.on_lower or of.metacopy:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF), of.path)
        realfs.fallocate(of.fd, mode, offset, length)

    def handles(self, path: str) -> list[int]:
        """The open handles on the object at ``path`` (by the real object they hold, whatever name they were opened by).

        Raises ENOENT/ENOTDIR as the lookup does.
        """
        node = self.lookup.lookup(path)
        reals = {_identity(node.st)} | ({_identity(node.data.entry)} if node.data is not None else set())
        return self.files.matching(lambda fd: _identity(os.fstat(fd)) in reals)

    def fsync(self, fh: int, datasync: bool) -> None:
        """Flush the open file ``fh`` to disk (its data only with ``datasync``); a no-op for a handle on a lower file.

        Raises ``fsync(2)``'s errors (EIO, ENOSPC, EDQUOT).
        """
        of = self.files.get(fh)
        if of.on_lower:
            return  # nothing of ours to sync: lower files are never written
        (os.fdatasync if datasync else os.fsync)(of.fd)

    def release(self, fh: int) -> None:
        """Close the open file ``fh`` (its handle number may then be reused)."""
        self.files.release(fh)

    # -- namespace, listing and xattrs (see the modules) ------------------------

    # Every change of a name drops the cached listings of its directory and below it (see readdir).

    def create(self, path: str, mode: int, flags: int, caller: Caller) -> int:
        """Create and open the regular file ``path`` (permission bits of ``mode``, owner ``caller``); its file handle.

        Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup of the parent does, EEXIST when the merged view
        has ``path``, and the upper filesystem's errors (ENOSPC, EDQUOT...). See :func:`.namespace.create`.
        """
        self.listings.forget(path)
        return namespace.create(self, path, mode, flags, caller)

    def tmpfile(self, directory: str, mode: int, flags: int, caller: Caller) -> int:
        """Make and open an unnamed regular file in ``directory`` (``O_TMPFILE``); return its file handle.

        The file is made in the upper directory (copied up first), owned by ``caller``, with the permission bits of
        ``mode`` and ``st_nlink`` 0; :meth:`link_handle` names it. Raises EROFS on a read-only stack, ENOENT/ENOTDIR as
        the lookup does, ENOTDIR for a non-directory, EINVAL for a read-only open, EOPNOTSUPP where the upper
        filesystem has no ``O_TMPFILE``, and its errors (ENOSPC, EDQUOT...). See :func:`.namespace.tmpfile`.
        """
        return namespace.tmpfile(self, directory, mode, flags, caller)

    def link_handle(self, fh: int, new: str) -> None:
        """Give the file open as ``fh`` (made by :meth:`tmpfile`, so nameless) the name ``new``.

        Raises ENOENT for a handle on a lower file or a file that may not be linked (``O_EXCL``), EROFS, EEXIST when
        the merged view has ``new``, ENOENT/ENOTDIR as the lookup of its parent does, and the upper filesystem's errors
        (EMLINK, ENOSPC...). See :func:`.namespace.link_open`.
        """
        self.listings.forget(new)
        namespace.link_open(self, fh, new)

    def mknod(self, path: str, mode: int, rdev: int, caller: Caller) -> None:
        """Create the FIFO, socket or device ``path`` (``mode`` with its type bits, device ``rdev``), for ``caller``.

        Raises EPERM for a character device 0/0 (a whiteout) or a device the daemon may not make, EROFS, ENOENT/ENOTDIR
        as the lookup of the parent does, EEXIST, and the upper filesystem's errors.
        """
        self.listings.forget(path)
        namespace.mknod(self, path, mode, rdev, caller)

    def mkdir(self, path: str, mode: int, caller: Caller) -> None:
        """Create the directory ``path`` (permission bits of ``mode``, owner ``caller``); opaque over a whiteout.

        Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup of the parent does, EEXIST when the merged view
        has ``path``, and the upper filesystem's errors (EMLINK, ENOSPC, EDQUOT...).
        """
        self.listings.forget(path)
        namespace.mkdir(self, path, mode, caller)

    def symlink(self, path: str, target: str, caller: Caller) -> None:
        """Create the symlink ``path`` pointing to ``target`` (stored as given), owned by ``caller``.

        Raises EROFS, ENOENT/ENOTDIR as the lookup of the parent does, EEXIST, ENAMETOOLONG for a target too long, and
        the upper filesystem's errors.
        """
        self.listings.forget(path)
        namespace.symlink(self, path, target, caller)

    def link(self, old: str, new: str) -> None:
        """Make ``new`` a hard link to ``old`` (copied up first).

        Raises ENOENT/ENOTDIR as the lookup of ``old`` (and of ``new``'s parent) does, EPERM for a directory, EROFS on a
        read-only stack, EEXIST when the merged view has ``new``, and the upper filesystem's errors (EMLINK, ENOSPC...).
        """
        self.listings.forget(new)
        namespace.link(self, old, new)

    def unlink(self, path: str) -> None:
        """Remove the non-directory ``path`` (a whiteout stays where a lower layer holds it).

        Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup does, EISDIR for a directory.
        """
        self.listings.forget(path)
        namespace.unlink(self, path)

    def rmdir(self, path: str) -> None:
        """Remove the directory ``path`` if it shows no entry (a whiteout stays where a lower layer holds it).

        Raises EROFS on a read-only stack, EBUSY for the root, ENOENT/ENOTDIR as the lookup does, ENOTDIR for a
        non-directory, ENOTEMPTY when it shows an entry.
        """
        self.listings.forget(path)
        namespace.rmdir(self, path)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """Rename ``old`` to ``new``; ``flags``: RENAME_NOREPLACE or RENAME_EXCHANGE.

        Raises EROFS on a read-only stack, EINVAL for other flags, ENOENT/ENOTDIR as the lookups do, EEXIST (NOREPLACE),
        ENOTDIR/EISDIR for a directory against a non-directory, EXDEV for a lower or merged directory, ENOTEMPTY over a
        directory that shows entries. See :func:`.namespace.rename`.
        """
        self.listings.forget(old)
        self.listings.forget(new)
        namespace.rename(self, old, new, flags)

    def readdir(self, path: str) -> list[tuple[str, int, int]]:
        """``(name, st_mode type bits, st_ino)`` of every entry of directory ``path``, ``.`` and ``..`` first.

        Cached until a name in or above the directory changes. Raises ENOTDIR for a non-directory, ENOENT/ENOTDIR as the
        lookup does.
        """
        return self.listings.get(path, lambda: readdir.merged_entries(self, path))

    def listxattr(self, path: str, fh: int | None = None) -> list[str]:
        """The xattr names of ``path`` as the merged view shows them (overlay's private ones hidden).

        Raises ENOENT/ENOTDIR as the lookup does.
        With ``fh``, those of that handle's object, which may have no name (see :mod:`.xattrs`).
        """
        return xattrs.listxattr(self, path, fh)

    def getxattr(self, path: str, name: str, fh: int | None = None) -> bytes:
        """The value (bytes) of the xattr ``name`` of ``path``.

        Raises ENODATA when it is not set (overlay's private xattrs read as not set), ENOTSUP where the layer keeps no
        such xattrs, ENOENT/ENOTDIR as the lookup does.
        With ``fh``, those of that handle's object, which may have no name (see :mod:`.xattrs`).
        """
        return xattrs.getxattr(self, path, name, fh)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0, fh: int | None = None) -> None:
        """Set the xattr ``name`` of ``path`` to ``value`` (``flags``: XATTR_CREATE/XATTR_REPLACE), copying it up.

        Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup does, EEXIST/ENODATA for the flags, ENOTSUP,
        EPERM for ``user.*`` on a symlink or special file, E2BIG/ENOSPC.
        With ``fh``, those of that handle's object, which may have no name (see :mod:`.xattrs`).
        """
        xattrs.setxattr(self, path, name, value, flags, fh)

    def removexattr(self, path: str, name: str, fh: int | None = None) -> None:
        """Remove the xattr ``name`` of ``path``, copying it up first.

        Raises ENODATA when it is not set (before any copy-up), EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup
        does.
        With ``fh``, those of that handle's object, which may have no name (see :mod:`.xattrs`).
        """
        xattrs.removexattr(self, path, name, fh)
