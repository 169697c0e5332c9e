"""The vfs storage driver: every layer and every container a full copy of the files below it.

As Docker's vfs driver (``/var/lib/docker/vfs/dir/<id>``), no overlay at all:

* a layer's tree ``vfs/dir/<cache-id>`` is its parent's tree copied, with the
  layer's diff applied (whiteouts remove, opaque directories empty first);
  it is made the first time something stands on the layer;
* a container (or a build step) gets ``vfs/dir/<id>-init``, a copy of the
  image's tree with the init layer's files written in, and ``vfs/dir/<id>``,
  a copy of that, in which the command runs (chrooted, like any other);
* what it changed is the *naive diff* (moby's ``ChangesDirs``) of ``<id>``
  against ``<id>-init``, written in the overlayfs on-disk form: changed and
  new entries copied, deleted ones as whiteouts. A build step's diff is its
  layer, so an image is the same image (same DiffIDs) whichever driver built
  it; only the disk cost differs, which ``system df`` shows.

Every walk goes through directory fds and never follows a symlink, so no
name or link in an image can make the driver read or write outside the store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator

from pylayerfs.image import sandbox
from pylayerfs.image.sizes import layer_size
from pylayerfs.image.store import Store
from pylayerfs.image.store.layers import random_id
from pylayerfs.overlay.copy_up import copy_data
from pylayerfs.overlay.markers import Markers, is_metacopy_file, is_whiteout, make_whiteout
from pylayerfs.overlay.realfs import fd_path

INIT = "-init"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_MARKERS = Markers()


def copy_tree(source: str, dest: str) -> None:
    """A full copy: owners, modes, times, xattrs, hard links, special files (``cp -a``, which never follows links)."""
    subprocess.run(["cp", "-a", "--preserve=all", f"{source}/.", dest], check=True, capture_output=True)


def layer_tree(store: Store, chain: str | None) -> str | None:
    """``vfs/dir/<cache-id>``: the whole filesystem up to the layer ``chain`` (made on first use)."""
    if chain is None:
        return None
    layer = store.layers.get(chain)
    path = store.layout.vfs_dir(layer.cache_id)
    if not os.path.isdir(path):
        below = layer_tree(store, layer.parent)
        with _staging(store, path) as staging:
            if below is not None:
                copy_tree(below, staging)
            apply_diff(store.layers.diff_dir(layer.cache_id), staging)
    return path


def create(store: Store, parent: str | None, name: str) -> str:
    """``vfs/dir/<name>-init`` (``parent``'s tree and the init files) and ``vfs/dir/<name>``, a copy to write in."""
    below = layer_tree(store, parent)
    with _staging(store, store.layout.vfs_dir(name + INIT)) as init:
        if below is not None:
            copy_tree(below, init)
        sandbox.call(init, lambda: sandbox.make_init_layer("/"), mounts=False)  # chrooted: links stay inside
    with _staging(store, store.layout.vfs_dir(name)) as rw:
        copy_tree(store.layout.vfs_dir(name + INIT), rw)
    return store.layout.vfs_dir(name)


@contextlib.contextmanager
def step_root(store: Store, parent: str | None, upper: str | None) -> Iterator[str]:
    """A build step's root: a full copy to write in, whose naive diff becomes ``overlay2/<upper>/diff``.

    Without ``upper``: the layer's own full tree, to read (``COPY --from``).
    """
    if upper is None:
        with tempfile.TemporaryDirectory(dir=store.layout.tmp) as empty:
            yield layer_tree(store, parent) or empty
        return
    try:
        yield create(store, parent, upper)
        changes(store, upper, store.layers.diff_dir(upper))
    finally:
        for name in (upper, upper + INIT):
            shutil.rmtree(store.layout.vfs_dir(name), ignore_errors=True)


def changes(store: Store, name: str, out: str) -> None:
    """Write into ``out`` what was changed in ``vfs/dir/<name>`` since :func:`create`."""
    naive_diff(store.layout.vfs_dir(name + INIT), store.layout.vfs_dir(name), out)


@contextlib.contextmanager
def changes_dir(store: Store, name: str) -> Iterator[str]:
    """:func:`changes` in a temporary directory of the store, for the ``with`` block."""
    out = os.path.join(store.layout.tmp, f"changes-{random_id()}")
    os.mkdir(out, 0o755)
    try:
        changes(store, name, out)
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def _staging(store: Store, path: str) -> Iterator[str]:
    """A directory in ``tmp/`` that becomes ``path`` by rename at the end of the block (if nobody made it first)."""
    staging = os.path.join(store.layout.tmp, f"vfs-{random_id()}")
    os.mkdir(staging, 0o755)
    try:
        yield staging
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        try:
            os.rename(staging, path)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the naive diff ---------------------------------------------------------------------------


def naive_diff(base: str, new: str, out: str) -> None:
    """moby's naive diff of ``new`` against ``base``, written into ``out`` in the overlayfs form."""
    with _open(base) as b, _open(new) as n, _open(out) as o:
        _Copier(o).diff(b, n, o)


def apply_diff(diff: str, tree: str) -> None:
    """Apply the overlayfs-form ``diff`` to ``tree``, as the layer's mount would show it over ``tree``."""
    with _open(diff) as d, _open(tree) as t:
        _Copier(t).apply(d, t)
        _set_meta(d, t, os.fstat(d))


@contextlib.contextmanager
def _open(path: str, dirfd: int | None = None, flags: int = _DIR) -> Iterator[int]:
    """An fd on ``path`` (a directory by default), never through a symlink at its last component."""
    fd = os.open(path, flags, 0o600, dir_fd=dirfd)  # the mode only for O_CREAT; metadata come after
    try:
        yield fd
    finally:
        os.close(fd)


def _changed(before: os.stat_result, after: os.stat_result, old: str | None, new: str | None) -> bool:
    """moby's changes.go: mode, owner or rdev differ; for non-directories also size, mtime or link target."""
    if (before.st_mode, before.st_uid, before.st_gid, before.st_rdev) != (
        after.st_mode, after.st_uid, after.st_gid, after.st_rdev
    ):  # fmt: skip
        return True
    if stat.S_ISDIR(after.st_mode):
        return False
    if old != new:
        return True
    a, b = before.st_mtime_ns, after.st_mtime_ns
    same_time = a == b or (a // 10**9 == b // 10**9 and (a % 10**9 == 0 or b % 10**9 == 0))
    return before.st_size != after.st_size or not same_time


def _lstat(dirfd: int | None, name: str) -> os.stat_result | None:
    if dirfd is None:
        return None
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _link_target(dirfd: int | None, name: str, st: os.stat_result | None) -> str | None:
    return os.readlink(name, dir_fd=dirfd) if st is not None and stat.S_ISLNK(st.st_mode) else None


def _remove(dirfd: int, name: str) -> None:
    st = _lstat(dirfd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def _set_meta(src: int, dst: int, st: os.stat_result) -> None:
    """Owner, mode, xattrs (not overlay's own) and times of the open object ``src`` onto ``dst``."""
    os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for attr in os.listxattr(src):
        if not _MARKERS.is_private(attr):
            os.setxattr(dst, attr, os.getxattr(src, attr))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


class _Copier:
    """Copies entries between trees by directory fd; hard links among them stay hard links."""

    def __init__(self, root: int) -> None:
        self.root = root  # the destination tree's root
        self.links: dict[tuple[int, int], str] = {}

    def diff(self, base: int | None, new: int, out: int, rel: str = "") -> bool:
        """Fill ``out`` with what ``new`` changed against ``base``; whether anything was written."""
        wrote = False
        names = sorted(os.listdir(new))
        for name in names:
            st = os.stat(name, dir_fd=new, follow_symlinks=False)
            before = _lstat(base, name)
            if stat.S_ISDIR(st.st_mode):
                merge = before is not None and stat.S_ISDIR(before.st_mode)
                os.mkdir(name, 0o700, dir_fd=out)
                with _open(name, new) as sub_new, _open(name, out) as sub_out:
                    with _open(name, base) if merge and base is not None else contextlib.nullcontext() as sub_base:
                        below = self.diff(sub_base, sub_new, sub_out, f"{rel}{name}/")
                    if merge and not below and before is not None and not _changed(before, st, None, None):
                        os.rmdir(name, dir_fd=out)
                        continue
                    _set_meta(sub_new, sub_out, st)
                wrote = True
            elif before is None or _changed(before, st, _link_target(base, name, before), _link_target(new, name, st)):
                self.copy(new, out, name, st, rel)
                wrote = True
        for name in sorted(set(os.listdir(base) if base is not None else ()) - set(names)):
            make_whiteout(out, name)
            wrote = True
        return wrote

    def apply(self, diff: int, tree: int, rel: str = "") -> None:
        for name in sorted(os.listdir(diff)):
            st = os.stat(name, dir_fd=diff, follow_symlinks=False)
            if is_whiteout(st) or _MARKERS.is_xattr_whiteout(diff, name):
                _remove(tree, name)
                continue
            existing = _lstat(tree, name)
            if existing is not None and stat.S_ISREG(existing.st_mode) and is_metacopy_file(fd_path(diff, name), st):
                with _open(name, diff, _FILE) as source, _open(name, tree, _FILE) as target:
                    _set_meta(source, target, st)  # metadata only: the data in the tree stays
                continue
            if not stat.S_ISDIR(st.st_mode):
                _remove(tree, name)
                self.copy(diff, tree, name, st, rel)
                continue
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                _remove(tree, name)
                os.mkdir(name, 0o700, dir_fd=tree)
            with _open(name, diff) as sub_diff, _open(name, tree) as sub_tree:
                if _MARKERS.is_opaque(sub_diff):
                    for child in os.listdir(sub_tree):
                        _remove(sub_tree, child)
                self.apply(sub_diff, sub_tree, f"{rel}{name}/")
                _set_meta(sub_diff, sub_tree, st)

    def copy(self, src: int, dst: int, name: str, st: os.stat_result, rel: str) -> None:
        """Copy the non-directory ``name`` from ``src`` into ``dst`` (``rel`` is ``dst`` below the root)."""
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(self.links[key], name, src_dir_fd=self.root, dst_dir_fd=dst, follow_symlinks=False)
            return
        if stat.S_ISREG(st.st_mode):
            create = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            with _open(name, src, _FILE) as source, _open(name, dst, create) as target:
                copy_data(source, target, st.st_size)
                _set_meta(source, target, st)
        else:  # a symlink, FIFO, socket or device: by name (ours, just made), never followed
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            else:
                os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=dst)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)
        if st.st_nlink > 1:
            self.links[key] = rel + name


def disk_usage(store: Store) -> int:
    """Bytes under ``vfs/dir`` (every full copy), counted as ``directory.Size``."""
    return layer_size(store.layout.vfs_dir()) if os.path.isdir(store.layout.vfs_dir()) else 0
