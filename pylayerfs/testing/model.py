"""The reference model: what a merged view must do, as a small in-memory filesystem.

It starts from the lower layers flattened top-down by the kernel's lookup
rules (:func:`pylayerfs.testing.lowers.flatten`) and then changes the way POSIX
says, with the one rule overlayfs adds to POSIX: renaming a directory that has
a part in a lower layer fails with EXDEV (the kernel's default,
``redirect_dir=follow``, and ``off`` and ``nofollow``). With ``redirect_dir=on``
(or ``metacopy=on``, which turns it on) there is no such rule: such a directory
moves with its whole subtree, as a directory of the upper layer does (see
:func:`features`). Copy-up is invisible in the model: an object keeps its
mode, owner, times and xattrs, and a directory whose entry is copied up keeps
its mtime; except that with ``metacopy=on`` a file whose metadata alone were
copied up loses its mtime when its data follow (:meth:`Model._copy_up`).
Times the system sets (a write, a new entry) are "any": the model pins only
the times that come from the layers or from ``utime``.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from pylayerfs.testing.ops import FALLOCATE_MODES, KIND_NAMES
from pylayerfs.testing.vfs import EXCHANGE, Vfs, fail, within

KINDS = {name: fmt for fmt, name in KIND_NAMES.items()}
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
    lower: bool = False  # a directory with a lower part: renaming it is EXDEV (unless redirect_dir=on)
    lower_file: bool = False  # a regular file of a lower layer, not copied up yet
    metacopy: bool = False  # (metacopy=on) copied up as a metacopy file: its metadata are up, its data below
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class _Handle:
    obj: Obj


@dataclass(frozen=True)
class Features:
    """What the model follows of a mount's options."""

    moves_dirs: bool = False  # redirect_dir=on: a directory with a lower part is renamed like any other, not EXDEV
    metacopy: bool = False  # metacopy=on: a metadata change, link or rename copies a file's metadata only


def features(mount_options: str) -> Features:
    """What a mount with ``mount_options`` (``-o`` syntax, ``key=value,...``) does that the model follows.

    Directories with a lower part move with ``redirect_dir=on`` and with ``metacopy=on`` (which turns it on);
    ``redirect_dir=follow`` (the kernel's module default here), ``nofollow`` and ``off`` rename such a directory
    with EXDEV. Other options are not looked at. The last value of an option wins, as in the kernel's
    ``fs/overlayfs/params.c`` (``ovl_fs_params_verify``). Raises ValueError naming the kernel's reason (its dmesg
    line) for the options it refuses to mount with: a bad ``redirect_dir`` or ``metacopy`` value, and
    ``metacopy=on`` with ``redirect_dir`` other than ``on`` (in either order).
    """
    given: dict[str, str] = {}
    for option in (o for o in mount_options.split(",") if o):
        key, _, value = option.partition("=")
        given[key] = value
    redirect, metacopy = given.get("redirect_dir"), given.get("metacopy", "off")
    refused = "the kernel refuses to mount with them"
    if redirect not in (None, "on", "follow", "nofollow", "off"):
        raise ValueError(f"{refused}: Bad value for 'redirect_dir'")
    if metacopy not in ("on", "off"):
        raise ValueError(f"{refused}: Bad value for 'metacopy'")
    if metacopy == "on" and redirect not in (None, "on"):
        mode = "follow" if redirect == "off" else redirect  # off means follow (redirect_always_follow=Y)
        raise ValueError(f"{refused}: conflicting options: metacopy=on,redirect_dir={mode}")
    return Features(moves_dirs=redirect == "on" or metacopy == "on", metacopy=metacopy == "on")


