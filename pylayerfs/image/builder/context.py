"""The build context as Docker's classic builder sees it: the directory, minus what ``.dockerignore`` excludes.

Docker filters the context once, in the client, and the daemon only ever sees what was sent: every COPY/ADD source
(files, directories, globs, ``COPY . .``) and its cache hash come from that filtered tree. This module rebuilds it:

- ``.dockerignore`` is read as docker/cli 20.10's ``dockerignore.ReadAll`` (``#`` comments at the start of a line,
  patterns trimmed, cleaned, taken relative to the context) and matched as moby 20.10's
  ``fileutils.PatternMatcher``: a pattern is a regular expression (``*`` and ``?`` stop at ``/``, ``**`` crosses
  it), it matches a path or the first as-many components of its parent, ``!`` makes an exception, the last matching
  line wins.
- The client's walk (``archive.TarWithOptions``) skips an excluded directory, unless an exception pattern starts
  with its path: then it walks into it and sends only what is not excluded (the daemon re-creates the directory,
  0755, when it unpacks its contents).
- The Dockerfile and ``.dockerignore`` are always sent (``TrimBuildFilesFromExcludes``), and the daemon deletes
  them before the build when ``.dockerignore`` excludes them (``remotecontext.removeDockerfile``): COPY never
  sees them then.
- The COPY/ADD hash in the history (``file:…``, ``dir:…``) is the daemon's: the tarsum (version 1) of each entry as
  the client sent it (name, mode with its file-type bits, uid/gid 0, size, type, link name, device numbers and
  ``security.capability``; no mtime), symlinks hashed as what they point to (``builder/remotecontext``).

The files are read through file descriptors below the root with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)``: a symlink in the context is copied as a symlink, never followed out of it.
"""

from __future__ import annotations

import functools
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
_MAX_LINKS = 255  # moby pkg/symlink: more links than this on one path is an error


class ContextError(Exception):
    """The context cannot be read as Docker reads it, or a COPY/ADD source is not in it; the message is Docker's."""


def _clean(path: str) -> str:
    """Go's ``filepath.Clean`` (``posixpath.normpath`` keeps a leading ``//``)."""
    cleaned = posixpath.normpath(path) if path else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as moby 20.10's ``fileutils.Pattern.compile`` turns it into a regular expression:
    ``*`` and ``?`` stop at ``/``, ``**`` (and ``**/``) match any number of components, ``\\`` escapes the next
    character, and every other character is taken as the regular expression's own. Raises ContextError on a
    pattern Go's ``filepath.Match`` or ``regexp`` refuses."""
    glob_regex(pattern)  # Go checks the pattern with filepath.Match first
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*" and pattern.startswith("*", i):
            i += 1 + pattern.startswith("/", i + 1)
            out.append(".*" if i >= len(pattern) else "(?:.*/)?")
        elif c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c in ".$":
            out.append("\\" + c)
        elif c == "\\":
            out.append("\\" + (pattern[i] if i < len(pattern) else "\\"))
            i += 1
        else:
            out.append(c)
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise ContextError(f"syntax error in pattern: {pattern}") from exc


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's ``filepath.Match`` as a regular expression (``*``, ``?``, ``[...]`` with ``^`` negation, ``\\``
    escapes; nothing crosses ``/``): how the classic builder matches a COPY/ADD source with wildcards.
    Raises ContextError on a pattern Go refuses (a class not closed or empty, a trailing ``\\``)."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        i += 1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            negate = pattern.startswith("^", i)
            i += negate
            body = []
            while i < len(pattern) and pattern[i] != "]":
                i += pattern[i] == "\\"
                if i >= len(pattern):
                    break
                body.append("-" if pattern[i] == "-" else re.escape(pattern[i]))
                i += 1
            if i >= len(pattern) or not body:
                raise ContextError(f"syntax error in pattern: {pattern}")
            out.append("[" + "^" * negate + "".join(body) + "]")
            i += 1
        elif c == "\\":
            if i >= len(pattern):
                raise ContextError(f"syntax error in pattern: {pattern}")
            out.append(re.escape(pattern[i]))
            i += 1
        else:
            out.append(re.escape(c))
    try:
        return re.compile("".join(out))
    except re.error as exc:  # a range out of order
        raise ContextError(f"syntax error in pattern: {pattern}") from exc


