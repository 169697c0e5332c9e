"""Layers: the real directories an overlay is stacked from.

The kernel's ``struct ovl_layer``: index 0 is the upper layer (writable, may be
absent), then the lower layers from the top-most to the bottom-most, exactly
the order of ``lowerdir=top:...:bottom``.

Lower layers are immutable while mounted (changing them is undefined in the
kernel too), so each lower directory is listed once, with an ``lstat`` of every
entry, and the listing is kept: a lookup in a stack of 100 layers is then 100
dictionary probes, not 100 ``stat`` calls.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from pylayerfs.overlay import realfs
from pylayerfs.overlay.markers import OPAQUE_XWHITEOUTS, OPAQUE_YES, Markers, is_whiteout

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def split(path: str) -> tuple[str, str]:
    """``"a/b/c"`` -> ``("a/b", "c")``; paths are relative to the layer root, ``""`` is the root (``("", "")``)."""
    head, _, tail = path.rpartition("/")
    return head, tail


def join(parent: str, name: str) -> str:
    """``join("a/b", "c")`` -> ``"a/b/c"``; at the root (``parent == ""``) the name alone."""
    return f"{parent}/{name}" if parent else name


class Layer:
    """One layer directory, reached only through a directory fd (``O_PATH``) opened at mount.

    ``index`` is the layer's place in the stack (0 the upper layer, 1 the top-most lower); ``root`` its real path.
    Opening it raises ENOENT, ENOTDIR or EACCES as ``open(2)`` does.
    """

    def __init__(self, index: int, root: str) -> None:
        self.index = index
        self.root = root
        self.fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.index} {self.root}>"

    def close(self) -> None:
        """Close the layer's fd; the layer is unusable after."""
        os.close(self.fd)

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        """Open ``path`` inside this layer without following symlinks on the way; return the fd (close-on-exec).

        ``""`` is the layer root. Raises as :func:`~pylayerfs.overlay.realfs.openat2`: ELOOP for a symlink on the path,
        EXDEV for a path that leaves the layer, ENOENT, ENOTDIR, EACCES...
        """
        return realfs.openat2(self.fd, path or ".", flags, mode)

    def open_dir(self, path: str) -> int:
        """An fd (``O_RDONLY | O_DIRECTORY``, for listing) on the directory ``path`` of this layer.

        Raises ENOTDIR for a non-directory, ELOOP for a symlink, and what :meth:`open` raises.
        """
        return self.open(path, _DIR_FLAGS)

    @contextlib.contextmanager
    def parent(self, path: str) -> Iterator[tuple[int, str]]:
        """Yield ``(fd of the parent directory, last component)`` of ``path`` for ``*at`` calls; the fd is closed after.

        The last component is not checked. Raises ENOENT/ENOTDIR/ELOOP when the parent directory cannot be reached in
        this layer (see :meth:`open`).
        """
        head, name = split(path)
        fd = self.open(head, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self, path: str) -> os.stat_result:
        """The ``lstat`` of ``path`` in this layer (a symlink itself; ``""``: the layer root).

        Raises ENOENT when the layer has no such object, and what :meth:`parent` raises.
        """
        if not path:
            return os.stat(self.fd)
        with self.parent(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)


class Entry(NamedTuple):
    """What a lower listing keeps of one entry: the lstat fields the lookup rules and a merged listing read.

    A whole ``os.stat_result`` costs ~640 bytes, this ~160: a lower layer of 100,000 files is listed once for the
    life of the mount. The rest of an object's lstat is read when its attributes are asked for
    (:attr:`pylayerfs.overlay.lookup.Node.st`).
    """

    st_mode: int
    st_ino: int
    st_dev: int
    st_size: int


def entry_of(st: os.stat_result, dev: int) -> Entry:
    """The :class:`Entry` of the lstat ``st`` (``dev``: the layer's ``st_dev``, whose int is then shared)."""
    return Entry(st.st_mode, st.st_ino, dev if st.st_dev == dev else st.st_dev, st.st_size)


