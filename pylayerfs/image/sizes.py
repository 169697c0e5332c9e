"""Sizes and ages as Docker measures and prints them.

* :func:`layer_size` is moby's ``directory.Size``: the apparent size of every
  non-directory under a layer's ``diff`` (a symlink counts its target's length,
  a whiteout 0), hard links counted once; a metacopy file (``metacopy=on``)
  counts 0, since its data is stored in a layer below.
* :func:`human_size` is go-units' ``HumanSizeWithPrecision``: decimal units with
  a lowercase ``kB``, ``%.3g`` by default (``9.29MB``, ``33B``); ``"%.*g"`` in
  Python prints exactly what Go does, ``1e+03kB`` included.
* :func:`human_duration` is go-units' ``HumanDuration`` (``50 minutes``,
  ``About an hour``, ``3 weeks``).
"""

from __future__ import annotations

import os
import stat

from pylayerfs.overlay.markers import is_metacopy_file

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def layer_size(root: str) -> int:
    """Bytes in the files below ``root``: regular files and symlinks, hard links once, directories 0."""
    total = 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(st.st_mode) or st.st_size == 0:
                continue
            if st.st_nlink > 1:
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            if not is_metacopy_file(os.path.join(dirpath, name), st):
                total += st.st_size
    return total


def human_size(size: float, precision: int = 3) -> str:
    unit = 0
    while size >= 1000 and unit < len(_UNITS) - 1:
        size /= 1000
        unit += 1
    return f"{size:.{precision}g}{_UNITS[unit]}"


def human_duration(seconds: float) -> str:
    """How long ago, in the words ``docker history`` and ``docker ps`` use (without " ago")."""
    if int(seconds) < 1:
        return "Less than a second"
    if int(seconds) == 1:
        return "1 second"
    if seconds < 60:
        return f"{int(seconds)} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"
