"""Layer tars: writing a layer's diff directory as the tar Docker hashes, and extracting tars safely.

A layer's **DiffID** is the sha256 of its uncompressed tar. pylayerfs writes
that tar the way moby's overlay2 driver does (go-archive, ``ConvertWrite``):

* entries in lexical walk order, names relative without ``./``, directories
  with a trailing ``/``, the layer's root itself left out;
* numeric uid/gid, empty uname/gname, mtime in whole seconds, no atime/ctime;
  USTAR headers, PAX records only where a field does not fit, and only
  ``security.capability`` of the xattrs;
* the second name of a hard-linked file is a link entry to the first;
* a metacopy file (``metacopy=on``) holds no data: its entry carries the data
  of the file below it, read through the layers under the layer (``lowers``),
  so a layer's tar and DiffID do not depend on how the layer is stored;
* a whiteout (char device 0/0) is an empty regular file ``.wh.<name>`` (mode
  0600, its owner and mtime); an opaque directory is followed by an empty
  ``<dir>/.wh..wh..opq`` (the directory's mode and owner, mtime 0);
* the archive ends with exactly 1024 zero bytes, as Go's ``tar.Writer`` ends
  it (Python's ``tarfile`` pads to 10240, which would change every digest):
  the empty layer hashes to Docker's ``sha256:5f70bf18...``.

Extraction (``pylayerfs import``, ``ADD archive.tar``) turns ``.wh.`` entries
back into overlay whiteouts and refuses every entry that would land outside
the destination: absolute names, ``..``, hard links to outside, and any path
that goes through a symlink the archive made.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from pylayerfs.overlay import realfs
from pylayerfs.overlay.markers import (
    OPAQUE_XATTR,
    OPAQUE_YES,
    TAR_META_PREFIX,
    TAR_OPAQUE_MARKER,
    TAR_WHITEOUT_PREFIX,
    is_metacopy_file,
    is_whiteout,
    make_whiteout,
)

EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
BLOCK = 512
TRAILER = b"\0" * 1024
CAPABILITY = "security.capability"


if TYPE_CHECKING:
    from pylayerfs.overlay.filesystem import Overlay


class ArchiveError(Exception):
    """A tar that cannot be extracted safely (the message names the entry)."""


def header(info: tarfile.TarInfo) -> bytes:
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT if _fits_ustar(info) else tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _fits_ustar(info: tarfile.TarInfo) -> bool:
    try:
        info.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
    except (ValueError, UnicodeError):
        return False
    return not info.pax_headers


def tar_info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    return info


def write_layer(diff: str, out: BinaryIO, lowers: Sequence[str] = ()) -> int:
    """Write the tar of the layer directory ``diff`` (over the layers ``lowers``, top first) to ``out``.

    Returns the number of bytes.
    """
    with _DataBelow(lowers) as below:
        return _write_layer(diff, out, below)


def _write_layer(diff: str, out: BinaryIO, below: _DataBelow) -> int:
    written = 0
    links: dict[tuple[int, int], str] = {}
    for rel, st in walk(diff):
        full = os.path.join(diff, rel)
        data: BinaryIO | None = None
        if is_whiteout(st):
            head, _, name = rel.rpartition("/")
            info = tar_info(f"{head}/{TAR_WHITEOUT_PREFIX}{name}".lstrip("/"), st, tarfile.REGTYPE)
            info.mode = 0o600
        elif stat.S_ISDIR(st.st_mode):
            info = tar_info(rel + "/", st, tarfile.DIRTYPE)
        elif stat.S_ISLNK(st.st_mode):
            info = tar_info(rel, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(full)
        elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
            info = tar_info(rel, st, tarfile.LNKTYPE)
            info.linkname = links[(st.st_dev, st.st_ino)]
        elif stat.S_ISREG(st.st_mode):
            links.setdefault((st.st_dev, st.st_ino), rel)
            info = tar_info(rel, st, tarfile.REGTYPE)
            info.size = st.st_size
            data = below.open(rel) if is_metacopy_file(full, st) else open(full, "rb")  # noqa: SIM115 - closed by _emit
        else:
            kind = {stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE}.get(stat.S_IFMT(st.st_mode))
            info = tar_info(rel, st, kind or tarfile.FIFOTYPE)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        if not is_whiteout(st) and not stat.S_ISLNK(st.st_mode):
            capability = _get_xattr(full, CAPABILITY)
            if capability is not None:
                info.pax_headers = {"SCHILY.xattr." + CAPABILITY: capability.decode("latin-1")}
        written += _emit(out, info, data)
        if stat.S_ISDIR(st.st_mode) and _get_xattr(full, OPAQUE_XATTR) == OPAQUE_YES:
            marker = tar_info(f"{rel}/{TAR_OPAQUE_MARKER}", st, tarfile.REGTYPE)
            marker.mtime = 0
            written += _emit(out, marker, None)
    out.write(TRAILER)
    return written + len(TRAILER)


class _DataBelow:
    """The data of metacopy files: read through a read-only overlay of the layers below."""

    def __init__(self, lowers: Sequence[str]) -> None:
        self.lowers = list(lowers)
        self.overlay: Overlay | None = None

    def __enter__(self) -> _DataBelow:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.overlay is not None:
            self.overlay.close()

    def open(self, rel: str) -> BinaryIO:
        if not self.lowers:
            raise ArchiveError(f"{rel} is a metacopy file and no layer below holds its data")
        if self.overlay is None:
            from pylayerfs.overlay.filesystem import Overlay

            self.overlay = Overlay(self.lowers, metacopy=True)
        try:
            fh = self.overlay.open(rel, os.O_RDONLY)
        except OSError as exc:
            raise ArchiveError(f"{rel} is a metacopy file and its data cannot be read below: {exc.strerror}") from exc
        data = os.fdopen(os.dup(fh), "rb")
        self.overlay.release(fh)
        return data


def _emit(out: BinaryIO, info: tarfile.TarInfo, data: BinaryIO | None) -> int:
    head = header(info)
    out.write(head)
    if data is None:
        return len(head)
    with data:
        remaining = info.size
        while remaining:
            chunk = data.read(min(remaining, 1 << 20))
            if not chunk:
                raise ArchiveError(f"{info.name} shrank while it was being archived")
            out.write(chunk)
            remaining -= len(chunk)
    padding = -info.size % BLOCK
    out.write(b"\0" * padding)
    return len(head) + info.size + padding


def walk(root: str, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below ``root`` in lexical order, depth first (Go's filepath.Walk)."""
    for name in sorted(os.listdir(os.path.join(root, rel) if rel else root)):
        path = f"{rel}/{name}" if rel else name
        st = os.lstat(os.path.join(root, path))
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(root, path)


