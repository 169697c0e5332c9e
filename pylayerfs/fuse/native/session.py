"""The request loop: read a request from the FUSE device, call the engine, write the reply.

One request at a time, in one thread (the engine needs no locks). Each request names its node by ID;
:class:`~pylayerfs.fuse.native.nodes.NodeTable` gives the node's path, and the handlers call
:class:`~pylayerfs.overlay.filesystem.Overlay` with it (or with the open file's handle, which keeps
open unlinked files usable). An :class:`OSError` from the engine becomes its errno in the reply; any
other exception is a bug: it is logged with its traceback and answered with EIO, and the loop goes
on. Nothing raised by a handler ever leaves the loop.

INTERRUPT (the caller of a request got a signal) needs no work here, and is never answered. The kernel
queues one only for a request the daemon has read, and this loop reads again only after answering, so the
request it names is answered already (the kernel then drops the interrupt unread). A slow request (a copy-up)
runs to its end and its caller gets its result: the kernel waits for a request it has sent even when the caller
is killed (a request not yet read is taken back and never seen). A reply the kernel no longer takes fails with
ENOENT and gives back what it counted (:meth:`Session._reply`). ENOSYS would stop the kernel sending interrupts,
EAGAIN would make it send this one again: neither is wanted.

The session ends when a read of the device fails with ENODEV (the filesystem was unmounted, with
``umount``, ``umount -l`` or ``fusermount3 -u``, or the connection aborted), after DESTROY, or when
:meth:`Session.stop` is called (a signal): then it unmounts lazily itself, as libfuse does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
import struct
from collections.abc import Callable
from typing import Any, cast

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.device import DeviceError, unmount
from pylayerfs.fuse.native.nodes import NodeEntry, NodeTable, identity
from pylayerfs.overlay import realfs, xattrs
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.state import Caller

log = logging.getLogger("pylayerfs.fuse.native")

Handler = Callable[["Request", memoryview], bytes]
_DOT_NAMES = (".", "..")
_CAPS = "security.capability"


class Stop(Exception):
    """Raised by a signal handler into a blocked read of the device: the session should end (see :meth:`stop`)."""


class Request:
    """The header of one request: its ID (``unique``), node, and the caller's uid, gid and pid."""

    __slots__ = ("gid", "nodeid", "opcode", "pid", "uid", "unique")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid

    @property
    def caller(self) -> Caller:
        """Who asks: new objects are theirs."""
        return Caller(self.uid, self.gid)


def _errno_of(exc: OSError) -> int:
    return exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else 0


def _cstring(payload: memoryview) -> str:
    """The NUL-terminated name at the start of ``payload``; raises ValueError when it has no NUL."""
    return p.names(payload, 1)[0]