class Model(Vfs):
    """The merged view as ``path -> Obj``; ``""`` is the root directory."""

    def __init__(self, objects: dict[str, Obj]) -> None:
        super().__init__()
        self.objects = objects
        self.features = Features()  # the mount options' effects (none: the kernel's defaults)
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
        return self._fstat(_Handle(self.objects[path]))

    def _fstat(self, handle: _Handle) -> os.stat_result:
        """An unnamed file has no links, but one never copied up shows its lower file's (overlayfs stats that)."""
        obj = handle.obj
        nlink = 1 if obj.kind == "dir" else sum(o is obj for o in self.objects.values())
        if obj.lower_file and not nlink:
            nlink = 1
        size = len(obj.content) if obj.kind == "file" else len(obj.target)
        mtime = math.nan if obj.mtime is None else obj.mtime
        return os.stat_result((KINDS[obj.kind] | obj.mode, obj.id, 0, nlink, obj.uid, obj.gid, size, 0, mtime, 0))

    def _same(self, a: str, b: str) -> bool:
        return self.objects[a] is self.objects[b]

    def _readlink(self, path: str) -> str:
        return self.objects[path].target

    def _listdir(self, path: str) -> list[str]:
        return [p.rpartition("/")[2] for p in self._children(path)]

    def _create(self, path: str, mode: int, access: int) -> _Handle:
        return _Handle(self._new(path, "file", mode))

    def _tmpfile(self, directory: str, mode: int) -> _Handle:
        parent = self.objects[directory]
        uid, gid = self.caller
        return _Handle(Obj("file", mode, uid, parent.gid if parent.mode & stat.S_ISGID else gid))

    def _open(self, path: str, flags: int) -> _Handle:
        obj = self.objects[path]
        if flags & os.O_ACCMODE != os.O_RDONLY:
            self._copy_up(obj, data=True)
        return _Handle(obj)

    def _pread(self, handle: _Handle, size: int, offset: int) -> bytes:
        return handle.obj.content[offset : offset + size]

    def _pwrite(self, handle: _Handle, data: bytes, offset: int) -> None:
        obj = handle.obj
        obj.content = obj.content[:offset].ljust(offset, b"\0") + data + obj.content[offset + len(data) :]
        obj.mtime = None

    def _release(self, handle: _Handle) -> None:
        pass

    def _truncate(self, path: str | None, length: int, handle: _Handle | None) -> None:
        obj = handle.obj if handle is not None else self._copy_up(self._obj(path or ""), data=True)
        obj.content = obj.content[:length].ljust(length, b"\0")
        obj.mtime = None

    def _fallocate(self, handle: _Handle, mode: int, offset: int, length: int) -> None:
        obj = handle.obj
        end = offset + length
        if mode & FALLOCATE_MODES["punch"] == FALLOCATE_MODES["punch"]:
            kept = obj.content[end:]
            obj.content = obj.content[:offset] + b"\0" * max(0, min(end, len(obj.content)) - offset) + kept
        elif not mode & FALLOCATE_MODES["keep"]:
            obj.content = obj.content.ljust(end, b"\0")
        obj.mtime = None  # whether the filesystem sets it depends on the filesystem: any time will do

    def _fsync(self, handle: _Handle) -> None:
        pass

    def _mkdir(self, path: str, mode: int) -> None:
        self._new(path, "dir", mode)

    def _mknod(self, path: str, kind: int, mode: int) -> None:
        self._new(path, KIND_NAMES[kind], mode)

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
        self.objects[new] = self._up(old)
        self._changed(new)

    def _rename(self, old: str, new: str, flags: int) -> None:
        """Move ``old`` and its subtree to ``new`` (swap them with EXCHANGE).

        A directory with a lower part (either one, with EXCHANGE) is EXDEV unless ``features.moves_dirs``: with
        ``redirect_dir=on`` the kernel copies it up alone and records where it came from in
        ``trusted.overlay.redirect`` (fs/overlayfs/dir.c, ``ovl_rename`` and ``ovl_set_redirect``), so what a user
        sees is the move of a directory of the upper layer.
        """
        source, target = self.objects[old], self.objects.get(new)
        moving = (source, target if flags & EXCHANGE else None)
        if not self.features.moves_dirs and any(o is not None and o.kind == "dir" and o.lower for o in moving):
            raise fail(errno.EXDEV, old)
        if target is not None and target.kind == "dir" and not flags & EXCHANGE and self._children(new):
            raise fail(errno.ENOTEMPTY, new)
        self._up(old)
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

    def _up(self, path: str) -> Obj:
        """The object at ``path``, copied up for a change of its metadata, a link or a rename."""
        return self._copy_up(self.objects[path], data=False)

    def _copy_up(self, obj: Obj, data: bool) -> Obj:
        """``obj``, copied up: from now on it has an upper file of its own; its data too when ``data`` (a write).

        With ``metacopy=on`` a lower file copied up without ``data`` becomes a metacopy file, and when its data
        follow, its mtime is the system's if it has any data: the kernel copies them into the upper file and sets
        no time afterwards (fs/overlayfs/copy_up.c, ``ovl_copy_up_meta_inode_data``; seen on Linux 6.18).
        """
        if data and obj.metacopy:
            obj.metacopy = False
            if obj.content:
                obj.mtime = None
        elif not data and obj.lower_file and self.features.metacopy:
            obj.metacopy = True
        obj.lower_file = False
        return obj

    def _changeable(self, handle: _Handle) -> Obj:
        """The object behind an fd, for a change of its metadata.

        A file never copied up whose names are all gone cannot be copied up: the kernel's copy-up meets the
        whiteout (EEXIST).
        """
        obj = handle.obj
        if obj.lower_file and not any(o is obj for o in self.objects.values()):
            raise fail(errno.EEXIST, "")
        return self._copy_up(obj, data=False)

    def _chmod(self, path: str, mode: int) -> None:
        self._fchmod(_Handle(self.objects[path]), mode)

    def _fchmod(self, handle: _Handle, mode: int) -> None:
        self._changeable(handle).mode = mode & 0o7777

    def _chown(self, path: str, uid: int, gid: int) -> None:
        self._fchown(_Handle(self.objects[path]), uid, gid)

    def _fchown(self, handle: _Handle, uid: int, gid: int) -> None:
        obj = self._changeable(handle)
        obj.uid, obj.gid = uid, gid
        if obj.kind != "dir":  # chown(2) clears set-user-ID, and set-group-ID when group-executable
            obj.mode &= ~stat.S_ISUID
            if obj.mode & stat.S_IXGRP:
                obj.mode &= ~stat.S_ISGID

    def _utime(self, path: str, mtime_ns: int) -> None:
        self._futimens(_Handle(self.objects[path]), mtime_ns)

    def _futimens(self, handle: _Handle, mtime_ns: int) -> None:
        self._changeable(handle).mtime = mtime_ns // 10**9

    def _setxattr(self, path: str, name: str, value: bytes) -> None:
        self._up(path).xattrs[name] = value

    def _removexattr(self, path: str, name: str) -> None:
        if name not in self.objects[path].xattrs:  # the kernel looks in the lower layer before any copy-up
            raise fail(errno.ENODATA, path)
        del self._up(path).xattrs[name]

    def _listxattr(self, path: str) -> list[str]:
        return list(self.objects[path].xattrs)

    def _getxattr(self, path: str, name: str) -> bytes:
        try:
            return self.objects[path].xattrs[name]
        except KeyError:
            raise fail(errno.ENODATA, path) from None
