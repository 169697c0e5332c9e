"""The handlers of directories: OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR."""

from __future__ import annotations

import errno
import os
import stat

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.core import Core, Request

_DOT_NAMES = (".", "..")
_NO_ENTRY = bytes(p.ENTRY_OUT.size)  # node 0: the kernel looks the name up itself


class DirOps(Core):
    """The handlers of directories: OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR."""

    # -- directories -------------------------------------------------------------------------------

    def _opendir(self, req: Request, arg: memoryview) -> bytes:
        """OPENDIR: ENOSYS when the kernel may cache (``timeout`` > 0), else a handle whose listing is read afresh.

        After one ENOSYS the kernel sends no OPENDIR or RELEASEDIR for the rest of the mount (two requests per
        directory opened) and opens every directory with FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR and handle 0
        (``fuse_do_open``, fs/fuse/file.c; FUSE_NO_OPENDIR_SUPPORT): what this method answered before with
        caching on. The kernel keeps a listing while the directory's version (bumped by every change made through
        the mount) and mtime stay the same: nothing else changes a merged directory while mounted. With
        ``timeout=0`` (layers may change underneath) every opendir gets a handle without those flags, so every
        listing is read from the layers; then raises ENOTDIR for a non-directory, ENOENT for a removed one.
        """
        if self.timeout > 0:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        if not stat.S_ISDIR(self._attrs(self._node(req.nodeid))["st_mode"]):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        fh = next(self._next_dir)
        self._dirs[fh] = None
        return p.OPEN_OUT.pack(fh, 0, 0)

    def _listing(self, req: Request, fh: int, offset: int) -> tuple[str, list[tuple[str, int, int]]]:
        """The directory's path and listing: read at offset 0 (a rewind reads again), then kept per handle.

        Handle 0 (no OPENDIR: the kernel caches the listing) reads the engine's listing, which is cached until
        something in the directory changes.
        """
        path = self._path(req.nodeid)
        entries = self._dirs.get(fh) if fh else None
        if entries is None or offset == 0:
            entries = self.ov.readdir(path)
            if fh:
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
        """READDIRPLUS: the entries from ``offset`` that fit in ``size`` bytes, each with its attributes and a lookup.

        An entry whose name is gone since the listing was made (or cannot be looked up) goes without them:
        the kernel looks it up itself. ``.`` and ``..`` never carry attributes.
        """
        fh, offset, size, *_ = p.READ_IN.unpack_from(arg)
        path, entries = self._listing(req, fh, offset)
        attrs_of = self.ov.getattr_entries(path, (e[0] for e in entries[offset:] if e[0] not in _DOT_NAMES))
        prefix = f"{path}/" if path else ""
        out = bytearray()
        for index in range(offset, len(entries)):
            name, mode, ino = entries[index]
            raw = os.fsencode(name)
            record_size = p.ENTRY_OUT.size + p.DIRENT.size + len(raw) + (-(p.DIRENT.size + len(raw)) % 8)
            if len(out) + record_size > size:
                break
            entry = _NO_ENTRY
            if name not in _DOT_NAMES:
                attrs = next(attrs_of)  # the attributes of this entry: the names given skip the dots too
                if attrs is not None:
                    child = prefix + name
                    entry = p.entry_out(self._found(child, attrs).nodeid, attrs, self.valid)
            out += entry
            out += p.dirent(ino, index + 1, mode >> 12, raw)
        return bytes(out)

    def _releasedir(self, req: Request, arg: memoryview) -> bytes:
        fh, *_ = p.RELEASE_IN.unpack_from(arg)
        self._dirs.pop(fh, None)
        return b""

    def _fsyncdir(self, req: Request, arg: memoryview) -> bytes:
        """Nothing to do: directories are changed by calls that are synchronous in the upper filesystem.

        (FLUSH has no handler: the ENOSYS the loop answers makes the kernel stop sending it at every close,
        one request per file saved, as fuse-overlayfs does; this transport holds nothing to flush.)
        """
        return b""