class Session:
    """Serves one mount: ``fd`` is its FUSE device, ``overlay`` the engine, ``timeout`` the kernel's cache time.

    ``on_ready`` is called once INIT is answered (the mount is usable then). ``mountpoint`` and
    ``by_fusermount`` say how to unmount when :meth:`stop` is asked for.
    """

    def __init__(
        self,
        overlay: Overlay,
        fd: int,
        *,
        mountpoint: str,
        timeout: float,
        on_ready: Callable[[], None] | None = None,
        by_fusermount: bool = False,
        passthrough: bool = True,
    ) -> None:
        self.ov = overlay
        self.fd = fd
        self.mountpoint = mountpoint
        self.timeout = timeout
        self.by_fusermount = by_fusermount
        self.passthrough = passthrough  # asked for; in force once INIT agreed and the first backing file opened
        self._on_ready = on_ready
        self.nodes = NodeTable(overlay.getattr("")["st_ino"])
        self.negotiated: p.Negotiated | None = None
        self.requests = 0  # served so far (INIT included)
        self.counts: collections.Counter[int] = collections.Counter()  # requests served, by opcode
        self._reading = False
        self._stopping = False
        self._ended = False
        self._counted: list[NodeEntry] = []  # lookups counted for the reply being made
        self._opening: int | None = None  # the file handle opened for the reply being made (OPEN, CREATE)
        self._dirs: dict[int, list[tuple[str, int, int]] | None] = {}  # open directory handle -> its listing
        self._next_dir = itertools.count(1)
        self._fh_node: dict[int, NodeEntry] = {}  # open file handle -> the node it was opened on
        self._passed: set[int] = set()  # the open file handles passed through to a backing file
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._handlers: dict[int, Handler] = {
            p.Op.INIT: self._init,
            p.Op.DESTROY: self._destroy,
            p.Op.LOOKUP: self._lookup,
            p.Op.FORGET: self._forget,
            p.Op.BATCH_FORGET: self._batch_forget,
            p.Op.GETATTR: self._getattr,
            p.Op.SETATTR: self._setattr,
            p.Op.READLINK: self._readlink,
            p.Op.SYMLINK: self._symlink,
            p.Op.MKNOD: self._mknod,
            p.Op.MKDIR: self._mkdir,
            p.Op.UNLINK: self._unlink,
            p.Op.RMDIR: self._rmdir,
            p.Op.RENAME: self._rename,
            p.Op.RENAME2: self._rename2,
            p.Op.LINK: self._link,
            p.Op.OPEN: self._open,
            p.Op.CREATE: self._create,
            p.Op.TMPFILE: self._tmpfile,
            p.Op.READ: self._read,
            p.Op.WRITE: self._write,
            p.Op.RELEASE: self._release,
            p.Op.FSYNC: self._fsync,
            p.Op.OPENDIR: self._opendir,
            p.Op.READDIR: self._readdir,
            p.Op.READDIRPLUS: self._readdirplus,
            p.Op.RELEASEDIR: self._releasedir,
            p.Op.FSYNCDIR: self._fsyncdir,
            p.Op.STATFS: self._statfs,
            p.Op.ACCESS: self._access,
            p.Op.SETXATTR: self._setxattr,
            p.Op.GETXATTR: self._getxattr,
            p.Op.LISTXATTR: self._listxattr,
            p.Op.REMOVEXATTR: self._removexattr,
            p.Op.FALLOCATE: self._fallocate,
            p.Op.LSEEK: self._lseek,
            p.Op.COPY_FILE_RANGE: self._copy_file_range,
            p.Op.INTERRUPT: self._interrupt,
        }

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> bool:
        """Serve until the mount is gone; return True if it ended by :meth:`stop` (a signal), False by unmount.

        Never raises for a request: see the module docstring. Raises OSError only for a device read
        failing with an errno other than ENODEV/ENOENT/EINTR (the device is unusable).
        """
        buf = bytearray(p.BUFFER_SIZE)
        view = memoryview(buf)
        while not self._ended:
            if self._stopping:
                self._unmount()
                self._log_counts()
                return True
            try:
                self._reading = True
                if self._stopping:
                    continue
                n = os.readv(self.fd, [buf])
            except Stop:
                continue
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    break  # unmounted: the end of the session
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # ENOENT: the request was interrupted before we read it
                raise
            finally:
                self._reading = False
            self._serve(view[:n])
        self._log_counts()
        return False

    def _log_counts(self) -> None:
        """Say (at -o debug) how many requests of each kind the session served: what a workload cost in round trips."""
        if log.isEnabledFor(logging.INFO):
            counts = ", ".join(f"{_name(op)} {n}" for op, n in self.counts.most_common())
            log.info("%s: %d requests served (%s)", self.mountpoint, self.requests, counts or "none")

    def stop(self) -> None:
        """End the session (from a signal handler): unmount lazily and return from :meth:`run`.

        Raises :class:`Stop` when the loop is blocked reading the device (to wake it), else only marks
        the session to end after the request being served.
        """
        self._stopping = True
        if self._reading:
            raise Stop

    def abandon(self) -> None:
        """The loop cannot go on (the device failed): unmount lazily, so no dead mount is left behind."""
        if not self._ended:
            self._unmount()

    def _unmount(self) -> None:
        try:
            unmount(self.mountpoint, lazy=True, by_fusermount=self.by_fusermount)
        except DeviceError as exc:
            log.warning("%s", exc)

    def _serve(self, request: memoryview) -> None:
        """Serve one request; never raises (a bug is logged and answered with EIO)."""
        try:
            length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = p.IN_HEADER.unpack_from(request)
        except struct.error:
            log.error("a request of %d bytes is shorter than its header: ignored", len(request))
            return
        self.requests += 1
        self.counts[opcode] += 1
        req = Request(opcode, unique, nodeid, uid, gid, pid)
        arg = request[p.IN_HEADER.size : length - extlen * 8]
        handler = self._handlers.get(opcode)
        self._counted = []
        self._opening = None
        error = 0
        payload = b""
        if handler is None:
            error = errno.ENOSYS
        else:
            try:
                payload = handler(req, arg)
            except OSError as exc:
                error = _errno_of(exc)
                if not error:
                    log.exception("%s on node %d: OSError without errno, answering EIO", _name(opcode), nodeid)
                    error = errno.EIO
            except Exception:
                log.exception("%s on node %d failed, answering EIO", _name(opcode), nodeid)
                error = errno.EIO
        if self._debug:
            node = self.nodes.get(nodeid)
            where = node.path if node is not None else None
            log.debug("%s #%d node %d (%r) pid %d -> %s", _name(opcode), unique, nodeid, where, pid,
                      os.strerror(error) if error else f"{len(payload)} bytes")  # fmt: skip
        if opcode in p.NO_REPLY:
            return
        self._reply(unique, error, payload)

    def _reply(self, unique: int, error: int, payload: bytes) -> None:
        data = p.OUT_HEADER.pack(p.OUT_HEADER.size + (0 if error else len(payload)), -error, unique)
        try:
            os.writev(self.fd, [data] if error else [data, payload])  # one write: the kernel takes it whole
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the request is gone (interrupted): the kernel took nothing from it
                for node in self._counted:
                    self.nodes.unfound(node)
                if self._opening is not None:  # nor the open file: it will never be released
                    try:
                        self._forget_handle(self._opening)
                    except Exception:
                        log.exception("cannot release handle %d of an interrupted open", self._opening)
            elif exc.errno == errno.ENODEV:
                self._ended = True
            else:
                log.error("cannot write the reply to request %d: %s", unique, exc.strerror)
        finally:
            self._counted = []
            self._opening = None

    # -- nodes and paths ---------------------------------------------------------------------------

    def _node(self, nodeid: int) -> NodeEntry:
        node = self.nodes.get(nodeid)
        if node is None:
            log.error("the kernel asks about node %d, which is not in the table", nodeid)
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return node

    def _path(self, nodeid: int) -> str:
        """A path of node ``nodeid``; raises ENOENT when it has none left (removed), ESTALE for an unknown node."""
        path = self._node(nodeid).path
        if path is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return path

    def _child(self, nodeid: int, name: str) -> str:
        parent = self._path(nodeid)
        return f"{parent}/{name}" if parent else name

    def _found(self, path: str, attrs: dict[str, Any]) -> NodeEntry:
        is_dir = stat.S_ISDIR(attrs["st_mode"])
        split = not is_dir and attrs["st_nlink"] > 1 and self.ov.lookup.lookup(path).upper is None
        node = self.nodes.found(path, identity(attrs["st_ino"], path, split), is_dir)
        self._counted.append(node)
        return node

    def _entry(self, path: str, fh: int | None = None) -> bytes:
        """The entry reply for the object now at ``path`` (a lookup counted for it)."""
        attrs = self.ov.getattr(path, fh)
        node = self._found(path, attrs)
        return p.entry_out(node.nodeid, attrs, self.timeout, self.timeout)

    def _attrs(self, node: NodeEntry, fh: int | None = None) -> dict[str, Any]:
        """The attributes of ``node``: by its path, else through ``fh`` or one of its open handles (ENOENT if none)."""
        path = node.path
        if fh is None and path is None:
            fh = self._any_handle(node)
        return self.ov.getattr(path or "", fh)

    @staticmethod
    def _any_handle(node: NodeEntry) -> int:
        if not node.handles:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return min(node.handles)

    # -- session -----------------------------------------------------------------------------------

    def _init(self, req: Request, arg: memoryview) -> bytes:
        try:
            self.negotiated, reply = p.negotiate(arg, self.passthrough)
        except p.ProtocolError as exc:
            log.error("%s", exc)
            self._ended = True
            raise OSError(errno.EPROTO, str(exc)) from None
        self.passthrough = self.negotiated.passthrough
        log.info("native FUSE transport: protocol 7.%d (the kernel offers 7.%d), flags %s", self.negotiated.minor,
                 struct.unpack_from("=I", arg, 4)[0], _flag_names(self.negotiated.flags))  # fmt: skip
        if not self.passthrough:
            log.info("passthrough is off: every read and write is served by the daemon")
        if self._on_ready is not None:
            self._on_ready()
        return reply

    def _destroy(self, req: Request, arg: memoryview) -> bytes:
        self._ended = True
        return b""

    def _interrupt(self, req: Request, arg: memoryview) -> bytes:
        """INTERRUPT: nothing to do, never answered (one request at a time: the one it names was answered)."""
        return b""

    # -- names -------------------------------------------------------------------------------------

    def _lookup(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, _cstring(arg))
        try:
            return self._entry(path)
        except FileNotFoundError:
            return p.negative_entry(self.timeout)

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
        path = self._child(req.nodeid, _cstring(arg[p.MKNOD_IN.size :]))
        self.ov.mknod(path, mode, rdev, req.caller)
        return self._entry(path)

    def _mkdir(self, req: Request, arg: memoryview) -> bytes:
        mode, _ = p.MKDIR_IN.unpack_from(arg)
        path = self._child(req.nodeid, _cstring(arg[p.MKDIR_IN.size :]))
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
        new = self._child(req.nodeid, _cstring(arg[p.LINK_IN.size :]))
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
        path = self._child(req.nodeid, _cstring(arg))
        last = self._last_name(path)
        self.ov.unlink(path)
        self.nodes.removed(path, last_name=last)
        return b""

    def _rmdir(self, req: Request, arg: memoryview) -> bytes:
        path = self._child(req.nodeid, _cstring(arg))
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

    # -- attributes --------------------------------------------------------------------------------

    def _getattr(self, req: Request, arg: memoryview) -> bytes:
        flags, _, fh = p.GETATTR_IN.unpack_from(arg)
        node = self._node(req.nodeid)
        if not flags & p.GETATTR_FH and node.handles:
            fh = min(node.handles)  # an fstat of an open handle: no lookup (fstat() sends no handle: it has a path)
            flags |= p.GETATTR_FH
        attrs = self._attrs(node, fh if flags & p.GETATTR_FH else None)
        return p.attr_out(attrs, self.timeout)

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
        return p.attr_out(self._attrs(node, handle), self.timeout)

    def _readlink(self, req: Request, arg: memoryview) -> bytes:
        return os.fsencode(self.ov.readlink(self._path(req.nodeid)))

    def _statfs(self, req: Request, arg: memoryview) -> bytes:
        sv = self.ov.statfs()
        return p.STATFS_OUT.pack(sv["f_blocks"], sv["f_bfree"], sv["f_bavail"], sv["f_files"], sv["f_ffree"],
                                 sv["f_bsize"], sv["f_namemax"], sv["f_frsize"], 0)  # fmt: skip

    def _access(self, req: Request, arg: memoryview) -> bytes:
        self._attrs(self._node(req.nodeid))  # exists (ENOENT if not); the kernel checks the permission bits
        return b""

    # -- files -------------------------------------------------------------------------------------

    def _opened(self, node: NodeEntry, fh: int) -> bytes:
        """The OPEN/CREATE reply for handle ``fh`` on ``node``: passed through to its real file when it can be.

        The kernel keeps one mode per inode: every open handle passed through to the same backing file, or
        every one served (then its pages are cached: every name is this inode, so they stay valid). A file
        still read from a lower layer (or a metacopy file's data) is served: its copy-up must switch every
        handle on it to the upper copy, which the engine does for its own fds and the kernel could not do for a
        backing file. So is every open of a node that has served handles open.
        """
        if node.handles is None:
            node.handles = set()
        node.handles.add(fh)
        self._fh_node[fh] = node
        self._opening = fh
        backing = self._backing(node, fh) if self.passthrough and not node.served else 0
        if backing:
            node.passed += 1
            self._passed.add(fh)
            return p.OPEN_OUT.pack(fh, p.FOPEN_PASSTHROUGH, backing)
        node.served += 1
        return p.OPEN_OUT.pack(fh, p.FOPEN_KEEP_CACHE, 0)

    def _backing(self, node: NodeEntry, fh: int) -> int:
        """The backing ID for handle ``fh`` on ``node`` (the node's, or a new one); 0 when it must be served.

        Passthrough is turned off for the whole session when the kernel refuses it (EPERM: not CAP_SYS_ADMIN).
        """
        of = self.ov.files.get(fh)
        if of.on_lower or of.metacopy:
            return 0
        st = os.fstat(of.fd)
        if not stat.S_ISREG(st.st_mode):
            return 0
        real = (st.st_dev, st.st_ino)
        if node.passed:
            return node.backing if node.backing_file == real else 0
        try:
            backing = int(fcntl.ioctl(self.fd, p.BACKING_OPEN, bytearray(p.BACKING_MAP.pack(of.fd, 0, 0)), True))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP):
                log.warning("passthrough is off: the kernel refuses backing files (%s)", exc.strerror)
                self.passthrough = False
            else:
                log.info("%r is served, not passed through: %s", of.path, exc.strerror)
            return 0
        node.backing, node.backing_file = backing, real
        return backing

    def _open(self, req: Request, arg: memoryview) -> bytes:
        flags, _ = p.OPEN_IN.unpack_from(arg)
        node = self._node(req.nodeid)
        path = node.path
        if path is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._opened(node, self.ov.open(path, flags))

    def _create(self, req: Request, arg: memoryview) -> bytes:
        flags, mode, _, _ = p.CREATE_IN.unpack_from(arg)
        path = self._child(req.nodeid, _cstring(arg[p.CREATE_IN.size :]))
        fh = self.ov.create(path, mode, flags, req.caller)
        try:
            entry = self._entry(path)
        except BaseException:
            self.ov.release(fh)
            raise
        node = self._counted[-1]
        node.no_caps = True  # a new file has no file capabilities
        return entry + self._opened(node, fh)

    def _tmpfile(self, req: Request, arg: memoryview) -> bytes:
        """TMPFILE (``open(dir, O_TMPFILE)``): the request and reply of CREATE, for a file that gets no name.

        The kernel sends it at any negotiated minor from 7.37 on (Linux 6.1), with the name ``/``, which is
        ignored; ENOSYS would make it answer EOPNOTSUPP for the rest of the mount. The node has no path: its requests
        go through its open handles until a LINK names it.
        """
        flags, mode, _, _ = p.CREATE_IN.unpack_from(arg)
        fh = self.ov.tmpfile(self._path(req.nodeid), mode, flags, req.caller)
        try:
            attrs = self.ov.getattr("", fh)
        except BaseException:
            self.ov.release(fh)
            raise
        node = self.nodes.unnamed(attrs["st_ino"])
        self._counted.append(node)
        node.no_caps = True  # a new file has no file capabilities
        return p.entry_out(node.nodeid, attrs, self.timeout, self.timeout) + self._opened(node, fh)

    def _read(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, size, *_ = p.READ_IN.unpack_from(arg)
        return self.ov.read(fh, size, offset)

    def _write(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, size, *_ = p.WRITE_IN.unpack_from(arg)
        data = arg[p.WRITE_IN.size : p.WRITE_IN.size + size]  # pwrite takes the buffer as it is: no copy of 1 MiB
        return p.WRITE_OUT.pack(self.ov.write(fh, cast(bytes, data), offset), 0)

    def _fsyncdir(self, req: Request, arg: memoryview) -> bytes:
        """Nothing to do: directories are changed by calls that are synchronous in the upper filesystem.

        (FLUSH has no handler: the ENOSYS the loop answers makes the kernel stop sending it at every close,
        one request per file saved, as fuse-overlayfs does; this transport holds nothing to flush.)
        """
        return b""

    def _release(self, req: Request, arg: memoryview) -> bytes:
        fh, *_ = p.RELEASE_IN.unpack_from(arg)
        self._forget_handle(fh)
        return b""

    def _forget_handle(self, fh: int) -> None:
        """Close the open file ``fh`` and drop it from its node (its backing file too, with its last handle)."""
        node = self._fh_node.pop(fh, None)
        if node is not None:
            if node.handles is not None:
                node.handles.discard(fh)
            if fh in self._passed:
                self._passed.discard(fh)
                node.passed -= 1
                if not node.passed:
                    self._close_backing(node)
            else:
                node.served -= 1
            if not node.handles:
                self.nodes.closed_nameless(node)
        self.ov.release(fh)

    def _close_backing(self, node: NodeEntry) -> None:
        backing, node.backing = node.backing, 0
        try:
            fcntl.ioctl(self.fd, p.BACKING_CLOSE, struct.pack("=I", backing))
        except OSError as exc:
            log.warning("cannot close backing file %d of node %d: %s", backing, node.nodeid, exc.strerror)

    def _fsync(self, req: Request, arg: memoryview) -> bytes:
        fh, flags, _ = p.FSYNC_IN.unpack_from(arg)
        self.ov.fsync(fh, bool(flags & p.FSYNC_FDATASYNC))
        return b""

    def _fallocate(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(arg)
        self.ov.fallocate(fh, mode, offset, length)
        return b""

    def _lseek(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, whence, _ = p.LSEEK_IN.unpack_from(arg)
        return p.LSEEK_OUT.pack(os.lseek(self.ov.files.get(fh).fd, offset, whence))

    def _copy_file_range(self, req: Request, arg: memoryview) -> bytes:
        fh_in, off_in, _, fh_out, off_out, length, _ = p.COPY_FILE_RANGE_IN.unpack_from(arg)
        fd_in, fd_out = self.ov.files.get(fh_in).fd, self.ov.files.get(fh_out).fd
        return p.WRITE_OUT.pack(os.copy_file_range(fd_in, fd_out, length, off_in, off_out), 0)

    # -- directories -------------------------------------------------------------------------------

    def _opendir(self, req: Request, arg: memoryview) -> bytes:
        if not stat.S_ISDIR(self._attrs(self._node(req.nodeid))["st_mode"]):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        fh = next(self._next_dir)
        self._dirs[fh] = None
        # The kernel keeps listings while the directory's version (bumped by every change made through the mount)
        # and mtime stay the same: nothing else changes a merged directory while mounted.
        return p.OPEN_OUT.pack(fh, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR if self.timeout > 0 else 0, 0)

    def _listing(self, req: Request, fh: int, offset: int) -> tuple[str, list[tuple[str, int, int]]]:
        """The directory's path and listing: read at offset 0 (a rewind reads again), then kept per handle."""
        path = self._path(req.nodeid)
        entries = self._dirs.get(fh)
        if entries is None or offset == 0:
            entries = self.ov.readdir(path)
            self._dirs[fh] = entries
        return path, entries

    def _readdir(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, size, *_ = p.READ_IN.unpack_from(arg)
        _, entries = self._listing(req, fh, offset)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, mode, ino = entries[index]
            record = p.dirent(ino, index + 1, mode >> 12, os.fsencode(name))
            if len(out) + len(record) > size:
                break
            out += record
        return bytes(out)

    def _readdirplus(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, size, *_ = p.READ_IN.unpack_from(arg)
        path, entries = self._listing(req, fh, offset)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, mode, ino = entries[index]
            raw = os.fsencode(name)
            record_size = p.ENTRY_OUT.size + p.DIRENT.size + len(raw) + (-(p.DIRENT.size + len(raw)) % 8)
            if len(out) + record_size > size:
                break
            entry = b""
            if name not in _DOT_NAMES:
                child = f"{path}/{name}" if path else name
                try:
                    attrs = self.ov.getattr(child)
                except OSError:
                    pass  # gone since the listing was made: a plain entry, the kernel looks it up
                else:
                    entry = p.entry_out(self._found(child, attrs).nodeid, attrs, self.timeout, self.timeout)
            out += entry or p.ENTRY_OUT.pack(*((0,) * 22))
            out += p.dirent(ino, index + 1, mode >> 12, raw)
        return bytes(out)

    def _releasedir(self, req: Request, arg: memoryview) -> bytes:
        fh, *_ = p.RELEASE_IN.unpack_from(arg)
        self._dirs.pop(fh, None)
        return b""

    # -- xattrs ------------------------------------------------------------------------------------

    def _setxattr(self, req: Request, arg: memoryview) -> bytes:
        size, flags = p.SETXATTR_IN.unpack_from(arg)
        rest = bytes(arg[p.SETXATTR_IN.size :])
        name, _, value = rest.partition(b"\0")
        node = self._node(req.nodeid)
        node.no_caps = False
        self.ov.setxattr(self._path(req.nodeid), os.fsdecode(name), value[:size], flags)
        self._mode_changed(req.nodeid, os.fsdecode(name))
        return b""

    def _getxattr(self, req: Request, arg: memoryview) -> bytes:
        """An xattr's value; ``security.capability`` is known absent after the first ENODATA, until a SETXATTR.

        The kernel asks for it before every write to a file (to drop file capabilities); only a SETXATTR
        through the mount can add it, since copy-up keeps a file's xattrs.
        """
        size, _ = p.GETXATTR_IN.unpack_from(arg)
        name = _cstring(arg[p.GETXATTR_IN.size :])
        node = self._node(req.nodeid)
        if name == _CAPS:
            if node.no_caps:
                raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
            try:
                value = self.ov.getxattr(self._path(req.nodeid), name)
            except OSError as exc:
                node.no_caps = exc.errno == errno.ENODATA
                raise
        else:
            value = self.ov.getxattr(self._path(req.nodeid), name)
        return _sized(value, size)

    def _listxattr(self, req: Request, arg: memoryview) -> bytes:
        size, _ = p.GETXATTR_IN.unpack_from(arg)
        names = self.ov.listxattr(self._path(req.nodeid))
        return _sized(b"".join(os.fsencode(n) + b"\0" for n in names), size)

    def _removexattr(self, req: Request, arg: memoryview) -> bytes:
        self.ov.removexattr(self._path(req.nodeid), _cstring(arg))
        self._mode_changed(req.nodeid, _cstring(arg))
        return b""

    def _mode_changed(self, nodeid: int, name: str) -> None:
        """After an ACL change (which sets the permission bits), make the kernel drop the node's attributes.

        The kernel updates only ctime after a SETXATTR. FUSE_NOTIFY_INVAL_INODE with offset -1 touches
        attributes only, no page, so writing it before the reply cannot wait on this request.
        """
        if xattrs.changes_mode(name):
            out = p.NOTIFY_INVAL_INODE_OUT.pack(nodeid, -1, 0)
            header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(out), p.NOTIFY_INVAL_INODE, 0)
            with contextlib.suppress(OSError):  # ENOENT: the kernel no longer has the inode
                os.writev(self.fd, [header, out])


def _sized(value: bytes, size: int) -> bytes:
    """An xattr reply: the length alone when asked with size 0, ERANGE when ``value`` is longer than ``size``."""
    if size == 0:
        return p.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
    return value


def _time(valid: int, given: int, now: int, seconds: int, nanoseconds: int) -> int:
    """A time of SETATTR in nanoseconds for the engine: UTIME_NOW, UTIME_OMIT, or the time given."""
    from pylayerfs.overlay.filesystem import UTIME_NOW, UTIME_OMIT

    if valid & now:
        return UTIME_NOW
    if not valid & given:
        return UTIME_OMIT
    if seconds >= 1 << 63:
        seconds -= 1 << 64  # before 1970
    return seconds * 1_000_000_000 + nanoseconds


def _flag_names(flags: int) -> str:
    return "|".join(flag.name or "?" for flag in p.Init if flags & flag) or "none"


def _name(opcode: int) -> str:
    try:
        return p.Op(opcode).name
    except ValueError:
        return f"opcode {opcode}"


def serve(
    overlay: Overlay,
    mountpoint: str,
    *,
    fsname: str,
    options: list[str],
    allow_other: bool,
    default_permissions: bool,
    timeout: float,
    on_ready: Callable[[], None] | None = None,
    on_session: Callable[[Session], None] | None = None,
    passthrough: bool = True,
) -> bool:
    """Mount ``overlay`` on ``mountpoint`` and serve it until unmounted; True if stopped by :meth:`Session.stop`.

    ``fsname`` is the mount's source, ``options`` the generic mount options, ``timeout`` how long the
    kernel may cache entries and attributes, ``passthrough`` whether open files may be passed through to
    their real files (where the kernel and the daemon's privileges allow). ``on_session`` gets the session
    before the first request (to route signals to :meth:`Session.stop`). Raises
    :class:`~pylayerfs.fuse.native.device.DeviceError` when the mount cannot be made. The overlay is closed when
    the session ends.
    """
    from pylayerfs.fuse.native.device import mount

    try:
        session = Session(overlay, -1, mountpoint=mountpoint, timeout=timeout, on_ready=on_ready,
                          passthrough=passthrough)  # fmt: skip
        session.fd, session.by_fusermount = mount(mountpoint, fsname=fsname, options=options,
                                                  allow_other=allow_other,
                                                  default_permissions=default_permissions)  # fmt: skip
    except BaseException:
        overlay.close()
        raise
    try:
        if on_session is not None:
            on_session(session)
        return session.run()
    except BaseException:
        session.abandon()  # a failing device: never leave a dead mount behind
        raise
    finally:
        os.close(session.fd)
        overlay.close()
