"""The FUSE adapter: translates kernel requests into :class:`~pylayerfs.overlay.filesystem.Overlay` calls.

The only module that imports the binding (mfusepy, on libfuse 3). It does
nothing but translate: paths lose their leading slash, the caller's uid/gid
come from the FUSE context, and errors become errnos. An exception that is not
an :class:`OSError` is a bug: it is logged with its traceback and answered with
EIO, and the daemon goes on.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import queue
import re
import stat
import threading
from collections.abc import Callable
from typing import Any, TypeVar

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy as fuse

from pylayerfs.overlay import xattrs
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.state import Caller

log = logging.getLogger("pylayerfs.fuse")
F = TypeVar("F", bound=Callable[..., Any])

# Lowers never change and the upper changes only through the mount: the kernel may cache freely.
CACHE_TIMEOUT = 86400.0
_STAT_FIELDS = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_rdev", "st_blocks", "st_blksize")
# The longest a request waits for the kernel to take an invalidation (see _Invalidator).
INVALIDATE_WAIT = 1.0
FUSE_CAP_POSIX_ACL = 1 << 19  # libfuse 3's fuse_common.h (the kernel's FUSE_POSIX_ACL, 1 << 20)
FUSE_CAP_DONT_MASK = 1 << 6  # same header: the kernel does not apply the umask, the request carries it
# The names libfuse gives an open file whose name is removed (fuse.c, hidden_name): ".fuse_hidden" node id, counter.
_HIDDEN_NAME = re.compile(r"\.fuse_hidden[0-9a-f]{16}")


def _answers_eio(method: F) -> F:
    @functools.wraps(method)
    def wrapper(*args: Any) -> Any:
        try:
            return method(*args)
        except OSError as exc:
            if isinstance(exc.errno, int) and exc.errno > 0:
                raise
            log.exception("%s%r: OSError without errno, answering EIO", method.__name__, args[1:])
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from exc
        except Exception as exc:
            log.exception("%s%r failed, answering EIO", method.__name__, args[1:])
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from exc

    return wrapper  # type: ignore[return-value]


def _rel(path: str | None) -> str:
    return path.lstrip("/") if path else ""


def _caller() -> Caller:
    """Who asks, with the umask of a creating request (the kernel leaves it to us: FUSE_CAP_DONT_MASK)."""
    context = fuse._libfuse.fuse_get_context().contents  # mfusepy's fuse_get_context() leaves the umask out
    return Caller(context.uid, context.gid, context.umask)


class _Invalidator:
    """Makes the kernel drop what it caches of a path, from a helper thread.

    Sent from the request handler itself, the notification could deadlock: the
    kernel may wait for a page that a read queued behind this very request
    holds locked. The handler waits for the helper at most INVALIDATE_WAIT.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue[tuple[int, bytes, threading.Event]] = queue.Queue()
        self._invalidate_path = fuse._libfuse.fuse_invalidate_path
        self._invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        threading.Thread(target=self._serve, name="pylayerfs-invalidate", daemon=True).start()

    def invalidate(self, path: str) -> None:
        done = threading.Event()
        self._requests.put((fuse._libfuse.fuse_get_context().contents.fuse, os.fsencode(path), done))
        done.wait(INVALIDATE_WAIT)

    def _serve(self) -> None:
        while True:
            session, path, done = self._requests.get()
            self._invalidate_path(session, path)
            done.set()


