"""Copy-up: the only code that moves a lower object into the upper layer.

``copy_up(ov, path)`` makes sure ``path`` has an upper object, ancestors first
(the kernel's ``ovl_copy_up_flags``). Each object is built in the workdir under
a temporary name, with its data (holes kept), then owner, mode (setuid/setgid
included), non-private xattrs and times, and only then renamed into place, so
it appears complete or not at all. A directory is copied without its contents.
The parent's times are restored afterwards: copy-up leaves no visible trace.

With ``metacopy=on``, a copy-up for a metadata change (chmod, chown, utimes,
xattrs, a rename or link) of a regular file copies no data: the upper file is
sparse, of the same size, marked ``metacopy``, and reads go on to the lower
file. An open for write or a truncate then copies the data into it, in place.

A copy-up is made in three steps (:class:`CopyUp`): begun (:func:`start_copy_up`: ancestors, the
temporary object), its data copied (:meth:`CopyUp.copy_data`: pure I/O between two fds, no engine
state, so a transport may run it in another thread), installed (:meth:`CopyUp.install`: metadata, the
rename, the engine's caches). :func:`copy_up` makes the three in a row.

Objects whose lower inode can be reported after copy-up (directories, and files
with a single link, as the kernel decides) keep their inode number: the lower
object's file handle is recorded in the kernel's ``origin`` xattr, in its format.
The parent directory is marked ``impure`` (once), as the kernel marks it. The
object copied up is the top-most lower one, at its path in its layer: not the
merged path when a redirect led the lookup elsewhere.
With ``index=on`` a lower hard link goes to its index entry and is linked at its name (:mod:`.index`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from pylayerfs.overlay import realfs
from pylayerfs.overlay.layers import split
from pylayerfs.overlay.lookup import Node
from pylayerfs.overlay.state import OverlayState

_CHUNK = 64 << 20  # bytes per copy_file_range call: how often a cancelled copy looks (~0.1 s)


def copy_up(ov: OverlayState, path: str, *, with_data: bool = True, meta_only: bool = False) -> Node:
    """Give ``path`` an upper object with its data (if it has none) and return the fresh node.

    ``with_data=False`` is for an ``O_TRUNC`` open: the copy is created empty.
    ``meta_only``: the caller changes metadata only, so with ``metacopy=on`` a file's data may stay below.
    Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup of ``path`` does, and whatever
    the upper filesystem answers (ENOSPC, EDQUOT, EPERM...); on any error nothing is left in the upper layer.
    """
    node, job = _start(ov, path, with_data, meta_only)
    return node if job is None else job.run()


def start_copy_up(ov: OverlayState, path: str, *, with_data: bool = True, meta_only: bool = False) -> CopyUp | None:
    """Begin the copy-up :func:`copy_up` would make: its ancestors copied up, ``path`` built in the workdir.

    Returns None when ``path`` needs none, else the :class:`CopyUp` whose data copy and install are the caller's.
    Raises what :func:`copy_up` raises (for the ancestors and the creation of the temporary object).
    """
    return _start(ov, path, with_data, meta_only)[1]


def _start(ov: OverlayState, path: str, with_data: bool, meta_only: bool) -> tuple[Node, CopyUp | None]:
    ov.writable(path)
    node = ov.lookup.lookup(path)
    if node.upper is not None and (meta_only or not node.metacopy):
        return node, None
    parent_path, name = split(path)
    parent = copy_up(ov, parent_path)
    if ov.index is not None and ov.index.link_up(node, parent.upper_fd, name):  # index=on: another name was copied up
        mark_impure(ov, parent)  # as the kernel's ovl_link_up
        return ov.lookup.lookup(path), None
    # index=on: a lower hard link goes to its index entry, whole (its names share the entry's data), then is linked
    entry = ov.index.name_for(node) if ov.index is not None else None
    metacopy = meta_only and ov.metacopy and stat.S_ISREG(node.mode) and entry is None
    return node, CopyUp(ov, parent, node, name, with_data and not metacopy, metacopy, entry)


class CopyUp:
    """One object's copy-up under way: built in the workdir under a temporary name, not in the upper layer yet.

    Made by :func:`start_copy_up` (the temporary object is created, empty; a regular file's source and
    destination fds are open). Then, in this order: :meth:`copy_data`, the long part, pure I/O between those
    two fds that touches no engine state (so a transport may run it in a worker thread while its loop serves
    other requests), and :meth:`install` (owner, mode, xattrs, origin, times, the atomic rename into the upper
    layer and the engine's caches: on the engine's thread). :meth:`abort` instead removes the temporary
    object. Data come from the top lower object (below a metacopy file: the file holding them); metadata from
    the top lower object too. The data copy-up of a metacopy file is made in place, as the kernel's
    ``ovl_copy_up_meta_inode_data``: its data are written into it (so every hard link of it, and its mtime, see
    them) and removing its ``metacopy`` xattr is the commit; until then reads still go below, so a crash half-way
    leaves it as it was. ``size`` is the number of bytes :meth:`copy_data` will copy (0: none).
    """

    def __init__(
        self,
        ov: OverlayState,
        parent: Node,
        node: Node,
        name: str,
        with_data: bool,
        metacopy: bool,
        index_entry: str | None = None,
    ) -> None:
        self._ov, self._parent, self._node, self._name, self._metacopy = ov, parent, node, name, metacopy
        self._index_entry = index_entry  # index=on: the copy goes there (Index.name_for), then is linked at name
        self._top = top = node.lower.hits[0]  # the object copied up (its path in its layer: a redirect may lead there)
        self._replacing = node.upper is not None
        self._st = st = node.st
        data = node.data or top
        self._work = ov.writable(node.path)[1]
        self._tmp = self._work.temp_name()
        self._src: int | None = None
        self._dst: int | None = None
        to = node.path if self._replacing else self._tmp
        realfs.trace("copy_up", f"{data.layer.root}/{data.path}", to=to, metacopy=metacopy)
        try:
            with data.layer.parent(data.path) as (src_dirfd, src_name):
                if self._replacing:  # in place: the metacopy file gets its data
                    self._dst = realfs.openat2(parent.upper_fd, name, os.O_WRONLY | os.O_NOFOLLOW)
                    if with_data and st.st_size:
                        self._src = realfs.openat2(src_dirfd, src_name, os.O_RDONLY | os.O_NOFOLLOW)
                else:
                    self._create(src_dirfd, src_name, with_data)
        except BaseException:
            self.abort()
            raise
        self.size = st.st_size if self._src is not None else 0

    @property
    def path(self) -> str:
        """The merged path of the object being copied up."""
        return self._node.path

    def _create(self, src_dirfd: int, src_name: str, with_data: bool) -> None:
        """Create the temporary object; for a regular file with data, open the source and keep both fds."""
        mode = self._st.st_mode
        workfd, tmp = self._work.fd, self._tmp
        if stat.S_ISREG(mode):
            self._dst = realfs.create(workfd, tmp, os.O_WRONLY, 0o600)
            if with_data and self._st.st_size:
                self._src = realfs.openat2(src_dirfd, src_name, os.O_RDONLY | os.O_NOFOLLOW)
            elif self._metacopy:
                realfs.truncate(self._dst, self._st.st_size)  # all hole: the size is metadata, the data stays below
        elif stat.S_ISDIR(mode):
            realfs.mkdir(workfd, tmp, 0o700)
        elif stat.S_ISLNK(mode):
            realfs.symlink(os.readlink(src_name, dir_fd=src_dirfd), workfd, tmp)
        else:  # FIFO, socket, device
            realfs.mknod(workfd, tmp, mode, self._st.st_rdev)

    def copy_data(self, cancelled: Callable[[], bool] | None = None) -> None:
        """Copy the data into the temporary file, ``fsync`` it, and close both fds (any thread: no engine state is
        touched).

        ``cancelled()`` is asked between chunks (of :data:`_CHUNK` bytes): when it says True the copy stops with
        EINTR (as the kernel's ``ovl_copy_up_file`` on a fatal signal). The ``fsync`` is the kernel's too (before the
        rename into place, unless mounted ``volatile``): after a crash the upper layer holds the whole copy or none,
        never an empty or partial file hiding the lower one. Raises the read, write and ``fsync`` errors (EIO, ENOSPC,
        EDQUOT...); the temporary file stays until :meth:`abort`.
        """
        try:
            if self._src is not None and self._dst is not None:
                copy_data(self._src, self._dst, self.size, cancelled)
                os.fsync(self._dst)
        finally:
            self._close()

    def install(self) -> Node:
        """Finish the object (owner, mode, xattrs, origin, times), rename it into place; return the fresh node.

        On the engine's thread. Raises the upper filesystem's errors (EEXIST when a name appeared meanwhile,
        ENOSPC, EPERM...), after removing the temporary object.
        """
        ov, parent, node, st, work, tmp = self._ov, self._parent, self._node, self._st, self._work, self._tmp
        self._close()
        path = node.path
        if self._replacing:  # the data are in: no longer a metacopy file (its redirect stays, as the kernel's)
            realfs.removexattr(parent.upper_fd, self._name, ov.markers.metacopy)
            upper = ov.writable(path)[0]
            ov.files.copied_up(path, lambda: upper.open(path, os.O_RDONLY | os.O_NOFOLLOW), ov.inodes.of_node(node))
            return ov.lookup.lookup(path)
        try:
            _copy_owner_and_mode(st, work.fd, tmp)
            with self._top.layer.parent(self._top.path) as meta:
                _copy_xattrs(ov, realfs.fd_path(*meta), realfs.fd_path(work.fd, tmp))
            origin = self._origin()
            if origin is not None:
                ov.markers.set_origin(work.fd, tmp, origin)
            if self._metacopy:
                ov.markers.set_metacopy(work.fd, tmp)
            mark_impure(ov, parent)  # the parent now holds a copied-up object
            realfs.utime(work.fd, tmp, (st.st_atime_ns, st.st_mtime_ns))
            parent_st = os.stat(parent.upper_fd)
            if ov.index is not None and self._index_entry is not None:
                realfs.renameat2(work.fd, tmp, ov.index.fd, self._index_entry, realfs.RENAME_NOREPLACE)
                ov.index.copied_up(self._index_entry, st.st_nlink, parent.upper_fd, self._name)
            else:
                realfs.renameat2(work.fd, tmp, parent.upper_fd, self._name, realfs.RENAME_NOREPLACE)
        except BaseException:
            self.abort()
            raise
        _restore_times(parent.upper_fd, parent_st)
        if node.is_dir:
            ov.lookup.invalidate(path)
        elif self._metacopy:
            ov.files.metadata_copied_up(path)
        elif stat.S_ISREG(st.st_mode):
            assert ov.upper is not None
            upper = ov.upper
            ov.files.copied_up(path, lambda: upper.open(path, os.O_RDONLY | os.O_NOFOLLOW))
        return ov.lookup.lookup(path)

    def _origin(self) -> bytes | None:
        """The ``origin`` the copy gets (None: none): the lower object's, as the kernel's ``ovl_copy_up_one`` decides.

        A directory or a file with a single link gets its lower object's handle (a hard-linked one none: its names
        may be copied up apart, ``index=off``; with ``index=on`` it gets it too). Raises the getxattr and
        name_to_handle_at errors (ENOENT...).
        """
        markers, st = self._ov.markers, self._st
        if self._index_entry is not None:
            return bytes.fromhex(self._index_entry)  # the index entry's name is its origin
        if not (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1):
            return None
        with self._top.layer.parent(self._top.path) as (dirfd, name):
            return markers.origin_value(dirfd, name, self._top.layer.uuid)

    def run(self) -> Node:
        """:meth:`copy_data` then :meth:`install` in this thread (:meth:`abort` on failure); the fresh node."""
        try:
            self.copy_data()
        except BaseException:
            self.abort()
            raise
        return self.install()

    def abort(self) -> None:
        """Give up: close the fds and remove the temporary object (never raises; the workdir is emptied at mount).

        A metacopy file half-way through getting its data in place stays a metacopy file: its reads still go below.
        """
        self._close()
        if self._replacing:
            return
        with contextlib.suppress(OSError):
            self._work.remove(self._tmp)

    def _close(self) -> None:
        for fd in (self._src, self._dst):
            if fd is not None:
                os.close(fd)
        self._src = self._dst = None


def mark_impure(ov: OverlayState, directory: Node) -> None:
    """Mark the upper ``directory`` impure once (the kernel's ``ovl_set_impure``): it holds an object with an origin,
    put there by copy-up, a rename or a link. Best effort, never raises."""
    if not directory.impure:
        ov.markers.set_impure(directory.upper_fd)
        directory.impure = True


def _restore_times(dirfd: int, st: os.stat_result) -> None:
    """Put back a directory's atime/mtime after an internal change (copy-up, whiteout cleanup)."""
    realfs.utime(dirfd, None, (st.st_atime_ns, st.st_mtime_ns))


def copy_data(src: int, dst: int, size: int, cancelled: Callable[[], bool] | None = None) -> None:
    """Copy ``size`` bytes from fd ``src`` to fd ``dst`` in the kernel, keeping holes (SEEK_DATA/SEEK_HOLE).

    Both are read and written at the same offsets, from 0; ``dst`` ends ``size`` bytes long. ``copy_file_range`` falls
    back to ``sendfile`` where it cannot copy (EXDEV, ENOSYS, EINVAL, EOPNOTSUPP). Raises the read and write errors
    (EIO, ENOSPC, EDQUOT, EFBIG...), and EINTR when ``cancelled()`` (asked before each chunk) says True.
    """
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole is left
                raise
            break
        hole = os.lseek(src, data, os.SEEK_HOLE)
        _copy_range(src, dst, data, min(hole, size) - data, cancelled)
        offset = hole
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, offset: int, count: int, cancelled: Callable[[], bool] | None) -> None:
    end = offset + count
    while offset < end:
        if cancelled is not None and cancelled():
            raise InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
        try:
            n = os.copy_file_range(src, dst, min(end - offset, _CHUNK), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(dst, offset, os.SEEK_SET)
            n = os.sendfile(dst, src, offset, min(end - offset, _CHUNK))
        if n == 0:
            break
        offset += n


def _copy_xattrs(ov: OverlayState, src: str, dst: str) -> None:
    """Copy every xattr but overlay's private ones (after data, owner and mode, which clear some)."""
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if realfs.is_enotsup(exc):
            return
        raise
    for name in names:
        if ov.markers.is_private(name):
            continue
        try:
            value = os.getxattr(src, name, follow_symlinks=False)
            os.setxattr(dst, name, value, follow_symlinks=False)
        except OSError as exc:
            # As the kernel: ACL and security.* failures are fatal, other EOPNOTSUPP are not.
            if not realfs.is_enotsup(exc) or name.startswith(("security.", "system.posix_acl")):
                raise


def _copy_owner_and_mode(st: os.stat_result, workfd: int, tmp: str) -> None:
    """Owner first (chown clears setuid/setgid and file capabilities), then mode; xattrs come after."""
    realfs.chown(workfd, tmp, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        realfs.chmod(workfd, tmp, stat.S_IMODE(st.st_mode))


def upper_parent(ov: OverlayState, path: str) -> tuple[Node, str]:
    """Copy up the parent directory of ``path``; return its node and the last component of ``path``.

    Raises ENOTDIR when the parent is not a directory, and what :func:`copy_up` raises.
    """
    parent_path, name = split(path)
    parent = ov.lookup.lookup(parent_path)
    if not parent.is_dir:
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return copy_up(ov, parent_path), name
