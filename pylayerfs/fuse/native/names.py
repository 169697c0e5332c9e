"""The handlers of names: LOOKUP, FORGET, creation, LINK, UNLINK, RMDIR, RENAME."""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable

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
        mode, rdev, umask, _ = p.MKNOD_IN.unpack_from(arg)
        path = self._child(req.nodeid, cstring(arg[p.MKNOD_IN.size :]))
        self.ov.mknod(path, mode, rdev, req.creator(umask))
        return self._entry(path)

    def _mkdir(self, req: Request, arg: memoryview) -> bytes:
        mode, umask = p.MKDIR_IN.unpack_from(arg)
        path = self._child(req.nodeid, cstring(arg[p.MKDIR_IN.size :]))
        self.ov.mkdir(path, mode, req.creator(umask))
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
            self._unsplit(node)  # copied up: the new name is this node's object
        return self._entry(new)

    def _last_name(self, path: str) -> bool:
        """Is ``path`` (about to be removed or replaced) its object's only name? (False if it cannot tell.)"""
        try:
            attrs = self.ov.getattr(path)
        except OSError:
            return False
        return stat.S_ISDIR(attrs["st_mode"]) or attrs["st_nlink"] <= 1

    def _removing(self, path: str, change: Callable[[], None]) -> None:
        """Make ``change``, which removes the name ``path`` or puts another object there, and update the node table.

        A node the kernel knows by ``path`` alone is held first (:meth:`Overlay.hold`): the kernel may still reach it
        without a name, through an ``O_PATH`` descriptor, ``/proc/self/fd/N``, or a dentry another process is opening
        while a file is renamed over it (its OPEN then reopens the held object, as the kernel's overlayfs opens the
        inode its dentry holds). The hold lasts until the kernel forgets the node.
        """
        node = self.nodes.at(path)
        if node is None:
            change()
            return
        last = self._last_name(path)
        held = None
        if node.path == path and not node.aliases and node.nodeid not in self._held:
            with contextlib.suppress(OSError):
                held = self.ov.hold(path)
        try:
            change()
        except BaseException:
            if held is not None:
                self.ov.release(held)
            raise
        if held is not None:
            self._held[node.nodeid] = held
        self.nodes.removed(path, last_name=last)

    def _unlink(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, cstring(arg))
        self._removing(path, lambda: self.ov.unlink(path))
        return b""

    def _rmdir(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, cstring(arg))
        self._removing(path, lambda: self.ov.rmdir(path))
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
        if flags & realfs.RENAME_EXCHANGE:
            self.ov.rename(old, new, flags)
        else:
            self._removing(new, lambda: self.ov.rename(old, new, flags))
        self.nodes.renamed(old, new, exchange=bool(flags & realfs.RENAME_EXCHANGE))
        for moved in filter(None, (self.nodes.at(new), self.nodes.at(old))):
            self._unsplit(moved)  # a rename copies up (both names, exchanged)
        return b""
