"""``docker diff``: what a container changed, read from its read-write layer.

Derived from the upper directory, as a copy-on-write filesystem has it:

* a whiteout is ``D`` (deleted);
* an entry with nothing below it in the image (the init layer and the image's
  layers, merged) is ``A`` (added); one that shadows something below is ``C``
  (changed: copied up, or replaced);
* an opaque directory is ``C`` and every name below it that it hides and did not
  re-create is ``D``;
* every directory above a change is ``C``, the root never listed.

Lines are sorted by path (Docker's order among siblings is its map's: unspecified).
"""

from __future__ import annotations

import os
import stat
from enum import StrEnum

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.markers import is_opaque_dir, is_whiteout


class ChangeKind(StrEnum):
    """A ``docker diff`` line's letter: go-archive's ChangeAdd, ChangeModify and ChangeDelete."""

    ADD = "A"
    MODIFY = "C"
    DELETE = "D"


def changes(upper: str, lowers: list[str]) -> list[str]:
    """``A /path``, ``C /path``, ``D /path`` lines for the upper directory over ``lowers`` (top first)."""
    below = Overlay(lowers, metacopy=True)  # only read: metacopy files in the image are followed
    found: dict[str, ChangeKind] = {}
    try:
        for dirpath, dirnames, filenames in os.walk(upper):
            rel_dir = os.path.relpath(dirpath, upper)
            rel_dir = "" if rel_dir == "." else rel_dir
            for name in sorted(dirnames + filenames):
                rel = f"{rel_dir}/{name}" if rel_dir else name
                st = os.lstat(os.path.join(upper, rel))
                if is_whiteout(st):
                    if _exists(below, rel):
                        found[rel] = ChangeKind.DELETE
                    continue
                found[rel] = ChangeKind.MODIFY if _exists(below, rel) else ChangeKind.ADD
                modified = found[rel] is ChangeKind.MODIFY
                if stat.S_ISDIR(st.st_mode) and is_opaque_dir(os.path.join(upper, rel)) and modified:
                    present = set(os.listdir(os.path.join(upper, rel)))
                    for hidden in below.readdir(rel):
                        if hidden[0] not in (".", "..") and hidden[0] not in present:
                            found[f"{rel}/{hidden[0]}"] = ChangeKind.DELETE
    finally:
        below.close()
    for rel in list(found):  # the directories above a change are changed
        parts = rel.split("/")
        for i in range(1, len(parts)):
            found.setdefault("/".join(parts[:i]), ChangeKind.MODIFY)
    return [f"{kind.value} /{rel}" for rel, kind in sorted(found.items())]


def _exists(overlay: Overlay, rel: str) -> bool:
    try:
        overlay.getattr(rel)
    except OSError:
        return False
    return True
