"""Storage drivers: how a build step's or a container's root is made from the layers."""

from __future__ import annotations

from enum import StrEnum


class StorageDriver(StrEnum):
    """``--storage-driver``, and a container record's ``Driver``: its value is what is written and typed."""

    FUSE = "fuse"  # pylayerfs's FUSE mount of the layers (the default)
    OVERLAY = "overlay"  # the kernel's overlayfs on the same layers (root only)
    VFS = "vfs"  # no mount: a full copy of the files per layer, and two per container

    @property
    def mounts(self) -> bool:
        """Whether the root is an overlay mount of the layers (fuse, overlay) rather than a full copy (vfs)."""
        return self is not StorageDriver.VFS
