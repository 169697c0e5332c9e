"""Extended attributes of merged objects (the kernel's ``xattrs.c``).

Reading goes to the top-most real object; setting or removing one copies the
object up first. Overlay's own xattrs (``trusted.overlay.*``, or
``user.overlay.*`` with userxattr) are never listed, read or written through
the mount: as the kernel does since 6.7, a user's ``trusted.overlay.X`` is
stored escaped as ``trusted.overlay.overlay.X`` and shown unescaped.
"""

from __future__ import annotations

import os

from pylayerfs.overlay import realfs
from pylayerfs.overlay.copy_up import copy_up
from pylayerfs.overlay.markers import Markers
from pylayerfs.overlay.state import OverlayState


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


def listxattr(ov: OverlayState, path: str) -> list[str]:
    with ov.real(ov.lookup.lookup(path)) as (dirfd, name):
        ref, follow = realfs.xattr_ref(dirfd, name)
        names = os.listxattr(ref, follow_symlinks=follow)
    return [shown for n in names if (shown := _shown(ov.markers, n)) is not None]


def getxattr(ov: OverlayState, path: str, attr: str) -> bytes:
    with ov.real(ov.lookup.lookup(path)) as (dirfd, name):
        ref, follow = realfs.xattr_ref(dirfd, name)
        return os.getxattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)


def setxattr(ov: OverlayState, path: str, attr: str, value: bytes, flags: int = 0) -> None:
    node = copy_up(ov, path, meta_only=True)
    with ov.real(node) as (dirfd, name):
        realfs.setxattr(dirfd, name, _on_disk(ov.markers, attr), value, flags)


def removexattr(ov: OverlayState, path: str, attr: str) -> None:
    node = ov.lookup.lookup(path)
    with ov.real(node) as (dirfd, name):  # ENODATA before any copy-up, as the kernel answers
        ref, follow = realfs.xattr_ref(dirfd, name)
        os.getxattr(ref, _on_disk(ov.markers, attr), follow_symlinks=follow)
    node = copy_up(ov, path, meta_only=True)
    with ov.real(node) as (dirfd, name):
        realfs.removexattr(dirfd, name, _on_disk(ov.markers, attr))
