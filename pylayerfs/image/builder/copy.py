"""COPY and ADD: files from a source tree into an image's root, as the classic builder copies them.

This runs inside the step's root (after ``chroot``, see
:func:`pylayerfs.image.sandbox.call`), so the destination resolves the way the image
sees it: its symlinks, even absolute ones, stay inside the image. The source
(the build context, or another stage's root) is reached only through a
directory fd opened before the ``chroot``, with ``openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS)``: a symlink in the source is copied as a symlink and
never followed.

Rules (moby ``copier.go``): a directory source copies its contents; a file
goes to ``dest/<name>`` when the destination ends with ``/`` or is an existing
directory, else to ``dest``; new parent directories are 0755 root; files keep
their mode and mtime and belong to 0:0 unless ``--chown``; ADD extracts a
local tar archive (plain or compressed) into the destination directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass

from pylayerfs.image import archive
from pylayerfs.image.sandbox import lookup_user
from pylayerfs.overlay import realfs


@dataclass(frozen=True)
class CopyJob:
    sources: list[str]  # relative to the source root ("" is the root itself)
    dest: str  # absolute in the image; a trailing "/" means "into this directory"
    owner: str | None = None  # --chown
    extract: bool = False  # ADD


def copy_into_root(source_root: int, job: CopyJob) -> None:
    """Carry out ``job`` (in the image's root) from the tree below the directory fd ``source_root``."""
    uid, gid = lookup_user(job.owner) if job.owner else (0, 0)
    for rel in job.sources:
        st = os.stat(rel, dir_fd=source_root, follow_symlinks=False) if rel else os.fstat(source_root)
        if stat.S_ISDIR(st.st_mode):
            _make_dirs(job.dest)
            src = realfs.openat2(source_root, rel or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                _copy_tree(src, job.dest.rstrip("/") or "/", uid, gid)
            finally:
                os.close(src)
            continue
        parent_rel, _, name = rel.rpartition("/")
        parent = realfs.openat2(source_root, parent_rel or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            if job.extract and stat.S_ISREG(st.st_mode) and _extract(parent, name, job.dest):
                continue
            target = job.dest
            if job.dest.endswith("/") or os.path.isdir(job.dest):
                target = os.path.join(job.dest, name)
            _make_dirs(os.path.dirname(target) or "/")
            _copy_entry(parent, name, st, target, uid, gid)
        finally:
            os.close(parent)


def _make_dirs(path: str) -> None:
    os.makedirs(path, 0o755, exist_ok=True)


def _extract(parent: int, name: str, dest: str) -> bool:
    fd = realfs.openat2(parent, name, os.O_RDONLY)
    try:
        if not archive.is_archive(fd):
            return False
        os.lseek(fd, 0, os.SEEK_SET)
        _make_dirs(dest)
        with os.fdopen(os.dup(fd), "rb") as f, archive.open_archive(f, name) as tar:
            archive.extract(tar, dest)
        return True
    finally:
        os.close(fd)


def _copy_tree(src: int, target: str, uid: int, gid: int) -> None:
    for name in sorted(os.listdir(src)):
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        _copy_entry(src, name, st, os.path.join(target, name), uid, gid)


def _copy_entry(src: int, name: str, st: os.stat_result, target: str, uid: int, gid: int) -> None:
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.lstat(target)
    if existing is not None and not (stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(existing.st_mode)):
        if stat.S_ISDIR(existing.st_mode):
            shutil.rmtree(target)
        else:
            os.unlink(target)
    if stat.S_ISDIR(st.st_mode):
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(target, 0o755)
        child = realfs.openat2(src, name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _copy_tree(child, target, uid, gid)
        finally:
            os.close(child)
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
    os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
