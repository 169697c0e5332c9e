"""The handlers of attributes: GETATTR, SETATTR, READLINK, STATFS, ACCESS and the xattrs."""

from __future__ import annotations

import errno
import os

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.core import Core, Request, cstring
from pylayerfs.overlay import xattrs
from pylayerfs.overlay.filesystem import UTIME_NOW, UTIME_OMIT

_CAPS = "security.capability"


class AttributeOps(Core):
    """The handlers of attributes: GETATTR, SETATTR, READLINK, STATFS, ACCESS and the xattrs."""

    # -- attributes --------------------------------------------------------------------------------

    def _getattr(self, req: Request, arg: memoryview) -> bytes:
        flags, _, fh = p.GETATTR_IN.unpack_from(arg)
        node = self._node(req.nodeid)
        if not flags & p.GETATTR_FH and node.handles:
            fh = min(node.handles)  # an fstat of an open handle: no lookup (fstat() sends no handle: it has a path)
            flags |= p.GETATTR_FH
        attrs = self._attrs(node, fh if flags & p.GETATTR_FH else None)
        return p.attr_out(attrs, self.valid)

    def _setattr(self, req: Request, arg: memoryview) -> bytes:
        (valid, _, fh, size, _, atime, mtime, _, atimensec, mtimensec, _, mode, _, uid, gid, _) = (
            p.SETATTR_IN.unpack_from(arg)
        )
        node = self._node(req.nodeid)
        path = node.path
        handle: int | None = fh if valid & p.FATTR_FH else None
        if path is None and handle is None:
            handle = self._any_handle(node)
        where = path or ""
        if valid & p.FATTR_MODE:
            self.ov.chmod(where, mode, handle)
        if valid & (p.FATTR_UID | p.FATTR_GID):
            self.ov.chown(where, uid if valid & p.FATTR_UID else -1, gid if valid & p.FATTR_GID else -1, handle)
        if valid & p.FATTR_SIZE:
            self.ov.truncate(where, size, handle)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME):
            times = (
                _time(valid, p.FATTR_ATIME, p.FATTR_ATIME_NOW, atime, atimensec),
                _time(valid, p.FATTR_MTIME, p.FATTR_MTIME_NOW, mtime, mtimensec),
            )
            self.ov.utimens(where, times, handle)
        self._unsplit(node)
        return p.attr_out(self._attrs(node, handle), self.valid)

    def _readlink(self, req: Request, arg: memoryview) -> bytes:
        return os.fsencode(self.ov.readlink(*self._where(self._node(req.nodeid))))

    def _statfs(self, req: Request, arg: memoryview) -> bytes:
        sv = self.ov.statfs()
        return p.STATFS_OUT.pack(sv["f_blocks"], sv["f_bfree"], sv["f_bavail"], sv["f_files"], sv["f_ffree"],
                                 sv["f_bsize"], sv["f_namemax"], sv["f_frsize"], 0)  # fmt: skip

    def _access(self, req: Request, arg: memoryview) -> bytes:
        self._attrs(self._node(req.nodeid))  # exists (ENOENT if not); the kernel checks the permission bits
        return b""

    # -- xattrs ------------------------------------------------------------------------------------

    def _setxattr(self, req: Request, arg: memoryview) -> bytes:
        size, flags = p.SETXATTR_IN.unpack_from(arg)
        rest = bytes(arg[p.SETXATTR_IN.size :])
        name, _, value = rest.partition(b"\0")
        node = self._node(req.nodeid)
        node.no_caps = False
        path, fh = self._where(node)
        self.ov.setxattr(path, os.fsdecode(name), value[:size], flags, fh)
        self._unsplit(node)
        self._mode_changed(req.nodeid, os.fsdecode(name))
        return b""

    def _getxattr(self, req: Request, arg: memoryview) -> bytes:
        """An xattr's value; ``security.capability`` is known absent after the first ENODATA, until a SETXATTR.

        The kernel asks for it before every write to a file (to drop file capabilities); only a SETXATTR
        through the mount can add it, since copy-up keeps a file's xattrs.
        """
        size, _ = p.GETXATTR_IN.unpack_from(arg)
        name = cstring(arg[p.GETXATTR_IN.size :])
        node = self._node(req.nodeid)
        path, fh = self._where(node)
        if name == _CAPS:
            if node.no_caps:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            try:
                value = self.ov.getxattr(path, name, fh)
            except OSError as exc:
                node.no_caps = exc.errno == errno.ENODATA
                raise
        else:
            value = self.ov.getxattr(path, name, fh)
        return _sized(value, size)

    def _listxattr(self, req: Request, arg: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(arg)
        names = self.ov.listxattr(*self._where(self._node(req.nodeid)))
        return _sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    def _removexattr(self, req: Request, arg: memoryview) -> bytes:
        node = self._node(req.nodeid)
        path, fh = self._where(node)
        self.ov.removexattr(path, cstring(arg), fh)
        self._unsplit(node)
        self._mode_changed(req.nodeid, cstring(arg))
        return b""

    def _mode_changed(self, nodeid: int, name: str) -> None:
        """After an ACL change (which sets the permission bits), make the kernel drop the node's attributes.

        The kernel updates only ctime after a SETXATTR. FUSE_NOTIFY_INVAL_INODE with offset -1 touches
        attributes only, no page, so writing it before the reply cannot wait on this request.
        """
        if xattrs.changes_mode(name):
            self._notify_inval_inode(nodeid)


def _sized(value: bytes, size: int) -> bytes:
    """An xattr reply: the length alone when asked with size 0, ERANGE when ``value`` is longer than ``size``."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
    return value


def _time(valid: int, given: int, now: int, seconds: int, nanoseconds: int) -> int:
    """A time of SETATTR in nanoseconds for the engine: UTIME_NOW, UTIME_OMIT, or the time given."""
    if valid & now:
        return UTIME_NOW
    if not valid & given:
        return UTIME_OMIT
    if seconds >= 1 << 63:
        seconds -= 1 << 64  # before 1970
    return seconds * 1_000_000_000 + nanoseconds
