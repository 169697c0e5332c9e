"""The system calls pylayerfs makes on the real layer directories.

This is pylayerfs's equivalent of the kernel's ``ovl_do_*`` wrappers: every
call that opens, creates, changes, renames or removes something inside a layer
(or the workdir) goes through here, so that

* paths inside a layer are resolved with ``openat2(RESOLVE_BENEATH |
  RESOLVE_NO_SYMLINKS)``: nothing a layer contains (symlinks, ``..``) can
  make pylayerfs reach outside that layer's directory, and
* the ``debug`` mount option logs every one of them, with the real path it
  acts on ("see what overlay does to the disk").

Objects are named ``(dirfd, name)``: an open directory and one path component
in it (``name=None`` for the directory itself), as the ``*at`` calls take them;
no function here follows a symlink in the last component. Reads (stat,
getxattr, readdir) are not traced: they change nothing. Each function raises
the :class:`OSError` of its system call.

``openat2``, ``renameat2``, ``name_to_handle_at`` and ``open_by_handle_at`` are not in
Python's ``os`` module; they are called through libc with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import platform
import shutil
import stat

log = logging.getLogger("pylayerfs.overlay.realfs")

# <linux/openat2.h>
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

# <linux/fs.h>
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# openat2 is syscall 437 on every architecture that has it (the unified table; alpha adds 110).
_SYS_OPENAT2 = 547 if platform.machine() == "alpha" else 437

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int

# <linux/fcntl.h>, <linux/exportfs.h>, <linux/fs.h>
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128  # bytes of a file handle, at most
FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 { __u8 len; __u8 uuid[16]; })
NULL_UUID = bytes(16)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# The longest path one openat2 call takes (PATH_MAX, with its terminating NUL).
PATH_MAX = 4096


class _FileHandle(ctypes.Structure):
    """``struct file_handle`` of name_to_handle_at(2), with room for the largest handle."""

    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _raise_errno(what: str, path: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), f"{what} {path}")


# The flags open(2) knows and the real file gets. openat2 refuses any other bit with EINVAL, and the
# kernel's FUSE passes some of its own in an open request (__FMODE_EXEC, 0x20, when a program is
# executed). O_DIRECT stays with the FUSE file (the kernel sends its I/O straight to us, bypassing
# its page cache): the daemon's reads and writes use buffers that O_DIRECT's alignment rules would
# refuse (EINVAL on ext4).
_OPEN_FLAGS = (
    os.O_ACCMODE
    | os.O_CREAT
    | os.O_EXCL
    | os.O_NOCTTY
    | os.O_TRUNC
    | os.O_APPEND
    | os.O_NONBLOCK
    | os.O_DSYNC
    | os.O_SYNC
    | os.O_LARGEFILE
    | os.O_DIRECTORY
    | os.O_NOFOLLOW
    | os.O_NOATIME
    | os.O_CLOEXEC
    | os.O_PATH
    | os.O_TMPFILE
)


def open_flags(flags: int) -> int:
    """``flags`` without the bits open(2) does not know (the kernel's own, from a FUSE request), nor O_DIRECT."""
    return flags & _OPEN_FLAGS


def openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    """Open ``path`` below ``dirfd`` without following any symlink or leaving ``dirfd``; return the new fd.

    The fd is close-on-exec; ``path`` is relative to ``dirfd`` (``"."`` for ``dirfd`` itself). Raises ELOOP for a
    symlink anywhere on the path (the last component too, unless the flags hold ``O_PATH | O_NOFOLLOW``), EXDEV for a
    path that leaves ``dirfd`` (an absolute path, ``..`` above it), and what ``open(2)`` raises (ENOENT, ENOTDIR,
    EACCES, EEXIST with ``O_CREAT | O_EXCL``, EISDIR for a directory opened for writing...).
    """
    flags &= _OPEN_FLAGS
    encoded = os.fsencode(path)
    if len(encoded) >= PATH_MAX:
        return _openat2_long(dirfd, encoded, flags, mode)
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, _RESOLVE)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, encoded, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        _raise_errno("openat2", path)
    trace("openat2", path, flags=oct(flags))
    return int(fd)


