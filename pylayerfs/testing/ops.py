"""The operations the checker runs, and how it reads a tree back.

Every operation is a small frozen dataclass with a one-line text form
(``rename a b/c exchange``) and a ``run`` method that performs it on a
:class:`FileSystem` and returns its outcome as a string: ``ok``, ``ok: VALUE``
or the errno's name (``ENOENT``). The same code runs against a mount
(:class:`OsFileSystem`), the in-process engine and the reference model.

This module imports nothing but the standard library: a reproduction script
embeds it verbatim and runs ``python3 ops.py MERGED`` with the operations on
standard input, so a person sees exactly what the checker did.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import shlex
import stat
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol

RENAME_FLAGS = {"": 0, "noreplace": 1, "exchange": 2}  # RENAME_NOREPLACE, RENAME_EXCHANGE
# How Open opens: the open(2) flags behind each mode letter (shell: > >> set -C ...).
OPEN_MODES = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
    "r+": os.O_WRONLY,
    "t": os.O_WRONLY | os.O_TRUNC,
}
OPEN_EXTRA = os.O_NONBLOCK | os.O_NOCTTY  # a FIFO must not block the checker
# How FdOpen opens a descriptor it keeps across steps.
FD_FLAGS = {
    "r": os.O_RDONLY,
    "rw": os.O_RDWR | os.O_CREAT,
    "append": os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    "trunc": os.O_RDWR | os.O_TRUNC,
    "tmpfile": os.O_RDWR | os.O_TMPFILE,  # PATH is the directory the unnamed file is made in
}
SLOTS = (0, 1, 2)  # the descriptors a scenario keeps open, by number
FD_READ = 4  # bytes a read through a kept descriptor asks for: small, so the offset matters
# fallocate(2) modes (linux/falloc.h); ZERO_RANGE is left out: tmpfs refuses it and ext4 does not.
FALLOCATE_MODES = {"alloc": 0, "keep": 0x01, "punch": 0x02 | 0x01}
MKNOD_TYPES = {"c": stat.S_IFCHR, "s": stat.S_IFSOCK}
NULL_DEVICE = os.makedev(1, 3)  # what mknod c makes: /dev/null's numbers (0, 0 would be a whiteout)
CREATE_MODE = 0o666  # what open(O_CREAT) and mkfifo ask for; the umask takes its bits away
DIR_MODE = 0o777
UMASK = 0o022
PINNED_BEFORE = 1_500_000_000  # seconds: a time earlier than this was set on purpose, later is "new"
NEW = -1


class FileSystem(Protocol):
    """What an operation needs of a filesystem: os-style calls on paths relative to its root.

    Calls follow symlinks in the final component exactly where the os call
    does (``lstat``, ``readlink``, ``unlink``, ``rename``, ``link`` do not).
    """

    held: dict[int, int]  # the descriptors kept across steps: slot -> fd

    def lstat(self, path: str) -> os.stat_result: ...
    def stat(self, path: str) -> os.stat_result: ...
    def listdir(self, path: str) -> list[str]: ...
    def readlink(self, path: str) -> str: ...
    def open(self, path: str, flags: int, mode: int = CREATE_MODE) -> int: ...
    def read(self, fd: int, size: int = 1 << 16) -> bytes: ...
    def write(self, fd: int, data: bytes) -> None: ...
    def pread(self, fd: int, size: int, offset: int) -> bytes: ...
    def pwrite(self, fd: int, data: bytes, offset: int) -> None: ...
    def fstat(self, fd: int) -> os.stat_result: ...
    def fchmod(self, fd: int, mode: int) -> None: ...
    def fchown(self, fd: int, uid: int, gid: int) -> None: ...
    def futimens(self, fd: int, mtime_ns: int) -> None: ...
    def ftruncate(self, fd: int, length: int) -> None: ...
    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None: ...
    def fsync(self, fd: int) -> None: ...
    def close(self, fd: int) -> None: ...
    def truncate(self, path: str, length: int) -> None: ...
    def mkdir(self, path: str, mode: int = DIR_MODE) -> None: ...
    def mkfifo(self, path: str, mode: int = CREATE_MODE) -> None: ...
    def mknod(self, path: str, kind: int, mode: int = CREATE_MODE) -> None: ...
    def rmdir(self, path: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def symlink(self, target: str, path: str) -> None: ...
    def link(self, old: str, new: str) -> None: ...
    def rename(self, old: str, new: str, flags: int = 0) -> None: ...
    def chmod(self, path: str, mode: int) -> None: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...
    def utime(self, path: str, mtime_ns: int) -> None: ...
    def setxattr(self, path: str, name: str, value: bytes) -> None: ...
    def removexattr(self, path: str, name: str) -> None: ...
    def listxattr(self, path: str) -> list[str]: ...
    def getxattr(self, path: str, name: str) -> bytes: ...


class OsFileSystem:
    """A mounted tree, through the real system calls."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.held: dict[int, int] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        self._renameat2 = libc.renameat2
        self._fallocate = libc.fallocate
        self._fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path) if path else self.root

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(self._p(path))

    def stat(self, path: str) -> os.stat_result:
        return os.stat(self._p(path))

    def listdir(self, path: str) -> list[str]:
        return os.listdir(self._p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self._p(path))

    def open(self, path: str, flags: int, mode: int = CREATE_MODE) -> int:
        return os.open(self._p(path), flags, mode)

    def read(self, fd: int, size: int = 1 << 16) -> bytes:
        return os.read(fd, size)

    def write(self, fd: int, data: bytes) -> None:
        os.write(fd, data)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        os.pwrite(fd, data, offset)

    def fstat(self, fd: int) -> os.stat_result:
        return os.fstat(fd)

    def fchmod(self, fd: int, mode: int) -> None:
        os.fchmod(fd, mode)

    def fchown(self, fd: int, uid: int, gid: int) -> None:
        os.fchown(fd, uid, gid)

    def futimens(self, fd: int, mtime_ns: int) -> None:
        os.utime(fd, ns=(mtime_ns, mtime_ns))

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        if self._fallocate(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def truncate(self, path: str, length: int) -> None:
        os.truncate(self._p(path), length)

    def mkdir(self, path: str, mode: int = DIR_MODE) -> None:
        os.mkdir(self._p(path), mode)

    def mkfifo(self, path: str, mode: int = CREATE_MODE) -> None:
        os.mkfifo(self._p(path), mode)

    def mknod(self, path: str, kind: int, mode: int = CREATE_MODE) -> None:
        os.mknod(self._p(path), kind | mode, NULL_DEVICE if kind == stat.S_IFCHR else 0)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self._p(path))

    def link(self, old: str, new: str) -> None:
        os.link(self._p(old), self._p(new), follow_symlinks=False)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if not flags:
            os.rename(self._p(old), self._p(new))
            return
        at_fdcwd = -100
        if self._renameat2(at_fdcwd, os.fsencode(self._p(old)), at_fdcwd, os.fsencode(self._p(new)), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), old)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._p(path), uid, gid)

    def utime(self, path: str, mtime_ns: int) -> None:
        os.utime(self._p(path), ns=(mtime_ns, mtime_ns))

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self._p(path), name, value)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._p(path), name)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._p(path), follow_symlinks=False)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._p(path), name, follow_symlinks=False)


