"""The FUSE wire protocol: opcodes, the structs of ``<linux/fuse.h>`` and the INIT negotiation.

Every layout here is the kernel's (``include/uapi/linux/fuse.h``; libfuse keeps a copy as
``include/fuse_kernel.h``), little- or big-endian as the machine is (``=``: native order, no padding,
the structs are already padded to 64 bits). A request is a ``fuse_in_header`` followed by the
opcode's argument struct and, for some, NUL-terminated names or data; a reply is a
``fuse_out_header`` (its ``error`` the negative errno, 0 for success) followed by the reply struct.

The transport speaks protocol 7.31 to 7.40 (:data:`MINOR`): it takes the kernel's minor when lower,
and answers 7.40 to a newer kernel, which then keeps to 7.40's structs. Older kernels than 7.31 are
refused (:func:`negotiate` raises). 7.40 (Linux 6.9) brought passthrough: ``fuse_init_out`` gained
``max_stack_depth``, ``fuse_open_out`` a ``backing_id``, and the device the ioctls of
:data:`BACKING_OPEN` / :data:`BACKING_CLOSE`.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from typing import Any

MAJOR = 7
MINOR = 40  # the newest minor whose structs this module has (7.38 is Debian 12's <linux/fuse.h>; 7.40 passthrough)
MIN_MINOR = 31  # the oldest minor accepted: libfuse 3.14's, every struct below has its full size there
ROOT_ID = 1  # FUSE_ROOT_ID: the node ID of the mount's root, never forgotten

MAX_PAGES = 256  # pages per request (FUSE_MAX_PAGES): 1 MiB writes and reads
MAX_WRITE = MAX_PAGES * 4096
# The largest READ (the mount's max_read): one page less than a pipe of the default pipe-max-size (1 MiB)
# holds, so that a READ's reply, its header in a page of its own, is spliced whole (FileOps._read).
MAX_READ = MAX_WRITE - 4096
# Readahead asked of the kernel after INIT (/sys/class/bdi/0:N/read_ahead_kb): two READs of MAX_READ. INIT's
# max_readahead can only lower the kernel's default of 128 KiB (fs/fuse/inode.c process_init_reply).
READAHEAD_KIB = 2 * MAX_READ // 1024
# What one read() of /dev/fuse may return: a request header, its argument and up to max_write bytes of data.
BUFFER_SIZE = MAX_WRITE + 4096


class Op(enum.IntEnum):
    """The request opcodes (``enum fuse_opcode``)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51  # 7.37 (Linux 6.1): sent for open(O_TMPFILE) whatever minor INIT agreed; ENOSYS means EOPNOTSUPP
    STATX = 52


# Requests the kernel sends without waiting for (and never takes) a reply.
NO_REPLY = frozenset({Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.NOTIFY_REPLY})