def _openat2_long(dirfd: int, path: bytes, flags: int, mode: int) -> int:
    """:func:`openat2` of a path of PATH_MAX bytes or more: directory by directory, each step beneath the last.

    The kernel takes at most PATH_MAX bytes per call (ENAMETOOLONG), but a merged tree may be deeper: the path is cut
    at slashes into pieces shorter than that, each directory opened (``O_PATH``) beneath the one before, so the walk
    stays beneath ``dirfd`` as a single call would. Raises what :func:`openat2` raises, ENAMETOOLONG for a component
    longer than PATH_MAX.
    """
    pieces: list[bytes] = []
    for component in path.split(b"/"):
        if pieces and len(pieces[-1]) + 1 + len(component) < PATH_MAX:
            pieces[-1] += b"/" + component
        else:
            pieces.append(component)
    fd = dirfd
    try:
        for piece in pieces[:-1]:
            step = openat2(fd, os.fsdecode(piece), os.O_PATH | os.O_DIRECTORY)
            if fd != dirfd:
                os.close(fd)
            fd = step
        return openat2(fd, os.fsdecode(pieces[-1]), flags, mode)
    finally:
        if fd != dirfd:
            os.close(fd)


def renameat2(olddirfd: int, oldname: str, newdirfd: int, newname: str, flags: int = 0) -> None:
    """``renameat2(2)`` of ``(olddirfd, oldname)`` to ``(newdirfd, newname)``.

    ``flags`` takes RENAME_NOREPLACE, RENAME_EXCHANGE and RENAME_WHITEOUT. Raises EEXIST for RENAME_NOREPLACE over an
    existing name, ENOENT for a missing source (with RENAME_EXCHANGE, either name), ENOTEMPTY (or EEXIST) over a
    non-empty directory, EISDIR/ENOTDIR when a directory would replace a non-directory or the reverse, EXDEV across
    filesystems, and EINVAL or EPERM when the filesystem or the caller's privilege does not allow a flag
    (RENAME_WHITEOUT).
    """
    trace("renameat2", f"{oldname} -> {newname}", flags=flags)
    if _libc.renameat2(olddirfd, os.fsencode(oldname), newdirfd, os.fsencode(newname), flags) != 0:
        _raise_errno("renameat2", f"{oldname} -> {newname}")


def detach(mountpoint: str) -> None:
    """Unmount ``mountpoint`` lazily (MNT_DETACH): gone from the namespace now, released when no longer busy.

    Raises EINVAL when ``mountpoint`` is not a mountpoint, ENOENT when it does not exist, EPERM without CAP_SYS_ADMIN.
    """
    trace("umount2", mountpoint, flags="MNT_DETACH")
    if _libc.umount2(os.fsencode(mountpoint), 2) != 0:
        _raise_errno("umount2", mountpoint)


def trace(call: str, path: str, **args: object) -> None:
    """Log one call on a real layer directory (the ``debug`` mount option shows these); does nothing below DEBUG."""
    if log.isEnabledFor(logging.DEBUG):
        extra = " ".join(f"{k}={v}" for k, v in args.items())
        log.debug("%s %s %s", call, path, extra)


def _trace_at(call: str, dirfd: int, name: str | None, **args: object) -> None:
    """:func:`trace` for an object named ``(dirfd, name)``, shown by its real path."""
    if log.isEnabledFor(logging.DEBUG):
        try:
            where = os.readlink(fd_path(dirfd))
        except OSError:
            where = fd_path(dirfd)
        trace(call, f"{where}/{name}" if name else where, **args)


# -- the calls that change a layer, each traced ------------------------------------------------


