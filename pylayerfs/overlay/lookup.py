"""Lookup: resolving a merged path to the real objects behind it.

The rules are the kernel's (``fs/overlayfs/namei.c``), applied top-down one
path component at a time:

=====================================  ======================================
found in this layer                    effect
=====================================  ======================================
a whiteout                             the name is hidden; stop
a non-directory                        it is the object (if nothing above
                                       was found); stop; an upper file
                                       marked metacopy takes its data from
                                       the lower file below it
a directory marked opaque              it joins the merge; stop
a directory                            it joins the merge; go on down
nothing                                go on down
=====================================  ======================================

A name is looked up in a lower layer only if the parent directory of that layer
is part of the parent's merge, so a symlink or a file in a lower layer never
leads the lookup into another directory.

Two caches make this cheap: the *lower stack* of every path a lower layer
holds (the lower layers never change while mounted, so it is computed once;
names no lower layer holds are not kept, so the cache is bounded by the lowers),
and the merged node of every directory looked up (with an fd on its upper
directory), dropped when the overlay removes, renames or copies up that
directory (:meth:`Lookup.invalidate`).

The directory cache holds at most :func:`max_cached_dirs` nodes, dropping the
least recently used, and a lookup finds a cached node before it opens anything,
so a directory has one fd at most however often it is looked up. An upper fd
belongs to its node (:class:`DirFd`): it is closed when the node is dropped
from the cache and no caller holds it any more, so an operation that holds a
node never sees its fd closed (or its number reused) under it.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import resource
import stat
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pylayerfs.overlay.layers import Entry, Layer, LowerLayer, entry_of, join, split
from pylayerfs.overlay.markers import Markers, OriginHandle, is_whiteout

LowerHit = tuple[LowerLayer, Entry]
MAX_CACHED_DIRS = 4096  # the most directory fds the cache keeps, when the fd limit allows it
_DIR_FD_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def max_cached_dirs() -> int:
    """How many directory nodes (each with an fd) the cache keeps: :data:`MAX_CACHED_DIRS`, or fewer when
    the process's soft ``RLIMIT_NOFILE`` is low, so the cache takes at most a quarter of it (64 at least)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CACHED_DIRS
    return max(64, min(MAX_CACHED_DIRS, soft // 4))


class DirFd:
    """Owns one directory fd: closes it when the last node holding it is gone (or at :meth:`close`).

    A node dropped from the cache may still be in a caller's hands (an operation half-way through, a listing
    walking its entries), so its fd is closed by the garbage collector, not by the cache.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        """Close the fd now (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class LowerStack:
    """What the lower layers hold at one path, top-first, ignoring the upper layer.

    Empty when no lower layer has the name (or a whiteout hides it). Holds one
    non-directory, or one or more directories that merge.
    """

    hits: tuple[LowerHit, ...] = ()
    # A metacopy file on top: hits then go down to the file holding the data (the last one). It has none: orphan.
    metacopy: bool = False
    orphan: bool = False

    @property
    def is_dir(self) -> bool:
        """True when the top-most hit is a directory (then every hit is one: they merge)."""
        return bool(self.hits) and stat.S_ISDIR(self.hits[0][1].st_mode)


NO_LOWER = LowerStack()


@dataclass(slots=True)
class Node:
    """One object of the merged view: its upper part, its lower stack (the kernel's ``ovl_entry``).

    ``upper`` is the lstat of the upper object (None: only in lower layers); ``upper_fd`` an ``O_PATH`` fd on the upper
    directory of a directory node (-1 otherwise), valid as long as the node is (``fd_owner`` closes it when the node
    is gone; the root's is the upper layer's own); ``origin`` the inode number of the lower object it was copied up
    from, found through its ``origin`` xattr.
    """

    path: str
    upper: os.stat_result | None
    lower: LowerStack
    upper_fd: int = -1  # O_PATH fd of the upper directory, for cached directory nodes
    opaque: bool = False  # the upper directory is marked opaque
    origin: int | None = None  # inode number the upper object had before copy-up
    metacopy: bool = False  # the upper file holds metadata only: the data is the lower file's (lower.hits[0])
    fd_owner: DirFd | None = field(default=None, repr=False, compare=False)  # closes upper_fd with the node
    lower_st: os.stat_result | None = field(default=None, repr=False, compare=False)  # read by ``st``, once
    nlink: int | None = None  # the merged link count of an indexed hard link (index.py), else the real object's

    @property
    def st(self) -> os.stat_result:
        """The lstat of the top-most real object: what the merged view shows.

        A lower object's is read from its layer on first use (the listings keep only an :class:`Entry`); raises
        ``lstat``'s errors then (ENOENT, EIO), which a lower layer changed while mounted would cause.
        """
        if self.upper is not None:
            return self.upper
        if self.lower_st is None:
            self.lower_st = self.lower.hits[0][0].lstat_found(self.path)
        return self.lower_st

    @property
    def top(self) -> os.stat_result | Entry:
        """The top-most real object's upper lstat, or its lower listing's :class:`Entry` (mode, inode, device, size):
        enough for its type and inode number without reading a lower object's whole lstat."""
        return self.upper if self.upper is not None else self.lower.hits[0][1]

    @property
    def mode(self) -> int:
        """The ``st_mode`` of the top-most real object."""
        return self.top.st_mode

    @property
    def is_dir(self) -> bool:
        """True when the merged object is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def data(self) -> LowerHit | None:
        """Where a metacopy file's data is: ``(layer, entry of the file holding it)``; None for any other object."""
        if self.metacopy or (self.upper is None and self.lower.metacopy):
            return self.lower.hits[-1]
        return None

    @property
    def is_merged(self) -> bool:
        """True for a directory with a part in more than one layer (its ``st_nlink`` then reads 1)."""
        return len(self.lower.hits) + (self.upper is not None) > 1


class Lookup:
    """Resolves merged paths over one stack of layers (the kernel's ``namei.c``), with the module's two caches.

    ``upper`` is None on a read-only stack; ``lowers`` are top-first; with ``metacopy`` (the ``metacopy=on`` option)
    lower metacopy files are recognised and followed. ``ino_of`` maps a real object's lstat to the inode number the
    mount reports (``InodeNumbers.of_real``; by default its own ``st_ino``).
    """

    def __init__(
        self,
        upper: Layer | None,
        lowers: list[LowerLayer],
        markers: Markers,
        metacopy: bool = False,
        ino_of: Callable[[os.stat_result], int] = operator.attrgetter("st_ino"),
    ) -> None:
        self.ino_of = ino_of
        self.upper = upper
        self.lowers = lowers
        self.markers = markers
        self.metacopy = metacopy
        self._lower_stacks: dict[str, LowerStack] = {}
        # index=on (index.py): a lower-only name of an indexed hard link is its index entry; an upper one gets its
        # merged link count. None: index=off.
        self.alias: Callable[[Node], Node] | None = None
        self.indexed: Callable[[Node, int, str], Node] | None = None
        self._dirs: OrderedDict[str, Node] = OrderedDict()  # least recently used first
        self.max_dirs = max_cached_dirs()

    # -- lower layers (immutable, cached forever) ------------------------------

    def lower_stack(self, path: str) -> LowerStack:
        """What the lower layers hold at ``path``, top-first (:class:`LowerStack`).

        A stack with hits is cached for the life of the mount; :data:`NO_LOWER` is not (any name may be asked for, and
        answering it again costs one dictionary probe per layer of the parent's merge). Ignores the upper layer, so
        whiteouts and opaque directories in the upper layer are the caller's to apply. Raises what
        :meth:`LowerLayer.listing <pylayerfs.overlay.layers.LowerLayer.listing>` raises, and EPERM for a lower metacopy
        file with a ``redirect`` (with ``metacopy=on``).
        """
        cached = self._lower_stacks.get(path)
        if cached is not None:
            return cached
        if not path:
            result = self._root_lower_stack()
            self._lower_stacks[path] = result
            return result
        parent_path, name = split(path)
        return self.lower_stack_in(self.lower_stack(parent_path), parent_path, name)

    def lower_stack_in(self, parent: LowerStack, parent_path: str, name: str) -> LowerStack:
        """What the lower layers hold at ``name`` in ``parent_path``, given ``parent``: the stack the lookup found
        for that directory (:data:`NO_LOWER` for an opaque upper directory); cached as :meth:`lower_stack`."""
        if not parent.is_dir:
            return NO_LOWER  # checked first: the cache may hold the path from before its parent became opaque
        path = join(parent_path, name)
        cached = self._lower_stacks.get(path)
        if cached is not None:
            return cached
        result = self._lower_child(parent, parent_path, name)
        if result.hits:
            self._lower_stacks[path] = result
        return result

    def _root_lower_stack(self) -> LowerStack:
        """Every lower layer's root: the kernel never looks the root up, so an opaque marker on a layer's root
        hides nothing (``ovl_get_lowerstack`` stacks them all; checked against the kernel in tests/test_kernel.py)."""
        return LowerStack(tuple((layer, entry_of(layer.lstat(""), layer.dev)) for layer in self.lowers))

    def _lower_child(self, parent: LowerStack, parent_path: str, name: str) -> LowerStack:
        hits: list[LowerHit] = []
        path = join(parent_path, name)
        metacopy = False
        for layer, _ in parent.hits:
            listing = layer.listing(parent_path)
            if name in listing.whiteouts:
                break
            st = listing.entries.get(name)
            if st is None:
                continue
            if metacopy and not stat.S_ISREG(st.st_mode):
                break  # a metacopy file's data can only be a regular file
            if not stat.S_ISDIR(st.st_mode):
                if hits and not metacopy:
                    break  # a non-directory below a directory: hidden
                hits.append((layer, st))
                # Lower metacopy files are looked for with metacopy=on only: a getxattr per lower file
                # doubles the cost of a cold lookup. Without it they show as they are on disk.
                if self.metacopy and stat.S_ISREG(st.st_mode) and st.st_size and layer.is_metacopy(path):
                    metacopy = True
                    continue  # the data is further down
                return LowerStack(tuple(hits), len(hits) > 1)
            hits.append((layer, st))
            if layer.listing(path).opaque:
                break
        return LowerStack(tuple(hits), metacopy, orphan=metacopy)

    # -- the merged view -------------------------------------------------------

    def root(self) -> Node:
        """The merged root's node (cached); raises the lstat errors of the layer roots (which the mount opened)."""
        node = self._cached("")
        if node is None:
            node = self._make_root()
            self._remember(node)
        return node

    def _make_root(self) -> Node:
        if self.upper is None:
            return Node("", None, self.lower_stack(""))
        upper_st = self.upper.lstat("")
        return Node("", upper_st, self.lower_stack(""), self.upper.fd)  # never opaque (see _root_lower_stack)

    def lookup(self, path: str) -> Node:
        """The merged node at ``path`` (``""``: the root), each directory on the way cached.

        Raises ENOENT when a component is missing or whited out, ENOTDIR when a non-final component is not a directory,
        as a path walk would; EPERM for a metacopy file without ``metacopy=on`` or with a ``redirect``, EIO for a
        metacopy file whose data is in no layer below (overlayfs.rst, "Metadata only copy up"). Symlinks are never
        followed: every component is looked up as it is.
        """
        node = self._cached(path)
        if node is not None:
            return node
        if not path:
            return self.root()
        parent_path, name = split(path)
        parent = self.lookup(parent_path)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        node = self.child(parent, name)
        if node is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return node

    def child(self, parent: Node, name: str) -> Node | None:
        """Look ``name`` up in the directory ``parent``: its node, or None when the merged view has no such name.

        A whiteout in the upper layer answers None. Raises EPERM/EIO for a metacopy file as :meth:`lookup` does, and the
        lstat/getxattr errors of the real objects other than ENOENT.
        """
        path = join(parent.path, name)
        cached = self._cached(path)
        if cached is not None:
            return cached
        upper_st = None
        if parent.upper_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                upper_st = os.stat(name, dir_fd=parent.upper_fd, follow_symlinks=False)
            if upper_st is not None and is_whiteout(upper_st):
                return None
        lower = self.lower_stack_in(parent.lower, parent.path, name)
        if upper_st is None:
            if not lower.hits:
                return None
            node = Node(path, None, lower)
            if lower.metacopy:
                self._check_metacopy(node)
            if self.alias is not None:
                node = self.alias(node)
        elif not stat.S_ISDIR(upper_st.st_mode):
            origin = self._origin_ino(parent.upper_fd, name)
            if self._is_metacopy(parent, name, upper_st, lower):
                node = Node(path, upper_st, lower, origin=origin, metacopy=True)
                self._check_metacopy(node)
                return node
            node = Node(path, upper_st, NO_LOWER, origin=origin)
            return node if self.indexed is None else self.indexed(node, parent.upper_fd, name)
        else:
            owner = DirFd(self._open_dir(parent.upper_fd, name))
            fd = owner.fd
            opaque = self._upper_opaque(fd)
            origin = self._origin_ino(fd, None)
            lower = lower if lower.is_dir and not opaque else NO_LOWER
            node = Node(path, upper_st, lower, fd, opaque, origin, fd_owner=owner)
        if node.is_dir:
            self._remember(node)
        return node

    def _origin_ino(self, dirfd: int, name: str | None) -> int | None:
        """The inode number of the lower object the upper ``(dirfd, name)`` was copied up from; None if unknown.

        Its ``origin`` file handle is opened (open_by_handle_at) in the first lower layer whose UUID is the handle's
        (the null UUID with ``uuid=off``; the kernel's ``ovl_check_origin_fh``, ``ovl_decode_real_fh``); a stale handle,
        or none, gives None: the object reports its upper inode number, as the kernel's does. An older pylayerfs
        upper's recorded inode number is taken as it is. Raises the getxattr errors other than ENODATA and ENOTSUP.
        """
        origin = self.markers.origin_of(dirfd, name)
        if not isinstance(origin, OriginHandle):
            return origin
        for layer in self.lowers:
            if origin.uuid != layer.uuid:
                continue
            try:
                fd = layer.open_by_handle(origin.handle_type, origin.handle)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if st.st_dev == layer.dev:
                return self.ino_of(st)
        return None

    def _is_metacopy(self, parent: Node, name: str, upper_st: os.stat_result, lower: LowerStack) -> bool:
        """Is the upper file ``name`` a metadata-only copy of the lower file below it?"""
        if not (stat.S_ISREG(upper_st.st_mode) and upper_st.st_size and lower.hits):
            return False
        return stat.S_ISREG(lower.hits[0][1].st_mode) and self.markers.is_metacopy(parent.upper_fd, name)

    def _check_metacopy(self, node: Node) -> None:
        """As the kernel: without ``metacopy=on`` a metacopy file is refused (EPERM); one without data is EIO."""
        if not self.metacopy:
            raise OSError(errno.EPERM, "refusing to follow a metacopy file without metacopy=on", node.path)
        if node.lower.orphan:
            raise OSError(errno.EIO, "a metacopy file whose data is in no layer below", node.path)

    def lower_positive(self, parent: Node, name: str) -> bool:
        """Does a lower layer of ``parent``'s merge hold ``name``? (Then removing it needs a whiteout.)

        Raises as :meth:`lower_stack`.
        """
        return bool(self.lower_stack_in(parent.lower, parent.path, name).hits)

    def _upper_opaque(self, fd: int) -> bool:
        return self.markers.is_opaque(fd)

    # -- cache of directory nodes ------------------------------------------------

    def _cached(self, path: str) -> Node | None:
        """The cached directory node at ``path`` (now the most recently used), or None."""
        node = self._dirs.get(path)
        if node is not None:
            self._dirs.move_to_end(path)
        return node

    def _remember(self, node: Node) -> None:
        """Cache the directory ``node``, dropping the least recently used ones beyond :attr:`max_dirs`."""
        self._dirs[node.path] = node
        while len(self._dirs) > self.max_dirs:
            self._dirs.popitem(last=False)

    def _open_dir(self, dirfd: int, name: str) -> int:
        """An ``O_PATH`` fd on the directory ``name`` in ``dirfd``; out of fds (EMFILE, ENFILE), the cache is
        emptied and the open tried once more. Raises ``open(2)``'s errors."""
        try:
            return os.open(name, _DIR_FD_FLAGS, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self._dirs:
                raise
        self.invalidate_all()
        return os.open(name, _DIR_FD_FLAGS, dir_fd=dirfd)

    def cached_dirs(self) -> int:
        """How many directory nodes the cache holds now (at most :attr:`max_dirs`)."""
        return len(self._dirs)

    def invalidate(self, path: str) -> None:
        """Forget the cached directory at ``path`` and every one below it (after the overlay removed, renamed or
        copied it up); ``""`` forgets them all.

        Their upper fds are closed as soon as no caller holds the nodes any more.
        """
        if not path:
            self.invalidate_all()
            return
        prefix = path + "/"
        for key in [k for k in self._dirs if k == path or k.startswith(prefix)]:
            del self._dirs[key]

    def invalidate_all(self) -> None:
        """Forget every cached directory node (their upper fds close once no caller holds them)."""
        self._dirs.clear()

    def close(self) -> None:
        """Forget every cached node and close its upper fd now, held or not (at unmount; not the layer's own fd)."""
        nodes = list(self._dirs.values())
        self._dirs.clear()
        for node in nodes:
            if node.fd_owner is not None:
                node.fd_owner.close()
                node.upper_fd = -1