def _get_xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


class _Digest(io.RawIOBase):
    """A sink that hashes what is written to it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.hash.update(b)
        return len(b)


def diff_id(diff: str, lowers: Sequence[str] = ()) -> str:
    """``sha256:<hex>`` of the layer tar of ``diff`` (over ``lowers``)."""
    sink = _Digest()
    write_layer(diff, sink, lowers)  # type: ignore[arg-type]
    return "sha256:" + sink.hash.hexdigest()


# -- extraction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Extracted:
    entries: int
    whiteouts: int


def open_archive(source: BinaryIO, name: str) -> tarfile.TarFile:
    """A tar stream (plain, gzip, bzip2 or xz) for reading; ArchiveError when it is none of them."""
    try:
        return tarfile.open(fileobj=source, mode="r|*")
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"cannot read '{name}' as a tar archive: {exc}") from exc


def is_archive(fd: int) -> bool:
    """Whether the file open at ``fd`` is a (maybe compressed) tar archive, as ADD decides to extract it."""
    try:
        with os.fdopen(os.dup(fd), "rb") as f, open_archive(f, "") as tar:
            return tar.next() is not None
    except (ArchiveError, tarfile.TarError, OSError, EOFError):
        return False


def _clean(name: str) -> str:
    """The member's path relative to the destination; ArchiveError when it would leave it."""
    if name.startswith("/"):
        raise ArchiveError(f"refusing '{name}': an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"refusing '{name}': '..' would leave the layer")
    return "/".join(parts)


def extract(tar: tarfile.TarFile, dest: str) -> Extracted:
    """Extract ``tar`` into the directory ``dest`` (as root: owners, modes, devices, times kept).

    Every write goes through ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``
    from ``dest``: a path that runs through a symlink is refused, not followed.
    """
    root = os.open(dest, os.O_PATH | os.O_DIRECTORY)
    entries = whiteouts = 0
    times: list[tuple[str, int]] = []
    try:
        for member in tar:
            rel = _clean(member.name)
            if not rel:
                continue
            parent, _, name = rel.rpartition("/")
            dirfd = _ensure_dir(root, parent, member.name)
            try:
                if name == TAR_OPAQUE_MARKER:
                    os.setxattr(realfs.fd_path(dirfd), OPAQUE_XATTR, OPAQUE_YES)
                elif name.startswith(TAR_META_PREFIX):
                    continue  # AUFS metadata (.wh..wh.plnk): nothing to apply
                elif name.startswith(TAR_WHITEOUT_PREFIX):
                    if len(name) == len(TAR_WHITEOUT_PREFIX) or name[len(TAR_WHITEOUT_PREFIX) :] in (".", ".."):
                        raise ArchiveError(f"refusing '{member.name}': not a whiteout of any name")
                    _remove(dirfd, name[len(TAR_WHITEOUT_PREFIX) :])
                    make_whiteout(dirfd, name[len(TAR_WHITEOUT_PREFIX) :])
                    whiteouts += 1
                else:
                    _extract_one(tar, member, root, dirfd, name)
                    if not member.issym():
                        times.append((rel, int(member.mtime)))
                    entries += 1
            finally:
                os.close(dirfd)
        for rel, mtime in reversed(times):  # children first: a directory's mtime is set last
            os.utime(rel, (mtime, mtime), dir_fd=root, follow_symlinks=False)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"cannot extract: {exc}") from exc
    finally:
        os.close(root)
    return Extracted(entries, whiteouts)


