"""The on-disk vocabulary of overlayfs: whiteouts, opaque directories, private xattrs.

This module is the only place that knows how these markers are stored, in the
kernel's format, so that an upper directory written by pylayerfs mounts under
``mount -t overlay`` with the same view and the reverse:

* A **whiteout** is a character device with device number 0/0. It hides the
  name in every lower layer; the merged view never shows it.
* An **opaque directory** carries ``trusted.overlay.opaque = "y"``: lower
  directories of the same name are hidden, the merge stops there.
* The kernel's other whiteout form, honoured in lower layers only: a zero-size
  regular file with ``trusted.overlay.whiteout`` inside a directory whose
  ``trusted.overlay.opaque`` is ``"x"`` (that directory still merges).
* A **metacopy** file (the kernel's ``metacopy=on``) carries ``<prefix>metacopy``
  (empty): a sparse upper file holding metadata only, its data still the lower
  file's at the same path until the first open for write copies it up.
* With the ``userxattr`` mount option, the prefix is ``user.overlay.``.
* In a layer **tar** (Docker's and OCI's format, written by moby's go-archive),
  a whiteout is an empty file ``.wh.<name>`` and an opaque directory holds an
  empty file ``.wh..wh..opq``; other ``.wh..wh.*`` names are AUFS metadata.
* A copied-up object (a directory, or a file with a single link) carries
  ``<prefix>origin``: the overlay file handle of the lower object it came from,
  the kernel's ``struct ovl_fb`` (fs/overlayfs/overlayfs.h): version 0, magic
  0xfb, total length, flags, the exportfs handle type, the lower filesystem's
  16-byte UUID, then the exportfs handle bytes. Empty where the lower
  filesystem makes no file handles (the kernel's "null" origin, which only says
  "copied up"). Lookup reports the lower object's inode number through it.
  Uppers written by earlier pylayerfs carry ``<prefix>pylayerfs.origin`` (the inode
  number in decimal) instead; it is still read, never written.
* A directory renamed with ``redirect_dir=on`` (or a metacopy file renamed or
  linked with ``metacopy=on``) carries ``<prefix>redirect``: where its lower
  part is, either the bare old name (a rename within the same parent) or an
  absolute path from the layer roots (``/a/b``), at most 256 bytes when written
  (the kernel's ``redirect_max``). Its old name is whited out.
* A directory where copy-up put an object with an origin (or a rename moved
  one) carries ``<prefix>impure = "y"``: the kernel's readdir then looks up
  those entries' origins for ``d_ino``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import sys
from dataclasses import dataclass
from typing import NamedTuple

from pylayerfs.overlay import realfs

TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
OPAQUE_YES = b"y"
OPAQUE_XWHITEOUTS = b"x"
IMPURE_YES = b"y"
REDIRECT_MAX = 256  # the longest redirect written (the kernel's redirect_max module parameter's default)
OPAQUE_XATTR = TRUSTED_PREFIX + "opaque"  # what a layer in the store carries (images never use userxattr)
TAR_WHITEOUT_PREFIX = ".wh."
TAR_OPAQUE_MARKER = ".wh..wh..opq"
TAR_META_PREFIX = ".wh..wh."
WHITEOUT_MODE = stat.S_IFCHR  # permission bits 0000, as the kernel makes them
WHITEOUT_RDEV = os.makedev(0, 0)

# struct ovl_fb (fs/overlayfs/overlayfs.h): u8 version, magic, len, flags, type; uuid_t uuid; then the fid bytes.
_OVL_FB = struct.Struct("<BBBBB16s")
OVL_FH_VERSION = 0
OVL_FH_MAGIC = 0xFB
OVL_FH_FLAG_BIG_ENDIAN = 1 << 0  # the handle was encoded on a big-endian machine
OVL_FH_FLAG_ANY_ENDIAN = 1 << 1  # ... or its encoding does not depend on endianness
OVL_FH_FLAG_PATH_UPPER = 1 << 2  # the handle is of an upper object (the index's, never an origin's)
OVL_FH_FLAG_ALL = OVL_FH_FLAG_BIG_ENDIAN | OVL_FH_FLAG_ANY_ENDIAN | OVL_FH_FLAG_PATH_UPPER
OVL_FH_FLAG_CPU_ENDIAN = OVL_FH_FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0


class OriginHandle(NamedTuple):
    """A decoded origin: the lower filesystem's 16-byte ``uuid``, the exportfs ``handle_type`` and ``handle`` bytes."""

    uuid: bytes
    handle_type: int
    handle: bytes


