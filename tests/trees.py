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


def entry(full: str, with_ino: bool = False) -> tuple[Any, ...]:
    """What :func:`view` records for the object at ``full`` (raises OSError when it cannot be looked up or read)."""
    st = os.lstat(full)
    found: list[Any] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
    if stat.S_ISREG(st.st_mode):
        with open(full, "rb") as f:
            found += [st.st_size, hashlib.sha256(f.read()).hexdigest()[:16]]
    elif stat.S_ISLNK(st.st_mode):
        found.append(os.readlink(full))
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        found.append(st.st_rdev)
    found.append(_user_xattrs(full))
    if with_ino:
        found.append(st.st_ino)
    return tuple(found)


def view(root: str, *, with_ino: bool = False, errors: bool = False) -> dict[str, Any]:
    """What a user sees below ``root``: type, mode, owner, size, content, target, user xattrs.

    ``errors``: a path that cannot be looked up or read maps to its errno's ``os.strerror`` (and is not entered), a
    directory that cannot be listed maps ``"path/"`` (``"./"`` for ``root``) to it; without, the first such error
    raises OSError (a directory that cannot be listed is skipped, as ``os.walk`` does).
    """
    out: dict[str, Any] = {}
    unlisted: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(full, root)] = entry(full, with_ino)
            except OSError as exc:
                if not errors:
                    raise
                out[os.path.relpath(full, root)] = os.strerror(exc.errno or 0)
                if name in dirnames:
                    dirnames.remove(name)
        dirnames.sort()
    if errors:
        for failure in unlisted:
            out[os.path.relpath(str(failure.filename), root) + "/"] = os.strerror(failure.errno or 0)
    return out


def disk_form(
    upper: str, prefix: str = TRUSTED_PREFIX, *, xattrs: tuple[str, ...] = (), links: bool = False
) -> dict[str, Any]:
    """The upper directory as overlayfs stores it: types, whiteouts, opaque markers, contents.

    ``xattrs``: more overlay xattrs to record byte for byte where present, named without ``prefix`` (``"redirect"``,
    ``"impure"``, ``"origin"``), on any type and on ``upper`` itself (as ``"."``, listed only when it has one);
    ``links``: the link count of files too (the kernel's hard links of metacopy files share one upper inode).
    """
    out: dict[str, Any] = {}

    def overlay_xattrs(full: str) -> list[tuple[str, bytes]]:
        found = []
        for name in xattrs:
            with contextlib.suppress(OSError):
                found.append((name, os.getxattr(full, prefix + name, follow_symlinks=False)))
        return found

    if overlay_xattrs(upper):
        out["."] = (stat.S_IFDIR, *overlay_xattrs(upper))
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
                if links:
                    entry.append(("nlink", st.st_nlink))
            entry += overlay_xattrs(full)
            out[os.path.relpath(full, upper)] = tuple(entry)
    return out


def tree_hash(root: str) -> str:
    """A hash of everything below ``root`` (names, types, modes, owners, times, contents, xattrs)."""
    return digest(root)