class Init(enum.IntFlag):
    """The capability bits of ``fuse_init_in.flags`` (bits 32-63 travel in ``flags2``)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    FLOCK_LOCKS = 1 << 10
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    WRITEBACK_CACHE = 1 << 16
    PARALLEL_DIROPS = 1 << 18
    POSIX_ACL = 1 << 20
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    INIT_EXT = 1 << 30
    PASSTHROUGH = 1 << 37  # flags2 bit 5 (7.40): reads and writes of an open file go to a backing file in the kernel


# What this transport asks for: O_TRUNC in OPEN, 1 MiB requests, listings with attributes when the
# kernel finds them worth it, and ASYNC_READ: readahead sends its READs without waiting for each (the loop
# still serves one request at a time, but the kernel queues the next READ while the reader copies the last
# one's pages: docs/performance.md, W3 cold). Not POSIX_LOCKS or FLOCK_LOCKS
# (locks stay in the kernel, local to the mount), not WRITEBACK_CACHE (every write reaches the layers at once), not
# EXPORT_SUPPORT (no LOOKUP of "." / ".."). DONT_MASK: the kernel leaves the caller's umask to the daemon (a new
# object in a directory with a default ACL must not lose its bits to it: the ACL decides, as on a local filesystem).
# POSIX_ACL is asked for besides (negotiate's acl): the kernel then enforces ACLs and caches them per inode.
WANTED = (
    Init.ASYNC_READ
    | Init.ATOMIC_O_TRUNC
    | Init.BIG_WRITES
    | Init.AUTO_INVAL_DATA
    | Init.DO_READDIRPLUS
    | Init.READDIRPLUS_AUTO
    | Init.PARALLEL_DIROPS
    | Init.MAX_PAGES
    | Init.CACHE_SYMLINKS
    | Init.INIT_EXT
    | Init.DONT_MASK
)

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7  # 7.40: fuse_open_out.backing_id names the backing file

GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags: fh is the open file's
FSYNC_FDATASYNC = 1 << 0

# Notifications (a reply header with unique 0 and the code as its error).
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
INIT_IN = struct.Struct("=IIIII")  # major, minor, max_readahead, flags, flags2 (then unused[11])
INIT_OUT = struct.Struct("=IIIIHHIIHHII24x")  # ... flags2, max_stack_depth (7.40), unused[6]: 64 bytes
# fuse_attr: ino size blocks atime mtime ctime (u64; times signed), atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags (u32)
ATTR = struct.Struct("=QQQqqqIIIIIIIIII")
ENTRY_HEAD = struct.Struct("=QQQQII")  # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
ENTRY_OUT = struct.Struct(ENTRY_HEAD.format + ATTR.format[1:])  # the head, then the attr
ATTR_HEAD = struct.Struct("=QII")  # fuse_attr_out: attr_valid attr_valid_nsec dummy, then the attr
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")  # count, dummy; then count x (nodeid, nlookup)
FORGET_ONE = struct.Struct("=QQ")
GETATTR_IN = struct.Struct("=IIQ")  # getattr_flags dummy fh
SETATTR_IN = struct.Struct(
    "=IIQQQQQQIIIIIIII"
)  # valid pad fh size lock_owner atime mtime ctime *nsec mode u4 uid gid u5
MKNOD_IN = struct.Struct("=IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("=II")  # mode umask
RENAME_IN = struct.Struct("=Q")  # newdir
RENAME2_IN = struct.Struct("=QII")  # newdir flags padding
LINK_IN = struct.Struct("=Q")  # oldnodeid
OPEN_IN = struct.Struct("=II")  # flags open_flags
CREATE_IN = struct.Struct("=IIII")  # flags mode umask open_flags
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id (7.40; padding before)
RELEASE_IN = struct.Struct("=QIIQ")  # fh flags release_flags lock_owner
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags padding; then the data
WRITE_OUT = struct.Struct("=II")  # size padding
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
SETXATTR_IN = struct.Struct("=II")  # size flags (the compat layout: FUSE_SETXATTR_EXT is not negotiated)
GETXATTR_IN = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")  # size padding
ACCESS_IN = struct.Struct("=II")  # mask padding
INTERRUPT_IN = struct.Struct("=Q")  # unique
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("=Q")
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")  # fh_in off_in nodeid_out fh_out off_out len flags
DIRENT = struct.Struct("=QQII")  # ino off namelen type; then the name, padded to 8 bytes
BACKING_MAP = struct.Struct("=iIQ")  # fd flags padding (struct fuse_backing_map)
BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map): returns the backing ID
BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)
MAX_STACK_DEPTH = 1  # backing files on a filesystem that stacks on nothing (ext4, tmpfs, xfs...); else ELOOP
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")  # ino off len
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")  # parent namelen flags; then the name and a NUL


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What INIT settled: the protocol minor both speak, the capability flags in force, and the limits."""

    minor: int
    flags: int
    max_readahead: int
    max_write: int = MAX_WRITE

    @property
    def passthrough(self) -> bool:
        """May open files be passed through to a backing file (FUSE_PASSTHROUGH agreed)?"""
        return bool(self.flags & Init.PASSTHROUGH)

    @property
    def readdirplus(self) -> bool:
        """Does the kernel ask for READDIRPLUS (always, or per directory with READDIRPLUS_AUTO)?"""
        return bool(self.flags & Init.DO_READDIRPLUS)


class ProtocolError(Exception):
    """The kernel speaks a protocol this transport cannot (major other than 7, minor below 7.31)."""