def create(dirfd: int, name: str, flags: int, mode: int) -> int:
    """``openat(dirfd, name, flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)``: a new file; its fd.

    Raises EEXIST when ``name`` exists (a symlink or a whiteout too), and what ``open(2)`` raises (ENOENT, ENOTDIR,
    EACCES, ENOSPC, EDQUOT...).
    """
    _trace_at("create", dirfd, name, mode=oct(mode))
    return os.open(name, open_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def mkdir(dirfd: int, name: str, mode: int) -> None:
    """Create the directory ``(dirfd, name)`` with the permission bits ``mode``.

    Raises EEXIST when ``name`` exists, and what ``mkdirat(2)`` raises (ENOENT, ENOTDIR, EMLINK, ENOSPC, EDQUOT...).
    """
    _trace_at("mkdir", dirfd, name, mode=oct(mode))
    os.mkdir(name, mode, dir_fd=dirfd)


def mknod(dirfd: int, name: str, mode: int, rdev: int = 0) -> None:
    """Create the FIFO, socket or device ``(dirfd, name)``; ``mode`` holds the type bits, ``rdev`` the device number.

    Raises EEXIST when ``name`` exists, EPERM for a device the caller may not make (no CAP_MKNOD; a 0/0 whiteout is
    allowed since Linux 5.8), and what ``mknodat(2)`` raises (ENOSPC, EDQUOT...).
    """
    _trace_at("mknod", dirfd, name, mode=oct(mode), rdev=f"{os.major(rdev)}:{os.minor(rdev)}")
    os.mknod(name, mode, rdev, dir_fd=dirfd)


def symlink(target: str, dirfd: int, name: str) -> None:
    """Create the symlink ``(dirfd, name)`` pointing to ``target`` (stored as given, never resolved).

    Raises EEXIST when ``name`` exists, ENAMETOOLONG for a target longer than the filesystem takes, and what
    ``symlinkat(2)`` raises (ENOSPC, EDQUOT...).
    """
    _trace_at("symlink", dirfd, name, target=target)
    os.symlink(target, name, dir_fd=dirfd)


def link(old_dirfd: int, old_name: str, new_dirfd: int, new_name: str) -> None:
    """A hard link ``(new_dirfd, new_name)`` to ``(old_dirfd, old_name)`` (never following a symlink).

    Raises EEXIST when ``new_name`` exists, ENOENT when ``old_name`` does not, EPERM for a directory, EMLINK at the
    filesystem's link limit, EXDEV across filesystems.
    """
    _trace_at("link", new_dirfd, new_name, to=old_name)
    os.link(old_name, new_name, src_dir_fd=old_dirfd, dst_dir_fd=new_dirfd, follow_symlinks=False)


def unlink(dirfd: int, name: str) -> None:
    """Remove the non-directory ``(dirfd, name)`` (a symlink itself, never its target).

    Raises ENOENT when ``name`` does not exist, EISDIR for a directory.
    """
    _trace_at("unlink", dirfd, name)
    os.unlink(name, dir_fd=dirfd)


def rmdir(dirfd: int, name: str) -> None:
    """Remove the empty directory ``(dirfd, name)``.

    Raises ENOENT when ``name`` does not exist, ENOTDIR for a non-directory, ENOTEMPTY when it holds anything (whiteouts
    included).
    """
    _trace_at("rmdir", dirfd, name)
    os.rmdir(name, dir_fd=dirfd)


def rmtree(dirfd: int, name: str) -> None:
    """Remove ``(dirfd, name)`` and, for a directory, everything below it (the workdir's cleanup).

    Raises ENOENT when ``name`` does not exist, and the first error of a removal below it.
    """
    _trace_at("rmtree", dirfd, name)
    if stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def chown(dirfd: int, name: str | None, uid: int, gid: int) -> None:
    """Set the owner of ``(dirfd, name)`` (a symlink itself); -1 leaves an id as it is.

    Name None: the object ``dirfd`` is open on (a directory, or an open file, even one whose last name is gone). Raises
    EPERM when the caller may not give the object away, and ENOENT when ``name`` does not exist.
    """
    _trace_at("chown", dirfd, name, uid=uid, gid=gid)
    if name is None:
        os.chown(fd_path(dirfd), uid, gid)  # the /proc link leads to the object itself
        return
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)


