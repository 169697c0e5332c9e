"""The build context: the directory sent to the builder, minus what ``.dockerignore`` excludes.

``.dockerignore`` follows docker/cli: one pattern a line, ``#`` comments,
patterns cleaned and taken relative to the context, Go's ``filepath.Match``
plus ``**``, ``!`` exceptions, the last matching line wins, and a pattern that
matches a directory excludes everything below it. The Dockerfile and
``.dockerignore`` are always sent (but COPY will not copy them if excluded).

The context is read through file descriptors below its root with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: a symlink in the context
is copied as a symlink, never followed out of it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from pylayerfs.image import archive
from pylayerfs.overlay import realfs

DOCKERIGNORE = ".dockerignore"


class ContextError(Exception):
    pass


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match (``*``, ``?``, ``[...]``, ``\\`` escapes) plus ``**`` for any depth."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise ContextError(f"syntax error in pattern: {pattern}")
            body = pattern[i + 1 : end]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    exclude: bool


class Ignore:
    def __init__(self, text: str) -> None:
        self.rules: list[_Rule] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exclude = not line.startswith("!")
            cleaned = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            if cleaned in (".", ""):
                continue
            self.rules.append(_Rule(pattern_regex(cleaned), exclude))

    def excludes(self, rel: str) -> bool:
        """The last matching rule decides; a rule matching a parent directory matches its contents."""
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for rule in self.rules:
            if any(rule.regex.fullmatch(p) for p in prefixes):
                excluded = rule.exclude
        return excluded


class Context:
    def __init__(self, root: str, dockerfile: str) -> None:
        if not os.path.isdir(root):
            raise ContextError(f"unable to prepare context: path '{root}' is not a directory")
        self.root = os.path.abspath(root)
        self.dockerfile = dockerfile  # relative to the root, when it is inside
        self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with open(os.path.join(self.root, DOCKERIGNORE)) as f:
                self.ignore = Ignore(f.read())
        except FileNotFoundError:
            self.ignore = Ignore("")

    def close(self) -> None:
        os.close(self.fd)

    def sent(self, rel: str) -> bool:
        return rel in (self.dockerfile, DOCKERIGNORE) or not self.ignore.excludes(rel)

    def entries(self, below: str = "") -> Iterator[tuple[str, os.stat_result]]:
        """Every sent entry below ``below`` (lexical, depth first)."""
        for rel, st in archive.walk(os.path.join(self.root, below) if below else self.root):
            full = f"{below}/{rel}" if below else rel
            if self.sent(full):
                yield full, st

    def transfer_size(self) -> int:
        """The bytes of the context as the client sends it: a tar, uid/gid 0, ending in 1024 zeros."""
        total = len(archive.TRAILER)
        for rel, st in self.entries():
            kind = tarfile.REGTYPE
            if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
                kind = tarfile.DIRTYPE if stat.S_ISDIR(st.st_mode) else tarfile.SYMTYPE
            info = archive.tar_info(rel + "/" if kind == tarfile.DIRTYPE else rel, st, kind)
            info.uid = info.gid = 0
            if kind == tarfile.SYMTYPE:
                info.linkname = os.readlink(os.path.join(self.root, rel))
            size = st.st_size if kind == tarfile.REGTYPE else 0
            total += len(archive.header(info)) + size + (-size % archive.BLOCK)
        return total

    def sources(self, pattern: str, keyword: str) -> list[str]:
        """The sent paths a COPY/ADD source names (a glob), relative to the root."""
        cleaned = posixpath.normpath(pattern).lstrip("/")
        if cleaned == ".." or cleaned.startswith("../"):
            raise ContextError(f"{keyword} failed: forbidden path outside the build context: {pattern} ()")
        if cleaned == ".":
            return [""]
        regex = pattern_regex(cleaned)
        depth = cleaned.count("/")
        found = [
            rel for rel, _ in self.entries() if rel.count("/") == depth and regex.fullmatch(rel) and self.sent(rel)
        ]
        if not found:
            raise ContextError(f"{keyword} failed: file not found in build context or excluded by .dockerignore: "
                               f"stat {pattern}: file does not exist")  # fmt: skip
        return found

    def lstat(self, rel: str) -> os.stat_result:
        return os.lstat(os.path.join(self.root, rel)) if rel else os.stat(self.root)

    def digest(self, rel: str) -> str:
        """``file:<sha256>`` or ``dir:<sha256>``: content and metadata, not mtime (the classic builder's cache key)."""
        st = self.lstat(rel)
        if not stat.S_ISDIR(st.st_mode):
            return "file:" + self._entry_hash(rel, st)
        hashes = [self._entry_hash(rel, st)] + [self._entry_hash(r, s) for r, s in self.entries(rel)]
        return "dir:" + hashlib.sha256(",".join(hashes).encode()).hexdigest()

    def _entry_hash(self, rel: str, st: os.stat_result) -> str:
        kind = "5" if stat.S_ISDIR(st.st_mode) else "2" if stat.S_ISLNK(st.st_mode) else "0"
        link = os.readlink(os.path.join(self.root, rel)) if kind == "2" else ""
        size = st.st_size if kind == "0" else 0
        h = hashlib.sha256(
            f"name{rel}mode{stat.S_IMODE(st.st_mode)}uid0gid0size{size}typeflag{kind}linkname{link}unamegname"
            "devmajor0devminor0".encode()
        )
        if kind == "0" and size:
            fd = realfs.openat2(self.fd, rel, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()
