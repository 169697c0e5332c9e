"""The request loop: read a request from the FUSE device, call the engine, write the reply.

One request at a time, in one thread (the engine needs no locks), but for the data copy of a large copy-up, which
runs in a worker thread while the loop goes on (:mod:`.workers`: requests that depend on it wait, replies go out
of order). Each request names its node by ID; :class:`~pylayerfs.fuse.native.nodes.NodeTable` gives the node's
path, and the handlers call :class:`~pylayerfs.overlay.filesystem.Overlay` with it (or with the open file's
handle, which keeps open unlinked files usable). An :class:`OSError` from the engine becomes its errno in the
reply; any other exception is a bug: it is logged with its traceback and answered with EIO, and the loop goes on.
Nothing raised by a handler ever leaves the loop. The device is non-blocking: after a request the loop reads again
for :data:`SPIN_NS` before it sleeps in ``poll`` (:meth:`Session._next`), which halves a round trip (W8).

INTERRUPT (the caller of a request got a signal) is never answered. The kernel queues one only for a request
the daemon has read; the request it names is answered already (the kernel then drops the interrupt unread),
or it is one whose copy-up runs in a worker (an OPEN, a chmod...): that copy stops if the caller is being killed (see
:mod:`.workers`), else it runs to its end and its caller gets its result. The kernel waits for a request it has
sent even when the caller is killed (a request not yet read is taken back and never seen). A reply the kernel
no longer takes fails with ENOENT and gives back what it counted (:meth:`Session._reply`). ENOSYS would stop the
kernel sending interrupts, EAGAIN would make it send this one again: neither is wanted.

The session ends when a read of the device fails with ENODEV (the filesystem was unmounted, with
``umount``, ``umount -l`` or ``fusermount3 -u``, or the connection aborted), after DESTROY, or when
:meth:`Session.stop` is called (a signal): then it unmounts lazily itself, as libfuse does.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct
import time
from collections.abc import Callable

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.attributes import AttributeOps
from pylayerfs.fuse.native.core import Handler, Request, errno_of, log
from pylayerfs.fuse.native.device import DeviceError, set_readahead, unmount
from pylayerfs.fuse.native.dirs import DirOps
from pylayerfs.fuse.native.files import FileOps
from pylayerfs.fuse.native.names import NameOps
from pylayerfs.fuse.native.workers import MIN_SIZE, NAMES, Deferred, Jobs
from pylayerfs.overlay.copy_up import CopyUp
from pylayerfs.overlay.filesystem import Overlay

SPIN_NS = 50_000  # how long the loop reads again without sleeping after a request (see Session._next)


class Stop(Exception):
    """Raised by a signal handler into a blocked read of the device: the session should end (see :meth:`stop`)."""


class Session(NameOps, AttributeOps, FileOps, DirOps):
    """Serves one mount: the loop, INIT and DESTROY; the handlers come from the mixins (see :class:`~.core.Core`)."""

    def _handler_table(self) -> dict[int, Handler]:
        """The handler of each opcode the transport serves (the others are answered ENOSYS)."""
        return {
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
        failing with an errno other than ENODEV/ENOENT/EINTR (the device is unusable). Copy-ups still in
        flight when it ends are cancelled, their temporary files removed.
        """
        try:
            return self._loop()
        finally:
            if self._jobs is not None:
                self._jobs.close()
                self._jobs = None

    def _loop(self) -> bool:
        """:meth:`run`'s loop: read the next request (:meth:`_next`), serve it, or queue it behind a copy-up."""
        buf = bytearray(p.BUFFER_SIZE)
        view = memoryview(buf)
        os.set_blocking(self.fd, False)  # see _next
        idle = select.poll()
        idle.register(self.fd, select.POLLIN)
        while not self._ended:
            if self._stopping:
                self._unmount()
                self._log_counts()
                return True
            try:
                self._reading = True
                if self._stopping:
                    continue
                n = self._next(buf)
                if not n:
                    if self._jobs is not None:
                        if not self._poll():
                            continue
                    else:
                        idle.poll()
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
            if self._jobs is not None and self._must_wait(view[:n]):
                self._waiting.append(bytes(view[:n]))  # served once the copy-ups it depends on are installed
                continue
            self._serve(view[:n])
        self._log_counts()
        return False

    def _next(self, buf: bytearray) -> int:
        """Read the next request into ``buf`` without sleeping, trying for up to :data:`SPIN_NS`; 0 if none came.

        A program making requests one after another (a ``stat`` loop, a walk) sends the next a few microseconds
        after its reply: reading again at once finds it without the daemon going to sleep and being woken, on
        another CPU as often as not, which costs several times the request itself (W8 in ``pylayerfs bench``).
        Only then does the loop sleep in ``poll``. Raises the read's errors but EAGAIN (ENODEV: unmounted...).
        """
        deadline = time.perf_counter_ns() + SPIN_NS
        while True:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                if time.perf_counter_ns() > deadline:
                    return 0

    def _must_wait(self, request: memoryview) -> bool:
        """Must ``request`` wait for the copy-ups in flight? (:meth:`Jobs.must_wait` with the names it changes.)"""
        assert self._jobs is not None
        opcode, nodeid = _HEAD.unpack_from(request)
        offset = NAMES.get(opcode)
        if offset is None:
            return self._jobs.must_wait(nodeid, [])
        arg = request[p.IN_HEADER.size :]
        try:
            if opcode == p.Op.LINK and self._jobs.must_wait(p.LINK_IN.unpack_from(arg)[0], []):
                return True  # a new name for the file being copied up: its copy-up must be installed first
            if opcode in (p.Op.RENAME, p.Op.RENAME2):
                (newdir,) = p.RENAME_IN.unpack_from(arg)  # RENAME2_IN starts with newdir too
                old, new = p.names(arg[offset:], 2)
                changed = [self._child(nodeid, old), self._child(newdir, new)]
            else:
                changed = [self._child(nodeid, p.names(arg[offset:], 1)[0])]
        except (OSError, ValueError, struct.error):
            return self._jobs.must_wait(nodeid, [])  # a parent without a name, or a bad request: its handler says
        return self._jobs.must_wait(nodeid, changed)

    def _poll(self) -> bool:
        """Wait for a request or a finished copy-up; install those finished; True when the device is readable."""
        assert self._jobs is not None
        readable, finished = self._jobs.poll()
        if finished:
            self._finish_jobs()
        return readable

    # Every request that copies up a regular file's data hands a large copy to a worker first: OPEN for writing,
    # SETATTR by path, SETXATTR, REMOVEXATTR, LINK, RENAME, RENAME2 (tests/test_native_concurrency.py checks each).

    def _hand_over(self, req: Request, arg: memoryview, copy: CopyUp | None, nodeid: int | None = None) -> None:
        """Hand ``copy``, the copy-up serving ``req`` (``arg``) would make inline, to a worker, and the request with
        it: raises :class:`Deferred` (the loop serves the request again once the copy is installed, and the request
        then finds the upper copy: see :meth:`_finish_jobs`). The job is on the copied object's node ``nodeid`` (default
        the request's). Returns when ``copy`` is None."""
        if copy is None:
            return
        if self._jobs is None:
            self._jobs = Jobs(self.fd)
        header = p.IN_HEADER.pack(p.IN_HEADER.size + len(arg), req.opcode, req.unique, req.nodeid,
                                  req.uid, req.gid, req.pid, 0, 0)  # fmt: skip
        self._jobs.start(req.nodeid if nodeid is None else nodeid, copy, header + arg, req.unique, req.pid)
        raise Deferred

    def _ahead(self, path: str | None, meta_only: bool) -> CopyUp | None:
        """The large copy-up a change of ``path`` would make (:meth:`Overlay.copy_up_ahead`), begun; None for none."""
        return None if path is None else self.ov.copy_up_ahead(path, meta_only=meta_only, min_size=MIN_SIZE)

    def _open(self, req: Request, arg: memoryview) -> bytes:
        flags, _ = p.OPEN_IN.unpack_from(arg)
        path = self._node(req.nodeid).path  # None: a held object, reopened as it is (FileOps._open)
        self._hand_over(req, arg, None if path is None else self.ov.open_copy_up(path, flags, MIN_SIZE))
        return super()._open(req, arg)

    def _setattr(self, req: Request, arg: memoryview) -> bytes:
        valid, *_ = p.SETATTR_IN.unpack_from(arg)
        if valid & _SETATTR_CHANGES and not valid & p.FATTR_FH:  # with a handle: a file open for writing, upper
            self._hand_over(req, arg, self._ahead(self._node(req.nodeid).path, meta_only=not valid & p.FATTR_SIZE))
        return super()._setattr(req, arg)

    def _setxattr(self, req: Request, arg: memoryview) -> bytes:
        self._hand_over(req, arg, self._ahead(self._node(req.nodeid).path, meta_only=True))
        return super()._setxattr(req, arg)

    def _removexattr(self, req: Request, arg: memoryview) -> bytes:
        self._hand_over(req, arg, self._ahead(self._node(req.nodeid).path, meta_only=True))
        return super()._removexattr(req, arg)

    def _link(self, req: Request, arg: memoryview) -> bytes:
        (old_id,) = p.LINK_IN.unpack_from(arg)
        self._hand_over(req, arg, self._ahead(self._node(old_id).path, meta_only=False), old_id)
        return super()._link(req, arg)

    def _rename(self, req: Request, arg: memoryview) -> bytes:
        self._rename_first(req, arg, p.RENAME_IN.size)
        return super()._rename(req, arg)

    def _rename2(self, req: Request, arg: memoryview) -> bytes:
        self._rename_first(req, arg, p.RENAME2_IN.size)
        return super()._rename2(req, arg)

    def _rename_first(self, req: Request, arg: memoryview, offset: int) -> None:
        """A rename copies its source up first: hand a large one over (the job on the source's node, if the kernel
        holds one, else on the directory)."""
        old = self._child(req.nodeid, p.names(arg[offset:], 2)[0])
        node = self.nodes.at(old)
        self._hand_over(req, arg, self._ahead(old, meta_only=False), node.nodeid if node is not None else None)

    def _finish_jobs(self) -> None:
        """Install the copy-ups whose data are copied and serve their requests again; then the requests that waited.

        A copy that failed (ENOSPC, EINTR when cancelled...) or an install that failed is answered with its errno,
        its temporary file removed. A successful one serves its request again, which now finds the upper copy.
        """
        assert self._jobs is not None
        for job in self._jobs.finished():
            error = 0
            try:
                if job.error is not None:
                    job.copy.abort()
                    raise job.error
                job.copy.install()
            except OSError as exc:
                error = errno_of(exc) or errno.EIO
            except Exception:
                log.exception("the copy-up for request %d failed, answering EIO", job.unique)
                error = errno.EIO
            if error:
                self._reply(job.unique, error, b"")
            else:
                self.requests -= 1  # served again: counted once
                self.counts[_HEAD.unpack_from(job.request)[0]] -= 1
                self._serve(memoryview(job.request))
        if not self._jobs.by_node:
            self._jobs.close()
            self._jobs = None
        waiting, self._waiting = self._waiting, []
        for request in waiting:  # in order; those that must wait for a copy-up started meanwhile wait again
            if self._jobs is not None and self._must_wait(memoryview(request)):
                self._waiting.append(request)
            else:
                self._serve(memoryview(request))

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
        payload: bytes | memoryview | None = b""
        if handler is None:
            error = errno.ENOSYS
        else:
            try:
                payload = handler(req, arg)
            except Deferred:
                return  # answered when its copy-up is installed
            except OSError as exc:
                error = errno_of(exc)
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
                      os.strerror(error) if error else "replied" if payload is None
                      else f"{len(payload)} bytes")  # fmt: skip
        if opcode in p.NO_REPLY or payload is None:
            return
        self._reply(unique, error, payload)
        if opcode == p.Op.INIT and not error and not set_readahead(self.mountpoint, p.READAHEAD_KIB):
            log.info("readahead stays at the kernel's default (128 KiB READs): only root can raise it")

    def _reply(self, unique: int, error: int, payload: bytes | memoryview) -> None:
        data = p.OUT_HEADER.pack(p.OUT_HEADER.size + (0 if error else len(payload)), -error, unique)
        try:
            os.writev(self.fd, [data] if error else [data, payload])  # one write: the kernel takes it whole
        except OSError as exc:
            self._unsent(unique, exc)
        finally:
            self._counted = []
            self._opening = None

    # -- session -----------------------------------------------------------------------------------

    def _init(self, req: Request, arg: memoryview) -> bytes:
        try:
            self.negotiated, reply = p.negotiate(arg, self.passthrough, self.acl)
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
        """INTERRUPT: never answered; it may stop a copy-up in flight (see :meth:`.workers.Jobs.interrupt`)."""
        if self._jobs is not None:
            self._jobs.interrupt(p.INTERRUPT_IN.unpack_from(arg)[0])
        return b""


_SETATTR_CHANGES = p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | p.FATTR_SIZE | p.FATTR_ATIME | p.FATTR_MTIME  # copy up
_HEAD = struct.Struct("=4xIxxxxxxxxQ")  # a request's opcode and node ID (for Jobs.must_wait)


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
    their real files (where the kernel and the daemon's privileges allow). With ``default_permissions`` the kernel
    checks permissions, POSIX ACLs included (FUSE_POSIX_ACL). ``on_session`` gets the session
    before the first request (to route signals to :meth:`Session.stop`). Raises
    :class:`~pylayerfs.fuse.native.device.DeviceError` when the mount cannot be made. The overlay is closed when
    the session ends.
    """
    from pylayerfs.fuse.native.device import mount

    try:
        session = Session(overlay, -1, mountpoint=mountpoint, timeout=timeout, on_ready=on_ready,
                          passthrough=passthrough, acl=default_permissions)  # fmt: skip
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
        session._close_pipe()
        os.close(session.fd)
        overlay.close()
