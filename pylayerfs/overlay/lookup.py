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
from typing import NamedTuple

from pylayerfs.overlay.layers import Entry, Layer, LowerLayer, entry_of, join, origin_object, split
from pylayerfs.overlay.markers import Markers, OriginHandle, check_component, is_whiteout, parse_redirect

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


class LowerHit(NamedTuple):
    """One lower layer's part of a merged object: the layer, its listing's :class:`Entry`, and its path in that layer
    (the merged path, unless a redirect on the way led elsewhere)."""

    layer: LowerLayer
    entry: Entry
    path: str


@dataclass(slots=True)
class _Walk:
    """The state of one lookup down the lower layers (the kernel's ``struct ovl_lookup_data``).

    ``name``: what is looked up, a name in the parent's directories or an absolute path from the layer roots (after a
    redirect); ``is_dir``: a directory was found (only directories merge below it); ``metacopy``: the last object found
    is a metacopy file (its data, a regular file, is further down); ``stop``: nothing below may be looked at.
    """

    name: str
    is_dir: bool = False
    metacopy: bool = False
    stop: bool = False


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
        return bool(self.hits) and stat.S_ISDIR(self.hits[0].entry.st_mode)


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
    metacopy: bool = False  # the upper file holds metadata only: the data is the lower file's (lower.hits[-1])
    redirect: str | None = None  # the upper object's redirect (checked): where its lower part was looked up
    impure: bool = False  # the upper directory is marked impure (copy-up marks it once)
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
            hit = self.lower.hits[0]
            self.lower_st = hit.layer.lstat_found(hit.path)
        return self.lower_st

    @property
    def top(self) -> os.stat_result | Entry:
        """The top-most real object's upper lstat, or its lower listing's :class:`Entry` (mode, inode, device, size):
        enough for its type and inode number without reading a lower object's whole lstat."""
        return self.upper if self.upper is not None else self.lower.hits[0].entry

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
        """Where a metacopy file's data is: the :class:`LowerHit` of the file holding it; None for any other object."""
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
    lower metacopy files are recognised and followed. ``follow``: redirects are followed (``redirect_dir=on`` or
    ``follow``); without it, one met where the kernel reads it is refused with EPERM (``nofollow``). ``ino_of`` maps a
    real object's lstat to the inode number the mount reports (``InodeNumbers.of_real``; by default its own
    ``st_ino``).
    """

    def __init__(
        self,
        upper: Layer | None,
        lowers: list[LowerLayer],
        markers: Markers,
        metacopy: bool = False,
        ino_of: Callable[[os.stat_result], int] = operator.attrgetter("st_ino"),
        follow: bool = True,
    ) -> None:
        self.ino_of = ino_of
        self.upper = upper
        self.lowers = lowers
        self.markers = markers
        self.metacopy = metacopy
        self.follow = follow
        self._roots = [(layer, "") for layer in lowers]  # where an absolute redirect is looked up
        self._root_stack: LowerStack | None = None
        self._lower_stacks: dict[str, LowerStack] = {}
        # index=on (index.py): a lower-only name of an indexed hard link is its index entry; an upper one gets its
        # merged link count. None: index=off.
        self.alias: Callable[[Node], Node] | None = None
        self.indexed: Callable[[Node, int, str], Node] | None = None
        self._dirs: OrderedDict[str, Node] = OrderedDict()  # least recently used first
        self.max_dirs = max_cached_dirs()

    # -- lower layers (immutable, cached forever) ------------------------------

    def lower_stack_in(self, parent: LowerStack, parent_path: str, name: str) -> LowerStack:
        """What the lower layers hold at ``name`` in ``parent_path``, given ``parent``: the stack the lookup found
        for that directory (:data:`NO_LOWER` for an opaque upper directory).

        Ignores the upper layer's object at the name, so its whiteout, opaque marker or redirect is the caller's to
        apply. A stack with hits is cached by its merged path until :meth:`moved` (a rename may give the path another
        lower part); :data:`NO_LOWER` is not cached (answering it again costs a dictionary probe per layer of
        the parent's merge). Raises what :meth:`_lower_lookup` raises.
        """
        if not parent.is_dir:
            return NO_LOWER  # checked first: the cache may hold the path from before its parent became opaque
        path = join(parent_path, name)
        cached = self._lower_stacks.get(path)
        if cached is not None:
            return cached
        result = self._lower_lookup(parent, _Walk(name))
        if result.hits:
            self._lower_stacks[path] = result
        return result

    def _root_lower_stack(self) -> LowerStack:
        """Every lower layer's root: the kernel never looks the root up, so an opaque marker on a layer's root
        hides nothing (``ovl_get_lowerstack`` stacks them all; checked against the kernel in tests/test_kernel.py)."""
        if self._root_stack is None:
            hits = tuple(LowerHit(layer, entry_of(layer.lstat(""), layer.dev), "") for layer in self.lowers)
            self._root_stack = LowerStack(hits)
        return self._root_stack

    def _lower_lookup(self, parent: LowerStack, walk: _Walk) -> LowerStack:
        """Look ``walk.name`` up down the lower layers, from the directories of ``parent`` (the kernel's lower loop in
        ``ovl_lookup``, fs/overlayfs/namei.c).

        A relative name is looked up in each of ``parent``'s directories, top-down; an absolute one (a redirect) is
        walked from every lower layer's root. A redirect met on the way changes the name for the layers below (an
        absolute one makes them start from their roots). Intermediate metacopy files are not kept: the stack holds the
        top-most object and, below a metacopy file, the file holding the data. Raises EACCES, EINVAL and EPERM for
        redirects as :meth:`_follow` does, and the listing and getxattr errors (EACCES, EIO...).
        """
        bases = [(hit.layer, hit.path) for hit in parent.hits] if parent.is_dir else []
        if walk.name.startswith("/"):
            bases = self._roots
        hits: list[LowerHit] = []
        top_metacopy = False
        i = 0
        while i < len(bases) and not walk.stop:
            layer, base = bases[i]
            i += 1
            # The bottom-most layer has no redirect or opaque marker read (nothing is below it to lead to or hide);
            # with redirect_dir=nofollow, the last layer of the parent's merge.
            last = i == len(bases) if not self.follow else layer is self.lowers[-1]
            hit = self._in_layer(layer, base, walk, last)
            if hit is None:
                continue
            if not hits:
                top_metacopy = walk.metacopy
                hits.append(hit)
            elif not walk.metacopy:
                hits.append(hit)
            if walk.name.startswith("/") and bases is not self._roots:
                bases, i = self._roots, self.lowers.index(layer) + 1  # on from the roots of the layers below this one
        return LowerStack(tuple(hits), top_metacopy, orphan=walk.metacopy)

    def _in_layer(self, layer: LowerLayer, base: str, walk: _Walk, last: bool) -> LowerHit | None:
        """``walk.name`` in ``layer``: a name in its directory ``base``, or an absolute path walked component by
        component from its root (the kernel's ``ovl_lookup_layer``); the hit, or None (with ``walk.stop`` set where
        nothing below may be looked at). Raises as :meth:`_lower_lookup`."""
        if not walk.name.startswith("/"):
            return self._single(layer, base, walk.name, walk, last, "", "")
        base, rest = "", walk.name[1:]
        while True:
            name, sep, tail = rest.partition("/")
            post = sep + tail
            hit = self._single(layer, base, name, walk, last, walk.name[: len(walk.name) - len(rest)], post)
            if hit is None or not post:
                return hit
            base, rest = hit.path, tail

    def _single(
        self, layer: LowerLayer, base: str, name: str, walk: _Walk, last: bool, prefix: str, post: str
    ) -> LowerHit | None:
        """One component ``name`` in the directory ``base`` of ``layer`` (the kernel's ``ovl_lookup_single``).

        ``post`` is what the walk still has to look up after it (``""``: it is the last component), ``prefix`` what
        came before (for a relative redirect met here). Updates ``walk`` as the kernel's lookup data; the hit, or None.
        """
        check_component(name)
        listing = layer.listing(base)
        if name in listing.whiteouts:
            walk.stop = True
            return None
        entry = listing.entries.get(name)
        if entry is None:
            return None
        hit = LowerHit(layer, entry, join(base, name))
        mode = entry.st_mode
        if not post and walk.metacopy and not stat.S_ISREG(mode):
            walk.stop = True  # a metacopy file's data can only be a regular file
            return None
        if not stat.S_ISDIR(mode):
            if walk.is_dir or post:
                walk.stop = True  # a non-directory below a directory, or on the way: hidden
                return None
            # Lower metacopy files are looked for with metacopy=on only: a getxattr per lower file
            # doubles the cost of a cold lookup. Without it they show as they are on disk.
            walk.metacopy = self.metacopy and stat.S_ISREG(mode) and layer.is_metacopy(hit.path)
            walk.stop = not walk.metacopy
            if not walk.metacopy or last:
                return hit
            redirect = layer.redirect_of(hit.path)
        else:
            if not post:
                walk.is_dir = True
            if last:
                return hit
            below = layer.listing(hit.path)
            if below.opaque:
                walk.stop = True
                return hit
            redirect = below.redirect
        if redirect is not None:
            self._follow(walk, redirect, prefix, post)
        return hit

    def _follow(self, walk: _Walk, value: bytes, prefix: str, post: str) -> None:
        """A redirect ``value`` met on the way: the name looked up below becomes it (the kernel's
        ``ovl_check_redirect``). Raises EINVAL for a malformed one (:func:`parse_redirect`) and EPERM with
        ``redirect_dir=nofollow`` (the kernel's "refusing to follow redirect")."""
        redirect = parse_redirect(value)
        if not self.follow:
            raise OSError(errno.EPERM, "refusing to follow redirect (redirect_dir=nofollow)", redirect)
        if redirect.startswith("/"):
            walk.stop = False  # an opaque directory on the way hid what was above, not what the redirect leads to
            walk.name = redirect + post
        else:
            walk.name = prefix + redirect + post

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
            return Node("", None, self._root_lower_stack())
        upper_st = self.upper.lstat("")
        impure = self.markers.impure in self.markers.present(self.upper.fd, None)
        return Node("", upper_st, self._root_lower_stack(), self.upper.fd, impure=impure)  # never opaque

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

        A whiteout in the upper layer answers None; an upper directory (or metacopy file) with a redirect has its lower
        part where the redirect leads. Raises EPERM/EIO for a metacopy file as :meth:`lookup` does, EINVAL, EACCES and
        EPERM for a redirect as :meth:`_follow` does, and the lstat/getxattr errors of the real objects other than
        ENOENT.
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
        if upper_st is None:
            lower = self.lower_stack_in(parent.lower, parent.path, name)
            if not lower.hits:
                return None
            node = Node(path, None, lower)
            if lower.metacopy:
                self._check_metacopy(node)
            if self.alias is not None:
                node = self.alias(node)
            if node.is_dir:
                self._remember(node)
            return node
        markers = self.markers
        if not stat.S_ISDIR(upper_st.st_mode):
            present = markers.present(parent.upper_fd, name)
            origin = self._origin_ino(parent.upper_fd, name, present)
            if not (stat.S_ISREG(upper_st.st_mode) and markers.metacopy in present):  # an empty one too
                node = Node(path, upper_st, NO_LOWER, origin=origin)
                return node if self.indexed is None else self.indexed(node, parent.upper_fd, name)
            redirect = self._upper_redirect(parent, parent.upper_fd, name, present)
            if not self.metacopy:  # refused before any lower layer is read (only a malformed redirect comes first)
                raise OSError(errno.EPERM, "refusing to follow a metacopy file without metacopy=on", path)
            lower = self._lower_lookup(parent.lower, _Walk(redirect or name, metacopy=True))
            node = Node(path, upper_st, lower, origin=origin, metacopy=True, redirect=redirect)
            self._check_metacopy(node)
            return node
        owner = DirFd(self._open_dir(parent.upper_fd, name))
        fd = owner.fd
        present = markers.present(fd, None)
        opaque = markers.opaque in present and markers.is_opaque(fd)
        origin = self._origin_ino(fd, None, present)
        redirect = None if opaque else self._upper_redirect(parent, fd, None, present)
        if opaque:
            lower = NO_LOWER
        elif redirect is not None:
            lower = self._lower_lookup(parent.lower, _Walk(redirect, is_dir=True))
        else:
            lower = self.lower_stack_in(parent.lower, parent.path, name)
            lower = lower if lower.is_dir else NO_LOWER
        impure = markers.impure in present
        node = Node(path, upper_st, lower, fd, opaque, origin, redirect=redirect, impure=impure, fd_owner=owner)
        self._remember(node)
        return node

    def _upper_redirect(self, parent: Node, dirfd: int, name: str | None, present: frozenset[str]) -> str | None:
        """The redirect of the upper ``(dirfd, name)`` in ``parent``, checked (:func:`parse_redirect`); None if it has
        none, or where the kernel does not read it (nofollow below a directory with no lower part). Raises EINVAL for a
        malformed one and EPERM with ``redirect_dir=nofollow``."""
        if self.markers.redirect not in present or not (self.follow or parent.lower.hits):
            return None
        value = self.markers.redirect_of(dirfd, name)
        if value is None:
            return None
        redirect = parse_redirect(value)
        if not self.follow:
            raise OSError(errno.EPERM, "refusing to follow redirect (redirect_dir=nofollow)", redirect)
        return redirect

    def _origin_ino(self, dirfd: int, name: str | None, present: frozenset[str]) -> int | None:
        """The inode number of the lower object the upper ``(dirfd, name)`` was copied up from; None if unknown.

        ``present``: the overlay xattrs it carries (:meth:`Markers.present`). Its ``origin`` file handle is opened
        (open_by_handle_at) in the first lower layer whose UUID is the handle's (the null UUID with ``uuid=off``; the
        kernel's ``ovl_check_origin_fh``, ``ovl_decode_real_fh``); a stale handle, or none, gives None: the object
        reports its upper inode number, as the kernel's does. An older pylayerfs upper's recorded inode number is taken
        as it is. Raises the getxattr errors other than ENODATA and ENOTSUP.
        """
        if self.markers.origin not in present and self.markers.legacy_origin not in present:
            return None
        origin = self.markers.origin_of(dirfd, name)
        if not isinstance(origin, OriginHandle):
            return origin
        st = origin_object(self.lowers, *origin)
        return self.ino_of(st) if st is not None else None

    def _check_metacopy(self, node: Node) -> None:
        """As the kernel's ``ovl_lookup``: a metacopy file whose data is in no layer below is EIO. (Without
        ``metacopy=on`` an upper one is refused before, EPERM, and lower ones are not looked for.)"""
        if node.lower.orphan:
            raise OSError(errno.EIO, "a metacopy file whose data is in no layer below", node.path)

    def lower_positive(self, parent: Node, name: str) -> bool:
        """Does a lower layer of ``parent``'s merge hold ``name``? (Then removing it needs a whiteout.)

        Raises as :meth:`lower_stack`.
        """
        return bool(self.lower_stack_in(parent.lower, parent.path, name).hits)

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

    def moved(self, path: str) -> None:
        """A rename changed what the directory at ``path`` is (or was): forget its cached node and lower stack and
        every one below, since a redirect may now give those paths another lower part."""
        self.invalidate(path)
        prefix = path + "/"
        for key in [k for k in self._lower_stacks if k == path or k.startswith(prefix)]:
            del self._lower_stacks[key]

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
