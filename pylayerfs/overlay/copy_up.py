"""Copy-up: the only code that moves a lower object into the upper layer.

``copy_up(ov, path)`` makes sure ``path`` has an upper object, ancestors first
(the kernel's ``ovl_copy_up_flags``). Each object is built in the workdir under
a temporary name, with its data (holes kept), then owner, mode (setuid/setgid
included), non-private xattrs and times, and only then renamed into place, so
it appears complete or not at all. A directory is copied without its contents.
The parent's times are restored afterwards: copy-up leaves no visible trace.

With ``metacopy=on``, a copy-up for a metadata change (chmod, chown, utimes,
xattrs) of a regular file copies no data: the upper file is sparse, of the
same size, marked ``metacopy``, and reads go on to the lower file. Any other
copy-up of it (an open for write, a truncate, a rename, a link) copies the
data in: a new file built in the workdir from the lower data and the upper
metadata replaces the metacopy file by rename.

Objects whose lower inode can be reported after copy-up (directories, and files
with a single link, as the kernel decides) keep their inode number: it is
recorded in the ``pylayerfs.origin`` xattr.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from pylayerfs.overlay import realfs
from pylayerfs.overlay.layers import split
from pylayerfs.overlay.lookup import Node
from pylayerfs.overlay.state import OverlayState

_CHUNK = 1 << 30


def copy_up(ov: OverlayState, path: str, *, with_data: bool = True, meta_only: bool = False) -> Node:
    """Give ``path`` an upper object with its data (if it has none) and return the fresh node.

    ``with_data=False`` is for an ``O_TRUNC`` open: the copy is created empty.
    ``meta_only``: the caller changes metadata only, so with ``metacopy=on`` a file's data may stay below.
    Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup of ``path`` does, and whatever
    the upper filesystem answers (ENOSPC, EDQUOT, EPERM...); on any error nothing is left in the upper layer.
    """
    ov.writable(path)
    node = ov.lookup.lookup(path)
    if node.upper is not None and (meta_only or not node.metacopy):
        return node
    parent_path, name = split(path)
    parent = copy_up(ov, parent_path)
    metacopy = meta_only and ov.metacopy and stat.S_ISREG(node.mode)
    _copy_up_one(ov, parent, node, name, with_data and not metacopy, metacopy)
    if node.is_dir:
        ov.lookup.invalidate(path)
    elif metacopy:
        ov.files.metadata_copied_up(path)
    elif stat.S_ISREG(node.mode):
        assert ov.upper is not None
        upper = ov.upper
        ov.files.copied_up(path, lambda: upper.open(path, os.O_RDONLY | os.O_NOFOLLOW))
    return ov.lookup.lookup(path)


def _copy_up_one(ov: OverlayState, parent: Node, node: Node, name: str, with_data: bool, metacopy: bool) -> None:
    """Build the upper object in the workdir, then rename it into place.

    Data come from the top lower object (below a metacopy file: the file holding them); metadata from
    the top lower object too, except for the data copy-up of a metacopy file,
    whose metadata are its own (and which the new file replaces).
    """
    layer = node.lower.hits[0][0]
    replacing = node.upper is not None
    st = node.st
    data_layer = node.data[0] if node.data is not None else layer
    work = ov.writable(node.path)[1]
    tmp = work.temp_name()
    realfs.trace("copy_up", f"{data_layer.root}/{node.path}", to=tmp, metacopy=metacopy)
    try:
        with data_layer.parent(node.path) as (src_dirfd, src_name):
            _create_copy(st, work.fd, tmp, with_data, metacopy, src_dirfd, src_name)
        _copy_owner_and_mode(st, work.fd, tmp)
        with contextlib.nullcontext((parent.upper_fd, name)) if replacing else layer.parent(node.path) as meta:
            _copy_xattrs(ov, realfs.fd_path(*meta), realfs.fd_path(work.fd, tmp))
        origin = node.origin
        if not replacing and (stat.S_ISDIR(st.st_mode) or st.st_nlink == 1):
            origin = ov.inodes.of_real(st)
        if origin is not None:
            ov.markers.set_origin(work.fd, tmp, origin)
        if metacopy:
            ov.markers.set_metacopy(work.fd, tmp)
        realfs.utime(work.fd, tmp, (st.st_atime_ns, st.st_mtime_ns))
        parent_st = os.stat(parent.upper_fd)
        realfs.renameat2(work.fd, tmp, parent.upper_fd, name, 0 if replacing else realfs.RENAME_NOREPLACE)
    except BaseException:
        with contextlib.suppress(OSError):
            work.remove(tmp)
        raise
    _restore_times(parent.upper_fd, parent_st)


def _restore_times(dirfd: int, st: os.stat_result) -> None:
    """Put back a directory's atime/mtime after an internal change (copy-up, whiteout cleanup)."""
    realfs.utime(dirfd, None, (st.st_atime_ns, st.st_mtime_ns))


def _create_copy(
    st: os.stat_result,
    workfd: int,
    tmp: str,
    with_data: bool,
    metacopy: bool,
    src_dirfd: int,
    src_name: str,
) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        dst = realfs.create(workfd, tmp, os.O_WRONLY, 0o600)
        try:
            if with_data and st.st_size:
                src = realfs.openat2(src_dirfd, src_name, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    copy_data(src, dst, st.st_size)
                finally:
                    os.close(src)
            elif metacopy:
                realfs.truncate(dst, st.st_size)  # all hole: the size is metadata, the data stays below
        finally:
            os.close(dst)
    elif stat.S_ISDIR(mode):
        realfs.mkdir(workfd, tmp, 0o700)
    elif stat.S_ISLNK(mode):
        realfs.symlink(os.readlink(src_name, dir_fd=src_dirfd), workfd, tmp)
    else:  # FIFO, socket, device
        realfs.mknod(workfd, tmp, mode, st.st_rdev)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from fd ``src`` to fd ``dst`` in the kernel, keeping holes (SEEK_DATA/SEEK_HOLE).

    Both are read and written at the same offsets, from 0; ``dst`` ends ``size`` bytes long. ``copy_file_range`` falls
    back to ``sendfile`` where it cannot copy (EXDEV, ENOSYS, EINVAL, EOPNOTSUPP). Raises the read and write errors
    (EIO, ENOSPC, EDQUOT, EFBIG...).
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
        _copy_range(src, dst, data, min(hole, size) - data)
        offset = hole
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    end = offset + count
    while offset < end:
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
