"""The handlers of directories: OPENDIR, READDIR, READDIRPLUS, RELEASEDIR, FSYNCDIR."""

from __future__ import annotations

import bisect
import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.core import Core, Request

_DOT_NAMES = (".", "..")
_NO_ENTRY = bytes(p.ENTRY_OUT.size)  # node 0: the kernel looks the name up itself
_COOKIE_MASK = (1 << 63) - 1  # offsets are a signed 64-bit off_t: the kernel and telldir(3) take positive ones
_HASHED_KEPT = 16  # listings kept in hash order (READDIRs of one directory come one after another)


class Listing(NamedTuple):
    """A directory's entries ``(name, st_mode type bits, st_ino)`` and the offset of each (``fuse_dirent.off``: where a
    READDIR that stopped after it resumes)."""

    entries: Sequence[tuple[str, int, int]]
    offsets: Sequence[int]


def _cookie(entry: tuple[str, int, int]) -> int:
    """The offset of ``entry`` (``(name, type, st_ino)``) in a listing given in hash order: a hash of its name, positive
    in 63 bits, with bit 2 set to keep it above those of ``.`` (1) and ``..`` (2). The same for the life of the daemon
    (Python's string hash is fixed per process), and distinct for distinct names as far as 62 bits go (two names with
    one hash would make a resumed READDIR skip the second: as likely as a collision of a 62-bit hash)."""
    return (hash(entry[0]) & _COOKIE_MASK) | 4


_hashed_cache: OrderedDict[int, tuple[list[tuple[str, int, int]], Listing]] = OrderedDict()


def _hashed(entries: list[tuple[str, int, int]]) -> Listing:
    """``entries`` (``.`` and ``..`` first, as the engine gives them) in the order of their offsets, with them
    (:func:`_cookie`); the last :data:`_HASHED_KEPT` are kept, by the identity of the engine's listing (a new one
    whenever the directory changes)."""
    kept = _hashed_cache.get(id(entries))
    if kept is not None and kept[0] is entries:
        return kept[1]
    rest = sorted(entries[2:], key=_cookie)
    listing = Listing([*entries[:2], *rest], [1, 2, *map(_cookie, rest)])
    _hashed_cache[id(entries)] = (entries, listing)
    while len(_hashed_cache) > _HASHED_KEPT:
        _hashed_cache.popitem(last=False)
    return listing


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

    def _listing(self, req: Request, fh: int, offset: int) -> tuple[str, Listing, int]:
        """The directory's path, its listing with each entry's offset, and the index of the first entry after
        ``offset`` (where a READDIR resumes).

        With a handle (``timeout=0``), the listing read at offset 0 (a rewind reads again) is kept for the handle, as
        the kernel's overlayfs keeps one per open directory: an entry's offset is its place in it. Handle 0 (no
        OPENDIR: the kernel caches the listing) reads the engine's listing, cached until something in the directory
        changes, which a reader may be half-way through: there an entry's offset is a hash of its name
        (:func:`_cookie`), in the order of which the listing is given, so that removing or adding other entries moves
        no offset and a READDIR resumes where the last one stopped (``rm -rf`` of a large directory, ``seekdir``),
        as a hashed directory of ext4 does. Raises ENOENT/ENOTDIR as the engine's readdir.
        """
        path = self._path(req.nodeid)
        if fh:
            entries = self._dirs.get(fh)
            if entries is None or offset == 0:
                entries = self._dirs[fh] = self.ov.readdir(path)
            return path, Listing(entries, range(1, len(entries) + 1)), offset
        listing = _hashed(self.ov.readdir(path))
        return path, listing, bisect.bisect_right(listing.offsets, offset)

    def _readdir(self, req: Request, arg: memoryview) -> bytes:
        fh, offset, size, *_ = p.READ_IN.unpack_from(arg)
        _, (entries, offsets), start = self._listing(req, fh, offset)
        out = bytearray()
        for index in range(start, len(entries)):
            name, mode, ino = entries[index]
            record = p.dirent(ino, offsets[index], mode >> 12, os.fsencode(name))
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
        path, (entries, offsets), start = self._listing(req, fh, offset)
        attrs_of = self.ov.getattr_entries(path, (e[0] for e in entries[start:] if e[0] not in _DOT_NAMES))
        prefix = f"{path}/" if path else ""
        out = bytearray()
        for index in range(start, len(entries)):
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
            out += p.dirent(ino, offsets[index], mode >> 12, raw)
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