class FuseOperations(fuse.Operations):  # type: ignore[misc]
    """The kernel caches attributes, entries and pages for as long as ``timeout`` (a day by default).

    Except for hard links: libfuse's path API gives every name its own kernel
    inode, so what is written through one name would not show through the
    others. Objects of every type with more than one link get their attributes
    uncached, regular files their pages dropped at open (close-to-open
    coherence), and ``link`` invalidates the source name, whose link count it
    changed.

    Open files whose name is removed: libfuse's high-level API finds a file
    only by a path, so it cannot serve ``fstat``, ``fchmod``, ``fchown`` or
    ``futimens`` on a file that has none (with ``hard_remove`` it answers
    ESTALE). Without ``hard_remove``, it renames such a file to a hidden name
    (``.fuse_hidden...``) instead of removing it, keeps using that name, and
    removes it at the last close. Here that rename *is* the removal: the name
    is unlinked in the overlay at once (the upper layer never holds a hidden
    name, as with the kernel), and the hidden path stands for the open handles
    of the file (:attr:`_hidden`), through which its requests are served.
    """

    use_ns = True

    def __init__(
        self, overlay: Overlay, on_ready: Callable[[], None] | None = None, timeout: float = CACHE_TIMEOUT
    ) -> None:
        self.ov = overlay
        self.timeout = timeout
        self.acl = True  # ask the kernel to enforce POSIX ACLs (only with default_permissions, which it turns on)
        self._on_ready = on_ready
        self._dirs: dict[int, str] = {}  # open directory handle -> path (readdir gets no path)
        self._next_dir = itertools.count(1)
        self._config: Any = None
        self._invalidator: _Invalidator | None = None
        self._hidden: dict[str, set[int]] = {}  # hidden path of an unlinked open file -> its open handles

    def init_with_config(self, conn: Any, config: Any) -> None:
        if self.acl and conn is not None and conn.capable & FUSE_CAP_POSIX_ACL:
            conn.want |= FUSE_CAP_POSIX_ACL  # the kernel enforces ACLs (it turns default_permissions on)
        if conn is not None and conn.capable & FUSE_CAP_DONT_MASK:
            conn.want |= FUSE_CAP_DONT_MASK  # a default ACL, not the umask, decides a new object's mode
        if config is not None:
            config.nullpath_ok = 1  # open files stay usable after their name is gone (hard_remove)
            self._config = config  # libfuse's own settings: read again for every reply
        self._invalidator = _Invalidator()
        if self._on_ready is not None:
            self._on_ready()

    def _cache(self, attrs: dict[str, Any], hidden: bool = False) -> dict[str, Any]:
        """Set how long the kernel may keep these attributes (libfuse reads it for the reply to come).

        Not at all for an object of any type with more than one name (each name is a kernel inode of its own), nor for
        a hidden file: libfuse takes one off its link count in a GETATTR reply (for the hidden name), so the link count
        is given one more here, which the replies that do not take it off (SETATTR, LOOKUP) must not leave cached.
        """
        if hidden:
            attrs["st_nlink"] += 1
        if self._config is not None:
            linked = not stat.S_ISDIR(attrs["st_mode"]) and attrs["st_nlink"] > 1
            self._config.attr_timeout = 0.0 if linked or hidden else self.timeout
        return attrs

    def _keep_pages(self, path: str, fh: int) -> int:
        """Keep the kernel's cached pages at open, unless another name may have written them."""
        if self._config is not None:
            self._config.kernel_cache = int(self.ov.getattr(_rel(path), fh)["st_nlink"] <= 1)
        return fh

    def destroy(self, path: str) -> None:
        self.ov.close()

    def _handle(self, path: str | None, fh: int | None) -> int | None:
        """The handle a request is about: ``fh``, or one of the hidden file's that ``path`` names (else None).

        Raises ENOENT for a hidden path whose handles are all closed (libfuse is about to remove it).
        """
        if fh is not None or path is None or path not in self._hidden:
            return fh
        handles = self._hidden[path]
        if not handles:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return min(handles)

    def _hiding(self, old: str, new: str) -> bool:
        """If ``rename(old, new)`` is libfuse hiding an open file that is being removed (or replaced), do the removal.

        That is a rename to a free hidden name in the same directory, of a name with open handles (a user's rename to
        such a name, of a file no one holds open, is a rename). Then ``old`` is removed from the overlay and ``new``
        stands for its handles; answers True. Raises what the removal raises.
        """
        parent, _, name = new.rpartition("/")
        if old.rpartition("/")[0] != parent or not _HIDDEN_NAME.fullmatch(name) or new in self._hidden:
            return False
        handles = set(self.ov.handles(_rel(old)))
        if not handles:
            return False
        self.ov.unlink(_rel(old))
        self._hidden[new] = handles
        if self._invalidator is not None:  # the kernel guesses the link count (one less): let it ask
            self._invalidator.invalidate(old)  # libfuse renames its node after this returns
        return True

    def _moved(self, old: str, new: str, exchange: bool) -> None:
        """A rename moved (or exchanged) ``old`` and ``new``: so did the hidden files below them in libfuse's tree,
        and the open directories at or below them (a directory renamed while open still lists its entries)."""
        moves = {old + "/": new + "/"} | ({new + "/": old + "/"} if exchange else {})

        def moved(path: str) -> str | None:
            return next((dst + path[len(src) :] for src, dst in moves.items() if path.startswith(src)), None)

        renamed: dict[str, set[int]] = {}
        for hidden in list(self._hidden):
            dest = moved(hidden)
            if dest is not None:
                renamed[dest] = self._hidden.pop(hidden)
        self._hidden.update(renamed)
        for fh, rel in self._dirs.items():  # relative paths: "" is the root, which never moves
            dest = moved("/" + rel + "/")
            if dest is not None:
                self._dirs[fh] = dest.strip("/")

    @_answers_eio
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        handle = self._handle(path, fh)
        hidden = path in self._hidden if path is not None else any(handle in h for h in self._hidden.values())
        return self._cache(self.ov.getattr(_rel(path), handle), hidden)

    @_answers_eio
    def readlink(self, path: str) -> str:
        return self.ov.readlink(_rel(path))

    @_answers_eio
    def opendir(self, path: str) -> int:
        if not self.ov.lookup.lookup(_rel(path)).is_dir:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        fh = next(self._next_dir)
        self._dirs[fh] = _rel(path)
        return fh

    @_answers_eio
    def readdir(self, path: str | None, fh: int) -> list[tuple[str, int, int]]:
        """``(name, type bits, st_ino)`` (libfuse asks at offset 0 and keeps the list: a snapshot per opendir)."""
        return self.ov.readdir(self._dirs[fh])

    def releasedir(self, path: str | None, fh: int) -> int:
        self._dirs.pop(fh, None)
        return 0

    @_answers_eio
    def statfs(self, path: str) -> dict[str, int]:
        return self.ov.statfs()

    @_answers_eio
    def open(self, path: str, flags: int) -> int:
        return self._keep_pages(path, self.ov.open(_rel(path), flags))

    @_answers_eio
    def create(self, path: str, mode: int, flags: int) -> int:
        return self._keep_pages(path, self.ov.create(_rel(path), mode, flags, _caller()))

    @_answers_eio
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.ov.read(fh, size, offset)

    @_answers_eio
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        return self.ov.write(fh, data, offset)

    @_answers_eio
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self.ov.truncate(_rel(path), length, self._handle(path, fh))
        return 0

    @_answers_eio
    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self.ov.fallocate(fh, mode, offset, size)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    @_answers_eio
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.ov.fsync(fh, bool(datasync))
        return 0

    @_answers_eio
    def release(self, path: str | None, fh: int) -> int:
        self.ov.release(fh)
        for handles in self._hidden.values():
            handles.discard(fh)
        return 0

    @_answers_eio
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self.ov.chmod(_rel(path), mode, self._handle(path, fh))
        return 0

    @_answers_eio
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        self.ov.chown(_rel(path), uid, gid, self._handle(path, fh))
        return 0

    @_answers_eio
    def utimens(self, path: str | None, times: tuple[int, int] | None = None, fh: int | None = None) -> int:
        self.ov.utimens(_rel(path), times, self._handle(path, fh))
        return 0

    @_answers_eio
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self.ov.mknod(_rel(path), mode, dev, _caller())
        return 0

    @_answers_eio
    def mkdir(self, path: str, mode: int) -> int:
        self.ov.mkdir(_rel(path), mode, _caller())
        return 0

    @_answers_eio
    def symlink(self, target: str, source: str) -> int:
        self.ov.symlink(_rel(target), source, _caller())
        return 0

    @_answers_eio
    def link(self, target: str, source: str) -> int:
        self.ov.link(_rel(source), _rel(target))
        if self._invalidator is not None:
            self._invalidator.invalidate(source)
        return 0

    @_answers_eio
    def unlink(self, path: str) -> int:
        if self._hidden.pop(path, None) is None:  # a hidden file's name was removed when it was hidden
            self.ov.unlink(_rel(path))
        return 0

    @_answers_eio
    def rmdir(self, path: str) -> int:
        self.ov.rmdir(_rel(path))
        return 0

    @_answers_eio
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if not flags and self._hiding(old, new):
            return 0
        self.ov.rename(_rel(old), _rel(new), flags)
        self._moved(old, new, bool(flags & 2))  # RENAME_EXCHANGE
        return 0

    @_answers_eio
    def listxattr(self, path: str) -> list[str]:
        return self.ov.listxattr(_rel(path))

    @_answers_eio
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self.ov.getxattr(_rel(path), name)

    @_answers_eio
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.ov.setxattr(_rel(path), name, value, options)
        self._acl_changed(path, name)
        return 0

    @_answers_eio
    def removexattr(self, path: str, name: str) -> int:
        self.ov.removexattr(_rel(path), name)
        self._acl_changed(path, name)
        return 0

    def _acl_changed(self, path: str, name: str) -> None:
        """An access ACL also sets the permission bits (``cp -a`` sets them that way): drop the cached ones.

        The kernel's FUSE module updates only ctime after a SETXATTR, unless the filesystem handles ACLs itself.
        """
        if xattrs.changes_mode(name) and self._invalidator is not None:
            self._invalidator.invalidate(path)