@dataclass(slots=True)
class Listing:
    """One directory of a lower layer, as the lookup rules need it.

    ``entries``: name -> :class:`Entry` of every entry but whiteouts; ``whiteouts``: the names whited out in this
    directory (0/0 devices, or xattr whiteouts in an ``opaque = "x"`` directory); ``opaque``: marked ``opaque = "y"``;
    ``redirect``: the directory's own raw ``redirect`` xattr (a directory the kernel renamed), None when unset;
    ``unread``: the whole lstat of each entry, until :meth:`LowerLayer.lstat_found` takes it (a listing is usually
    followed by a lookup of its entries, which then costs no second ``lstat``; each is handed out once).
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    unread: dict[str, os.stat_result] = field(default_factory=dict)  # whole lstats not yet asked for (lstat_found)
    whiteouts: set[str] = field(default_factory=set)
    opaque: bool = False
    redirect: bytes | None = None


class LowerLayer(Layer):
    """A read-only layer whose directory listings are cached for the life of the mount."""

    def __init__(self, index: int, root: str, markers: Markers, uuid_off: bool = False) -> None:
        super().__init__(index, root)
        self._markers = markers
        self._listings: dict[str, Listing] = {}
        self.dev = os.stat(self.fd).st_dev
        # The UUID origin file handles name this layer's filesystem by: its own, the null one with uuid=off.
        self.uuid = realfs.NULL_UUID if uuid_off else realfs.fs_uuid(self.fd)
        self._handle_fd = -1  # the root opened for reading, for open_by_handle_at (which refuses O_PATH fds)

    def close(self) -> None:
        """Close the layer's fds; the layer is unusable after."""
        if self._handle_fd >= 0:
            os.close(self._handle_fd)
        super().close()

    def open_by_handle(self, handle_type: int, handle: bytes) -> int:
        """An O_PATH fd of the object of this layer's filesystem with the file handle ``(handle_type, handle)``.

        Raises what :func:`realfs.open_by_handle <pylayerfs.overlay.realfs.open_by_handle>` raises (ESTALE...).
        """
        if self._handle_fd < 0:
            self._handle_fd = os.open(realfs.fd_path(self.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return realfs.open_by_handle(self._handle_fd, handle_type, handle)

    def listing(self, path: str) -> Listing:
        """The entries of directory ``path`` in this layer, whiteouts apart; cached for the life of the mount.

        A path that is missing, not a directory or behind a symlink in this layer (ENOENT, ENOTDIR, ELOOP) has an empty
        listing. Other errors are raised (EACCES...), and the marker reads' (see :class:`Markers`).
        """
        cached = self._listings.get(path)
        if cached is not None:
            return cached
        listing = Listing()
        try:
            fd = self.open_dir(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            self._listings[path] = listing
            return listing
        try:
            present = self._markers.present(fd, None)  # one listxattr: most directories carry no marker
            opaque = self._markers.opaque_value(fd) if self._markers.opaque in present else None
            listing.opaque = opaque == OPAQUE_YES
            listing.redirect = self._markers.redirect_of(fd) if self._markers.redirect in present else None
            with os.scandir(fd) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    if is_whiteout(st) or (
                        opaque == OPAQUE_XWHITEOUTS
                        and stat.S_ISREG(st.st_mode)
                        and st.st_size == 0
                        and self._markers.is_xattr_whiteout(fd, entry.name)
                    ):
                        listing.whiteouts.add(entry.name)
                    else:
                        listing.entries[entry.name] = entry_of(st, self.dev)
                        listing.unread[entry.name] = st
        finally:
            os.close(fd)
        self._listings[path] = listing
        return listing

    def lstat_found(self, path: str) -> os.stat_result:
        """The ``lstat`` of ``path``, which the lookup found in this layer's listings: one call through /proc/self/fd.

        Safe for such a path only: it was reached through directories these listings hold (no symlink on the way, and
        lower layers do not change); the last component is not followed. A path of PATH_MAX or more goes through
        :meth:`lstat`. The first time, the lstat its directory's listing made is handed out instead. Raises ENOENT, EIO.
        """
        if not path:
            return os.stat(self.fd)
        parent, name = split(path)
        listing = self._listings.get(parent)
        st = listing.unread.pop(name, None) if listing is not None else None
        if st is not None:
            return st
        try:
            return os.lstat(realfs.fd_path(self.fd, path))
        except OSError as exc:
            if exc.errno != errno.ENAMETOOLONG:
                raise
        return self.lstat(path)

    def is_metacopy(self, path: str) -> bool:
        """Is the regular file ``path`` a metadata-only copy (its data in a layer below)?

        One ``getxattr`` through ``/proc/self/fd``: the lookup reached ``path`` through directories this layer's
        listings found (no symlinks on the way, and lower layers do not change), and the last component is not followed.
        Raises the getxattr errors other than ENODATA and ENOTSUP.
        """
        return self._markers.is_metacopy(self.fd, path)

    def redirect_of(self, path: str) -> bytes | None:
        """The raw ``redirect`` of the metacopy file ``path`` (found as :meth:`is_metacopy` finds it), None if unset."""
        return self._markers.redirect_of(self.fd, path)


def origin_object(lowers: list[LowerLayer], uuid: bytes, handle_type: int, handle: bytes) -> os.stat_result | None:
    """The lstat of the lower object an origin file handle names: opened (open_by_handle_at) in the first of
    ``lowers`` whose UUID is ``uuid`` and on whose filesystem it is (the kernel's ``ovl_check_origin_fh``,
    ``ovl_decode_real_fh``); None when none has it (a stale handle). Never raises."""
    for layer in lowers:
        if uuid != layer.uuid:
            continue
        try:
            fd = layer.open_by_handle(handle_type, handle)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if st.st_dev == layer.dev:
            return st
    return None
