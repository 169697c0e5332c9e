"""What every handler of the native transport shares: the request header, the session's state, nodes and paths.

:class:`Core` holds one mount's state (the engine, the device, the node table, the open handles); the
handlers are grouped by concern in mixins on it (:mod:`.names`, :mod:`.attributes`, :mod:`.files`,
:mod:`.dirs`) and :class:`~pylayerfs.fuse.native.session.Session` puts them together with the loop.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native.nodes import NodeEntry, NodeTable, identity
from pylayerfs.fuse.native.workers import Jobs
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.state import Caller

log = logging.getLogger("pylayerfs.fuse.native")


class Request:
    """The header of one request: its ID (``unique``), node, and the caller's uid, gid and pid."""

    __slots__ = ("gid", "nodeid", "opcode", "pid", "uid", "unique")

    def __init__(self, opcode: int, unique: int, nodeid: int, uid: int, gid: int, pid: int) -> None:
        self.opcode = opcode
        self.unique = unique
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid

    @property
    def caller(self) -> Caller:
        """Who asks: new objects are theirs."""
        return Caller(self.uid, self.gid)

    def creator(self, umask: int) -> Caller:
        """Who asks for a new object, with the umask the request carries (the kernel leaves it to us: DONT_MASK)."""
        return Caller(self.uid, self.gid, umask)


def errno_of(exc: OSError) -> int:
    return exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else 0


def cstring(payload: memoryview) -> str:
    """The NUL-terminated name at the start of ``payload``; raises ValueError when it has no NUL.

    :func:`~.protocol.names` for one name, twice as fast (LOOKUP, CREATE and every request naming a child).
    """
    name, nul, _ = bytes(payload).partition(b"\0")
    if not nul:
        raise ValueError("a request is missing a name")
    return os.fsdecode(name)


Handler = Callable[[Request, memoryview], bytes | memoryview | None]  # None: the handler replied itself