def has_wildcards(path: str) -> bool:
    """The classic builder's ``containsWildcards``: an unescaped ``*``, ``?`` or ``[``."""
    return re.search(r"(?<!\\)(?:\\\\)*[*?\[]", path) is not None


@dataclass(frozen=True)
class _Pattern:
    text: str  # cleaned, without its "!"
    regex: re.Pattern[str]
    dirs: int  # how many path components the pattern has
    exception: bool


class Ignore:
    """The patterns of a ``.dockerignore`` (``text``); raises ContextError on a bad pattern."""

    def __init__(self, text: str, extra: tuple[str, ...] = ()) -> None:
        self.patterns: list[_Pattern] = []
        for n, raw in enumerate(text.split("\n")):  # Go's bufio.ScanLines: "\n", a "\r" before it dropped
            line = raw.removeprefix("\ufeff") if n == 0 else raw
            line = line.removesuffix("\r")
            if line.startswith("#") or not line.strip():
                continue
            self.add(line.strip())
        for line in extra:
            self.add(line)

    def add(self, line: str) -> None:
        """One pattern, ``!`` for an exception."""
        exception = line.startswith("!")
        text = line[1:].strip() if exception else line
        if not text:
            raise ContextError('illegal exclusion pattern: "!"')
        text = _clean(text)
        text = text[1:] if len(text) > 1 and text.startswith("/") else text
        self.patterns.append(_Pattern(text, pattern_regex(text), text.count("/") + 1, exception))

    def excludes(self, rel: str) -> bool:
        """Whether the context path ``rel`` is excluded (``PatternMatcher.Matches``): the last pattern that matches
        ``rel``, or the first as-many components of its parent directory as the pattern has, decides."""
        parent = posixpath.dirname(rel)
        parents = parent.split("/") if parent else []
        excluded = False
        for p in self.patterns:
            match = p.regex.fullmatch(rel) is not None
            if not match and parents and p.dirs <= len(parents):
                match = p.regex.fullmatch("/".join(parents[: p.dirs])) is not None
            if match:
                excluded = not p.exception
        return excluded

    def walks_into(self, rel: str) -> bool:
        """Whether the client still walks into the excluded directory ``rel``: an exception starts with its path."""
        return any(p.exception and (p.text + "/").startswith(rel + "/") for p in self.patterns)


@dataclass(frozen=True)
class Entry:
    """One path of the context as the daemon unpacks it. ``st`` is None for a directory the client did not send
    but the daemon created for what it holds; ``link`` is the earlier name of a hard link (sent as a link)."""

    st: os.stat_result | None
    link: str = ""

    @property
    def is_dir(self) -> bool:
        """Whether the entry is a directory (a re-created one too)."""
        return self.st is None or stat.S_ISDIR(self.st.st_mode)