def outcome(fn: Any, *args: Any) -> str:
    """``ok``, ``ok: VALUE`` or the errno's name."""
    try:
        value = fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    return "ok" if value is None else f"ok: {value}"


@dataclass(frozen=True)
class Op(ABC):
    """One operation; subclasses name their verb and operation family."""

    verb: ClassVar[str]
    family: ClassVar[str]

    def run(self, fs: FileSystem) -> str:
        return outcome(self.apply, fs)

    @abstractmethod
    def apply(self, fs: FileSystem) -> object:
        """Do the operation on ``fs``; what it returns is part of the outcome."""

    def __str__(self) -> str:
        words = [self.verb]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mode" and isinstance(value, int):  # permission bits, in octal as chmod takes them
                value = f"{value:o}"
            words.append(shlex.quote(value.decode() if isinstance(value, bytes) else str(value)))
        return " ".join(words)


@dataclass(frozen=True)
class _OnPath(Op):
    """An operation that is the FileSystem call of its verb, on one path."""

    path: str

    def apply(self, fs: FileSystem) -> object:
        return getattr(fs, self.verb)(self.path)


@dataclass(frozen=True)
class Open(Op):
    """open(2) for writing with one of OPEN_MODES, write ``data`` (maybe nothing), close."""

    verb = "open"
    family = "write"
    path: str
    mode: str
    data: bytes

    def apply(self, fs: FileSystem) -> None:
        fd = fs.open(self.path, OPEN_MODES[self.mode] | OPEN_EXTRA)
        try:
            if self.data:
                fs.write(fd, self.data)
        finally:
            fs.close(fd)


@dataclass(frozen=True)
class Truncate(Op):
    verb = "truncate"
    family = "write"
    path: str
    length: int

    def apply(self, fs: FileSystem) -> None:
        fs.truncate(self.path, self.length)