def encode_origin(origin: OriginHandle) -> bytes:
    """The value of ``<prefix>origin`` for ``origin``, byte for byte the kernel's ``ovl_encode_real_fh``.

    Raises EINVAL for a handle longer than MAX_HANDLE_SZ (128 bytes) or a uuid not of 16 bytes.
    """
    if len(origin.handle) > realfs.MAX_HANDLE_SZ or len(origin.uuid) != 16:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), "origin file handle")
    length = _OVL_FB.size + len(origin.handle)
    header = _OVL_FB.pack(OVL_FH_VERSION, OVL_FH_MAGIC, length, OVL_FH_FLAG_CPU_ENDIAN, origin.handle_type, origin.uuid)
    return header + origin.handle


def decode_origin(value: bytes) -> OriginHandle | None:
    """``value`` of ``<prefix>origin`` decoded, or None where the kernel would not use it (its ``ovl_check_fb_len``).

    None for the empty (null) origin, a wrong version or magic, unknown flags, another machine's byte order, or a
    length that disagrees with the value's. Never raises.
    """
    if len(value) < _OVL_FB.size:
        return None
    version, magic, length, flags, handle_type, uuid = _OVL_FB.unpack_from(value)
    if version != OVL_FH_VERSION or magic != OVL_FH_MAGIC or flags & ~OVL_FH_FLAG_ALL or length != len(value):
        return None
    if not flags & OVL_FH_FLAG_ANY_ENDIAN and flags & OVL_FH_FLAG_BIG_ENDIAN != OVL_FH_FLAG_CPU_ENDIAN:
        return None
    return OriginHandle(uuid, handle_type, value[_OVL_FB.size :])


