"""The state of one mount, shared by the operation modules (the kernel's ``struct ovl_fs``).

:class:`OverlayState` holds what a mounted stack is made of and what it
caches: the upper layer with its workdir (both absent on a read-only stack),
the lower layers top-first, the marker names (``trusted.overlay.`` or, with
``userxattr``, ``user.overlay.``), the lookup with its caches, inode numbers,
open files and merged listings. It performs no operation itself: the operation
modules (:mod:`.copy_up`, :mod:`.namespace`, :mod:`.readdir`, :mod:`.xattrs`)
take it as their first argument, and :class:`~pylayerfs.overlay.filesystem.Overlay`
puts them behind one POSIX-shaped facade. Nothing here imports those modules,
so the dependencies run one way: state below, operations above, facade on top.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pylayerfs.overlay.file import OpenFiles
from pylayerfs.overlay.inode import InodeNumbers
from pylayerfs.overlay.layers import Layer, LowerLayer, split
from pylayerfs.overlay.lookup import Lookup, Node
from pylayerfs.overlay.markers import Markers
from pylayerfs.overlay.params import redirect_mode
from pylayerfs.overlay.workdir import Workdir

Entry = tuple[str, int, int]  # a merged directory entry: name, st_mode type bits, st_ino
MAX_CACHED_ENTRIES = 1 << 20


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: new objects are owned by the caller, as in the kernel (uid, and gid unless the parent is setgid).

    ``umask`` is the caller's, for a transport whose kernel leaves it to the server (FUSE_DONT_MASK): a new object's
    mode loses its bits unless the directory has a default ACL, which then decides (``posix_acl_create``). 0 when the
    mode given is final (masked by the kernel already, or the in-process engine's caller).
    """

    uid: int
    gid: int
    umask: int = 0

    @classmethod
    def me(cls) -> Caller:
        """This process's effective uid and gid (the in-process engine's caller)."""
        return cls(os.geteuid(), os.getegid())


def erofs(path: str) -> OSError:
    """The error of any write on a read-only stack (no upper layer): an EROFS :class:`OSError` naming ``path``."""
    return OSError(errno.EROFS, os.strerror(errno.EROFS), path)


class Listings:
    """Merged listings, kept until a name changes in (or above) their directory (the kernel's ``ovl_dir_cache``).

    Lowers never change while mounted and the upper changes only through the
    overlay, whose namespace operations call :meth:`forget` with the path they
    change: the parent's listing and every listing below the path go. Entries
    carry only the name, the type and the inode number, which copy-up keeps.
    At most :data:`MAX_CACHED_ENTRIES` entries are kept in all.
    """

    def __init__(self) -> None:
        self._by_dir: dict[str, list[Entry]] = {}
        self._size = 0

    def get(self, path: str, make: Callable[[], list[Entry]]) -> list[Entry]:
        """The cached listing of directory ``path``, made by ``make()`` when absent; raises what ``make`` raises."""
        entries = self._by_dir.get(path)
        if entries is None:
            entries = make()
            if self._size + len(entries) > MAX_CACHED_ENTRIES:
                self._by_dir.clear()
                self._size = 0
            self._by_dir[path] = entries
            self._size += len(entries)
        return entries

    def forget(self, path: str) -> None:
        """A name changed at ``path``: drop its parent's listing and every listing at or below it."""
        parent = split(path)[0]
        prefix = path + "/"
        for key in [k for k in self._by_dir if k in (parent, path) or k.startswith(prefix)]:
            self._size -= len(self._by_dir.pop(key))