def chmod(dirfd: int, name: str | None, mode: int) -> None:
    """Set the permission bits of ``(dirfd, name)`` (name None: the directory or file ``dirfd`` is open on).

    Never follows a symlink.

    Raises EOPNOTSUPP for a symlink (Linux cannot chmod one; the kernel's overlayfs answers the same), EPERM when
    the caller does not own the object, ENOENT when ``name`` does not exist.
    """
    _trace_at("chmod", dirfd, name, mode=oct(mode))
    if name is None:
        os.chmod(fd_path(dirfd), mode)
        return
    # chmod through an O_PATH fd's /proc link acts on the object itself: a symlink answers EOPNOTSUPP
    # (as fchmodat(AT_SYMLINK_NOFOLLOW) does) instead of its target being changed.
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        os.chmod(fd_path(fd), mode)
    finally:
        os.close(fd)


def utime(dirfd: int, name: str | None, ns: tuple[int, int]) -> None:
    """Set atime and mtime of ``(dirfd, name)`` (a symlink itself), ``ns`` = ``(atime, mtime)`` in nanoseconds.

    Name None: the directory or file ``dirfd`` is open on. Raises EPERM/EACCES when the caller may not set the times,
    ENOENT when ``name`` does not exist.
    """
    _trace_at("utimensat", dirfd, name)
    if name is None:
        os.utime(fd_path(dirfd), ns=ns)  # the /proc link leads to the object itself (O_PATH fds too)
        return
    os.utime(name, ns=ns, dir_fd=dirfd, follow_symlinks=False)


def truncate(fd: int, length: int) -> None:
    """``ftruncate(fd, length)`` on an fd opened for writing on an upper (or workdir) file; ``length`` in bytes.

    As any ``ftruncate``, it sets mtime and ctime even when the size does not change. Raises EINVAL (or EBADF) when
    ``fd`` is not open for writing or ``length`` is negative, EFBIG beyond the filesystem's file size limit, EPERM for
    an append-only or immutable file.
    """
    _trace_at("ftruncate", fd, None, length=length)
    os.ftruncate(fd, length)


