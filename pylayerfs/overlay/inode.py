"""Inode numbers and attributes of merged objects (the kernel's ``inode.c`` getattr side).

``st_ino`` must be unique within the mount (FUSE reports one ``st_dev`` for
everything) and stable across copy-up and remount:

* When every layer lives on one filesystem, real inode numbers are passed
  through unchanged, as the kernel does. Otherwise each filesystem gets an
  ``fsid`` (in layer order, upper first) stored in the top 8 bits, like the
  kernel's ``xino``.
* A copied-up object keeps reporting the inode number it had below (recorded in
  its ``origin`` xattr, the lower object's file handle); a merged directory reports its top-most
  lower directory's number until it is copied up, then keeps it.
* A merged directory reports ``st_nlink == 1``, as the kernel does.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from pylayerfs.overlay.layers import Entry
from pylayerfs.overlay.lookup import Node

_FSID_SHIFT = 56


class InodeNumbers:
    """Inode numbers for one mount: an fsid per filesystem (``st_dev``), given in layer order, upper first.

    ``layer_fds`` are the layers' fds, upper first; the first filesystem is fsid 0, whose numbers pass through as they
    are (the kernel's ``xino``). Raises EBADF for a closed fd.
    """

    def __init__(self, layer_fds: list[int]) -> None:
        self._fsids: dict[int, int] = {}
        for fd in layer_fds:
            self._fsid(os.stat(fd).st_dev)

    def _fsid(self, dev: int) -> int:
        return self._fsids.setdefault(dev, len(self._fsids))

    def of_real(self, st: os.stat_result | Entry) -> int:
        """The ``st_ino`` the mount reports for a real object (``st`` its lstat): ``st_ino``, fsid in the top 8 bits.

        A filesystem first seen here gets the next fsid.
        """
        fsid = self._fsid(st.st_dev)
        return st.st_ino ^ (fsid << _FSID_SHIFT) if fsid else st.st_ino

    def of_node(self, node: Node) -> int:
        """The ``st_ino`` of a merged object: the one recorded at copy-up, else its top-most real object's."""
        if node.origin is not None:
            return node.origin
        return self.of_real(node.top)


def attributes(node: Node, ino: int) -> dict[str, Any]:
    """The merged object's ``struct stat`` as a dict of ``st_*`` fields, ``ino`` as its ``st_ino``.

    ``st_atime``, ``st_mtime`` and ``st_ctime`` are in nanoseconds; a merged directory has ``st_nlink == 1``; a metacopy
    file reports the blocks of the lower file holding its data, as the kernel does.
    """
    st = node.st
    nlink = 1 if node.is_merged and stat.S_ISDIR(st.st_mode) else st.st_nlink
    attrs = stat_dict(st, ino, nlink)
    if node.data is not None:  # the blocks holding the data are the lower file's, as the kernel reports
        attrs["st_blocks"] = node.data.layer.lstat_found(node.data.path).st_blocks
    return attrs


def stat_dict(st: os.stat_result, ino: int, nlink: int) -> dict[str, Any]:
    """``st`` as the dict of ``st_*`` fields getattr answers, ``st_ino = ino``, ``st_nlink = nlink``, times in ns."""
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