class Unlink(_OnPath):
    verb = "unlink"
    family = "remove"


class Rmdir(_OnPath):
    verb = "rmdir"
    family = "remove"


class Mkdir(_OnPath):
    verb = "mkdir"
    family = "mkdir"


@dataclass(frozen=True)
class Rename(Op):
    verb = "rename"
    family = "rename"
    old: str
    new: str
    flags: str = ""

    def apply(self, fs: FileSystem) -> None:
        fs.rename(self.old, self.new, RENAME_FLAGS[self.flags])

    def __str__(self) -> str:
        return super().__str__().removesuffix(" ''")


@dataclass(frozen=True)
class Link(Op):
    verb = "link"
    family = "link"
    old: str
    new: str

    def apply(self, fs: FileSystem) -> None:
        fs.link(self.old, self.new)


@dataclass(frozen=True)
class Symlink(Op):
    verb = "symlink"
    family = "link"
    target: str
    path: str

    def apply(self, fs: FileSystem) -> None:
        fs.symlink(self.target, self.path)


class Mkfifo(_OnPath):
    verb = "mkfifo"
    family = "link"


@dataclass(frozen=True)
class Mknod(Op):
    """mknod(2) of a character device (``c``: /dev/null's numbers) or a socket (``s``)."""

    verb = "mknod"
    family = "link"
    path: str
    type: str

    def apply(self, fs: FileSystem) -> None:
        fs.mknod(self.path, MKNOD_TYPES[self.type])


@dataclass(frozen=True)
class Chmod(Op):
    verb = "chmod"
    family = "meta"
    path: str
    mode: int

    def apply(self, fs: FileSystem) -> None:
        fs.chmod(self.path, self.mode)


@dataclass(frozen=True)
class Chown(Op):
    verb = "chown"
    family = "meta"
    path: str
    uid: int
    gid: int

    def apply(self, fs: FileSystem) -> None:
        fs.chown(self.path, self.uid, self.gid)


@dataclass(frozen=True)
class Utime(Op):
    verb = "utime"
    family = "meta"
    path: str
    mtime: int  # seconds; set as both atime and mtime

    def apply(self, fs: FileSystem) -> None:
        fs.utime(self.path, self.mtime * 10**9)


@dataclass(frozen=True)
class SetXattr(Op):
    verb = "setxattr"
    family = "xattr"
    path: str
    name: str
    value: bytes

    def apply(self, fs: FileSystem) -> None:
        fs.setxattr(self.path, self.name, self.value)


@dataclass(frozen=True)
class RemoveXattr(Op):
    verb = "removexattr"
    family = "xattr"
    path: str
    name: str

    def apply(self, fs: FileSystem) -> None:
        fs.removexattr(self.path, self.name)


@dataclass(frozen=True)
class Stat(Op):
    """lstat(2): the type, permission bits and (for files) the size."""

    verb = "stat"
    family = "read"
    path: str

    def apply(self, fs: FileSystem) -> str:
        st = fs.lstat(self.path)
        size = f" {st.st_size}" if stat.S_ISREG(st.st_mode) else ""
        return f"{kind(st.st_mode)} {stat.S_IMODE(st.st_mode):o}{size}"


@dataclass(frozen=True)
class Readdir(Op):
    verb = "readdir"
    family = "read"
    path: str

    def apply(self, fs: FileSystem) -> str:
        return " ".join(sorted(fs.listdir(self.path))) or "(empty)"


class Readlink(_OnPath):
    verb = "readlink"
    family = "read"


@dataclass(frozen=True)
class Read(Op):
    verb = "read"
    family = "read"
    path: str

    def apply(self, fs: FileSystem) -> str:
        fd = fs.open(self.path, os.O_RDONLY | OPEN_EXTRA)
        try:
            return repr(fs.read(fd))
        finally:
            fs.close(fd)


@dataclass(frozen=True)
class ReadAcrossCopyUp(Op):
    """Open a file read-only, append to it through a second open (a copy-up), read the first fd.

    Since Linux 4.19 a read-only fd opened before the copy-up reads the copied-up data.
    """

    verb = "read-across-copy-up"
    family = "read"
    path: str

    def apply(self, fs: FileSystem) -> str:
        if not stat.S_ISREG(fs.stat(self.path).st_mode):
            return "not a regular file"
        reader = fs.open(self.path, os.O_RDONLY | OPEN_EXTRA)
        try:
            writer = fs.open(self.path, os.O_WRONLY | os.O_APPEND | OPEN_EXTRA)
            fs.write(writer, b"+")
            fs.close(writer)
            return repr(fs.read(reader))
        finally:
            fs.close(reader)