class Context:
    """The build context at ``root``; ``dockerfile`` is the Dockerfile's path in it ("" when outside).

    ``image=True``: an image's root filesystem (``COPY --from``): no ``.dockerignore``, and the files hashed as the
    daemon hashes an image's (``remotecontext.lazySource``: their own owners, names looked up on this host).
    Raises ContextError when ``root`` is not a directory or ``.dockerignore`` has a bad pattern.
    """

    def __init__(self, root: str, dockerfile: str, *, image: bool = False) -> None:
        if not os.path.isdir(root):
            raise ContextError(f"unable to prepare context: path '{root}' is not a directory")
        self.root = os.path.abspath(root)
        self.dockerfile = dockerfile
        text = ""
        self.image = image
        if not image:
            try:
                with open(os.path.join(self.root, DOCKERIGNORE), encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except FileNotFoundError:
                pass
        self.ignore = Ignore(text)
        # The client sends the Dockerfile and .dockerignore even when excluded: exceptions added after the rest.
        kept = [name for name in (DOCKERIGNORE, dockerfile) if name and self.ignore.excludes(name)]
        self.sending = Ignore(text, tuple(f"!{name}" for name in kept))
        self.removed = set(kept)  # ...and the daemon deletes them before the build
        self.fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        """Close the context's root fd (a copy in progress needs it open)."""
        os.close(self.fd)

    @functools.cached_property
    def sent(self) -> list[tuple[str, os.stat_result, str]]:
        """What the client sends, as it walks (lexical, depth first; an excluded directory skipped unless an exception
        starts with it): path, lstat, and for a second name of a hard link, its first name (sent as a link)."""
        sent = []
        inodes: dict[int, str] = {}
        for rel, st in self._walk(""):
            first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else rel
            sent.append((rel, st, "" if first == rel else first))
        return sent

    def _walk(self, below: str) -> Iterator[tuple[str, os.stat_result]]:
        """Path and lstat of what the client sends below ``below`` (``archive.TarWithOptions``'s walk)."""
        for name in sorted(os.listdir(os.path.join(self.root, below) if below else self.root)):
            rel = f"{below}/{name}" if below else name
            st = os.lstat(os.path.join(self.root, rel))
            if not self.sending.excludes(rel):
                yield rel, st
            elif not stat.S_ISDIR(st.st_mode) or not self.sending.walks_into(rel):
                continue
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk(rel)

    @functools.cached_property
    def tree(self) -> dict[str, Entry]:
        """The context as the daemon has it, by path relative to the root, in walk order (the root is not in it)."""
        tree: dict[str, Entry] = {}
        for rel, st, link in self.sent:
            missing = []  # unpacking creates the parents the client did not send
            parent = posixpath.dirname(rel)
            while parent and parent not in tree:
                missing.append(parent)
                parent = posixpath.dirname(parent)
            tree.update((name, Entry(None)) for name in reversed(missing))
            tree[rel] = Entry(st, link)
        for name in self.removed:
            tree.pop(name, None)
        return tree

    def below(self, rel: str) -> list[str]:
        """The paths of the tree below the directory ``rel`` ("" for the root), in walk order."""
        prefix = rel + "/" if rel else ""
        return [p for p in self.tree if p.startswith(prefix)]

    def transfer_size(self) -> int:
        """The bytes of the context as the client sends it: a tar, uid/gid 0, ending in 1024 zeros."""
        total = len(archive.TRAILER)
        for rel, st, link in self.sent:
            kind = tarfile.LNKTYPE if link else tarfile.REGTYPE
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and not link):
                kind = tarfile.DIRTYPE if stat.S_ISDIR(st.st_mode) else tarfile.SYMTYPE
            info = archive.tar_info(rel + "/" if kind == tarfile.DIRTYPE else rel, st, kind)
            info.uid = info.gid = 0
            if kind == tarfile.SYMTYPE:
                info.linkname = os.readlink(os.path.join(self.root, rel))
            info.linkname = link or info.linkname
            size = st.st_size if kind == tarfile.REGTYPE else 0
            total += len(archive.header(info)) + size + (-size % archive.BLOCK)
        return total

    def sources(self, pattern: str, keyword: str) -> list[str]:
        """The paths a COPY/ADD source names, relative to the root ("" for the root itself), as the classic builder
        finds them (``copier.calcCopyInfo``): with wildcards, every path of the tree that Go's ``filepath.Match``
        matches, in walk order; else the path itself, which must exist after symlinks (followed inside the context).
        Raises ContextError when nothing is found (Docker's words for a glob and for a path differ) or the path
        leaves the context."""
        cleaned = _clean(pattern).lstrip("/")
        if cleaned == ".." or cleaned.startswith("../"):
            raise ContextError(f"{keyword} failed: forbidden path outside the build context: {pattern} ()")
        if has_wildcards(pattern):
            origin = pattern[1:] if len(pattern) > 1 and pattern.startswith("/") else pattern
            regex = glob_regex(origin.removeprefix("./"))
            found = [rel for rel in self.tree if regex.fullmatch(rel)]
        else:
            rel = "" if cleaned == "." else cleaned
            found = [rel] if self.resolve(rel) is not None else []
        if not found and has_wildcards(pattern):
            raise ContextError(f"{keyword} failed: no source files were specified")
        if not found:
            raise ContextError(f"{keyword} failed: file not found in build context or excluded by .dockerignore: "
                               f"stat {pattern}: file does not exist")  # fmt: skip
        return found

    def follow(self, rel: str) -> str:
        """``rel`` with its symlinks followed inside the tree ("" for the root): an absolute target is taken from
        the root, ``..`` stops there, a missing component is kept as it is (moby ``symlink.FollowSymlinkInScope``).
        Raises ContextError after 255 links."""
        todo = rel.split("/")[::-1]
        done: list[str] = []
        links = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                done = done[:-1]
                continue
            path = "/".join([*done, name])
            entry = self.tree.get(path)
            if entry is None or entry.st is None or not stat.S_ISLNK(entry.st.st_mode):
                done.append(name)
                continue
            links += 1
            if links > _MAX_LINKS:
                raise ContextError(f"too many links in {rel}")
            target = os.readlink(path, dir_fd=self.fd)  # also after a chroot (copy.py)
            done = [] if target.startswith("/") else done
            todo.extend(target.split("/")[::-1])
        return "/".join(done)

    def resolve(self, rel: str) -> str | None:
        """:meth:`follow`, or None when that is not in the tree."""
        resolved = self.follow(rel)
        return resolved if not resolved or resolved in self.tree else None

    def digest(self, rel: str) -> str:
        """The source ``rel``'s hash in the classic builder's history and cache key (``copier.calcCopyInfo``):
        ``file:<tarsum>``, or ``dir:<sha256>`` of the sorted hashes of the directory and of every path below it
        (the root itself is not hashed). Raises ContextError when ``rel`` does not resolve to a path of the tree."""
        resolved = self.resolve(rel)
        if resolved is None:
            raise ContextError(f"file not found in build context or excluded by .dockerignore: stat {rel}")
        if resolved and not self.tree[resolved].is_dir:
            return f"file:{self._hash(rel)}"
        hashes = [self._hash(path) for path in ([resolved] if resolved else []) + self.below(resolved)]
        return "dir:" + hashlib.sha256(",".join(sorted(hashes)).encode()).hexdigest()

    def _hash(self, rel: str) -> str:
        """The tarsum of the entry ``rel`` resolves to. When that was not sent (a dangling symlink, the root, a
        directory the daemon made for what was sent below it), ``rel`` itself (``archiveContext.Hash``); for an
        image, the path it resolves to, the root being hashed as ``./`` (``lazySource.Hash``)."""
        target = self.follow(rel)
        entry = self.tree.get(target)
        if self.image:
            return self._tarsum(target) if entry is not None or not target else target
        return rel if entry is None or entry.st is None else self._tarsum(target, entry.link)

    def _tarsum(self, rel: str, link: str = "") -> str:
        """The tarsum v1 of the entry ``rel`` ("" for the root; ``link``: the earlier name of a hard link) as
        ``pkg/tarsum`` hashes the header the client sent (uid/gid 0, no user names), or for an image as
        ``remotecontext.NewFileHash`` does (its own owners and their names here): the selected header fields,
        then the data."""
        st = os.stat(rel or ".", dir_fd=self.fd, follow_symlinks=False)
        mode, size, kind, linkname = st.st_mode, 0, "0", link
        if link:
            kind = "1"
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
        else:
            kind = {stat.S_IFDIR: "5", stat.S_IFLNK: "2", stat.S_IFCHR: "3", stat.S_IFBLK: "4"}.get(
                stat.S_IFMT(mode), "6"
            )
        if kind == "2":
            linkname = os.readlink(rel, dir_fd=self.fd)
        device = kind in ("3", "4")
        major, minor = (os.major(st.st_rdev), os.minor(st.st_rdev)) if device else (0, 0)
        name = (rel or ".") + "/" if kind == "5" else rel
        owner = f"uid{st.st_uid}gid{st.st_gid}" if self.image else "uid0gid0"
        names = (
            f"uname{archive.user_name(st.st_uid)}gname{archive.group_name(st.st_gid)}" if self.image else "unamegname"
        )
        h = hashlib.sha256(
            f"name{name}mode{mode}{owner}size{size}typeflag{kind}linkname{linkname}{names}"
            f"devmajor{major}devminor{minor}".encode("utf-8", "surrogateescape")
        )
        try:
            capability = os.getxattr(os.path.join(self.root, rel), archive.CAPABILITY, follow_symlinks=False)
            h.update(archive.CAPABILITY.encode() + capability)
        except OSError:
            pass
        if size:
            fd = realfs.openat2(self.fd, rel, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        return h.hexdigest()