def _ensure_dir(root: int, rel: str, member: str) -> int:
    """An fd on the directory ``rel`` below ``root``, created (0755) where missing; never via a symlink."""
    fd = os.dup(root)
    for part in rel.split("/") if rel else []:
        with contextlib.suppress(FileExistsError):
            os.mkdir(part, 0o755, dir_fd=fd)
        try:
            child = realfs.openat2(fd, part, os.O_PATH | os.O_DIRECTORY)
        except OSError as exc:
            os.close(fd)
            raise ArchiveError(
                f"refusing '{member}': '{part}' is not a directory of the layer ({exc.strerror})"
            ) from exc
        os.close(fd)
        fd = child
    return fd


def _remove(dirfd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        sub = realfs.openat2(dirfd, name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for child in os.listdir(sub):
                _remove(sub, child)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def _extract_one(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int, dirfd: int, name: str) -> None:
    existing = None
    with contextlib.suppress(FileNotFoundError):
        existing = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
        _remove(dirfd, name)
    if member.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(name, 0o700, dir_fd=dirfd)
    elif member.isreg():
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dirfd)
        with os.fdopen(fd, "wb") as out:
            source = tar.extractfile(member)
            assert source is not None
            while chunk := source.read(1 << 20):
                out.write(chunk)
    elif member.issym():
        os.symlink(member.linkname, name, dir_fd=dirfd)
    elif member.islnk():
        target = _clean(member.linkname)
        parent, _, base = target.rpartition("/")
        source_dir = _ensure_dir(root, parent, member.name)
        try:
            os.link(base, name, src_dir_fd=source_dir, dst_dir_fd=dirfd, follow_symlinks=False)
        finally:
            os.close(source_dir)
        return
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
        os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=dirfd)
    else:
        raise ArchiveError(f"refusing '{member.name}': unsupported entry type {member.type!r}")
    os.chown(name, member.uid, member.gid, dir_fd=dirfd, follow_symlinks=False)
    if not member.issym():
        os.chmod(name, member.mode & 0o7777, dir_fd=dirfd)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            os.setxattr(realfs.fd_path(dirfd, name), key[len("SCHILY.xattr.") :], value.encode("latin-1"),
                        follow_symlinks=False)  # fmt: skip
