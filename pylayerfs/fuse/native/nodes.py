"""The node table: the kernel's inodes (node IDs) and the merged objects they stand for.

The kernel names an object by a node ID that the server chose in a LOOKUP (or a READDIRPLUS entry,
or a creation) reply, and holds it until it sends FORGET for as many lookups as it was given. The
engine is path-based, so each node keeps the paths by which the kernel has found it; requests about
the node use one of them. A node is keyed by the overlay's ``st_ino``, which the engine keeps stable
across copy-up, so every name of a hard link is one node (one kernel inode: what one name changes
shows through the others at once), and a copied-up file keeps its node.

A hard link that only a lower layer holds is not one object of the merged view: copying up one of its
names splits it (the kernel's overlayfs without ``index``), so each such name is a node of its own,
keyed by ``(st_ino, path)`` (:func:`identity`); otherwise a write through one name would copy up the
other.

Renames and removals made through the mount move or drop the paths (a directory's rename moves its
whole subtree). A node whose last known name is removed keeps its open handles: requests about it are
served through one of them (an open unlinked file: ``fstat``, ``fchmod``, ``ftruncate``). Its
``st_ino`` leaves the index then, so an object that later gets the same number (the filesystem may
reuse it) becomes a node of its own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from pylayerfs.fuse.native.protocol import ROOT_ID

Identity = int | tuple[int, str]  # st_ino, or (st_ino, path) for a name of a lower-only hard link


def identity(ino: int, path: str, split: bool) -> Identity:
    """The key of the object ``ino`` found at ``path``: ``ino``, or ``(ino, path)`` when ``split`` (a lower-only
    hard link, whose names copy-up separates)."""
    return (ino, path) if split else ino


@dataclass(slots=True, eq=False)
class NodeEntry:
    """One kernel inode: its node ID, the overlay ``st_ino``, known paths, lookup count and open handles.

    Small on purpose (a walk of 100,000 files keeps 100,000 of them until the kernel forgets them): one
    path in ``path``, further names of a hard link in ``aliases``, open handles in a set made on first use.
    """

    nodeid: int
    ino: Identity
    path: str | None = None  # a current path of the node; None when it has none left (removed)
    nlookup: int = 0
    is_dir: bool = False  # a directory: its rename moves the paths of the nodes below it
    aliases: set[str] | None = None  # the other paths the kernel knows it by (names of a hard link)
    handles: set[int] | None = None  # open file handles (engine fhs) opened on this node
    served: int = 0  # open handles whose reads and writes the daemon serves (the kernel's cached I/O mode)
    passed: int = 0  # open handles passed through to the backing file ``backing`` (the kernel's uncached mode)
    backing: int = 0  # the kernel's backing ID while ``passed`` > 0 (one backing file per inode)
    backing_file: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of that backing file
    no_caps: bool = False  # has no security.capability xattr (the kernel asks before every write)

    @property
    def paths(self) -> list[str]:
        """Every path the kernel knows the node by."""
        return ([self.path] if self.path is not None else []) + sorted(self.aliases or ())

    def add_path(self, path: str) -> None:
        """The node is (also) known by ``path``."""
        if self.path is None:
            self.path = path
        elif path != self.path:
            if self.aliases is None:
                self.aliases = set()
            self.aliases.add(path)

    def discard_path(self, path: str) -> None:
        """``path`` no longer names the node (another of its names, if known, becomes its path)."""
        if path == self.path:
            self.path = self.aliases.pop() if self.aliases else None
        elif self.aliases is not None:
            self.aliases.discard(path)
        if not self.aliases:
            self.aliases = None


class NodeTable:
    """The live nodes of one mount, by node ID, by ``st_ino`` and by path; the root is node 1, never forgotten.

    ``root_ino`` is the ``st_ino`` of the merged root; ``on_drop(node)`` is called for every node the kernel forgets.
    """

    def __init__(self, root_ino: int, on_drop: Callable[[NodeEntry], None] | None = None) -> None:
        self._on_drop = on_drop
        self._next = itertools.count(ROOT_ID + 1)
        self.root = NodeEntry(ROOT_ID, root_ino, "", 1, is_dir=True)
        self._by_id: dict[int, NodeEntry] = {ROOT_ID: self.root}
        self._by_ino: dict[Identity, NodeEntry] = {root_ino: self.root}
        self._by_path: dict[str, NodeEntry] = {"": self.root}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, nodeid: int) -> NodeEntry | None:
        """The node of ``nodeid``, None if the kernel names one that does not exist (a bug: the caller says EIO)."""
        return self._by_id.get(nodeid)

    def at(self, path: str) -> NodeEntry | None:
        """The node the kernel knows by ``path``, if any."""
        return self._by_path.get(path)

    def found(self, path: str, ino: Identity, is_dir: bool = False) -> NodeEntry:
        """The kernel found the object ``ino`` at ``path`` (a LOOKUP or a creation): count one lookup; return its node.

        A node already known by another path gets ``path`` too (a hard link); a path the kernel knew
        for another object (replaced behind a name) is taken from it.
        """
        node = self._by_ino.get(ino)
        if node is None:
            node = NodeEntry(next(self._next), ino, is_dir=is_dir)
            self._by_id[node.nodeid] = node
            self._by_ino[ino] = node
        self._bind(path, node)
        node.nlookup += 1
        return node

    def unnamed(self, ino: int) -> NodeEntry:
        """A new node for the object ``ino`` that has no name (``O_TMPFILE``: TMPFILE), its one lookup counted.

        It stays out of the ``st_ino`` index until :meth:`named` (a LINK gives it a name): while nameless, no LOOKUP
        can reach it, and the number is the real file's, which its filesystem reuses once the file is closed.
        """
        node = NodeEntry(next(self._next), ino, nlookup=1)
        self._by_id[node.nodeid] = node
        return node

    def named(self, node: NodeEntry) -> None:
        """The nameless ``node`` is about to get a name (LINK): let :meth:`found` find it by its ``st_ino``."""
        if self._by_id.get(node.nodeid) is node:
            self._by_ino[node.ino] = node

    def rekey(self, node: NodeEntry, ino: Identity) -> None:
        """``node``'s object is now the object ``ino`` (a name of a lower-only hard link that copy-up made an object of
        its own): :meth:`found` finds the node by it from now on, unless another node has it already."""
        if node.ino == ino:
            return
        if self._by_ino.get(node.ino) is node:
            del self._by_ino[node.ino]
        node.ino = ino
        self._by_ino.setdefault(ino, node)

    def closed_nameless(self, node: NodeEntry) -> None:
        """The last open handle of ``node``, which has no name, is closed: its object is gone, its ``st_ino`` free."""
        if node.path is None and self._by_ino.get(node.ino) is node:
            del self._by_ino[node.ino]

    def unfound(self, node: NodeEntry) -> None:
        """Take back one lookup that was counted for a reply the kernel did not take (its request was gone)."""
        self.forget(node.nodeid, 1)

    def forget(self, nodeid: int, count: int) -> None:
        """The kernel drops ``count`` lookups of ``nodeid`` (FORGET); at zero the node goes (the root never does)."""
        node = self._by_id.get(nodeid)
        if node is None or node is self.root:
            return
        node.nlookup -= count
        if node.nlookup > 0:
            return
        del self._by_id[nodeid]
        if self._by_ino.get(node.ino) is node:
            del self._by_ino[node.ino]
        for path in node.paths:
            if self._by_path.get(path) is node:
                del self._by_path[path]
        if self._on_drop is not None:
            self._on_drop(node)

    def removed(self, path: str, *, last_name: bool) -> None:
        """The name ``path`` was removed (UNLINK, RMDIR); ``last_name``: the object has no other name left.

        An object with no name left leaves the ``st_ino`` index (the number may be reused).
        """
        node = self._by_path.pop(path, None)
        if node is None:
            return
        node.discard_path(path)
        if last_name:
            for other in node.paths:
                if self._by_path.get(other) is node:
                    del self._by_path[other]
            node.path = node.aliases = None
            if self._by_ino.get(node.ino) is node:
                del self._by_ino[node.ino]

    def renamed(self, old: str, new: str, *, exchange: bool = False) -> None:
        """``old`` was renamed to ``new`` (replacing what was there), or exchanged with it; subtrees move too."""
        moves = [(old, new), (new, old)] if exchange else [(old, new)]
        if not exchange:
            self.removed(new, last_name=False)
        changed: list[tuple[str, NodeEntry]] = []
        for src, dst in moves:
            moved = self._by_path.get(src)
            if moved is None:
                continue
            prefix = src + "/"
            below = [p for p in self._by_path if p.startswith(prefix)] if moved.is_dir else []
            for path in [src, *below]:
                node = self._by_path.pop(path)
                node.discard_path(path)
                changed.append((dst + path[len(src) :], node))
        for path, node in changed:
            self._bind(path, node)

    def _bind(self, path: str, node: NodeEntry) -> None:
        previous = self._by_path.get(path)
        if previous is node:
            return
        if previous is not None:
            previous.discard_path(path)
        self._by_path[path] = node
        node.add_path(path)