@dataclass(frozen=True, slots=True)
class Markers:
    """The overlay xattr names for one mount (``trusted.`` or, with userxattr, ``user.``)."""

    prefix: str = TRUSTED_PREFIX

    @classmethod
    def for_mount(cls, userxattr: bool) -> Markers:
        """The names a mount uses: ``user.overlay.*`` with the ``userxattr`` option, else ``trusted.overlay.*``."""
        return cls(USER_PREFIX if userxattr else TRUSTED_PREFIX)

    @property
    def opaque(self) -> str:
        """The opaque xattr's name: ``<prefix>opaque``."""
        return self.prefix + "opaque"

    @property
    def whiteout(self) -> str:
        """The xattr whiteout's name: ``<prefix>whiteout`` (the kernel's other whiteout form)."""
        return self.prefix + "whiteout"

    @property
    def metacopy(self) -> str:
        """The metacopy xattr's name: ``<prefix>metacopy``."""
        return self.prefix + "metacopy"

    @property
    def origin(self) -> str:
        """The origin xattr's name: ``<prefix>origin`` (the lower object's overlay file handle)."""
        return self.prefix + "origin"

    @property
    def redirect(self) -> str:
        """The redirect xattr's name: ``<prefix>redirect`` (where a renamed object's lower part is)."""
        return self.prefix + "redirect"

    @property
    def impure(self) -> str:
        """The impure xattr's name: ``<prefix>impure`` (a directory holding copied-up or moved objects)."""
        return self.prefix + "impure"

    @property
    def legacy_origin(self) -> str:
        """Where older pylayerfs recorded a copied-up object's inode number: ``<prefix>pylayerfs.origin``."""
        return self.prefix + "pylayerfs.origin"

    @property
    def escaped_prefix(self) -> str:
        """Where a user's own ``<prefix>X`` xattr is stored: ``<prefix>overlay.X`` (kernel >= 6.7)."""
        return self.prefix + "overlay."

    def is_private(self, name: str) -> bool:
        """True for overlay's own xattrs (never listed, read or copied up)."""
        return name.startswith(self.prefix) and not name.startswith(self.escaped_prefix)

    # -- reading -------------------------------------------------------------
    # Objects are named by an open directory fd and, for an entry in it, a name
    # (see realfs.xattr_ref).

    def present(self, dirfd: int, name: str | None) -> frozenset[str]:
        """The names of the overlay xattrs ``(dirfd, name)`` carries (name None: ``dirfd``), from one ``listxattr``.

        Most upper objects carry none: a lookup then reads no xattr. Empty where the filesystem has no xattrs; raises
        the listxattr errors other than ENOTSUP (ENOENT, EACCES...).
        """
        path, follow = realfs.xattr_ref(dirfd, name)
        try:
            names = os.listxattr(path, follow_symlinks=follow)
        except OSError as exc:
            if realfs.is_enotsup(exc):
                return frozenset()
            raise
        return frozenset(n for n in names if n.startswith(self.prefix))

    def opaque_value(self, dirfd: int) -> bytes | None:
        """The opaque xattr of the directory ``dirfd``: ``b"y"``, ``b"x"`` or None when unset.

        Raises the getxattr errors other than ENODATA and ENOTSUP (EACCES...).
        """
        return get(dirfd, None, self.opaque)

    def is_opaque(self, dirfd: int) -> bool:
        """Is the directory ``dirfd`` opaque (``opaque = "y"``: nothing below it merges)?

        ``"x"`` (a directory holding xattr whiteouts, which still merges) is not opaque. Raises as :meth:`opaque_value`.
        """
        return self.opaque_value(dirfd) == OPAQUE_YES

    def is_xattr_whiteout(self, dirfd: int, name: str) -> bool:
        """The kernel's xattr whiteout: is ``(dirfd, name)`` a file carrying ``<prefix>whiteout``?

        The caller checks the rest of the rule (a zero-size regular file in an ``opaque = "x"`` directory:
        overlayfs.rst, "whiteouts and opaque directories"). Raises the getxattr errors other than ENODATA and ENOTSUP
        (ENOENT...).
        """
        return get(dirfd, name, self.whiteout) is not None

    def is_metacopy(self, dirfd: int, name: str) -> bool:
        """Is ``(dirfd, name)`` a metadata-only copy, the upper file's data still the lower file's?

        Raises the getxattr errors other than ENODATA and ENOTSUP.
        """
        return get(dirfd, name, self.metacopy) is not None

    def redirect_of(self, dirfd: int, name: str | None = None) -> bytes | None:
        """The raw ``<prefix>redirect`` of ``(dirfd, name)`` (name None: ``dirfd``), None when unset.

        :func:`parse_redirect` checks it. Raises the getxattr errors other than ENODATA and ENOTSUP.
        """
        return get(dirfd, name, self.redirect)

    def is_impure(self, dirfd: int) -> bool:
        """Is the directory ``dirfd`` marked impure? Raises the getxattr errors other than ENODATA and ENOTSUP."""
        return get(dirfd, None, self.impure) == IMPURE_YES

    def origin_of(self, dirfd: int, name: str | None = None) -> OriginHandle | int | None:
        """The origin recorded on ``(dirfd, name)`` (name None: ``dirfd``): its handle, else a legacy inode number.

        None when there is none or it is unusable (the null origin, a malformed one). Raises the getxattr errors other
        than ENODATA and ENOTSUP.
        """
        value = get(dirfd, name, self.origin)
        if value is not None:
            return decode_origin(value)
        value = get(dirfd, name, self.legacy_origin)
        return int(value) if value is not None and value.isdigit() else None

    def origin_value(self, dirfd: int, name: str | None, uuid: bytes) -> bytes:
        """The ``<prefix>origin`` value the kernel writes when it copies up the lower object ``(dirfd, name)``.

        ``uuid`` is the lower filesystem's (16 bytes; null with ``uuid=off``). Empty where that filesystem makes no
        file handles (the kernel's null origin). Raises what :func:`realfs.file_handle
        <pylayerfs.overlay.realfs.file_handle>` raises (ENOENT...).
        """
        handle = realfs.file_handle(dirfd, name)
        return b"" if handle is None else encode_origin(OriginHandle(uuid, *handle))

    # -- writing (upper layer only) -----------------------------------------

    def set_opaque(self, dirfd: int, name: str | None = None) -> None:
        """Mark the directory ``(dirfd, name)`` (name None: ``dirfd`` itself) opaque: ``<prefix>opaque = "y"``.

        Raises what :func:`realfs.setxattr <pylayerfs.overlay.realfs.setxattr>` raises (EPERM for ``trusted.*`` without
        CAP_SYS_ADMIN, ENOTSUP on an upper filesystem without xattrs, ENOSPC).
        """
        set_(dirfd, name, self.opaque, OPAQUE_YES)

    def set_redirect(self, dirfd: int, name: str, redirect: str) -> None:
        """Record where the renamed object ``(dirfd, name)`` came from: ``<prefix>redirect = redirect``.

        Raises what :func:`realfs.setxattr <pylayerfs.overlay.realfs.setxattr>` raises (the kernel then falls back to
        EXDEV, and so does the caller).
        """
        set_(dirfd, name, self.redirect, os.fsencode(redirect))

    def set_impure(self, dirfd: int) -> None:
        """Mark the upper directory ``dirfd`` impure (``<prefix>impure = "y"``), as the kernel's ``ovl_set_impure``.

        Best effort, never raises: an upper filesystem without xattrs holds no origins or redirects either.
        """
        with contextlib.suppress(OSError):
            set_(dirfd, None, self.impure, IMPURE_YES)

    def set_metacopy(self, dirfd: int, name: str) -> None:
        """Mark the file ``(dirfd, name)`` as a metadata-only copy: ``<prefix>metacopy``, empty.

        Raises what :func:`realfs.setxattr <pylayerfs.overlay.realfs.setxattr>` raises.
        """
        set_(dirfd, name, self.metacopy, b"")

    def set_origin(self, dirfd: int, name: str, value: bytes) -> None:
        """Set ``<prefix>origin`` of the copied-up object ``(dirfd, name)`` to ``value`` (from :meth:`origin_value`).

        Best effort, never raises: where the xattr cannot be stored (``user.`` xattrs on a symlink), the object reports
        its upper inode number, as the kernel does (``ovl_set_origin_fh`` ignores EOPNOTSUPP).
        """
        with contextlib.suppress(OSError):
            set_(dirfd, name, self.origin, value)


