"""Merged directory listing (the kernel's ``readdir.c``).

The union of the names of every layer in the directory's merge, upper first,
then each lower layer top-down; a name is listed once, from the top-most layer
that has it; whiteouts and the names they hide are left out. Each entry carries
the type and inode number that ``lstat`` of it reports, and ``.`` and ``..``
come first, in the root too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from pylayerfs.overlay.layers import split
from pylayerfs.overlay.lookup import Node
from pylayerfs.overlay.markers import is_whiteout
from pylayerfs.overlay.state import Entry, OverlayState


def merged_entries(ov: OverlayState, path: str) -> list[Entry]:
    """The merged listing of directory ``path``: ``(name, st_mode type bits, st_ino)`` per entry.

    ``.`` and ``..`` come first, then the upper layer's names, then each lower layer's, top-down, each name once
    (overlayfs.rst, "readdir"). Raises ENOTDIR when ``path`` is not a directory, ENOENT/ENOTDIR as the lookup does, and
    the listing errors (EACCES...).
    """
    node = ov.lookup.lookup(path)
    if not node.is_dir:
        raise NotADirectoryError(20, os.strerror(20), path)
    parent = ov.lookup.lookup(split(path)[0]) if path else node
    entries: list[Entry] = [
        (".", stat.S_IFDIR, ov.inodes.of_node(node)),
        ("..", stat.S_IFDIR, ov.inodes.of_node(parent)),
    ]
    entries.extend(_merged(ov, node, resolve=True))
    return entries


def merged_names(ov: OverlayState, node: Node) -> Iterator[str]:
    """The visible names of directory ``node`` (no ``.``/``..``), lazily, for emptiness checks.

    Raises the listing errors of its real directories (EACCES...).
    """
    for name, _, _ in _merged(ov, node, resolve=False):
        yield name


def _merged(ov: OverlayState, node: Node, resolve: bool) -> Iterator[Entry]:
    """``(name, type bits, st_ino)`` of each visible entry (without ``resolve``: the name and zeros).

    A name that only lower layers hold is the object of the top-most layer listing it (the
    others are below it, whited out, or hidden behind an opaque directory): its listing's stat
    gives its type and inode number without a lookup.
    """
    seen: set[str] = set()
    if node.upper_fd >= 0:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.upper_fd)
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    seen.add(entry.name)
                    if _maybe_whiteout(entry) and is_whiteout(entry.stat(follow_symlinks=False)):
                        continue
                    if not resolve:
                        yield entry.name, 0, 0
                        continue
                    child = ov.lookup.child(node, entry.name)
                    if child is not None:
                        yield entry.name, stat.S_IFMT(child.mode), ov.inodes.of_node(child)
        finally:
            os.close(fd)
    for hit in node.lower.hits:
        listing = hit.layer.listing(hit.path)
        for name, st in listing.entries.items():
            if name not in seen:
                seen.add(name)
                yield (name, stat.S_IFMT(st.st_mode), ov.inodes.of_real(st)) if resolve else (name, 0, 0)
        seen.update(listing.whiteouts)


def _maybe_whiteout(entry: os.DirEntry[str]) -> bool:
    """Only a character device can be a whiteout; ``d_type`` rules most entries out without a stat."""
    return not (entry.is_dir(follow_symlinks=False) or entry.is_file(follow_symlinks=False) or entry.is_symlink())
