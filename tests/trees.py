"""Building layer trees for tests, and reading trees back for comparison."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Mapping
from typing import Any

from pylayerfs.overlay.markers import TRUSTED_PREFIX, make_whiteout
from pylayerfs.testing.lowers import digest

WHITEOUT = ("whiteout",)
# A spec maps a relative path to: str/bytes (file content), None (directory),
# ("symlink", target), ("whiteout",), ("opaque",) (an opaque directory), ("fifo",).
Spec = Mapping[str, str | bytes | tuple[str, ...] | None]


def build(root: str, spec: Spec, prefix: str = TRUSTED_PREFIX) -> str:
    os.makedirs(root, exist_ok=True)
    for path in sorted(spec):
        value = spec[path]
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if value is None:
            os.makedirs(full, exist_ok=True)
        elif isinstance(value, (str, bytes)):
            with open(full, "wb") as f:
                f.write(value.encode() if isinstance(value, str) else value)
        elif value[0] == "symlink":
            os.symlink(value[1], full)
        elif value[0] == "whiteout":
            fd = os.open(os.path.dirname(full), os.O_RDONLY | os.O_DIRECTORY)
            make_whiteout(fd, os.path.basename(full))
            os.close(fd)
        elif value[0] == "opaque":
            os.makedirs(full, exist_ok=True)
            os.setxattr(full, prefix + "opaque", b"y")
        elif value[0] == "fifo":
            os.mkfifo(full)
        elif value[0] == "link":  # a hard link to a path given earlier in sorted order
            os.link(os.path.join(root, value[1]), full)
    return root


def _user_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names if n.startswith("user.")))


def view(root: str, *, with_ino: bool = False) -> dict[str, Any]:
    """What a user sees below ``root``: type, mode, owner, size, content, target, user xattrs."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entry: list[Any] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    entry += [st.st_size, hashlib.sha256(f.read()).hexdigest()[:16]]
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(full))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry.append(st.st_rdev)
            entry.append(_user_xattrs(full))
            if with_ino:
                entry.append(st.st_ino)
            out[os.path.relpath(full, root)] = tuple(entry)
    return out


def disk_form(upper: str, prefix: str = TRUSTED_PREFIX) -> dict[str, Any]:
    """The upper directory as overlayfs stores it: types, whiteouts, opaque markers, contents."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entry: list[Any] = [stat.S_IFMT(st.st_mode)]
            if stat.S_ISCHR(st.st_mode):
                entry.append(("rdev", st.st_rdev))
            if stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(OSError):
                    entry.append(("opaque", os.getxattr(full, prefix + "opaque")))
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    entry.append(hashlib.sha256(f.read()).hexdigest()[:16])
                with contextlib.suppress(OSError):
                    entry.append(("metacopy", os.getxattr(full, prefix + "metacopy")))
            out[os.path.relpath(full, upper)] = tuple(entry)
    return out


def tree_hash(root: str) -> str:
    """A hash of everything below ``root`` (names, types, modes, owners, times, contents, xattrs)."""
    return digest(root)