def negotiate(payload: bytes | memoryview, passthrough: bool = False, acl: bool = True) -> tuple[Negotiated, bytes]:
    """Read the kernel's ``fuse_init_in`` and answer it: ``(what is agreed, the fuse_init_out payload)``.

    Takes the kernel's minor when it is older than :data:`MINOR`, else :data:`MINOR`; takes the flags of
    :data:`WANTED` the kernel offers, and PASSTHROUGH with ``passthrough`` when offered (7.40 and newer).
    ``acl``: POSIX_ACL too (the mount has ``default_permissions``, which POSIX_ACL turns on in the kernel).
    Raises :class:`ProtocolError` for a major other than 7 or a minor below :data:`MIN_MINOR` (the caller
    answers EPROTO).
    """
    major, minor, max_readahead, flags = struct.unpack_from("=IIII", payload)
    flags2 = INIT_IN.unpack_from(payload)[4] if len(payload) >= INIT_IN.size else 0
    if major != MAJOR or minor < MIN_MINOR:
        raise ProtocolError(f"the kernel speaks FUSE {major}.{minor}; pylayerfs needs 7.{MIN_MINOR} or newer")
    offered = flags | (flags2 << 32 if flags & Init.INIT_EXT else 0)
    agreed_minor = min(minor, MINOR)
    wanted = int(WANTED) | (Init.POSIX_ACL if acl else 0)
    agreed = offered & (wanted | (Init.PASSTHROUGH if passthrough and agreed_minor >= 40 else 0))
    reply = INIT_OUT.pack(
        MAJOR,
        agreed_minor,
        max_readahead,
        agreed & 0xFFFFFFFF,
        16,  # max_background
        12,  # congestion_threshold
        MAX_WRITE,
        1,  # time_gran: nanoseconds
        MAX_PAGES,
        0,  # map_alignment
        agreed >> 32,
        MAX_STACK_DEPTH if agreed & Init.PASSTHROUGH else 0,
    )
    return Negotiated(agreed_minor, agreed, max_readahead), reply


def split_seconds(seconds: float) -> tuple[int, int]:
    """A timeout in seconds as the protocol's ``(seconds, nanoseconds)`` pair (negative counts as 0)."""
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * 1_000_000_000)


def fuse_attr(attrs: dict[str, Any]) -> bytes:
    """The engine's ``st_*`` dict (times in nanoseconds) as a ``struct fuse_attr``.

    Written out field by field: it is packed for every GETATTR and every entry of a READDIRPLUS.
    """
    asec, ansec = divmod(attrs["st_atime"], 1_000_000_000)
    msec, mnsec = divmod(attrs["st_mtime"], 1_000_000_000)
    csec, cnsec = divmod(attrs["st_ctime"], 1_000_000_000)
    return ATTR.pack(attrs["st_ino"], attrs["st_size"], attrs["st_blocks"], asec, msec, csec, ansec, mnsec, cnsec,
                 attrs["st_mode"], attrs["st_nlink"], attrs["st_uid"], attrs["st_gid"],
                 attrs["st_rdev"] & 0xFFFFFFFF,  # the kernel's new_encode_dev: glibc's dev_t below 4096 majors
                 attrs["st_blksize"], 0)  # fmt: skip


def entry_out(nodeid: int, attrs: dict[str, Any], valid: tuple[int, int]) -> bytes:
    """``fuse_entry_out`` for ``nodeid`` with ``attrs``; the name and the attributes cached ``valid`` (seconds,
    nanoseconds: :func:`split_seconds`)."""
    sec, nsec = valid
    return ENTRY_HEAD.pack(nodeid, 0, sec, sec, nsec, nsec) + fuse_attr(attrs)


def negative_entry(valid: tuple[int, int]) -> bytes:
    """``fuse_entry_out`` saying "no such name", which the kernel may remember ``valid`` (seconds, nanoseconds)."""
    return ENTRY_OUT.pack(0, 0, valid[0], 0, valid[1], 0, *((0,) * 16))


def attr_out(attrs: dict[str, Any], valid: tuple[int, int]) -> bytes:
    """``fuse_attr_out`` with ``attrs``, cached ``valid`` (seconds, nanoseconds)."""
    return ATTR_HEAD.pack(valid[0], valid[1], 0) + fuse_attr(attrs)


def dirent(ino: int, offset: int, dtype: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` record (padded to 8 bytes): ``offset`` is where the next READDIR resumes."""
    record = DIRENT.pack(ino, offset, len(name), dtype) + name
    return record + b"\0" * (-len(record) % 8)


def names(payload: bytes | memoryview, count: int) -> list[str]:
    """The first ``count`` NUL-terminated names of ``payload``, decoded as the filesystem encodes names."""
    parts = bytes(payload).split(b"\0", count)
    if len(parts) <= count:
        raise ValueError("a request is missing a name")
    return [os.fsdecode(p) for p in parts[:count]]
