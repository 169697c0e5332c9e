"""One scenario: the same operations on an implementation and on its reference, compared after every step.

After every step the outcome (result or errno), the merged tree, and the
grouping of paths by inode number (hard links share one, nothing else does)
must match the reference; against the model, an object's inode number must
also stay the same for as long as it exists (across copy-up). At the end the
lower layers must be byte-for-byte unchanged, a remount must show the same
tree (persistence) and, when both implementations keep the overlayfs on-disk
format, each one's upper directory mounted by the other must too (interop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from pylayerfs.testing.lowers import NAMES, Layer, build, digest
from pylayerfs.testing.ops import FD_FLAGS, Entry, FileSystem, Op, release, snapshot
from pylayerfs.testing.targets import Instance, Layout, ModelTarget, Target, TargetError

if TYPE_CHECKING:
    from pylayerfs.testing.strategies import Scenario

Tree = dict[str, Entry]
OPTIONAL_CHECKS = ("inode", "lowers", "persistence", "interop")  # what --skip may turn off


@dataclass(frozen=True)
class Step:
    op: str
    expected: str
    actual: str


class Divergence(Exception):
    """The implementation did not do what the reference did.

    ``check`` names what differed: result, tree, inode, lowers, persistence or interop.
    """

    def __init__(self, check: str, message: str, steps: Sequence[Step], details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.check = check
        self.message = message
        self.steps = list(steps)
        self.details = list(details)
        self.scenario: Scenario | None = None  # set by the checker that ran it


def tree_diff(expected: Tree, actual: Tree) -> list[str]:
    """``+`` a path that should not be there, ``-`` one that is missing, ``~`` one that differs."""
    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        e, a = expected.get(path), actual.get(path)
        if e is None:
            lines.append(f"+ {path}: {a}")
        elif a is None:
            lines.append(f"- {path}: {e}")
        elif e != (a if e.mtime is not None else dataclasses.replace(a, mtime=None)):
            lines.append(f"~ {path}: expected {e}; actual {a}")
    return lines


def links(inodes: dict[str, int]) -> list[list[str]]:
    """The paths that share an inode number, grouped (hard links)."""
    groups: dict[int, list[str]] = {}
    for path, ino in inodes.items():
        groups.setdefault(ino, []).append(path)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


@dataclass
class _Side:
    target: Target
    layout: Layout
    lowers_digest: list[str]
    instance: Instance | None = None

    @property
    def fs(self) -> FileSystem:
        assert self.instance is not None
        return self.instance.fs


class Run:
    """A scenario in progress: ``step()`` each operation, then ``finish()``; a context manager."""

    def __init__(
        self,
        lowers: Sequence[Layer],
        subject: Target,
        reference: Target,
        base: str | None = None,
        skip: Sequence[str] = (),
        mount_options: str = "",
    ) -> None:
        """``mount_options``: what every side mounts with besides its directories (``redirect_dir=on,...``)."""
        self.lowers = lowers
        self.skip = set(skip)
        self.mount_options = mount_options
        self.base = tempfile.mkdtemp(prefix="pylayerfs-check-", dir=base)
        self.steps: list[Step] = []
        self.sides: list[_Side] = []
        self._identity: dict[int, int] = {}  # model object id -> the subject's st_ino
        self.paths: list[str] = []  # what the tree holds now, to aim the next operations at
        self.fresh: list[str] = []  # names that are free in its directories
        self.dirs: list[str] = [""]  # its directories
        self.lacking: dict[str, str] = {}  # open flag (FD_FLAGS) -> which side does not support it
        try:
            self.subject = self._start(subject, "subject")
            self.reference = self._start(reference, "reference")
            self._probe()
            self._compare("in the starting tree")
        except BaseException:
            self.close()
            raise

    def _start(self, target: Target, tag: str) -> _Side:
        d = os.path.join(self.base, tag)
        lowers = tuple(os.path.join(d, f"l{i}") for i in range(len(self.lowers)))
        upper, work, merged = (os.path.join(d, name) for name in ("upper", "work", "merged"))
        layout = Layout(lowers, upper, work, merged, self.mount_options)
        if target.on_disk:
            for i, (layer, root) in enumerate(zip(self.lowers, layout.lowers, strict=True)):
                build(root, layer, i)
            for d in (layout.upper, layout.work, layout.merged):
                os.makedirs(d)
        side = _Side(target, layout, [digest(d) for d in layout.lowers] if target.on_disk else [])
        self.sides.append(side)
        side.instance = target.start(layout, self.lowers)
        return side

    @property
    def held(self) -> list[int]:
        """The descriptor slots that hold one now (``ops.SLOTS``), to aim the next operations at."""
        return sorted(self.reference.fs.held)

    def _probe(self) -> None:
        """Which open flags a side does not support at all (EOPNOTSUPP at the root): they are not checked."""
        for side in self.sides:
            try:
                side.fs.close(side.fs.open("", FD_FLAGS["tmpfile"], 0o600))
            except OSError as exc:
                if exc.errno == errno.EOPNOTSUPP:
                    self.lacking["tmpfile"] = f"O_TMPFILE ({side.target.name}: EOPNOTSUPP)"

    def _fail(self, check: str, message: str, details: Sequence[str] = ()) -> Divergence:
        return Divergence(check, message, self.steps, details)

    def _compare(self, when: str) -> None:
        expected, expected_inodes = snapshot(self.reference.fs)
        actual, inodes = snapshot(self.subject.fs)
        self.paths = list(expected)
        self.dirs = [""] + [p for p, e in expected.items() if e.kind == "dir"]
        names = (f"{d}/{n}".lstrip("/") for d in self.dirs for n in NAMES)
        self.fresh = [p for p in names if p not in expected]
        diff = tree_diff(expected, actual)
        if diff:
            raise self._fail("tree", f"the merged tree differs {when}", diff)
        if "inode" in self.skip:
            return
        if links(expected_inodes) != links(inodes):
            details = [f"expected hard links {links(expected_inodes)}", f"actual hard links {links(inodes)}"]
            raise self._fail("inode", f"paths share inode numbers differently {when}", details)
        if isinstance(self.reference.target, ModelTarget):
            for path, ino in inodes.items():
                before = self._identity.setdefault(expected_inodes[path], ino)
                if before != ino:
                    raise self._fail("inode", f"st_ino of {path} changed from {before} to {ino} {when}")

    def step(self, op: Op) -> None:
        n = len(self.steps) + 1
        expected = op.run(self.reference.fs)
        try:
            actual = op.run(self.subject.fs)
        except TargetError:
            raise
        except Exception as exc:
            self.steps.append(Step(str(op), expected, f"raised {type(exc).__name__}: {exc}"))
            raise self._fail("crash", f"step {n} ({op}) raised {type(exc).__name__}: {exc}") from exc
        self.steps.append(Step(str(op), expected, actual))
        if expected != actual:
            raise self._fail("result", f"step {n} ({op}) gave {actual}, expected {expected}")
        self._compare(f"after step {n}")

    def finish(self) -> None:
        """Close the kept descriptors; then lowers unchanged, persistence across a remount, interop."""
        for side in self.sides:
            release(side.fs)
        self._compare("after closing every descriptor")
        for side in self.sides:
            if "lowers" in self.skip or not side.target.on_disk:
                continue
            if [digest(d) for d in side.layout.lowers] != side.lowers_digest:
                raise self._fail("lowers", f"{side.target.name} changed a lower layer")
        if "persistence" not in self.skip:
            self._persistence()
        if self.subject.target.on_disk and self.reference.target.on_disk and "interop" not in self.skip:
            self._interop()

    def _persistence(self) -> None:
        final, inodes = snapshot(self.subject.fs)
        assert self.subject.instance is not None
        self.subject.instance.remount()
        after, after_inodes = snapshot(self.subject.fs)
        moved = [p for p in inodes if inodes[p] != after_inodes.get(p, inodes[p]) and "inode" not in self.skip]
        diff = tree_diff(final, after) + [f"~ {p}: st_ino {inodes[p]} before, {after_inodes[p]} after" for p in moved]
        if diff:
            raise self._fail("persistence", "the tree differs after unmount and mount", diff)

    def _interop(self) -> None:
        trees = {side.target.name: snapshot(side.fs)[0] for side in self.sides}
        for side in self.sides:
            self._stop(side)
        for writer, reader in ((self.subject, self.reference), (self.reference, self.subject)):
            layout = dataclasses.replace(writer.layout, work=writer.layout.work + "-interop",
                                         merged=writer.layout.merged + "-interop")  # fmt: skip
            for d in (layout.work, layout.merged):
                os.makedirs(d, exist_ok=True)
            instance = reader.target.start(layout, self.lowers)
            try:
                diff = tree_diff(trees[writer.target.name], snapshot(instance.fs)[0])
            finally:
                instance.close()
            if diff:
                message = f"{reader.target.name} shows the upper written by {writer.target.name} differently"
                raise self._fail("interop", message, diff)

    def _stop(self, side: _Side) -> None:
        if side.instance is not None:
            with contextlib.suppress(OSError):  # a descriptor left open would keep the mount busy
                release(side.instance.fs)
            instance, side.instance = side.instance, None
            instance.close()

    def close(self) -> None:
        """Stop everything; remove the directories unless something could not be unmounted."""
        errors = []
        for side in self.sides:
            try:
                self._stop(side)
            except TargetError as exc:
                errors.append(str(exc))
        if errors:
            raise TargetError("; ".join(errors) + f" (left {self.base} in place)")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.base)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