# -- descriptors kept across steps: the "fd" family ------------------------------------------


@dataclass(frozen=True)
class FdOpen(Op):
    """open(2) with one of FD_FLAGS and keep the descriptor in ``slot`` (closing what the slot held).

    Only regular files are kept: a directory or FIFO is closed again at once (``ok: dir``, ``ok: fifo``),
    because what a removed one answers through its descriptor is the lower layer's business under the
    kernel's overlayfs (fchmod: ENOTDIR, st_nlink of the lower) and out of the model's reach.
    """

    verb = "fopen"
    family = "fd"
    slot: int
    path: str
    flags: str

    def apply(self, fs: FileSystem) -> str | None:
        release(fs, self.slot)
        fd = fs.open(self.path, FD_FLAGS[self.flags] | OPEN_EXTRA)
        mode = fs.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            fs.close(fd)
            return kind(mode)
        fs.held[self.slot] = fd
        return None


def release(fs: FileSystem, slot: int | None = None) -> None:
    """Close the descriptor kept in ``slot`` (every one when None); a free slot is fine."""
    for s in list(fs.held) if slot is None else [slot]:
        fd = fs.held.pop(s, None)
        if fd is not None:
            fs.close(fd)


@dataclass(frozen=True)
class _OnSlot(Op):
    """An operation through the descriptor kept in ``slot``: EBADF when the slot is free."""

    family = "fd"
    slot: int

    def apply(self, fs: FileSystem) -> object:
        fd = fs.held.get(self.slot)
        if fd is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self.through(fs, fd)

    @abstractmethod
    def through(self, fs: FileSystem, fd: int) -> object: ...


class FdClose(_OnSlot):
    verb = "close"

    def through(self, fs: FileSystem, fd: int) -> None:
        release(fs, self.slot)


class FdRead(_OnSlot):
    """read(2) of FD_READ bytes at the descriptor's offset, which moves."""

    verb = "fread"

    def through(self, fs: FileSystem, fd: int) -> str:
        return repr(fs.read(fd, FD_READ))


@dataclass(frozen=True)
class FdWrite(_OnSlot):
    verb = "fwrite"
    data: bytes

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.write(fd, self.data)


@dataclass(frozen=True)
class FdPread(_OnSlot):
    verb = "pread"
    offset: int

    def through(self, fs: FileSystem, fd: int) -> str:
        return repr(fs.pread(fd, FD_READ, self.offset))


@dataclass(frozen=True)
class FdPwrite(_OnSlot):
    verb = "pwrite"
    offset: int
    data: bytes

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.pwrite(fd, self.data, self.offset)


class FdStat(_OnSlot):
    """fstat(2): the mode, size, link count (0 once every name is gone) and owner."""

    verb = "fstat"

    def through(self, fs: FileSystem, fd: int) -> str:
        st = fs.fstat(fd)
        owner = f"{st.st_uid}:{st.st_gid}"
        return f"{kind(st.st_mode)} {stat.S_IMODE(st.st_mode):o} {st.st_size} nlink={st.st_nlink} {owner}"


@dataclass(frozen=True)
class FdChmod(_OnSlot):
    verb = "fchmod"
    mode: int

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.fchmod(fd, self.mode)


@dataclass(frozen=True)
class FdChown(_OnSlot):
    verb = "fchown"
    uid: int
    gid: int

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.fchown(fd, self.uid, self.gid)


@dataclass(frozen=True)
class FdUtime(_OnSlot):
    verb = "futimens"
    mtime: int  # seconds; set as both atime and mtime

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.futimens(fd, self.mtime * 10**9)


@dataclass(frozen=True)
class FdTruncate(_OnSlot):
    verb = "ftruncate"
    length: int

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.ftruncate(fd, self.length)


@dataclass(frozen=True)
class FdAllocate(_OnSlot):
    """fallocate(2) with one of FALLOCATE_MODES over ``length`` bytes from ``offset``."""

    verb = "fallocate"
    how: str
    offset: int
    length: int

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.fallocate(fd, FALLOCATE_MODES[self.how], self.offset, self.length)


class FdSync(_OnSlot):
    verb = "fsync"

    def through(self, fs: FileSystem, fd: int) -> None:
        fs.fsync(fd)


