"""COPY and ADD: files from a source tree into an image's root, as the classic builder copies them.

This runs inside the step's root (after ``chroot``, see
:func:`pylayerfs.image.sandbox.call`), so the destination resolves the way the image
sees it: its symlinks, even absolute ones, stay inside the image. The source is a
:class:`~pylayerfs.image.builder.context.Context` (the build context, or another stage's
root): only what its tree holds is copied, so nothing ``.dockerignore`` excludes ever
reaches the image, however it is named (a file, a directory, a glob, ``.``). Its files
are reached only through the directory fd opened before the ``chroot``, with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``: a symlink inside a copied directory
is copied as a symlink and never followed; a source named by the step is what it
resolves to inside the tree (:meth:`Context.resolve`).

Rules (moby 20.10 ``builder/dockerfile/copy.go``, ``copy_unix.go``, ``pkg/idtools``):
a directory source copies its contents; its destination, when the copy creates it,
belongs to the ``--chown`` owner, and the missing parents above it to root. A file goes
to ``dest/<name>`` when the destination ends with ``/`` or is an existing directory,
else to ``dest``; the parents the copy creates for it belong to the ``--chown`` owner.
New directories are 0755; copied entries keep their mode and mtime and belong to 0:0
unless ``--chown``; hard links between copied files stay links. ADD extracts a local tar
archive (plain or compressed) into the destination directory, owners from the archive.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import stat
from dataclasses import dataclass

from pylayerfs.image import archive
from pylayerfs.image.builder.context import Context
from pylayerfs.image.sandbox import SandboxError
from pylayerfs.overlay import realfs


@dataclass(frozen=True)
class CopyJob:
    sources: list[str]  # paths of the source's tree ("" is its root), as Context.sources gives them
    dest: str  # absolute in the image; a trailing "/" means "into this directory"
    owner: str | None = None  # --chown
    extract: bool = False  # ADD


def copy_into_root(source: Context, job: CopyJob) -> None:
    """Carry out ``job`` (in the image's root) from ``source``'s tree.

    Raises OSError (ENOTDIR when a parent in the image is a file...) and SandboxError for an unknown ``--chown``.
    """
    uid, gid = chown_ids(job.owner) if job.owner else (0, 0)
    for rel in job.sources:
        resolved = source.resolve(rel)
        if resolved is None:
            raise FileNotFoundError(f"file not found in build context or excluded by .dockerignore: stat {rel}")
        if not resolved or source.tree[resolved].is_dir:
            dest = job.dest.rstrip("/") or "/"
            _make_dirs(os.path.dirname(dest), 0, 0)
            _make_dirs(dest, uid, gid)
            _copy_tree(source, resolved, dest, uid, gid)
            continue
        parent_rel, _, name = resolved.rpartition("/")
        parent = realfs.openat2(source.fd, parent_rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if job.extract and stat.S_ISREG(st.st_mode) and _extract(parent, name, job.dest):
                continue
            target = job.dest
            if job.dest.endswith("/") or os.path.isdir(job.dest):
                target = os.path.join(job.dest, posixpath.basename(rel))  # the name the step gave
            _make_dirs(os.path.dirname(target) or "/", uid, gid)
            _copy_entry(parent, name, st, target, uid, gid)
        finally:
            os.close(parent)


def chown_ids(owner: str) -> tuple[int, int]:
    """uid and gid of a ``--chown`` value, read in the current root, as moby 20.10's ``parseChownFlag``
    (builder/dockerfile/internals_linux.go): ``user[:group]``, each a number or a name looked up in /etc/passwd,
    /etc/group. Without a group the user's text names the group too: ``--chown=u2`` is u2's uid and the gid of the
    GROUP named u2 (not u2's primary group), ``--chown=1500`` is 1500:1500. Raises SandboxError in moby's words
    (``unable to convert uid/gid chown string to host mapping: can't find gid for group u2: no such group: u2``)."""
    parts = owner.split(":")
    try:
        if len(parts) > 2:
            raise SandboxError(f"invalid chown string format: {owner}")
        return _lookup(parts[0], "/etc/passwd", "uid for user"), _lookup(parts[-1], "/etc/group", "gid for group")
    except SandboxError as exc:  # moby's performCopy wraps it so
        raise SandboxError(f"unable to convert uid/gid chown string to host mapping: {exc}") from None


def _lookup(name: str, path: str, what: str) -> int:
    """``lookupUser``/``lookupGroup``: a number (Go's ``strconv.Atoi``) as it is, else the id (third field) of the
    first entry of that name in ``path`` (runc's ``ParsePasswdFileFilter``)."""
    if re.fullmatch(r"[+-]?[0-9]+", name):
        return int(name)
    kind = "user" if path == "/etc/passwd" else "group"
    try:
        with open(path, errors="replace") as f:
            fields = [line.strip().split(":") for line in f]
    except OSError as exc:
        raise SandboxError(f"can't find {what} {name}: open {path}: {os.strerror(exc.errno or 0).lower()}") from exc
    ids = [f[2] if len(f) > 2 else "" for f in fields if f[0] == name and name]
    if not ids:
        raise SandboxError(f"can't find {what} {name}: no such {kind}: {name}")
    return int(ids[0]) if ids[0].isdigit() else 0


def _make_dirs(path: str, uid: int, gid: int) -> None:
    """Create ``path`` and its missing parents, 0755 and owned by ``uid:gid`` (``idtools.MkdirAllAndChownNew``).

    ``path`` is resolved first (moby: ``FollowSymlinkInScope``): a symlink of the image whose target does not exist
    yet (``/evil -> /tmp/x/y``) gets its target created. This runs in the step's root, so the resolution never
    leaves the image."""
    missing = []
    path = os.path.realpath(path)
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory, 0o755)
        os.chmod(directory, 0o755)
        os.chown(directory, uid, gid)


def _extract(parent: int, name: str, dest: str) -> bool:
    fd = realfs.openat2(parent, name, os.O_RDONLY)
    try:
        if not archive.is_archive(fd):
            return False
        os.lseek(fd, 0, os.SEEK_SET)
        _make_dirs(dest, 0, 0)
        with os.fdopen(os.dup(fd), "rb") as f, archive.open_archive(f, name) as tar:
            archive.extract(tar, dest, merged=True)
        return True
    finally:
        os.close(fd)


def _copy_tree(source: Context, top: str, dest: str, uid: int, gid: int) -> None:
    """Copy what the tree holds below ``top`` ("" for the root) into the directory ``dest``."""
    links: dict[int, str] = {}  # inode -> where its first name was copied
    times: list[tuple[str, int]] = []  # directories' mtimes, set once their contents are copied
    for rel in source.below(top):
        target = os.path.join(dest, rel[len(top) :].lstrip("/"))
        entry = source.tree[rel]
        if entry.st is None:  # a directory the daemon made (0755) for what was sent below it
            if _replace(target, None) is None:
                os.mkdir(target, 0o755)
                os.chmod(target, 0o755)
            os.chown(target, uid, gid)
            continue
        parent_rel, _, name = rel.rpartition("/")
        parent = realfs.openat2(source.fd, parent_rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            first = links.setdefault(st.st_ino, target) if st.st_nlink > 1 and not entry.is_dir else target
            if first != target:
                _replace(target, st)
                os.link(first, target, follow_symlinks=False)
            else:
                _copy_entry(parent, name, st, target, uid, gid)
            if entry.is_dir:
                times.append((target, st.st_mtime_ns))
        finally:
            os.close(parent)
    for directory, mtime in reversed(times):
        os.utime(directory, ns=(mtime, mtime))


def _replace(target: str, st: os.stat_result | None) -> os.stat_result | None:
    """Remove what is at ``target`` unless both it and the entry ``st`` (None: a directory) are directories;
    return what stays there."""
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(target)
    if existing is None or (stat.S_ISDIR(existing.st_mode) and (st is None or stat.S_ISDIR(st.st_mode))):
        return existing
    if stat.S_ISDIR(existing.st_mode):
        shutil.rmtree(target)
    else:
        os.unlink(target)
    return None


def _copy_entry(src: int, name: str, st: os.stat_result, target: str, uid: int, gid: int) -> None:
    """Copy the entry ``name`` of the directory fd ``src`` (``st``: its lstat) to ``target``, owned by ``uid:gid``
    (a directory's mtime is left to the caller)."""
    existing = _replace(target, st)
    if stat.S_ISDIR(st.st_mode):
        if existing is None:
            os.mkdir(target, 0o755)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src), target)
    elif stat.S_ISREG(st.st_mode):
        fd = realfs.openat2(src, name, os.O_RDONLY)
        with os.fdopen(fd, "rb") as fin, open(target, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    else:
        os.mknod(target, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
    os.chown(target, uid, gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))
    if not stat.S_ISDIR(st.st_mode):  # a directory's, once its contents are there (_copy_tree)
        os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