def truncate_at(dirfd: int, name: str, length: int) -> None:
    """``truncate(2)`` of the regular file ``(dirfd, name)`` to ``length`` bytes (never following a symlink).

    Unlike :func:`truncate`, the request carries the size only: the filesystem decides whether the times change when
    the size does not (tmpfs changes them for a file with data, ext4 does not), as for the kernel's overlayfs, which
    passes ``truncate(2)`` on to the upper file. Raises ENOENT when ``name`` does not exist, EISDIR for a directory,
    EINVAL for a negative length or a non-regular file, EFBIG, EPERM for an append-only or immutable file.
    """
    _trace_at("truncate", dirfd, name, length=length)
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)
        os.truncate(fd_path(fd), length)  # the /proc link leads to the file itself: truncate(2), not ftruncate(2)
    finally:
        os.close(fd)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` on an fd opened for writing on an upper file: ``length`` bytes from ``offset``.

    ``mode``: 0 (allocate, growing the file), FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_ZERO_RANGE (with or without KEEP_SIZE). Raises EOPNOTSUPP for a mode the filesystem does not support,
    EINVAL for a bad range or combination, EBADF when ``fd`` is not open for writing, ENOSPC, EFBIG, EPERM.
    """
    _trace_at("fallocate", fd, None, mode=hex(mode), offset=offset, length=length)
    if _libc.fallocate(fd, mode, offset, length) != 0:
        _raise_errno("fallocate", fd_path(fd))


def setxattr(dirfd: int, name: str | None, attr: str, value: bytes, flags: int = 0) -> None:
    """Set the xattr ``attr`` of ``(dirfd, name)`` (a symlink itself; name None: ``dirfd`` itself) to ``value``.

    ``flags``: ``os.XATTR_CREATE`` or ``os.XATTR_REPLACE``, which then raise EEXIST or ENODATA. Raises ENOTSUP where the
    filesystem keeps no such xattrs, EPERM for ``trusted.*`` without CAP_SYS_ADMIN or a ``user.*`` xattr on a symlink or
    special file, E2BIG/ERANGE for a value or name too large, ENOSPC/EDQUOT.
    """
    path, follow = xattr_ref(dirfd, name)
    _trace_at("setxattr", dirfd, name, attr=attr)
    os.setxattr(path, attr, value, flags, follow_symlinks=follow)


def removexattr(dirfd: int, name: str | None, attr: str) -> None:
    """Remove the xattr ``attr`` of ``(dirfd, name)`` (a symlink itself; name None: ``dirfd`` itself).

    Raises ENODATA when it is not set, ENOTSUP where the filesystem keeps no such xattrs, EPERM as for setxattr.
    """
    path, follow = xattr_ref(dirfd, name)
    _trace_at("removexattr", dirfd, name, attr=attr)
    os.removexattr(path, attr, follow_symlinks=follow)


def file_handle(dirfd: int, name: str | None) -> tuple[int, bytes] | None:
    """The exportfs file handle of ``(dirfd, name)`` (name None: ``dirfd`` itself), never following a symlink.

    Returns ``(handle_type, handle bytes)`` as name_to_handle_at(2) gives them (the encoding the kernel's overlayfs
    stores in its ``origin``: ``exportfs_encode_fh`` without ``connectable``), or None where the filesystem makes no
    file handles (EOPNOTSUPP). Raises the other errors (ENOENT, EOVERFLOW...).
    """
    handle = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    path, flags = (b"", AT_EMPTY_PATH) if name is None else (os.fsencode(name), 0)
    if _libc.name_to_handle_at(dirfd, path, ctypes.byref(handle), ctypes.byref(mount_id), flags) != 0:
        if ctypes.get_errno() == errno.EOPNOTSUPP:
            return None
        _raise_errno("name_to_handle_at", name or fd_path(dirfd))
    return handle.handle_type, bytes(handle.f_handle[: handle.handle_bytes])


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes) -> int:
    """An O_PATH fd of the object whose file handle is ``(handle_type, handle)`` on the filesystem of ``mount_fd``.

    open_by_handle_at(2) (needs CAP_DAC_READ_SEARCH); ``mount_fd`` is any fd of that filesystem but an O_PATH one
    (refused with EBADF). Raises ESTALE when the object is gone, EINVAL for a malformed handle, EPERM without the
    capability.
    """
    if len(handle) > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), "file handle too long")
    fh = _FileHandle(handle_bytes=len(handle), handle_type=handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    if fd < 0:
        _raise_errno("open_by_handle_at", fd_path(mount_fd))
    return int(fd)


def fs_uuid(fd: int) -> bytes:
    """The 16-byte UUID of the filesystem holding the directory ``fd`` (an O_PATH fd will do): its ``s_uuid``.

    By ``FS_IOC_GETFSUUID`` on the directory reopened for reading (ioctls refuse O_PATH fds). A filesystem that
    reports none (ENOTTY, Linux < 6.5 included) has the null UUID, as its ``s_uuid`` is then. Raises the open's
    errors (EACCES...).
    """
    buf = bytearray(17)
    rfd = os.open(fd_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(rfd, FS_IOC_GETFSUUID, buf)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return NULL_UUID
        raise
    finally:
        os.close(rfd)
    return bytes(buf[1 : 1 + buf[0]]).ljust(16, b"\0")


def fd_path(fd: int, name: str = "") -> str:
    """``/proc/self/fd/<fd>[/name]``: a path reaching ``name`` inside the directory ``fd``, walking no layer path."""
    return f"/proc/self/fd/{fd}/{name}" if name else f"/proc/self/fd/{fd}"


def xattr_ref(dirfd: int, name: str | None) -> tuple[str, bool]:
    """``(path, follow)`` for the ``*xattr`` calls on directory ``dirfd`` (name None) or its entry ``name``.

    ``follow`` says whether to follow the path: ``/proc/self/fd/N`` itself is followed to the directory (this works for
    O_PATH fds too); an entry is never followed. Raises nothing: the path is built, not checked.
    """
    return (fd_path(dirfd), True) if name is None else (fd_path(dirfd, name), False)


def is_enotsup(exc: OSError) -> bool:
    """True for ENOTSUP/EOPNOTSUPP: the filesystem (or this object's type) keeps no such xattrs."""
    return exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
