"""Namespace operations: create, mkdir, mknod, symlink, link, unlink, rmdir, rename (the kernel's ``dir.c``).

The upper-layer rules they follow:

* Creating anything first copies up the parent directory. Over a whiteout, the
  new object is built in the workdir and renamed over the whiteout; a new
  directory there is marked opaque, so the lower contents stay hidden.
* Removing a name that a lower layer holds leaves a whiteout; removing a
  pure-upper name leaves nothing. A merged directory can be removed only when
  it shows no entry; its upper part (holding only whiteouts) is then swapped
  for a whiteout and deleted in the workdir.
* Renaming a lower or merged directory is refused with EXDEV unless the mount
  is ``redirect_dir=on`` (``mv`` then copies). Anything else is copied up and
  renamed in the upper layer, with a whiteout left at the old name if a lower
  layer holds it; a pure-upper directory moved into a merged directory is
  marked opaque. With ``redirect_dir=on`` a lower or merged directory (and with
  ``metacopy=on`` a metacopy file) is copied up without its contents and
  records where it came from in ``redirect`` (the kernel's ``ovl_rename``,
  fs/overlayfs/dir.c): its old name if it stays in the same directory, else
  its absolute path from the layer roots. A new directory made in a merged
  directory is marked opaque then, as the kernel's ``ovl_create_upper`` does
  when offline changes to the layers are not allowed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator

from pylayerfs.overlay import realfs
from pylayerfs.overlay.copy_up import copy_up, upper_parent
from pylayerfs.overlay.file import OpenFile
from pylayerfs.overlay.layers import split
from pylayerfs.overlay.lookup import Node
from pylayerfs.overlay.markers import REDIRECT_MAX, is_whiteout, make_whiteout
from pylayerfs.overlay.readdir import merged_names
from pylayerfs.overlay.state import Caller, OverlayState
from pylayerfs.overlay.workdir import Workdir


def _error(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _upper_stat(parent: Node, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent.upper_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# -- creating --------------------------------------------------------------------------


def _create_object(
    ov: OverlayState,
    path: str,
    make: Callable[[int, str], None],
    owner: Caller | None,
    is_dir: bool = False,
    special_bits: bool = True,
) -> None:
    """Create ``path`` with ``make(dirfd, name)``, over a whiteout if there is one.

    The new object is given to ``owner`` (the caller; None for a hard link, which keeps its owner).
    ``special_bits=False`` says the new object has no set-user/group-ID bit for chown to clear.
    """
    work = ov.writable(path)[1]
    parent, name = upper_parent(ov, path)
    existing = _upper_stat(parent, name)
    if (existing is not None and not is_whiteout(existing)) or (
        existing is None and ov.lookup.lower_positive(parent, name)
    ):
        raise _error(errno.EEXIST, path)
    parent_st = os.stat(parent.upper_fd)
    dirfd, tmp, inheriting = parent.upper_fd, name, None
    if existing is not None:  # built in the workdir, in a directory of its own when the parent has a default ACL
        acl = _default_acl(parent.upper_fd)
        inheriting = None if acl is None else _inheriting_dir(work, acl)
        dirfd, tmp = (work.fd, work.temp_name()) if inheriting is None else (inheriting[0], name)
    try:
        with _umask(owner):
            make(dirfd, tmp)
        if is_dir and existing is None and ov.redirect_dir == "on" and parent.is_merged:
            ov.markers.set_opaque(dirfd, tmp)  # lower layers may not change offline: nothing below to look for
        if is_dir and parent_st.st_mode & stat.S_ISGID:  # passed on, also to a directory built in the workdir
            mode = stat.S_IMODE(os.stat(tmp, dir_fd=dirfd, follow_symlinks=False).st_mode)
            realfs.chmod(dirfd, tmp, mode | stat.S_ISGID)
        if owner is not None:
            gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else owner.gid  # setgid dirs pass on their group
            made = os.stat(tmp, dir_fd=dirfd, follow_symlinks=False) if special_bits or is_dir else None
            realfs.chown(dirfd, tmp, owner.uid, gid)
            if made and made.st_mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(made.st_mode):
                realfs.chmod(dirfd, tmp, stat.S_IMODE(made.st_mode))  # chown cleared them
        if existing is not None:  # over a whiteout: built in the workdir, now swapped in
            assert is_whiteout(existing)
            if is_dir:
                ov.markers.set_opaque(dirfd, tmp)
                realfs.renameat2(dirfd, tmp, parent.upper_fd, name, realfs.RENAME_EXCHANGE)
                realfs.rmtree(dirfd, tmp)
            else:
                realfs.renameat2(dirfd, tmp, parent.upper_fd, name)
    finally:
        if inheriting is not None:
            os.close(inheriting[0])
            work.remove(inheriting[1])
    ov.files.forget(path)


_DEFAULT_ACL = "system.posix_acl_default"


def _default_acl(dirfd: int) -> bytes | None:
    """The default ACL of the directory ``dirfd`` (its xattr's value), None when it has none or ACLs are off."""
    try:
        return os.getxattr(realfs.fd_path(dirfd), _DEFAULT_ACL)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
        raise


def _inheriting_dir(work: Workdir, acl: bytes) -> tuple[int, str]:
    """A new directory in the workdir with the default ACL ``acl``: an object made in it inherits as in the directory
    it came from (the kernel's overlayfs computes the same with ``posix_acl_create`` in ``ovl_create_over_whiteout``).
    Returns an fd on it and its name, for the caller to close and remove."""
    name = work.temp_name()
    realfs.mkdir(work.fd, name, 0o700)
    fd = -1
    try:
        fd = realfs.openat2(work.fd, name, os.O_RDONLY | os.O_DIRECTORY)
        os.setxattr(realfs.fd_path(fd), _DEFAULT_ACL, acl)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        work.remove(name)
        raise
    return fd, name


@contextlib.contextmanager
def _umask(owner: Caller | None) -> Iterator[None]:
    """The process's umask set to ``owner``'s while an object is made, so that the upper filesystem applies it unless
    the directory has a default ACL, as a local filesystem does for the caller (``Caller.umask``). The engine makes
    objects on one thread (copy-up workers only copy data)."""
    if owner is None or not owner.umask:
        yield
        return
    old = os.umask(owner.umask)
    try:
        yield
    finally:
        os.umask(old)


def create(ov: OverlayState, path: str, mode: int, flags: int, caller: Caller) -> int:
    """Create and open the regular file ``path``; return the file handle (the fd that made the file is the handle's).

    ``mode``'s permission bits are the file's, ``flags`` the open flags (``O_TRUNC`` dropped: the file is new), the
    owner ``caller``. Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup of the parent does, EEXIST when
    the merged view has ``path``, and the upper filesystem's errors (ENOSPC, EDQUOT...).
    """
    opened: list[int] = []

    def make(fd: int, name: str) -> None:
        opened.append(realfs.create(fd, name, flags & ~os.O_TRUNC, stat.S_IMODE(mode)))

    try:
        _create_object(ov, path, make, caller, special_bits=bool(mode & (stat.S_ISUID | stat.S_ISGID)))
    except BaseException:
        for fd in opened:
            os.close(fd)
        raise
    fd = opened[0]
    return ov.files.add(OpenFile(fd, path, ov.inodes.of_real(os.fstat(fd)), on_lower=False))


def tmpfile(ov: OverlayState, directory: str, mode: int, flags: int, caller: Caller) -> int:
    """Make an unnamed regular file in the directory ``directory`` (``open(2)``'s ``O_TMPFILE``); its file handle.

    The directory is copied up first and the file made in its upper directory, as the kernel's ``ovl_tmpfile``
    does: it has no name (``st_nlink`` 0) until :func:`link_open` gives it one, and is gone at its last close
    otherwise. ``mode``'s permission bits are the file's, ``flags`` the open flags (access mode, ``O_EXCL``: never
    to be linked), the owner ``caller`` (a setgid directory passes on its group). Raises EROFS on a read-only
    stack, ENOENT/ENOTDIR as the lookup of ``directory`` does, ENOTDIR when it is not a directory, EINVAL for a
    read-only open, EOPNOTSUPP where the upper filesystem has no ``O_TMPFILE``, and its errors (ENOSPC, EDQUOT...).
    """
    ov.writable(directory)
    if not ov.lookup.lookup(directory).is_dir:
        raise _error(errno.ENOTDIR, directory)
    parent = copy_up(ov, directory)
    real_flags = realfs.open_flags(flags) & ~(os.O_CREAT | os.O_TRUNC | os.O_TMPFILE) | os.O_TMPFILE
    with _umask(caller):
        fd = realfs.openat2(parent.upper_fd, ".", real_flags, stat.S_IMODE(mode))
    try:
        parent_st = os.stat(parent.upper_fd)
        gid = parent_st.st_gid if parent_st.st_mode & stat.S_ISGID else caller.gid  # as _create_object
        made = os.stat(fd).st_mode
        realfs.chown(fd, None, caller.uid, gid)
        if made & (stat.S_ISUID | stat.S_ISGID):
            realfs.chmod(fd, None, stat.S_IMODE(made))  # chown cleared them
    except BaseException:
        os.close(fd)
        raise
    return ov.files.add(OpenFile(fd, directory, ov.inodes.of_real(os.fstat(fd)), on_lower=False))


def link_open(ov: OverlayState, fh: int, new: str) -> None:
    """Give the file open as ``fh`` the name ``new``: ``linkat`` of its ``/proc/self/fd`` link (an ``O_TMPFILE``).

    The FUSE LINK of a node that has no name left, made by ``linkat(fd, "", ..., AT_EMPTY_PATH)`` or through
    ``/proc/self/fd/N``; the kernel's VFS has already refused a file that was unlinked rather than made unnamed.
    The new name keeps the file's owner. Raises ENOENT for a handle still on a lower file (it has no upper object to
    link), EROFS on a read-only stack, EEXIST when the merged view has ``new``, ENOENT/ENOTDIR as the lookup of its
    parent does, ENOENT for a file opened with ``O_EXCL`` or one whose last name was removed, and the upper
    filesystem's errors (EMLINK, ENOSPC...). A handle that is not open raises KeyError (a caller's bug).
    """
    of = ov.files.get(fh)
    if of.on_lower or of.metacopy:
        raise _error(errno.ENOENT, new)

    def make(dirfd: int, name: str) -> None:
        # linkat(AT_FDCWD, "/proc/self/fd/N", dirfd, name, AT_SYMLINK_FOLLOW): AT_EMPTY_PATH would need
        # CAP_DAC_READ_SEARCH, the /proc link needs nothing more than the fd.
        os.link(realfs.fd_path(of.fd), name, dst_dir_fd=dirfd, follow_symlinks=True)

    _create_object(ov, new, make, owner=None)


def mknod(ov: OverlayState, path: str, mode: int, rdev: int, caller: Caller) -> None:
    """Create the FIFO, socket or device ``path`` (``mode`` with its type bits, ``rdev`` the device number).

    The owner is ``caller``. Raises EPERM for a character device 0/0 (users cannot make whiteouts: the kernel's
    ``ovl_mknod``) or a device the daemon may not make, and as :func:`create` does (EROFS, ENOENT/ENOTDIR, EEXIST,
    ENOSPC...).
    """
    if stat.S_ISCHR(mode) and rdev == 0:
        raise _error(errno.EPERM, path)  # users cannot make whiteouts
    _create_object(ov, path, lambda fd, name: realfs.mknod(fd, name, mode, rdev), caller)


def mkdir(ov: OverlayState, path: str, mode: int, caller: Caller) -> None:
    """Create the directory ``path`` with the permission bits of ``mode``, owned by ``caller``.

    A setgid parent passes on its group and setgid bit. Over a whiteout the new directory is opaque, hiding the lower
    ones (overlayfs.rst, "whiteouts and opaque directories"). Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the
    lookup of the parent does, EEXIST when the merged view has ``path``, and the upper filesystem's errors (EMLINK,
    ENOSPC, EDQUOT...).
    """

    _create_object(ov, path, lambda fd, name: realfs.mkdir(fd, name, stat.S_IMODE(mode)), caller, is_dir=True)


def symlink(ov: OverlayState, path: str, target: str, caller: Caller) -> None:
    """Create the symlink ``path`` pointing to ``target`` (stored as given), owned by ``caller``.

    Raises as :func:`mkdir` does, and ENAMETOOLONG for a target longer than the upper filesystem takes.
    """
    _create_object(ov, path, lambda fd, name: realfs.symlink(target, fd, name), caller)


def link(ov: OverlayState, old: str, new: str) -> None:
    """Make ``new`` a hard link to ``old``, which is copied up first (links live in the upper layer only).

    With ``metacopy=on`` a regular file is copied up as a metacopy file with an absolute ``redirect`` to its data.
    The new name keeps the object's owner. Raises ENOENT/ENOTDIR as the lookup of ``old`` does, EPERM for a directory,
    EROFS on a read-only stack, EEXIST when the merged view has ``new``, EXDEV when the redirect cannot be recorded,
    and the upper filesystem's errors (EMLINK, ENOSPC...).
    """
    src = ov.lookup.lookup(old)
    if src.is_dir:
        raise _error(errno.EPERM, old)
    src = copy_up(ov, old, meta_only=True)  # with metacopy=on a regular file's data stay below
    old_parent_path, old_name = split(old)
    if src.metacopy:  # every name of it must find the data: an absolute redirect (the kernel's ovl_link)
        _set_redirect(ov, src, False, ov.lookup.lookup(old_parent_path))

    def make(fd: int, name: str) -> None:
        src_parent = ov.lookup.lookup(old_parent_path)
        realfs.link(src_parent.upper_fd, old_name, fd, name)

    _create_object(ov, new, make, owner=None)


# -- removing ----------------------------------------------------------------------------


def _replace_with_whiteout(ov: OverlayState, parent: Node, name: str, is_dir: bool) -> None:
    """Atomically put a whiteout where ``name`` is (or just create it if the upper has nothing)."""
    work = ov.writable(name)[1]
    tmp = work.temp_name()
    make_whiteout(work.fd, tmp)
    if is_dir and _upper_stat(parent, name) is not None:
        realfs.renameat2(work.fd, tmp, parent.upper_fd, name, realfs.RENAME_EXCHANGE)
        work.remove(tmp)  # the old upper directory, holding only whiteouts
    else:
        realfs.renameat2(work.fd, tmp, parent.upper_fd, name)


def unlink(ov: OverlayState, path: str) -> None:
    """Remove the non-directory ``path``: a whiteout stays where a lower layer holds the name, nothing otherwise.

    The parent is copied up first. Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup does, EISDIR for a
    directory, and the upper filesystem's errors.
    """
    ov.writable(path)
    node = ov.lookup.lookup(path)
    if node.is_dir:
        raise _error(errno.EISDIR, path)
    parent, name = upper_parent(ov, path)
    if ov.lookup.lower_positive(parent, name):
        _replace_with_whiteout(ov, parent, name, is_dir=False)
    else:
        realfs.unlink(parent.upper_fd, name)
    ov.files.forget(path)


def rmdir(ov: OverlayState, path: str) -> None:
    """Remove the directory ``path`` if the merged view shows it empty; a whiteout stays where a lower layer holds it.

    A merged directory's upper part (holding only whiteouts) is swapped for the whiteout and removed in the workdir.
    Raises EROFS on a read-only stack, EBUSY for the root, ENOENT/ENOTDIR as the lookup does, ENOTDIR for a
    non-directory, ENOTEMPTY when it shows an entry, and the upper filesystem's errors.
    """
    ov.writable(path)
    if not path:
        raise _error(errno.EBUSY, path)
    node = ov.lookup.lookup(path)
    if not node.is_dir:
        raise _error(errno.ENOTDIR, path)
    if has_visible_entries(ov, node):
        raise _error(errno.ENOTEMPTY, path)
    parent, name = upper_parent(ov, path)
    if ov.lookup.lower_positive(parent, name):
        _replace_with_whiteout(ov, parent, name, is_dir=True)
    else:
        _remove_upper_dir(ov, parent, name)
    ov.lookup.invalidate(path)


def _remove_upper_dir(ov: OverlayState, parent: Node, name: str) -> None:
    """Remove a pure-upper directory; one left with stale whiteouts goes through the workdir."""
    try:
        realfs.rmdir(parent.upper_fd, name)
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        work = ov.writable(name)[1]
        tmp = work.temp_name()
        realfs.renameat2(parent.upper_fd, name, work.fd, tmp)
        work.remove(tmp)


def has_visible_entries(ov: OverlayState, node: Node) -> bool:
    """Does the merged directory ``node`` show any entry (whiteouts and what they hide do not count)?

    Raises the listing errors of its real directories.
    """
    return any(True for _ in merged_names(ov, node))


# -- renaming ----------------------------------------------------------------------------

_RENAME_FLAGS = realfs.RENAME_NOREPLACE | realfs.RENAME_EXCHANGE


def rename(ov: OverlayState, old: str, new: str, flags: int = 0) -> None:
    """Rename ``old`` to ``new`` in the merged view; ``flags``: RENAME_NOREPLACE or RENAME_EXCHANGE (``renameat2(2)``).

    ``old`` (and, for an exchange, ``new``) is copied up (with ``metacopy=on`` a regular file's metadata only) and
    renamed in the upper layer, with a whiteout left at ``old`` if a lower layer holds it; ``old == new`` changes
    nothing. A lower or merged directory, and a metacopy file, records where it came from in ``redirect``
    (:func:`_set_redirect`); the new parent is marked impure when an object with an origin moves into it (the
    kernel's ``ovl_rename``, fs/overlayfs/dir.c). Raises EROFS on a read-only stack; EINVAL for other flags or both;
    ENOENT/ENOTDIR as the lookups of ``old`` and of ``new``'s parent do, ENOENT for a missing ``new`` with
    RENAME_EXCHANGE; EEXIST for RENAME_NOREPLACE over an existing name; ENOTDIR/EISDIR when a directory would replace a
    non-directory or the reverse; EXDEV for a lower or merged directory unless ``redirect_dir=on`` (overlayfs.rst,
    "Renaming directories"; ``mv`` then copies), and when a redirect cannot be recorded (too long, no xattrs);
    ENOTEMPTY over a directory that shows entries. Moving a directory below itself (EINVAL) is the VFS's check, not
    made here.
    """
    ov.writable(old)
    if flags & ~_RENAME_FLAGS or flags == _RENAME_FLAGS:
        raise _error(errno.EINVAL, old)  # RENAME_WHITEOUT is the overlay's own
    exchange = bool(flags & realfs.RENAME_EXCHANGE)
    src = ov.lookup.lookup(old)
    new_parent_node = ov.lookup.lookup(split(new)[0])
    if not new_parent_node.is_dir:
        raise _error(errno.ENOTDIR, new)
    dst = ov.lookup.child(new_parent_node, split(new)[1])
    if old == new:
        return
    if dst is not None and flags & realfs.RENAME_NOREPLACE:
        raise _error(errno.EEXIST, new)
    if dst is None and exchange:
        raise _error(errno.ENOENT, new)
    if dst is not None and not exchange:  # the VFS checks types first, overlay then refuses to move
        if src.is_dir and not dst.is_dir:
            raise _error(errno.ENOTDIR, new)
        if not src.is_dir and dst.is_dir:
            raise _error(errno.EISDIR, new)
    if not _can_move(ov, src) or (exchange and dst is not None and not _can_move(ov, dst)):
        raise _error(errno.EXDEV, old)  # redirect_dir is not on: lower and merged directories do not move
    if dst is not None and not exchange and dst.is_dir and has_visible_entries(ov, dst):
        raise _error(errno.ENOTEMPTY, new)

    copy_up(ov, old, meta_only=True)
    if exchange:
        copy_up(ov, new, meta_only=True)
    old_parent, old_name = upper_parent(ov, old)
    new_parent, new_name = upper_parent(ov, new)
    old_parent = ov.lookup.lookup(split(old)[0])  # refreshed: copying up one parent may move the other's node
    src = ov.lookup.lookup(old)
    samedir = split(old)[0] == split(new)[0]
    if exchange:
        assert dst is not None
        dst = ov.lookup.lookup(new)
    _mark_moved(ov, src, samedir, new_parent, old_parent)
    if exchange:
        assert dst is not None
        _mark_moved(ov, dst, samedir, old_parent, new_parent)
        realfs.renameat2(old_parent.upper_fd, old_name, new_parent.upper_fd, new_name, realfs.RENAME_EXCHANGE)
    else:
        _move(ov, old_parent, old_name, new_parent, new_name, src.is_dir)
    for path in (old, new):
        if src.is_dir or (dst is not None and dst.is_dir):
            ov.lookup.moved(path)
        ov.files.forget(path)


def _can_move(ov: OverlayState, node: Node) -> bool:
    """May ``node`` be renamed? Not a lower or merged directory unless ``redirect_dir=on`` (the kernel's
    ``ovl_can_move``)."""
    return ov.redirect_dir == "on" or not node.is_dir or not node.lower.hits


def _mark_moved(ov: OverlayState, node: Node, samedir: bool, to: Node, source: Node) -> None:
    """Mark the copied-up ``node`` before it moves from the directory ``source`` into ``to`` (the kernel's
    ``ovl_rename``): a lower or merged directory, or a metacopy file, gets its redirect; a pure-upper directory
    moving into a merged directory is marked opaque; ``to`` is marked impure when ``node`` has an origin and the move
    is to another directory. Raises EXDEV where a redirect or the opaque marker cannot be recorded."""
    if (node.is_dir and node.lower.hits) or node.metacopy:
        _set_redirect(ov, node, samedir, source)
    elif node.is_dir and not node.opaque and to.is_merged:
        try:
            ov.markers.set_opaque(source.upper_fd, split(node.path)[1])
        except OSError:
            raise _error(errno.EXDEV, node.path) from None
    if not samedir and not to.impure and (node.origin is not None or node.lower.hits):
        ov.markers.set_impure(to.upper_fd)
        to.impure = True


def _set_redirect(ov: OverlayState, node: Node, samedir: bool, parent: Node) -> None:
    """Record in the copied-up ``node`` (in the directory ``parent``) where its lower part is, before it is renamed (the
    kernel's
    ``ovl_set_redirect`` and ``ovl_get_redirect``): its current name for a rename within its directory, else its
    absolute path, made of its ancestors' names, each replaced by its own redirect where it has one, up to the root or
    to an absolute redirect. An absolute redirect is kept, and so is a relative one within the same directory. Raises
    EXDEV for an absolute path over :data:`REDIRECT_MAX` bytes, or one the upper filesystem cannot store (``mv`` then
    copies, as under the kernel).
    """
    if node.redirect is not None and (samedir or node.redirect.startswith("/")):
        return
    path, name = split(node.path)
    if samedir:
        redirect = name
    else:
        parts = [node.redirect or name]
        while path and not parts[0].startswith("/"):
            ancestor = ov.lookup.lookup(path)
            path, name = split(path)
            parts.insert(0, ancestor.redirect or name)
        redirect = "/".join(parts) if parts[0].startswith("/") else "/" + "/".join(parts)
        if len(os.fsencode(redirect)) > REDIRECT_MAX:
            raise _error(errno.EXDEV, node.path)
    try:
        ov.markers.set_redirect(parent.upper_fd, split(node.path)[1], redirect)
    except OSError:
        raise _error(errno.EXDEV, node.path) from None


def _move(ov: OverlayState, old_parent: Node, old_name: str, new_parent: Node, new_name: str, is_dir: bool) -> None:
    """Rename in the upper layer, leaving a whiteout at the old name where a lower layer holds it."""
    whiteout = ov.lookup.lower_positive(old_parent, old_name)
    target = _upper_stat(new_parent, new_name)
    if target is not None and stat.S_ISDIR(target.st_mode):
        _clear_dir(ov, new_parent, new_name)
    if target is not None and is_dir and is_whiteout(target):
        # A directory cannot replace a device: swap them, the whiteout lands at the old name.
        realfs.renameat2(old_parent.upper_fd, old_name, new_parent.upper_fd, new_name, realfs.RENAME_EXCHANGE)
        if not whiteout:
            realfs.unlink(old_parent.upper_fd, old_name)
        return
    if whiteout:
        try:
            realfs.renameat2(old_parent.upper_fd, old_name, new_parent.upper_fd, new_name, realfs.RENAME_WHITEOUT)
            return
        except OSError as exc:  # the upper filesystem (or our privilege) has no RENAME_WHITEOUT
            if exc.errno not in (errno.EINVAL, errno.EPERM):
                raise
    realfs.renameat2(old_parent.upper_fd, old_name, new_parent.upper_fd, new_name)
    if whiteout:
        make_whiteout(old_parent.upper_fd, old_name)


def _clear_dir(ov: OverlayState, parent: Node, name: str) -> None:
    """Empty an upper directory that holds only whiteouts, atomically (the kernel's ``ovl_clear_empty``)."""
    work = ov.writable(name)[1]
    tmp = work.temp_name()
    realfs.mkdir(work.fd, tmp, 0o700)
    fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent.upper_fd)
    try:
        st = os.stat(fd)
        realfs.chown(work.fd, tmp, st.st_uid, st.st_gid)
        realfs.chmod(work.fd, tmp, stat.S_IMODE(st.st_mode))
    finally:
        os.close(fd)
    ov.markers.set_opaque(work.fd, tmp)
    realfs.renameat2(work.fd, tmp, parent.upper_fd, name, realfs.RENAME_EXCHANGE)
    work.remove(tmp)