def _fh(fip: Any) -> int | None:
    """The file handle of libfuse's ``struct fuse_file_info *`` (None: a request by path)."""
    return int(fip.contents.fh) if fip else None


class _FUSE(fuse.FUSE):  # type: ignore[misc]
    """mfusepy with callbacks of our own.

    * rename: mfusepy drops the flags of rename(2) on libfuse 3; pass RENAME_NOREPLACE/EXCHANGE on.
    * truncate, chmod, chown, utimens: mfusepy drops the open file libfuse 3 passes them. With ``nullpath_ok`` the
      path is then NULL, and the request (``ftruncate``, and the ``utimens`` that follows it) would reach the root;
      pass the handle on.
    * readdir: fill libfuse's buffer straight from ``(name, type, ino)`` tuples (no dict per entry).
    * getattr and create, the hottest callbacks of a metadata workload: mfusepy fills ``struct stat``
      through a generic loop and inspects ``create``'s signature on every call (tens of microseconds).
    """

    def fgetattr(self, path: bytes | None, buf: Any, fip: Any) -> int:
        attrs = self.operations.getattr(self._path(path), _fh(fip))
        ctypes.memset(buf, 0, ctypes.sizeof(fuse.c_stat))
        st = buf.contents
        for key in _STAT_FIELDS:
            setattr(st, key, attrs[key])
        for key in ("st_atime", "st_mtime", "st_ctime"):
            spec = getattr(st, key + "spec")
            spec.tv_sec, spec.tv_nsec = divmod(attrs[key], 1_000_000_000)
        return 0

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return int(self.operations.truncate(self._path(path), length, _fh(fip)) or 0)

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return int(self.operations.chmod(self._path(path), mode, _fh(fip)) or 0)

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        uid = -1 if fuse.c_uid_t(uid + 1).value == 0 else uid  # (uid_t)-1: leave it
        gid = -1 if fuse.c_gid_t(gid + 1).value == 0 else gid
        return int(self.operations.chown(self._path(path), uid, gid, _fh(fip)) or 0)

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        times = None
        if buf:
            spec = buf.contents
            times = (fuse.time_of_timespec(spec.actime, use_ns=True), fuse.time_of_timespec(spec.modtime, use_ns=True))
        return int(self.operations.utimens(self._path(path), times, _fh(fip)) or 0)

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        return 0

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
        entries = self.operations.readdir(None, fip.contents.fh)
        st = fuse.c_stat()
        for name, mode, ino in entries:
            st.st_mode = mode
            st.st_ino = ino
            if filler(buf, name.encode(self.encoding, self.errors), st, 0, 0) != 0:
                break
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(
            self.operations.rename(
                old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
            )
            or 0
        )


def serve(
    overlay: Overlay,
    mountpoint: str,
    *,
    fsname: str,
    fuse_options: dict[str, Any],
    on_ready: Callable[[], None] | None = None,
    timeout: float = CACHE_TIMEOUT,
) -> None:
    """Mount and serve requests until unmounted (single-threaded, in the foreground)."""
    operations = FuseOperations(overlay, on_ready, timeout)
    operations.acl = bool(fuse_options.get("default_permissions"))
    _FUSE(
        operations,
        mountpoint,
        foreground=True,
        nothreads=True,
        fsname=fsname,
        subtype="pylayerfs",
        use_ino=True,
        hard_remove=False,  # an unlinked open file keeps a (hidden) path: see FuseOperations
        kernel_cache=True,
        attr_timeout=timeout,
        entry_timeout=timeout,
        negative_timeout=timeout,
        **fuse_options,
    )