class OverlayState:
    """One mounted stack: an optional upper layer with its workdir, and lower layers top-first.

    ``lowerdirs`` are paths, the top-most first (``lowerdir=top:...:bottom``).
    ``upperdir`` and ``workdir`` go together (ValueError otherwise); without them
    the stack is read-only. Opening the layers raises OSError (ENOENT, ENOTDIR,
    EACCES) as ``open(2)`` does; the workdir's ``work/`` is created and emptied. ``redirect_dir``: ``"on"``,
    ``"follow"`` or ``"nofollow"`` (None: the default for the other options, :func:`params.redirect_mode
    <pylayerfs.overlay.params.redirect_mode>`; it raises MountError for a combination the kernel refuses). With
    ``uuid_off`` (the kernel's ``uuid=off``), origin file handles name their filesystem by the null UUID.
    """

    def __init__(
        self,
        lowerdirs: list[str],
        upperdir: str | None = None,
        workdir: str | None = None,
        *,
        userxattr: bool = False,
        metacopy: bool = False,
        redirect_dir: str | None = None,
        uuid_off: bool = False,
    ) -> None:
        if (upperdir is None) != (workdir is None):
            raise ValueError("upperdir and workdir go together")
        self.markers = Markers.for_mount(userxattr)
        self.upper = Layer(0, upperdir) if upperdir is not None else None
        self.lowers = [LowerLayer(i, d, self.markers, uuid_off) for i, d in enumerate(lowerdirs, start=1)]
        self.workdir = Workdir(workdir) if workdir is not None else None
        self.metacopy = metacopy
        self.redirect_dir = redirect_mode(redirect_dir, metacopy, userxattr)
        layer_fds = ([self.upper.fd] if self.upper else []) + [layer.fd for layer in self.lowers]
        self.inodes = InodeNumbers(layer_fds)
        self.lookup = Lookup(
            self.upper, self.lowers, self.markers, metacopy, self.inodes.of_real, self.redirect_dir != "nofollow"
        )
        self.files = OpenFiles()
        self.listings = Listings()
        self._closed = False

    def close(self) -> None:
        """Close every fd the stack holds: open files, cached directories, layers, workdir (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.files.close_all()
        self.lookup.close()
        for layer in [self.upper, *self.lowers]:
            if layer is not None:
                layer.close()
        if self.workdir is not None:
            self.workdir.close()

    def writable(self, path: str) -> tuple[Layer, Workdir]:
        """The upper layer and workdir; raises EROFS (naming ``path``) on a read-only (lowers only) stack."""
        if self.upper is None or self.workdir is None:
            raise erofs(path)
        return self.upper, self.workdir

    def top_object(self, node: Node) -> tuple[Layer, str]:
        """Where the object the merged view shows for ``node`` is: ``(layer, path in it)``, the upper layer's at the
        merged path, else its top-most lower layer's (at another path when a redirect led there)."""
        if node.upper is not None:
            assert self.upper is not None
            return self.upper, node.path
        hit = node.lower.hits[0]
        return hit.layer, hit.path

    @contextlib.contextmanager
    def real(self, node: Node) -> Iterator[tuple[int, str | None]]:
        """Yield ``(dirfd, name)`` naming the top real object of ``node`` (name None: the directory itself).

        The fd is valid inside the ``with`` only. Raises what the lookup of ``node``'s parent raises, and
        ENOENT/ENOTDIR/ELOOP when its directory cannot be opened in the layer (as ``Layer.parent`` raises).
        """
        if node.upper_fd >= 0:
            yield node.upper_fd, None
            return
        layer, path = self.top_object(node)
        if not path:
            yield layer.fd, None
            return
        if node.upper is not None:  # in an upper directory: its cached node holds an fd on it
            parent_path, name = split(node.path)
            parent = self.lookup.lookup(parent_path)
            if parent.upper_fd >= 0:
                yield parent.upper_fd, name
                return
        with layer.parent(path) as (fd, name):
            yield fd, name

    def upper_object_of(self, fh: int) -> int:
        """An fd on the upper file behind the open handle ``fh``, for a change of its metadata.

        FUSE passes a handle for a file whose last name is gone (an unlinked file still open, or an object held by
        ``Overlay.hold``). A handle on an upper object has its fd; one on a lower object (opened read-only, then its
        name removed) cannot be copied up without a name: the kernel's overlayfs answers EEXIST there (its copy-up meets
        the whiteout; ENOTDIR for a directory), and so does this. Raises KeyError for a handle that is not open.
        """
        of = self.files.get(fh)
        if of.on_lower or of.metacopy:
            directory = stat.S_ISDIR(os.stat(of.fd).st_mode)  # a lower directory: its copy-up answers ENOTDIR
            code = errno.ENOTDIR if directory else errno.EEXIST
            raise OSError(code, os.strerror(code), of.path)
        return of.fd
