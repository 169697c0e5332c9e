"""Inode numbers and attributes of merged objects (the kernel's ``inode.c`` getattr side).

``st_ino`` must be unique within the mount (FUSE reports one ``st_dev`` for
everything) and stable across copy-up and remount:

* When every layer lives on one filesystem, real inode numbers are passed
  through unchanged, as the kernel does. Otherwise each filesystem gets an
  ``fsid`` (in layer order, upper first) stored in the top 8 bits, like the
  kernel's ``xino``.
* A copied-up object keeps reporting the inode number it had below (recorded in
  the ``pylayerfs.origin`` xattr); a merged directory reports its top-most
  lower directory's number until it is copied up, then keeps it.
* A merged directory reports ``st_nlink == 1``, as the kernel does.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from pylayerfs.overlay.lookup import Node

_FSID_SHIFT = 56


class InodeNumbers:
    def __init__(self, layer_fds: list[int]) -> None:
        self._fsids: dict[int, int] = {}
        for fd in layer_fds:
            self._fsid(os.stat(fd).st_dev)

    def _fsid(self, dev: int) -> int:
        return self._fsids.setdefault(dev, len(self._fsids))

    def of_real(self, st: os.stat_result) -> int:
        fsid = self._fsid(st.st_dev)
        return st.st_ino ^ (fsid << _FSID_SHIFT) if fsid else st.st_ino

    def of_node(self, node: Node) -> int:
        if node.origin is not None:
            return node.origin
        return self.of_real(node.st)


def attributes(node: Node, ino: int) -> dict[str, Any]:
    """The merged object's ``struct stat`` (times in nanoseconds)."""
    st = node.st
    nlink = 1 if node.is_merged and stat.S_ISDIR(st.st_mode) else st.st_nlink
    attrs = stat_dict(st, ino, nlink)
    if node.data is not None:  # the blocks holding the data are the lower file's, as the kernel reports
        attrs["st_blocks"] = node.data[1].st_blocks
    return attrs


def stat_dict(st: os.stat_result, ino: int, nlink: int) -> dict[str, Any]:
    return {
        "st_mode": st.st_mode,
        "st_ino": ino,
        "st_nlink": nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_size": st.st_size,
        "st_rdev": st.st_rdev,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }
