"""The handlers of open files: OPEN, CREATE, TMPFILE, READ, WRITE, RELEASE and passthrough."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from typing import cast

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.core import Core, Request, cstring, log
from pylayerfs.fuse.native.nodes import NodeEntry

PAGE_SIZE = 4096
SPLICE_MIN = 64 << 10  # smaller READ replies are copied: two system calls instead of four


def _pipe() -> tuple[int, int, int]:
    """A non-blocking pipe for spliced READ replies, 1 MiB if allowed: ``(read end, write end, pages it holds)``."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    with contextlib.suppress(OSError):  # EPERM above /proc/sys/fs/pipe-max-size: the default size stays
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, p.MAX_WRITE)
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) // PAGE_SIZE


class FileOps(Core):
    """The handlers of open files: OPEN, CREATE, TMPFILE, READ, WRITE, RELEASE and passthrough."""

    _pipe: tuple[int, int, int] | None = None  # for spliced READ replies (:func:`_pipe`), made at the first
    _read_buffer: memoryview | None = None  # for READ replies that are copied

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
        if node.path is None:  # no name left: the object the kernel's dentry still holds (see NameOps._removing)
            return self._opened(node, self.ov.reopen(self._held_handle(node), flags))
        fh = self.ov.open(node.path, flags)
        self._unsplit(node)  # opened for writing: copied up
        return self._opened(node, fh)

    def _create(self, req: Request, arg: memoryview) -> bytes:
        flags, mode, umask, _ = p.CREATE_IN.unpack_from(arg)
        path = self._child(req.nodeid, cstring(arg[p.CREATE_IN.size :]))
        fh = self.ov.create(path, mode, flags, req.creator(umask))
        try:
            entry = self._entry(path, fh)  # the new file's fstat: no lookup of what was just made
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
        flags, mode, umask, _ = p.CREATE_IN.unpack_from(arg)
        fh = self.ov.tmpfile(self._path(req.nodeid), mode, flags, req.creator(umask))
        try:
            attrs = self.ov.getattr("", fh)
        except BaseException:
            self.ov.release(fh)
            raise
        node = self.nodes.unnamed(attrs["st_ino"])
        self._counted.append(node)
        node.no_caps = True  # a new file has no file capabilities
        return p.entry_out(node.nodeid, attrs, self.valid) + self._opened(node, fh)

    def _read(self, req: Request, arg: memoryview) -> memoryview | None:
        """READ of a served handle: ``size`` bytes from byte ``offset`` of its real file (fewer at its end).

        Read from the engine's fd for the handle at the time of the request, which copy-up moves to the upper
        copy. A reply of :data:`SPLICE_MIN` bytes or more (up to the file's end, by ``fstat``) is spliced
        (:meth:`_splice_read`; None: replied); a smaller one, and one that cannot be spliced, is read into a
        buffer kept for the session (two copies of the data, no allocation). Raises EBADF for a handle not open
        for reading, and ``pread(2)``'s errors (EIO...).
        """
        fh, offset, size, *_ = p.READ_IN.unpack_from(arg)
        fd = self.ov.files.get(fh).fd
        if size >= SPLICE_MIN:
            length = min(size, os.fstat(fd).st_size - offset)
            if length >= SPLICE_MIN and self._splice_read(req.unique, fd, offset, length):
                return None
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(p.MAX_WRITE))
        return self._read_buffer[: os.preadv(fd, [self._read_buffer[:size]], offset)]

    def _splice_read(self, unique: int, fd: int, offset: int, size: int) -> bool:
        """Answer READ ``unique`` with ``size`` bytes at ``offset`` of ``fd`` by splice(2); False: nothing was sent.

        The reply header is written into a pipe, the file's pages are spliced in behind it (the pipe takes
        references to them: no copy) and the pipe is spliced to the device, which copies each page once into
        the FUSE file's page cache (fs/fuse/dev.c ``fuse_dev_splice_write``; libfuse's splice path does the
        same). The header goes first, so the size must be known before the data is read: a splice shorter
        than ``size`` (the file shrank meanwhile), a reply the pipe cannot hold or a file that cannot be
        spliced (EINVAL) gives False, with the pipe made anew, and the caller reads the data by ``pread``.
        Errors writing to the device go to :meth:`_unsent`, as a written reply's do.
        """
        if self._pipe is None:
            self._pipe = _pipe()
        r, w, capacity = self._pipe
        if 1 + (offset + size - 1) // PAGE_SIZE - offset // PAGE_SIZE + 1 > capacity:  # the header's page, the data's
            return False
        total = p.OUT_HEADER.size + size
        try:
            os.write(w, p.OUT_HEADER.pack(total, 0, unique))
            done = 0
            while done < size:
                n = os.splice(fd, w, size - done, offset + done)
                if not n:
                    raise EOFError
                done += n
        except (OSError, EOFError):
            self._close_pipe()
            return False
        try:
            os.splice(r, self.fd, total)
        except OSError as exc:
            self._close_pipe()
            self._unsent(unique, exc)
        return True

    def _unsent(self, unique: int, exc: OSError) -> None:
        """The reply to request ``unique`` could not be written (``exc``): take back what it gave the kernel.

        ENOENT: the request is gone (interrupted) and the kernel took nothing from it, neither the lookups counted
        for it nor the file it opened (which will never be released). ENODEV: the session is over. Anything
        else is logged.
        """
        if exc.errno == errno.ENOENT:
            for node in self._counted:
                self.nodes.unfound(node)
            if self._opening is not None:
                try:
                    self._forget_handle(self._opening)
                except Exception:
                    log.exception("cannot release handle %d of an interrupted open", self._opening)
        elif exc.errno == errno.ENODEV:
            self._ended = True
        else:
            log.error("cannot write the reply to request %d: %s", unique, exc.strerror)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    def _write(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, size, *_ = p.WRITE_IN.unpack_from(arg)
        data = arg[p.WRITE_IN.size : p.WRITE_IN.size + size]  # pwrite takes the buffer as it is: no copy of 1 MiB
        return p.WRITE_OUT.pack(self.ov.write(fh, cast(bytes, data), offset), 0)

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
