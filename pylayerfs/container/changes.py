"""``docker diff``: what a container changed, read from its read-write layer.

Derived from the upper directory, as a copy-on-write filesystem has it:

* a whiteout is ``D`` (deleted);
* an entry with nothing below it in the image (the init layer and the image's
  layers, merged) is ``A`` (added); one that shadows something below is ``C``
  (changed: copied up, or replaced);
* an opaque directory is ``C`` and every name below it that it hides and did not
  re-create is ``D``;
* every directory above a change is ``C``, the root never listed;
* a directory the overlay renamed (its ``redirect``) holds only what changed in
  it: what it shows is compared name by name with what was below at its new
  path (the whole moved tree is ``A`` where nothing was), as moby's naive diff
  compares the two views;
* an entry the copy-up brought up unchanged is not listed: as moby's naive diff (the one the overlay2 driver uses
  on this kernel), a name below is ``C`` only when its type and mode, owner, device number, or (not for a
  directory) mtime or size differ (``pkg/archive/changes.go`` ``addChanges``).

The order is Docker's walk: a directory, then what changed inside it, each entry followed by its own subtree and
the deletions last. Docker walks a Go map, so its order among siblings changes from call to call; pylayerfs sorts
them by name, one of the orders Docker prints.
"""

from __future__ import annotations

import os
import stat
from enum import StrEnum
from typing import Any

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.markers import has_redirect, is_opaque_dir, is_whiteout


class ChangeKind(StrEnum):
    """A ``docker diff`` line's letter: go-archive's ChangeAdd, ChangeModify and ChangeDelete."""

    ADD = "A"
    MODIFY = "C"
    DELETE = "D"


def changes(upper: str, lowers: list[str]) -> list[str]:
    """``A /path``, ``C /path``, ``D /path`` lines for the upper directory over ``lowers`` (top first)."""
    below = Overlay(lowers, metacopy=True)  # only read: metacopy files in the image are followed
    above = Overlay([upper, *lowers], metacopy=True)  # the container's view, for the trees it renamed
    found: list[tuple[str, ChangeKind]] = []
    try:
        _walk(below, above, upper, "", False, found)
    finally:
        below.close()
        above.close()
    return [f"{kind.value} /{rel}" for rel, kind in found]


def _walk(
    below: Overlay, above: Overlay, upper: str, directory: str, opaque: bool, found: list[tuple[str, ChangeKind]]
) -> None:
    """Append the changes inside ``directory`` (relative; ``""`` the root) to ``found``, in Docker's order."""
    names = sorted(os.listdir(os.path.join(upper, directory)))
    deleted = []
    if opaque:  # what the directory hides and did not re-create
        deleted = [n for n, _, _ in below.readdir(directory) if n not in (".", "..") and n not in names]
    for name in names:
        rel = f"{directory}/{name}" if directory else name
        st = os.lstat(os.path.join(upper, rel))
        old = _stat(below, rel)
        if is_whiteout(st):
            if old is not None:
                deleted.append(name)
            continue
        mark = len(found)
        if old is None:
            found.append((rel, ChangeKind.ADD))
        elif _differs(old, _attrs(st)):
            found.append((rel, ChangeKind.MODIFY))
        if stat.S_ISDIR(st.st_mode):
            if has_redirect(os.path.join(upper, rel)):
                _compare(below, above, rel, found)
            else:
                hides = old is not None and stat.S_ISDIR(old["st_mode"]) and is_opaque_dir(os.path.join(upper, rel))
                _walk(below, above, upper, rel, hides, found)
            if len(found) > mark and found[mark][0] != rel:  # changed inside: the directory is changed too
                found.insert(mark, (rel, ChangeKind.MODIFY))
    found.extend((f"{directory}/{n}" if directory else n, ChangeKind.DELETE) for n in sorted(deleted))


def _compare(below: Overlay, above: Overlay, directory: str, found: list[tuple[str, ChangeKind]]) -> None:
    """Append the changes inside ``directory`` by comparing the container's view with the image's, name by name
    (moby's naive diff), in Docker's order."""
    names = sorted(n for n, _, _ in above.readdir(directory) if n not in (".", ".."))
    old_dir = _stat(below, directory)
    deleted = []
    if old_dir is not None and stat.S_ISDIR(old_dir["st_mode"]):
        deleted = [n for n, _, _ in below.readdir(directory) if n not in (".", "..") and n not in names]
    for name in names:
        rel = f"{directory}/{name}"
        new = above.getattr(rel)
        old = _stat(below, rel)
        mark = len(found)
        if old is None:
            found.append((rel, ChangeKind.ADD))
        elif _differs(old, new):
            found.append((rel, ChangeKind.MODIFY))
        if stat.S_ISDIR(new["st_mode"]):
            _compare(below, above, rel, found)
            if len(found) > mark and found[mark][0] != rel:
                found.insert(mark, (rel, ChangeKind.MODIFY))
    found.extend((f"{directory}/{n}", ChangeKind.DELETE) for n in sorted(deleted))


def _attrs(st: os.stat_result) -> dict[str, Any]:
    """The fields of an upper object's lstat that :func:`_differs` compares, as ``Overlay.getattr`` names them."""
    return {"st_mode": st.st_mode, "st_uid": st.st_uid, "st_gid": st.st_gid, "st_rdev": st.st_rdev,
            "st_mtime": st.st_mtime_ns, "st_size": st.st_size}  # fmt: skip


def _differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """moby's test for a modified entry: type and mode, owner, rdev; for a non-directory also mtime (ns), size."""
    keys = ("st_mode", "st_uid", "st_gid", "st_rdev")
    if any(old[k] != new[k] for k in keys):
        return True
    return not stat.S_ISDIR(new["st_mode"]) and (old["st_mtime"], old["st_size"]) != (new["st_mtime"], new["st_size"])


def _stat(overlay: Overlay, rel: str) -> dict[str, Any] | None:
    """The merged view's ``st_*`` fields of ``rel`` below the container, None when it has no such name."""
    try:
        return overlay.getattr(rel)
    except OSError:
        return None