OPS: dict[str, type[Op]] = {
    cls.verb: cls
    for cls in (
        *(Open, Truncate, Unlink, Rmdir, Mkdir, Rename, Link, Symlink, Mkfifo, Mknod, Chmod, Chown, Utime),
        *(SetXattr, RemoveXattr, Stat, Readdir, Readlink, Read, ReadAcrossCopyUp),
        *(FdOpen, FdClose, FdRead, FdWrite, FdPread, FdPwrite, FdStat, FdChmod, FdChown, FdUtime, FdTruncate),
        *(FdAllocate, FdSync),
    )
}
FAMILIES = sorted({cls.family for cls in OPS.values()})


def parse(line: str) -> Op:
    """The operation a line of text names (the inverse of ``str(op)``)."""
    verb, *words = shlex.split(line)
    cls = OPS[verb]
    args: list[object] = []
    for f, word in zip(fields(cls), words, strict=False):
        if f.type == "bytes":
            args.append(word.encode())
        elif f.type == "int":
            args.append(int(word, 8) if f.name == "mode" else int(word))
        else:
            args.append(word)
    return cls(*args)


KIND_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFSOCK: "socket",
}


def kind(mode: int) -> str:
    return KIND_NAMES.get(stat.S_IFMT(mode), "other")


@dataclass(frozen=True)
class Entry:
    """What a user sees of one path.

    ``mtime`` is in seconds when it was set on purpose (by the layers or utime), NEW when the system
    set it, None when any time will do (the model's answer for a time the system sets; st_mtime NaN)."""

    kind: str
    mode: int | None = None
    owner: str | None = None
    nlink: int | None = None
    content: bytes | None = None
    target: str | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime: int | None = None

    def __str__(self) -> str:
        words = [self.kind]
        if self.mode is not None:
            words.append(f"{self.mode:o}")
        for name in ("owner", "nlink", "content", "target"):
            value = getattr(self, name)
            if value is not None:
                words.append(f"{name}={value!r}" if name in ("content", "target") else f"{name}={value}")
        words += [f"{n}={v!r}" for n, v in self.xattrs]
        if self.mtime is not None:
            words.append("mtime=new" if self.mtime == NEW else f"mtime={self.mtime}")
        return " ".join(words)


def entry(fs: FileSystem, path: str, st: os.stat_result) -> Entry:
    k = kind(st.st_mode)
    if k == "symlink":
        return Entry(k, owner=f"{st.st_uid}:{st.st_gid}", nlink=st.st_nlink, target=fs.readlink(path))
    mtime = None if math.isnan(st.st_mtime) else int(st.st_mtime) if st.st_mtime < PINNED_BEFORE else NEW
    xattrs: tuple[tuple[str, bytes], ...] = ()
    if k in ("file", "dir"):
        names = sorted(n for n in fs.listxattr(path) if n.startswith("user."))
        xattrs = tuple((n, fs.getxattr(path, n)) for n in names)
    content = None
    if k == "file":
        fd = fs.open(path, os.O_RDONLY | OPEN_EXTRA)
        try:
            content = fs.read(fd)
        finally:
            fs.close(fd)
    nlink = None if k == "dir" else st.st_nlink  # a merged directory's link count is not meaningful
    return Entry(k, stat.S_IMODE(st.st_mode), f"{st.st_uid}:{st.st_gid}", nlink, content, None, xattrs, mtime)


def snapshot(fs: FileSystem) -> tuple[dict[str, Entry], dict[str, int]]:
    """Every path below the root with what a user sees of it, and its inode number."""
    entries: dict[str, Entry] = {}
    inodes: dict[str, int] = {}
    todo = [""]
    while todo:
        parent = todo.pop()
        for name in sorted(fs.listdir(parent)):
            path = f"{parent}/{name}" if parent else name
            try:
                st = fs.lstat(path)
                entries[path] = entry(fs, path, st)
            except OSError as exc:  # listed but not readable: an inconsistency worth showing, not a crash
                entries[path] = Entry(f"listed, but {errno.errorcode.get(exc.errno or 0, exc)}")
                continue
            inodes[path] = st.st_ino
            if stat.S_ISDIR(st.st_mode):
                todo.append(path)
    return dict(sorted(entries.items())), inodes


def main(argv: list[str]) -> int:
    """``python3 ops.py MERGED < OPERATIONS``: run each line, print its outcome, then the tree."""
    os.umask(UMASK)
    fs = OsFileSystem(argv[1])
    for n, line in enumerate((line for line in sys.stdin if line.strip()), start=1):
        print(f"step {n}: {line.strip()} -> {parse(line).run(fs)}")
    release(fs)
    entries, inodes = snapshot(fs)
    print("tree:")
    for path, e in entries.items():
        print(f"  {path}: {e} ino={inodes.get(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
