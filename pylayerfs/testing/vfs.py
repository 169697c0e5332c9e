"""What the kernel's VFS does before a filesystem sees a request, for filesystems with no kernel in front.

A mount gets this for free: the kernel walks every path (following symlinks,
answering ENOENT, ENOTDIR or ELOOP), turns ``open(O_CREAT)`` into a create or
an open, refuses ``unlink`` of a directory (EISDIR) and a rename into its own
subtree (EINVAL), and handles FIFOs itself. The in-process engine and the
reference model see raw paths, so :class:`Vfs` does that work for them and
calls their primitives with resolved paths whose parent is a directory.

Symlink targets resolve relative to the link's directory, absolute ones
relative to the root: nothing here resolves outside the tree.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from pylayerfs.testing.ops import CREATE_MODE, DIR_MODE, RENAME_FLAGS, UMASK

MAX_SYMLINKS = 40  # the kernel's limit, then ELOOP
NOREPLACE, EXCHANGE = RENAME_FLAGS["noreplace"], RENAME_FLAGS["exchange"]


def fail(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent and name else parent or name


def within(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or below it."""
    return ancestor in ("", path) or path.startswith(ancestor + "/")


def _components(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise fail(errno.EACCES, path)  # the checker never generates '..': refuse rather than guess
    return parts


@dataclass
class _Open:
    """An open file description: what the kernel keeps for an fd (its handle, access mode and offset)."""

    handle: Any
    kind: int  # S_IFREG, S_IFDIR or S_IFIFO
    flags: int
    offset: int = 0

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_WRONLY

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class Vfs(ABC):
    """The :class:`~pylayerfs.testing.ops.FileSystem` calls, checked and resolved as the kernel does."""

    def __init__(self) -> None:
        self._fds: dict[int, _Open] = {}
        self._next_fd = itertools.count(3)
        self.held: dict[int, int] = {}

    # -- path walk -----------------------------------------------------------------

    def resolve(self, path: str, follow: bool) -> str:
        """The real path ``path`` names: intermediate symlinks followed, the last one if ``follow``.

        The parent of the result exists and is a directory; the result itself may not exist.
        """
        todo = _components(path)
        done = ""
        links = 0
        while todo:
            name = todo.pop(0)
            current = join(done, name)
            mode = self._mode(current)
            last = not todo
            if mode is not None and stat.S_ISLNK(mode) and (follow or not last):
                links += 1
                if links > MAX_SYMLINKS:
                    raise fail(errno.ELOOP, path)
                target = self._readlink(current)
                if target.startswith("/"):
                    done = ""
                todo = _components(target) + todo
                continue
            if last:
                return current
            if mode is None:
                raise fail(errno.ENOENT, path)
            if not stat.S_ISDIR(mode):
                raise fail(errno.ENOTDIR, path)
            done = current
        return done

    def _existing(self, path: str, follow: bool) -> tuple[str, int]:
        real = self.resolve(path, follow)
        mode = self._mode(real)
        if mode is None:
            raise fail(errno.ENOENT, path)
        return real, mode

    def _absent(self, path: str) -> str:
        real = self.resolve(path, follow=False)
        if self._mode(real) is not None:
            raise fail(errno.EEXIST, path)
        return real

    # -- FileSystem ------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        return self._stat(self._existing(path, False)[0])

    def stat(self, path: str) -> os.stat_result:
        return self._stat(self._existing(path, True)[0])

    def listdir(self, path: str) -> list[str]:
        real, mode = self._existing(path, True)
        if not stat.S_ISDIR(mode):
            raise fail(errno.ENOTDIR, path)
        return self._listdir(real)

    def readlink(self, path: str) -> str:
        real, mode = self._existing(path, False)
        if not stat.S_ISLNK(mode):
            raise fail(errno.EINVAL, path)
        return self._readlink(real)

    def open(self, path: str, flags: int, mode: int = CREATE_MODE) -> int:
        writes = flags & os.O_ACCMODE != os.O_RDONLY
        if flags & os.O_TMPFILE == os.O_TMPFILE:  # an unnamed file in the directory PATH
            directory, dir_mode = self._existing(path, True)
            if not stat.S_ISDIR(dir_mode):
                raise fail(errno.ENOTDIR, path)
            if not writes:
                raise fail(errno.EINVAL, path)
            return self._add(self._tmpfile(directory, mode & ~UMASK), stat.S_IFREG, flags)
        exclusive = flags & os.O_CREAT and flags & os.O_EXCL
        real = self.resolve(path, follow=not exclusive)
        kind = self._mode(real)
        if kind is None:
            if not flags & os.O_CREAT:
                raise fail(errno.ENOENT, path)
            return self._add(self._create(real, mode & ~UMASK, flags & os.O_ACCMODE), stat.S_IFREG, flags)
        if exclusive:
            raise fail(errno.EEXIST, path)
        if stat.S_ISDIR(kind) and (writes or flags & os.O_CREAT):
            raise fail(errno.EISDIR, path)
        if stat.S_ISFIFO(kind):
            if flags & os.O_ACCMODE == os.O_WRONLY:  # O_NONBLOCK and no reader (O_RDWR is a reader)
                raise fail(errno.ENXIO, path)
            return self._add(self._stat(real), stat.S_IFIFO, flags)
        if stat.S_ISDIR(kind):
            return self._add(self._stat(real), stat.S_IFDIR, flags)
        if stat.S_ISSOCK(kind):
            raise fail(errno.ENXIO, path)
        if not stat.S_ISREG(kind):  # the checker's devices are /dev/null: opened, they are an empty stream
            return self._add(self._stat(real), stat.S_IFIFO, flags)
        handle = self._open(real, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        if flags & os.O_TRUNC and writes:
            self._truncate(real, 0, handle)
        return self._add(handle, stat.S_IFREG, flags)

    def _add(self, handle: Any, kind: int, flags: int) -> int:
        """A new fd; a directory's or FIFO's handle is its stat (the checker keeps only files open)."""
        fd = next(self._next_fd)
        self._fds[fd] = _Open(handle, kind, flags)
        return fd

    def _file(self, fd: int, need: str = "") -> _Open:
        """The open file ``fd`` for an operation that needs it ``readable`` or ``writable`` (else EBADF)."""
        of = self._fds.get(fd)
        if of is None or (need and not getattr(of, need)):
            raise fail(errno.EBADF, "")
        return of

    def read(self, fd: int, size: int = 1 << 16) -> bytes:
        of = self._file(fd, "readable")
        if of.kind == stat.S_IFDIR:
            raise fail(errno.EISDIR, "")
        if of.kind == stat.S_IFIFO:
            return b""
        data = self._pread(of.handle, size, of.offset)
        of.offset += len(data)
        return data

    def write(self, fd: int, data: bytes) -> None:
        of = self._file(fd, "writable")
        if of.kind != stat.S_IFREG:  # /dev/null (a FIFO the checker holds only to close it)
            return
        if of.flags & os.O_APPEND:
            of.offset = self._fstat(of.handle).st_size
        self._pwrite(of.handle, data, of.offset)
        of.offset += len(data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        of = self._file(fd, "readable")
        if of.kind != stat.S_IFREG:
            raise fail(errno.EISDIR if of.kind == stat.S_IFDIR else errno.ESPIPE, "")
        return self._pread(of.handle, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        of = self._file(fd, "writable")
        if of.flags & os.O_APPEND:  # Linux appends whatever the offset (pwrite(2), BUGS)
            offset = self._fstat(of.handle).st_size
        self._pwrite(of.handle, data, offset)

    def fstat(self, fd: int) -> os.stat_result:
        of = self._file(fd)
        return self._fstat(of.handle) if of.kind == stat.S_IFREG else of.handle

    def fchmod(self, fd: int, mode: int) -> None:
        self._fchmod(self._file(fd).handle, mode)

    def fchown(self, fd: int, uid: int, gid: int) -> None:
        self._fchown(self._file(fd).handle, uid, gid)

    def futimens(self, fd: int, mtime_ns: int) -> None:
        self._futimens(self._file(fd).handle, mtime_ns)

    def ftruncate(self, fd: int, length: int) -> None:
        of = self._fds.get(fd)
        if of is None:
            raise fail(errno.EBADF, "")
        if not of.writable:  # do_ftruncate: EINVAL, not EBADF
            raise fail(errno.EINVAL, "")
        self._truncate(None, length, of.handle)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2): EINVAL for a negative offset or a length of 0 or less, before EBADF for a read-only fd
        (fs/open.c, ``vfs_fallocate``)."""
        of = self._file(fd)
        if offset < 0 or length <= 0:
            raise fail(errno.EINVAL, "")
        if not of.writable:
            raise fail(errno.EBADF, "")
        self._fallocate(of.handle, mode, offset, length)

    def fsync(self, fd: int) -> None:
        self._fsync(self._file(fd).handle)

    def close(self, fd: int) -> None:
        of = self._fds.pop(fd)
        if of.kind == stat.S_IFREG:
            self._release(of.handle)

    def truncate(self, path: str, length: int) -> None:
        real, kind = self._existing(path, True)
        if stat.S_ISDIR(kind):
            raise fail(errno.EISDIR, path)
        if not stat.S_ISREG(kind):
            raise fail(errno.EINVAL, path)
        self._truncate(real, length, None)

    def mkdir(self, path: str, mode: int = DIR_MODE) -> None:
        self._mkdir(self._absent(path), mode & ~UMASK)

    def mkfifo(self, path: str, mode: int = CREATE_MODE) -> None:
        self._mknod(self._absent(path), stat.S_IFIFO, mode & ~UMASK)

    def mknod(self, path: str, kind: int, mode: int = CREATE_MODE) -> None:
        real = self._absent(path)
        if kind == stat.S_IFCHR and os.geteuid() != 0:
            raise fail(errno.EPERM, path)
        self._mknod(real, kind, mode & ~UMASK)

    def symlink(self, target: str, path: str) -> None:
        self._symlink(target, self._absent(path))

    def rmdir(self, path: str) -> None:
        real, kind = self._existing(path, False)
        if not stat.S_ISDIR(kind):
            raise fail(errno.ENOTDIR, path)
        if real == "":
            raise fail(errno.EBUSY, path)
        self._rmdir(real)

    def unlink(self, path: str) -> None:
        real, kind = self._existing(path, False)
        if stat.S_ISDIR(kind):
            raise fail(errno.EISDIR, path)
        self._unlink(real)

    def link(self, old: str, new: str) -> None:
        real_old, kind = self._existing(old, False)
        real_new = self._absent(new)
        if stat.S_ISDIR(kind):
            raise fail(errno.EPERM, old)
        self._link(real_old, real_new)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """renameat2(2) up to the filesystem's own checks (do_renameat2 and vfs_rename)."""
        if flags & ~(NOREPLACE | EXCHANGE) or flags == NOREPLACE | EXCHANGE:
            raise fail(errno.EINVAL, old)
        real_old = self.resolve(old, follow=False)
        real_new = self.resolve(new, follow=False)
        kind = self._mode(real_old)
        if kind is None:
            raise fail(errno.ENOENT, old)
        new_kind = self._mode(real_new)
        if flags & NOREPLACE and new_kind is not None:
            raise fail(errno.EEXIST, new)
        if flags & EXCHANGE and new_kind is None:
            raise fail(errno.ENOENT, new)
        old_parent, new_parent = real_old.rpartition("/")[0], real_new.rpartition("/")[0]
        if old_parent != new_parent:  # lock_rename's trap: one directory is inside the other
            if within(new_parent, real_old):
                raise fail(errno.EINVAL, old)
            if within(old_parent, real_new):
                raise fail(errno.EINVAL if flags & EXCHANGE else errno.ENOTEMPTY, new)
        if new_kind is not None and self._same(real_old, real_new):
            return
        if new_kind is not None and not flags & EXCHANGE:
            if stat.S_ISDIR(kind) and not stat.S_ISDIR(new_kind):
                raise fail(errno.ENOTDIR, new)
            if not stat.S_ISDIR(kind) and stat.S_ISDIR(new_kind):
                raise fail(errno.EISDIR, new)
        self._rename(real_old, real_new, flags)

    def chmod(self, path: str, mode: int) -> None:
        self._chmod(self._existing(path, True)[0], mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self._chown(self._existing(path, True)[0], uid, gid)

    def utime(self, path: str, mtime_ns: int) -> None:
        self._utime(self._existing(path, True)[0], mtime_ns)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        real, kind = self._existing(path, True)
        if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
            raise fail(errno.EPERM, path)  # user.* xattrs live only on files and directories
        self._setxattr(real, name, value)

    def removexattr(self, path: str, name: str) -> None:
        real, kind = self._existing(path, True)
        if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
            raise fail(errno.EPERM, path)
        self._removexattr(real, name)

    def listxattr(self, path: str) -> list[str]:
        return self._listxattr(self._existing(path, False)[0])

    def getxattr(self, path: str, name: str) -> bytes:
        return self._getxattr(self._existing(path, False)[0], name)

    # -- the filesystem's primitives, on resolved paths ----------------------------------

    @abstractmethod
    def _mode(self, path: str) -> int | None: ...
    @abstractmethod
    def _stat(self, path: str) -> os.stat_result: ...
    @abstractmethod
    def _same(self, a: str, b: str) -> bool: ...
    @abstractmethod
    def _readlink(self, path: str) -> str: ...
    @abstractmethod
    def _listdir(self, path: str) -> list[str]: ...
    @abstractmethod
    def _create(self, path: str, mode: int, access: int) -> Any: ...
    @abstractmethod
    def _open(self, path: str, flags: int) -> Any: ...
    @abstractmethod
    def _tmpfile(self, directory: str, mode: int) -> Any: ...
    @abstractmethod
    def _pread(self, handle: Any, size: int, offset: int) -> bytes: ...
    @abstractmethod
    def _pwrite(self, handle: Any, data: bytes, offset: int) -> None: ...
    @abstractmethod
    def _fstat(self, handle: Any) -> os.stat_result: ...
    @abstractmethod
    def _fchmod(self, handle: Any, mode: int) -> None: ...
    @abstractmethod
    def _fchown(self, handle: Any, uid: int, gid: int) -> None: ...
    @abstractmethod
    def _futimens(self, handle: Any, mtime_ns: int) -> None: ...
    @abstractmethod
    def _fallocate(self, handle: Any, mode: int, offset: int, length: int) -> None: ...
    @abstractmethod
    def _fsync(self, handle: Any) -> None: ...
    @abstractmethod
    def _release(self, handle: Any) -> None: ...
    @abstractmethod
    def _truncate(self, path: str | None, length: int, handle: Any) -> None: ...
    @abstractmethod
    def _mkdir(self, path: str, mode: int) -> None: ...
    @abstractmethod
    def _mknod(self, path: str, kind: int, mode: int) -> None: ...
    @abstractmethod
    def _symlink(self, target: str, path: str) -> None: ...
    @abstractmethod
    def _rmdir(self, path: str) -> None: ...
    @abstractmethod
    def _unlink(self, path: str) -> None: ...
    @abstractmethod
    def _link(self, old: str, new: str) -> None: ...
    @abstractmethod
    def _rename(self, old: str, new: str, flags: int) -> None: ...
    @abstractmethod
    def _chmod(self, path: str, mode: int) -> None: ...
    @abstractmethod
    def _chown(self, path: str, uid: int, gid: int) -> None: ...
    @abstractmethod
    def _utime(self, path: str, mtime_ns: int) -> None: ...
    @abstractmethod
    def _setxattr(self, path: str, name: str, value: bytes) -> None: ...
    @abstractmethod
    def _removexattr(self, path: str, name: str) -> None: ...
    @abstractmethod
    def _listxattr(self, path: str) -> list[str]: ...
    @abstractmethod
    def _getxattr(self, path: str, name: str) -> bytes: ...
