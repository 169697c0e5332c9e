"""Hypothesis drives the engine with random operations and compares it with a model after every step.

The model is deliberately simple: the merged view as a dict of paths, computed
first by flattening the lower layers top-down (as ``mutate.extract`` in
go-containerregistry does) and then changed by each operation the way POSIX
says. The lower layers must never change.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pylayerfs.overlay import Caller, Overlay
from tests.trees import WHITEOUT, build, tree_hash

NAMES = ["a", "b", "c"]
PATHS = ["a", "b", "c", "a/a", "a/b", "b/a", "b/c", "a/a/b"]
DIR = None
ME = Caller.me()

layer_entry = st.one_of(st.sampled_from(["x", "yy"]), st.just(DIR), st.just(WHITEOUT), st.just(("opaque",)))
layer_spec = st.dictionaries(st.sampled_from(PATHS), layer_entry, max_size=6)


def _consistent(spec):
    """Drop entries whose parent in the same layer is not a directory (a layer is a real tree)."""
    out: dict[str, object] = {}
    for path in sorted(spec, key=lambda p: p.count("/")):
        parts = path.split("/")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if any(a in out and out[a] not in (DIR, ("opaque",)) for a in ancestors):
            continue
        for a in ancestors:
            out.setdefault(a, DIR)
        out[path] = spec[path]
    return out


def flatten(layers):
    """The merged view of lower layers (top first): path -> content (bytes) or DIR."""
    view: dict[str, bytes | None] = {}
    hidden: set[str] = set()
    stop: set[str] = set()
    for layer in layers:
        for path in sorted(layer, key=lambda p: p.count("/")):
            value = layer[path]
            parts = path.split("/")
            ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
            if any(a in hidden or a in stop or (a in view and view[a] is not DIR) for a in ancestors):
                continue
            if path in hidden or (path in view and view[path] is not DIR):
                continue
            if path in view and value not in (DIR, ("opaque",)):
                stop.add(path)  # a whiteout or a non-directory below a directory ends its merge
                continue
            if any(a not in view for a in ancestors):
                continue
            if value == WHITEOUT:
                hidden.add(path)
            elif value in (DIR, ("opaque",)):
                view.setdefault(path, DIR)
            elif path not in view:
                view[path] = value.encode()
        for path, value in layer.items():
            if value == ("opaque",) and view.get(path) is DIR:
                stop.add(path)
    return view


class OverlayMachine(RuleBasedStateMachine):
    @initialize(layers=st.lists(layer_spec, min_size=1, max_size=3))
    def setup(self, layers):
        self.tmp = tempfile.mkdtemp(prefix="pylayerfs-model-")
        specs = [_consistent(s) for s in layers]
        self.lowers = [build(f"{self.tmp}/l{i}", spec) for i, spec in enumerate(specs)]
        for d in ("u", "w"):
            os.makedirs(f"{self.tmp}/{d}")
        self.hashes = [tree_hash(d) for d in self.lowers]
        self.ov = Overlay(self.lowers, f"{self.tmp}/u", f"{self.tmp}/w")
        self.model = flatten(specs)

    def teardown(self):
        if hasattr(self, "ov"):
            self.ov.close()
            shutil.rmtree(self.tmp)

    def _parent_ok(self, path):
        parent = path.rpartition("/")[0]
        return not parent or self.model.get(parent, 0) is DIR

    @rule(path=st.sampled_from(PATHS), data=st.sampled_from([b"1", b"22"]))
    def write(self, path, data):
        try:
            fh = self.ov.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            assert path not in self.model
            if not self._parent_ok(path):
                return
            fh = self.ov.create(path, 0o644, os.O_WRONLY, ME)
            self.model[path] = b""
        except OSError as exc:
            assert exc.errno == errno.ENOTDIR or self.model.get(path) is DIR
            return
        self.ov.write(fh, data, 0)
        self.ov.release(fh)
        self.model[path] += data

    @rule(path=st.sampled_from(PATHS))
    def remove(self, path):
        expected = self.model.get(path, 0)
        try:
            if expected is DIR:
                self.ov.rmdir(path)
            else:
                self.ov.unlink(path)
        except OSError as exc:
            children = [p for p in self.model if p.startswith(path + "/")]
            assert expected == 0 or (expected is DIR and children), exc
            return
        assert expected != 0
        del self.model[path]

    @rule(path=st.sampled_from(PATHS))
    def mkdir(self, path):
        try:
            self.ov.mkdir(path, 0o755, ME)
        except OSError:
            assert path in self.model or not self._parent_ok(path)
            return
        self.model[path] = DIR

    @rule(old=st.sampled_from(PATHS), new=st.sampled_from(NAMES))
    @precondition(lambda self: True)
    def rename_file(self, old, new):
        if self.model.get(old, 0) in (0, DIR) or self.model.get(new, 0) is DIR or old == new:
            return
        if old.startswith(new + "/"):
            return
        self.ov.rename(old, new)
        self.model[new] = self.model.pop(old)

    @invariant()
    def same_view(self):
        if not hasattr(self, "ov"):
            return
        seen: dict[str, bytes | None] = {}
        todo = [""]
        while todo:
            d = todo.pop()
            for name, mode, _ in self.ov.readdir(d):
                if name in (".", ".."):
                    continue
                path = f"{d}/{name}".lstrip("/")
                if stat.S_ISDIR(mode):
                    seen[path] = DIR
                    todo.append(path)
                else:
                    fh = self.ov.open(path, os.O_RDONLY)
                    seen[path] = self.ov.read(fh, 100, 0)
                    self.ov.release(fh)
        assert seen == self.model

    @invariant()
    def lowers_unchanged(self):
        if hasattr(self, "ov"):
            assert [tree_hash(d) for d in self.lowers] == self.hashes


OverlayMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=15, deadline=None)
TestOverlayMachine = OverlayMachine.TestCase