def parse_redirect(value: bytes) -> str:
    """A redirect xattr's value as the lookup uses it: the bare old name, or an absolute path (``/a/b``).

    As the kernel's ``ovl_get_redirect_xattr`` (fs/overlayfs/util.c): the value ends at its first NUL; an empty one,
    an absolute one with an empty component (``//a``, ``/a/``) or a relative one holding a ``/`` raise EINVAL. A
    ``.`` or ``..`` component is refused where the lookup meets it (:func:`check_component`).
    """
    text = os.fsdecode(value.split(b"\0", 1)[0])
    if not text or ("/" in text and (not text.startswith("/") or "" in text[1:].split("/"))):
        raise OSError(errno.EINVAL, "invalid redirect", text)
    return text


def check_component(name: str) -> None:
    """A redirect's component is looked up as a name: ``.`` and ``..`` raise EACCES, as ``lookup_one`` refuses them
    in the kernel (so no redirect leads out of a layer)."""
    if name in (".", ".."):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), name)


def get(dirfd: int, name: str | None, attr: str) -> bytes | None:
    """One xattr of the directory ``dirfd`` (name None) or of its entry ``name`` (not followed); None when unset.

    ENODATA and ENOTSUP/EOPNOTSUPP read as None; other errors are raised (ENOENT, EACCES, ERANGE...).
    """
    path, follow = realfs.xattr_ref(dirfd, name)
    try:
        return os.getxattr(path, attr, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno == errno.ENODATA or realfs.is_enotsup(exc):
            return None
        raise


def set_(dirfd: int, name: str | None, attr: str, value: bytes) -> None:
    """Set the xattr ``attr`` of ``(dirfd, name)`` to ``value``; raises what ``realfs.setxattr`` raises."""
    realfs.setxattr(dirfd, name, attr, value)


def is_metacopy_file(path: str, st: os.stat_result, prefix: str = TRUSTED_PREFIX) -> bool:
    """Is the file at ``path`` (``st`` its lstat) a metacopy file, holding metadata only?

    For layers on disk that are not mounted. A non-empty regular file carrying ``<prefix>metacopy``; never raises (an
    unreadable xattr reads as no).
    """
    if not (stat.S_ISREG(st.st_mode) and st.st_size):
        return False
    try:
        os.getxattr(path, prefix + "metacopy", follow_symlinks=False)
    except OSError:
        return False
    return True


def is_opaque_dir(path: str, prefix: str = TRUSTED_PREFIX) -> bool:
    """Is the directory at ``path`` (never followed) marked opaque (``<prefix>opaque = "y"``)?

    For layers on disk that are not mounted (the store's diffs): a mount reads through :meth:`Markers.opaque_value` on
    its directory fds instead. Never raises (an unreadable xattr reads as no).
    """
    try:
        return os.getxattr(path, prefix + "opaque", follow_symlinks=False) == OPAQUE_YES
    except OSError:
        return False


def has_redirect(path: str, prefix: str = TRUSTED_PREFIX) -> bool:
    """Does the object at ``path`` (never followed) carry ``<prefix>redirect`` (a directory or metacopy file renamed
    by the overlay)? For layers on disk that are not mounted; never raises (an unreadable xattr reads as no)."""
    try:
        os.getxattr(path, prefix + "redirect", follow_symlinks=False)
    except OSError:
        return False
    return True


def is_whiteout(st: os.stat_result) -> bool:
    """Is ``st`` (an lstat) a whiteout: a character device with device number 0/0?"""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == WHITEOUT_RDEV


def make_whiteout(dirfd: int, name: str) -> None:
    """Create a whiteout ``name`` in the directory ``dirfd``: a character device 0/0, permission bits 0000.

    Raises what :func:`realfs.mknod <pylayerfs.overlay.realfs.mknod>` raises (EEXIST, EPERM without CAP_MKNOD before
    Linux 5.8, ENOSPC...).
    """
    realfs.mknod(dirfd, name, WHITEOUT_MODE, WHITEOUT_RDEV)
