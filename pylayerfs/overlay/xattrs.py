"""Extended attributes of merged objects (the kernel's ``xattrs.c``).

Reading goes to the top-most real object; setting or removing one copies the
object up first. Each call takes a path, or the handle ``fh`` of an object that may
have no name (an open file whose names are gone, an ``O_TMPFILE``, a held object:
``Overlay.hold``): then the handle's real object, which a change needs in the upper
layer (a lower one answers EEXIST, as the kernel's copy-up without a name).

Overlay's own xattrs (``trusted.overlay.*``, or ``user.overlay.*`` with
userxattr) are never listed, read or written through the mount: as the kernel
does since 6.7, a user's ``trusted.overlay.X`` is stored escaped as
``trusted.overlay.overlay.X`` and shown unescaped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from pylayerfs.overlay import realfs
from pylayerfs.overlay.copy_up import copy_up
from pylayerfs.overlay.markers import Markers
from pylayerfs.overlay.state import OverlayState

# An access ACL holds the permission bits too: setting or removing one (cp -a, setfacl) changes the mode.
POSIX_ACL_PREFIX = "system.posix_acl_"


def changes_mode(name: str) -> bool:
    """Does setting or removing the xattr ``name`` change the object's permission bits (a POSIX ACL)?"""
    return name.startswith(POSIX_ACL_PREFIX)


def _on_disk(markers: Markers, name: str) -> str:
    """The name a user's xattr ``name`` is stored under."""
    if name.startswith(markers.prefix):
        return markers.escaped_prefix + name[len(markers.prefix) :]
    return name


def _shown(markers: Markers, name: str) -> str | None:
    """The name an xattr stored as ``name`` is shown under (None: hidden)."""
    if name.startswith(markers.escaped_prefix):
        return markers.prefix + name[len(markers.escaped_prefix) :]
    return None if markers.is_private(name) else name


@contextlib.contextmanager
def _read(ov: OverlayState, path: str, fh: int | None) -> Iterator[tuple[str, bool]]:
    """``(path, follow)`` for reading the xattrs of ``path``'s top real object, or of handle ``fh``'s object."""
    if fh is not None:
        yield realfs.xattr_ref(ov.files.get(fh).fd, None)
        return
    with ov.real(ov.lookup.lookup(path)) as (dirfd, name):
        yield realfs.xattr_ref(dirfd, name)


@contextlib.contextmanager
def _upper(ov: OverlayState, path: str, fh: int | None) -> Iterator[tuple[int, str | None]]:
    """``(dirfd, name)`` of the upper object to change: ``path`` copied up (metadata only with metacopy=on), or the
    object of handle ``fh`` (EEXIST for a lower one, which cannot be copied up without a name)."""
    if fh is not None:
        yield ov.upper_object_of(fh), None
        return
    with ov.real(copy_up(ov, path, meta_only=True)) as ref:
        yield ref


def listxattr(ov: OverlayState, path: str, fh: int | None = None) -> list[str]:
    """The names of ``path``'s xattrs as the merged view shows them, read from its top real object.

    Overlay's private xattrs are left out, a user's escaped ``<prefix>overlay.X`` is shown as ``<prefix>X``. Raises
    ENOENT/ENOTDIR as the lookup does, and ``listxattr(2)``'s errors.
    """
    with _read(ov, path, fh) as (ref, follow):
        names = os.listxattr(ref, follow_symlinks=follow)
    return [shown for n in names if (shown := _shown(ov.markers, n)) is not None]


def getxattr(ov: OverlayState, path: str, attr: str, fh: int | None = None) -> bytes:
    """The value (bytes) of the xattr ``attr`` of ``path``, read from its top real object.

    A user's ``<prefix>X`` is read from its escaped name. Raises ENODATA when it is not set (overlay's private xattrs
    read as not set), ENOTSUP where the layer keeps no such xattrs, ENOENT/ENOTDIR as the lookup does.
    """
    with _read(ov, path, fh) as (ref, follow):
        return os.getxattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)


def setxattr(ov: OverlayState, path: str, attr: str, value: bytes, flags: int = 0, fh: int | None = None) -> None:
    """Set the xattr ``attr`` of ``path`` to ``value``, copying the object up first (metadata only with metacopy=on).

    ``flags``: ``os.XATTR_CREATE`` or ``os.XATTR_REPLACE``. A user's ``<prefix>X`` is stored as ``<prefix>overlay.X``.
    Raises EROFS on a read-only stack, ENOENT/ENOTDIR as the lookup does, EEXIST/ENODATA for the flags, and the upper
    filesystem's errors (ENOTSUP; EPERM for ``user.*`` on a symlink or special file; E2BIG, ENOSPC...).
    """
    with _upper(ov, path, fh) as (dirfd, name):
        realfs.setxattr(dirfd, name, _on_disk(ov.markers, attr), value, flags)


def removexattr(ov: OverlayState, path: str, attr: str, fh: int | None = None) -> None:
    """Remove the xattr ``attr`` of ``path``, copying the object up first (metadata only with ``metacopy=on``).

    Raises ENODATA when it is not set, before any copy-up (as the kernel answers); then EROFS on a read-only stack,
    ENOENT/ENOTDIR as the lookup does, and the upper filesystem's errors.
    """
    with _read(ov, path, fh) as (ref, follow):  # ENODATA before any copy-up, as the kernel answers
        os.getxattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)
    with _upper(ov, path, fh) as (dirfd, name):
        realfs.removexattr(dirfd, name, _on_disk(ov.markers, attr))