class Core:
    """One mount's state: ``fd`` is its FUSE device, ``overlay`` the engine, ``timeout`` the kernel's cache time.

    ``on_ready`` is called once INIT is answered (the mount is usable then). ``mountpoint`` and
    ``by_fusermount`` say how to unmount when the session is stopped; ``passthrough`` whether open files may be passed
    through, ``acl`` whether the kernel is asked to enforce POSIX ACLs (the mount has ``default_permissions``).
    """

    def __init__(
        self,
        overlay: Overlay,
        fd: int,
        *,
        mountpoint: str,
        timeout: float,
        on_ready: Callable[[], None] | None = None,
        by_fusermount: bool = False,
        passthrough: bool = True,
        acl: bool = True,
    ) -> None:
        self.ov = overlay
        self.acl = acl  # ask the kernel to enforce POSIX ACLs (FUSE_POSIX_ACL: only with default_permissions)
        self.fd = fd
        self.mountpoint = mountpoint
        self.timeout = timeout
        self.valid = p.split_seconds(timeout)  # the kernel's cache time as the protocol gives it
        self.by_fusermount = by_fusermount
        self.passthrough = passthrough  # asked for; in force once INIT agreed and the first backing file opened
        self._on_ready = on_ready
        self.nodes = NodeTable(overlay.getattr("")["st_ino"], on_drop=self._dropped)
        self.negotiated: p.Negotiated | None = None
        self.requests = 0  # served so far (INIT included)
        self.counts: collections.Counter[int] = collections.Counter()  # requests served, by opcode
        self._reading = False
        self._stopping = False
        self._ended = False
        self._counted: list[NodeEntry] = []  # lookups counted for the reply being made
        self._opening: int | None = None  # the file handle opened for the reply being made (OPEN, CREATE)
        self._dirs: dict[int, list[tuple[str, int, int]] | None] = {}  # open directory handle -> its listing
        self._next_dir = itertools.count(1)
        self._fh_node: dict[int, NodeEntry] = {}  # open file handle -> the node it was opened on
        self._passed: set[int] = set()  # the open file handles passed through to a backing file
        self._held: dict[int, int] = {}  # node ID -> the engine's hold on its object, once no name of it is known
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._jobs: Jobs | None = None  # the copy-ups in flight in worker threads (None: none)
        self._waiting: list[bytes] = []  # the requests that wait for them, in order
        self._handlers = self._handler_table()

    def _handler_table(self) -> dict[int, Handler]:
        """The handler of each opcode served (the session's; none here)."""
        return {}

    # -- nodes and paths ---------------------------------------------------------------------------

    def _node(self, nodeid: int) -> NodeEntry:
        node = self.nodes.get(nodeid)
        if node is None:
            log.error("the kernel asks about node %d, which is not in the table", nodeid)
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return node

    def _path(self, nodeid: int) -> str:
        """A path of node ``nodeid``; raises ENOENT when it has none left (removed), ESTALE for an unknown node."""
        path = self._node(nodeid).path
        if path is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return path

    def _child(self, nodeid: int, name: str) -> str:
        parent = self._path(nodeid)
        return f"{parent}/{name}" if parent else name

    def _found(self, path: str, attrs: dict[str, Any]) -> NodeEntry:
        is_dir = stat.S_ISDIR(attrs["st_mode"])
        # A lower-only hard link splits at copy-up, unless index=on keeps its names one inode.
        split = not is_dir and attrs["st_nlink"] > 1 and self.ov.index is None
        split = split and self.ov.lookup.lookup(path).upper is None
        node = self.nodes.found(path, identity(attrs["st_ino"], path, split), is_dir)
        self._counted.append(node)
        return node

    def _unsplit(self, node: NodeEntry) -> None:
        """After a change that may have copied ``node``'s object up: a name of a lower-only hard link (a node keyed by
        ``(st_ino, path)``: :func:`~.nodes.identity`) that is in the upper layer now is an object of its own, with its
        own number and link count. Key the node by its ``st_ino`` (a new name for it, LINK, then finds this node: one
        kernel inode) and make the kernel drop the attributes it holds (FUSE_NOTIFY_INVAL_INODE, attributes only).
        Never raises: a name gone meanwhile leaves the node as it is."""
        if not isinstance(node.ino, tuple) or node.path is None:
            return
        try:
            if self.ov.lookup.lookup(node.path).upper is None:
                return
            ino = self.ov.getattr(node.path)["st_ino"]
        except OSError:
            return
        self.nodes.rekey(node, ino)
        self._notify_inval_inode(node.nodeid)

    def _notify_inval_inode(self, nodeid: int) -> None:
        """FUSE_NOTIFY_INVAL_INODE of ``nodeid``'s attributes (offset -1: no page, so written before a reply it cannot
        wait on that request); the kernel may no longer have the inode (ENOENT: nothing to drop)."""
        out = p.NOTIFY_INVAL_INODE_OUT.pack(nodeid, -1, 0)
        header = p.OUT_HEADER.pack(p.OUT_HEADER.size + len(out), p.NOTIFY_INVAL_INODE, 0)
        with contextlib.suppress(OSError):
            os.writev(self.fd, [header, out])

    def _entry(self, path: str, fh: int | None = None) -> bytes:
        """The entry reply for the object now at ``path`` (a lookup counted for it)."""
        attrs = self.ov.getattr(path, fh)
        node = self._found(path, attrs)
        return p.entry_out(node.nodeid, attrs, self.valid)

    def _where(self, node: NodeEntry) -> tuple[str, int | None]:
        """How the engine reaches ``node``'s object: ``(path, None)``, or ``("", handle)`` once it has no name left
        (an open handle, or its hold: see NameOps._removing); ENOENT when it has neither."""
        return (node.path, None) if node.path is not None else ("", self._any_handle(node))

    def _attrs(self, node: NodeEntry, fh: int | None = None) -> dict[str, Any]:
        """The attributes of ``node``: through ``fh`` if given, else as :meth:`_where` reaches it."""
        if fh is not None:
            return self.ov.getattr(node.path or "", fh)
        return self.ov.getattr(*self._where(node))

    def _any_handle(self, node: NodeEntry) -> int:
        """An engine handle on ``node``'s object: one of its open files, else its hold; ENOENT when it has neither."""
        return min(node.handles) if node.handles else self._held_handle(node)

    def _held_handle(self, node: NodeEntry) -> int:
        """The engine's hold on ``node``'s object, which has no name left (see NameOps._removing); ENOENT if none."""
        held = self._held.get(node.nodeid)
        if held is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return held

    def _dropped(self, node: NodeEntry) -> None:
        """The kernel forgot ``node``: let go of its object (the engine's hold on it, if any)."""
        held = self._held.pop(node.nodeid, None)
        if held is not None:
            self.ov.release(held)
