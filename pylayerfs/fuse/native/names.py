"""The handlers of names: LOOKUP, FORGET, creation, LINK, UNLINK, RMDIR, RENAME."""

from __future__ import annotations

import stat

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.core import Core, Request, cstring
from pylayerfs.overlay import realfs


class NameOps(Core):
    """The handlers of names: LOOKUP, FORGET, creation, LINK, UNLINK, RMDIR, RENAME."""

    # -- names -------------------------------------------------------------------------------------

    def _lookup(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, cstring(arg))
        try:
            return self._entry(path)
        except FileNotFoundError:
            return p.negative_entry(self.valid)

    def _forget(self, req: Request, arg: memoryview) -> bytes:
        (count,) = p.FORGET_IN.unpack_from(arg)
        self.nodes.forget(req.nodeid, count)
        return b""

    def _batch_forget(self, req: Request, arg: memoryview) -> bytes:
        (count, _) = p.BATCH_FORGET_IN.unpack_from(arg)
        for i in range(count):
            nodeid, nlookup = p.FORGET_ONE.unpack_from(arg, p.BATCH_FORGET_IN.size + i * p.FORGET_ONE.size)
            self.nodes.forget(nodeid, nlookup)
        return b""

    def _mknod(self, req: Request, arg: memoryview) -> bytes:
        mode, rdev, _, _ = p.MKNOD_IN.unpack_from(arg)
        path = self._child(req.nodeid, cstring(arg[p.MKNOD_IN.size :]))
        self.ov.mknod(path, mode, rdev, req.caller)
        return self._entry(path)

    def _mkdir(self, req: Request, arg: memoryview) -> bytes:
        mode, _ = p.MKDIR_IN.unpack_from(arg)
        path = self._child(req.nodeid, cstring(arg[p.MKDIR_IN.size :]))
        self.ov.mkdir(path, mode, req.caller)
        return self._entry(path)

    def _symlink(self, req: Request, arg: memoryview) -> bytes:
        name, target = p.names(arg, 2)
        path = self._child(req.nodeid, name)
        self.ov.symlink(path, target, req.caller)
        return self._entry(path)

    def _link(self, req: Request, arg: memoryview) -> bytes:
        """LINK: a new name for node ``oldnodeid``; one without a name (an ``O_TMPFILE``) is linked through its handle.

        The kernel sends LINK for a nameless node only for a file made by TMPFILE without ``O_EXCL`` (its VFS
        answers ENOENT for one whose names were removed). The reply names the same node: one kernel inode.
        """
        (old_id,) = p.LINK_IN.unpack_from(arg)
        node = self._node(old_id)
        new = self._child(req.nodeid, cstring(arg[p.LINK_IN.size :]))
        if node.path is None:
            self.ov.link_handle(self._any_handle(node), new)
            self.nodes.named(node)
        else:
            self.ov.link(node.path, new)
        return self._entry(new)

    def _last_name(self, path: str) -> bool:
        """Is ``path`` (about to be removed or replaced) its object's only name? (False if it cannot tell.)"""
        if self.nodes.at(path) is None:
            return False
        try:
            attrs = self.ov.getattr(path)
        except OSError:
            return False
        return stat.S_ISDIR(attrs["st_mode"]) or attrs["st_nlink"] <= 1

    def _unlink(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, cstring(arg))
        last = self._last_name(path)
        self.ov.unlink(path)
        self.nodes.removed(path, last_name=last)
        return b""

    def _rmdir(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, cstring(arg))
        self.ov.rmdir(path)
        self.nodes.removed(path, last_name=True)
        return b""

    def _rename(self, req: Request, arg: memoryview) -> bytes:
        (newdir,) = p.RENAME_IN.unpack_from(arg)
        return self._do_rename(req.nodeid, newdir, 0, arg[p.RENAME_IN.size :])

    def _rename2(self, req: Request, arg: memoryview) -> bytes:
        newdir, flags, _ = p.RENAME2_IN.unpack_from(arg)
        return self._do_rename(req.nodeid, newdir, flags, arg[p.RENAME2_IN.size :])

    def _do_rename(self, olddir: int, newdir: int, flags: int, names: memoryview) -> bytes:
        oldname, newname = p.names(names, 2)
        old, new = self._child(olddir, oldname), self._child(newdir, newname)
        exchange = bool(flags & realfs.RENAME_EXCHANGE)
        replaced_last = not exchange and self._last_name(new)
        self.ov.rename(old, new, flags)
        if replaced_last:
            self.nodes.removed(new, last_name=True)
        self.nodes.renamed(old, new, exchange=exchange)
        return b""
