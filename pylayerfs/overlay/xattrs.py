"""Extended attributes of merged objects (the kernel's ``xattrs.c``).

Reading goes to the top-most real object; setting or removing one copies the
object up first. Overlay's own xattrs (``trusted.overlay.*``, or
``user.overlay.*`` with userxattr) are never listed, read or written through
the mount: as the kernel does since 6.7, a user's ``trusted.overlay.X`` is
stored escaped as ``trusted.overlay.overlay.X`` and shown unescaped.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pylayerfs.overlay import realfs

if TYPE_CHECKING:
    from pylayerfs.overlay.filesystem import Overlay
    from pylayerfs.overlay.markers import Markers


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


def listxattr(ov: Overlay, path: str) -> list[str]:
    with ov.real(ov.lookup.lookup(path)) as (dirfd, name):
        ref, follow = realfs.xattr_ref(dirfd, name)
        names = os.listxattr(ref, follow_symlinks=follow)
    return [shown for n in names if (shown := _shown(ov.markers, n)) is not None]


def getxattr(ov: Overlay, path: str, attr: str) -> bytes:
    with ov.real(ov.lookup.lookup(path)) as (dirfd, name):
        ref, follow = realfs.xattr_ref(dirfd, name)
        return os.getxattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)


def setxattr(ov: Overlay, path: str, attr: str, value: bytes, flags: int = 0) -> None:
    node = ov.copy_up(path, meta_only=True)
    with ov.real(node) as (dirfd, name):
        ref, follow = realfs.xattr_ref(dirfd, name)
        realfs.trace("setxattr", ref, name=attr)
        os.setxattr(ref, _on_disk(ov.markers, attr), value, flags, follow_symlinks=follow)


def removexattr(ov: Overlay, path: str, attr: str) -> None:
    node = ov.lookup.lookup(path)
    with ov.real(node) as (dirfd, name):  # ENODATA before any copy-up, as the kernel answers
        ref, follow = realfs.xattr_ref(dirfd, name)
        os.getxattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)
    node = ov.copy_up(path, meta_only=True)
    with ov.real(node) as (dirfd, name):
        ref, follow = realfs.xattr_ref(dirfd, name)
        realfs.trace("removexattr", ref, name=attr)
        os.removexattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)
