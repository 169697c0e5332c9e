"""Lower layers for the checker: how they are generated, written to disk, and flattened.

A layer is a mapping ``path -> Node``. Generated layers overlap on a small set
of names so that whiteouts, opaque directories and files replaced by
directories (and the reverse) meet each other across layers. Every object is
written with a pinned mtime (one per layer), an owner and a mode, so that a
copy-up that loses any of them shows.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from pylayerfs.overlay.markers import OPAQUE_XATTR, OPAQUE_YES, make_whiteout
from pylayerfs.testing.model import Model, Obj

NAMES = ("a", "b", "c")
PATHS = (*NAMES, *(f"{p}/{n}" for p in NAMES for n in NAMES), "a/a/a", "a/b/c", "b/a/b")
SYMLINK_TARGETS = ("b", "a/b", "c/a", "nowhere")
FILE_MODES = (0o644, 0o600, 0o755, 0o4755, 0o2755)
DIR_MODES = (0o755, 0o700, 0o2775)
OWNERS = (0, 1000)
LAYER_TIME = 946_684_800  # 2000-01-01; layer i's objects have mtime LAYER_TIME + i days
XATTR = "user.layer"
DIR_KINDS = ("dir", "opaque")


@dataclass(frozen=True)
class Node:
    """One entry of a lower layer: file, dir, opaque (directory), whiteout, symlink or fifo."""

    kind: str
    content: bytes = b""
    target: str = ""
    mode: int = 0o755
    uid: int = 0
    xattr: bytes | None = None  # the value of user.layer, if set

    def __str__(self) -> str:
        extra = {"file": repr(self.content), "symlink": f"-> {self.target}"}.get(self.kind, "")
        meta = f" {self.mode:o} uid={self.uid}" if self.kind in ("file", "dir", "opaque") else ""
        return f"{self.kind}{' ' + extra if extra else ''}{meta}{f' {XATTR}={self.xattr!r}' if self.xattr else ''}"


Layer = Mapping[str, Node]
PLAIN_DIR = Node("dir")


def _node() -> st.SearchStrategy[Node]:
    xattr = st.sampled_from([None, b"x"])
    owner = st.sampled_from(OWNERS)
    return st.one_of(
        st.builds(Node, st.just("file"), st.sampled_from([b"", b"1", b"lower"]), st.just(""),
                  st.sampled_from(FILE_MODES), owner, xattr),
        st.builds(Node, st.sampled_from(DIR_KINDS), st.just(b""), st.just(""), st.sampled_from(DIR_MODES), owner,
                  xattr),
        st.builds(Node, st.just("whiteout")),
        st.builds(Node, st.just("symlink"), st.just(b""), st.sampled_from(SYMLINK_TARGETS)),
        st.builds(Node, st.just("fifo"), mode=st.just(0o644)),
    )  # fmt: skip


def consistent(layer: Mapping[str, Node]) -> dict[str, Node]:
    """A real tree: drop entries below a non-directory of the same layer, add missing parent directories."""
    out: dict[str, Node] = {}
    for path in sorted(layer, key=lambda p: p.count("/")):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(a in out and out[a].kind not in DIR_KINDS for a in ancestors):
            continue
        for a in ancestors:
            out.setdefault(a, PLAIN_DIR)
        out[path] = layer[path]
    return dict(sorted(out.items()))


def layers(max_layers: int = 3, *, only_realistic: bool = True) -> st.SearchStrategy[list[dict[str, Node]]]:
    """Lower layers, top first: each a consistent tree of one to eight entries on shared names.

    ``only_realistic`` keeps only what a container runtime writes (see :func:`realistic`).
    """
    layer = st.dictionaries(st.sampled_from(PATHS), _node(), min_size=1, max_size=8).map(consistent)
    stack = st.lists(layer, min_size=1, max_size=max_layers)
    return stack.map(realistic) if only_realistic else stack


def realistic(lowers: Sequence[Layer]) -> list[dict[str, Node]]:
    """Drop the whiteouts no runtime writes: those that would hide nothing.

    A runtime writes a whiteout when it deletes a name the layers below show
    through a merged parent. The kernel lists any other whiteout in readdir of
    its (not merged) directory, while lookup hides it.
    """
    out = []
    for i, layer in enumerate(lowers):
        kept = dict(layer)
        for path, node in layer.items():
            if node.kind == "whiteout":
                without = {p: n for p, n in kept.items() if p != path}
                if path not in flatten([without, *lowers[i + 1 :]]).objects:
                    kept = without
        out.append(kept)
    return out


def layer_time(index: int) -> int:
    return LAYER_TIME + 86400 * index


def build(root: str, layer: Layer, index: int) -> str:
    """Write lower layer number ``index`` (0 is the top) below ``root``."""
    os.makedirs(root, exist_ok=True)
    for path, node in layer.items():  # parents first (consistent() sorts)
        full = os.path.join(root, path)
        if node.kind in DIR_KINDS:
            os.mkdir(full)
            if node.kind == "opaque":
                os.setxattr(full, OPAQUE_XATTR, OPAQUE_YES)
        elif node.kind == "file":
            with open(full, "wb") as f:
                f.write(node.content)
        elif node.kind == "symlink":
            os.symlink(node.target, full)
        elif node.kind == "fifo":
            os.mkfifo(full)
        else:
            parent = os.open(os.path.dirname(full), os.O_PATH | os.O_DIRECTORY)
            try:
                make_whiteout(parent, os.path.basename(full))
            finally:
                os.close(parent)
    when = layer_time(index)
    for path, node in sorted(layer.items(), reverse=True):  # children before parents: their mtimes stay
        full = os.path.join(root, path)
        if node.kind != "whiteout":
            os.chown(full, node.uid, node.uid, follow_symlinks=False)
        if node.kind in ("file", "fifo", *DIR_KINDS):
            os.chmod(full, node.mode)
        if node.xattr is not None:
            os.setxattr(full, XATTR, node.xattr)
        if node.kind != "whiteout":
            os.utime(full, (when, when), follow_symlinks=False)
    os.utime(root, (layer_time(index), layer_time(index)))
    return root


def flatten(lowers: Sequence[Layer]) -> Model:
    """The model of the merged view the layers (top first) give, by the kernel's lookup rules.

    For each name, the layers are searched top-down: a whiteout hides the name
    here and below, a non-directory is the answer and stops the search, a
    directory merges with the directories below it until one is opaque.
    """
    objects: dict[str, Obj] = {"": Obj("dir", 0o755, 0, 0, lower=True)}

    def merge(path: str, stack: list[int]) -> None:
        names = sorted({p.rpartition("/")[2] for i in stack for p in lowers[i] if p.rpartition("/")[0] == path})
        for name in names:
            child = f"{path}/{name}" if path else name
            hits: list[int] = []
            for i in stack:
                node = lowers[i].get(child)
                if node is None:
                    continue
                if node.kind == "whiteout" or (hits and node.kind not in DIR_KINDS):
                    break
                hits.append(i)
                if node.kind != "dir":  # a non-directory, or an opaque directory, ends the merge
                    break
            if hits:
                top = lowers[hits[0]][child]
                objects[child] = _object(top, hits[0])
                if top.kind in DIR_KINDS:
                    merge(child, hits)

    merge("", list(range(len(lowers))))
    return Model(objects)


def _object(node: Node, index: int) -> Obj:
    kind = "dir" if node.kind in DIR_KINDS else node.kind
    mode = 0o777 if kind == "symlink" else node.mode
    xattrs = {XATTR: node.xattr} if node.xattr is not None else {}
    obj = Obj(kind, mode, node.uid, node.uid, layer_time(index), node.content, node.target, xattrs, kind == "dir")
    obj.lower_file = kind == "file"
    return obj


def describe(lowers: Sequence[Layer]) -> list[str]:
    """One line per entry, for reports."""
    return [f"lower {i}: {path}: {node}" for i, layer in enumerate(lowers) for path, node in layer.items()]


__all__ = ["Layer", "Node", "build", "consistent", "describe", "digest", "flatten", "layers", "realistic"]


def digest(root: str) -> str:
    """A hash of everything below ``root``: names, types, modes, owners, times, contents, xattrs."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, root)}|{st.st_mode}|{st.st_uid}|{st.st_gid}|{st.st_rdev}".encode())
            h.update(f"|{st.st_mtime_ns}|{st.st_size}".encode())
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    h.update(f.read())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(full).encode())
            for n in sorted(os.listxattr(full, follow_symlinks=False)):
                h.update(n.encode() + os.getxattr(full, n, follow_symlinks=False))
    return h.hexdigest()
