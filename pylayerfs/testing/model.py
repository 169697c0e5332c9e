"""The reference model: what a merged view must do, as a small in-memory filesystem.

It starts from the lower layers flattened top-down by the kernel's lookup
rules (:func:`pylayerfs.testing.lowers.flatten`) and then changes the way POSIX
says, with the one rule overlayfs adds to POSIX: renaming a directory that has
a part in a lower layer fails with EXDEV (the kernel's default,
``redirect_dir=off``). Copy-up is invisible in the model: an object keeps its
mode, owner, times and xattrs, and a directory whose entry is copied up keeps
its mtime. Times the system sets (a write, a new entry) are "any": the model
pins only the times that come from the layers or from ``utime``.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from pylayerfs.testing.vfs import EXCHANGE, Vfs, fail, within

KINDS = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO}
_ids = itertools.count(1)


@dataclass(eq=False)
class Obj:
    """One object of the merged view. Hard links are several paths to one Obj."""

    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int | None = None  # seconds when pinned, None when the system set it
    content: bytes = b""
    target: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    lower: bool = False  # a directory with a lower part: renaming it is EXDEV
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class _Handle:
    obj: Obj


class Model(Vfs):
    """The merged view as ``path -> Obj``; ``""`` is the root directory."""

    def __init__(self, objects: dict[str, Obj]) -> None:
        super().__init__()
        self.objects = objects
        self.caller = (os.geteuid(), os.getegid())

    def _obj(self, path: str) -> Obj:
        return self.objects[path]

    def _children(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        return [p for p in self.objects if p.startswith(prefix) and p != path and "/" not in p[len(prefix) :]]

    def _changed(self, path: str) -> None:
        """An entry of the directory holding ``path`` changed: its mtime is the system's."""
        self.objects[path.rpartition("/")[0]].mtime = None

    def _new(self, path: str, kind: str, mode: int, **attrs: Any) -> Obj:
        parent = self.objects[path.rpartition("/")[0]]
        uid, gid = self.caller
        if parent.mode & stat.S_ISGID:  # BSD group semantics: the group comes from the directory
            gid = parent.gid
            if kind == "dir":
                mode |= stat.S_ISGID
        obj = Obj(kind, mode, uid, gid, **attrs)
        self.objects[path] = obj
        self._changed(path)
        return obj

    # -- primitives ------------------------------------------------------------------

    def _mode(self, path: str) -> int | None:
        obj = self.objects.get(path)
        return None if obj is None else KINDS[obj.kind] | obj.mode

    def _stat(self, path: str) -> os.stat_result:
        obj = self.objects[path]
        nlink = 1 if obj.kind == "dir" else sum(o is obj for o in self.objects.values())
        size = len(obj.content) if obj.kind == "file" else len(obj.target)
        mtime = math.nan if obj.mtime is None else obj.mtime
        return os.stat_result((KINDS[obj.kind] | obj.mode, obj.id, 0, nlink, obj.uid, obj.gid, size, 0, mtime, 0))

    def _same(self, a: str, b: str) -> bool:
        return self.objects[a] is self.objects[b]

    def _readlink(self, path: str) -> str:
        return self.objects[path].target

    def _listdir(self, path: str) -> list[str]:
        return [p.rpartition("/")[2] for p in self._children(path)]

    def _create(self, path: str, mode: int) -> _Handle:
        return _Handle(self._new(path, "file", mode))

    def _open(self, path: str, flags: int) -> _Handle:
        return _Handle(self.objects[path])

    def _read(self, handle: _Handle) -> bytes:
        return handle.obj.content

    def _write(self, handle: _Handle, data: bytes, append: bool) -> None:
        obj = handle.obj
        obj.content = obj.content + data if append else data + obj.content[len(data) :]
        obj.mtime = None

    def _release(self, handle: _Handle) -> None:
        pass

    def _truncate(self, path: str, length: int, handle: _Handle | None) -> None:
        obj = handle.obj if handle is not None else self.objects[path]
        obj.content = obj.content[:length].ljust(length, b"\0")
        obj.mtime = None

    def _mkdir(self, path: str, mode: int) -> None:
        self._new(path, "dir", mode)

    def _mkfifo(self, path: str, mode: int) -> None:
        self._new(path, "fifo", mode)

    def _symlink(self, target: str, path: str) -> None:
        self._new(path, "symlink", 0o777, target=target)

    def _rmdir(self, path: str) -> None:
        if self._children(path):
            raise fail(errno.ENOTEMPTY, path)
        self._unlink(path)

    def _unlink(self, path: str) -> None:
        del self.objects[path]
        self._changed(path)

    def _link(self, old: str, new: str) -> None:
        self.objects[new] = self.objects[old]
        self._changed(new)

    def _rename(self, old: str, new: str, flags: int) -> None:
        source, target = self.objects[old], self.objects.get(new)
        if any(o is not None and o.kind == "dir" and o.lower for o in (source, target if flags & EXCHANGE else None)):
            raise fail(errno.EXDEV, old)
        if target is not None and target.kind == "dir" and not flags & EXCHANGE and self._children(new):
            raise fail(errno.ENOTEMPTY, new)
        moved = self._take(old)
        if flags & EXCHANGE:
            self.objects.update({old + p[len(new) :]: o for p, o in self._take(new).items()})
        else:
            self.objects.pop(new, None)
        self.objects.update({new + p[len(old) :]: o for p, o in moved.items()})
        self._changed(old)
        self._changed(new)

    def _take(self, path: str) -> dict[str, Obj]:
        """Remove ``path`` and everything below it; return them."""
        return {p: self.objects.pop(p) for p in [p for p in self.objects if within(p, path)]}

    def _chmod(self, path: str, mode: int) -> None:
        self.objects[path].mode = mode & 0o7777

    def _chown(self, path: str, uid: int, gid: int) -> None:
        obj = self.objects[path]
        obj.uid, obj.gid = uid, gid
        if obj.kind != "dir":  # chown(2) clears set-user-ID, and set-group-ID when group-executable
            obj.mode &= ~stat.S_ISUID
            if obj.mode & stat.S_IXGRP:
                obj.mode &= ~stat.S_ISGID

    def _utime(self, path: str, mtime_ns: int) -> None:
        self.objects[path].mtime = mtime_ns // 10**9

    def _setxattr(self, path: str, name: str, value: bytes) -> None:
        self.objects[path].xattrs[name] = value

    def _removexattr(self, path: str, name: str) -> None:
        if self.objects[path].xattrs.pop(name, None) is None:
            raise fail(errno.ENODATA, path)

    def _listxattr(self, path: str) -> list[str]:
        return list(self.objects[path].xattrs)

    def _getxattr(self, path: str, name: str) -> bytes:
        try:
            return self.objects[path].xattrs[name]
        except KeyError:
            raise fail(errno.ENODATA, path) from None
