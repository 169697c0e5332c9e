"""Layer tars: writing a layer's diff directory as the tar Docker hashes, and extracting tars safely.

A layer's **DiffID** is the sha256 of its uncompressed tar. pylayerfs writes
that tar byte for byte as moby's overlay2 driver does (``pkg/archive``
``addTarFile`` with ``overlayWhiteoutConverter.ConvertWrite``, Go's
``archive/tar`` writer):

* entries in lexical walk order, names relative without ``./``, directories
  with a trailing ``/``, the layer's root itself left out, sockets skipped;
* the whole mode with its file-type bits (``0100644``, ``040755``), numeric
  uid/gid with the host's names for them (``root``), mtime in whole seconds,
  no atime/ctime, devmajor/devminor zero-filled octal; USTAR headers (a long
  name split at Go's place), PAX (Go's ``PaxHeaders.0/<name>`` header, records
  sorted) only where a field does not fit, and only ``security.capability`` of
  the xattrs;
* a later name of a multiply-linked non-directory is a link entry to the
  first; all whiteouts of a layer count as one inode, as the kernel links them
  to one shared whiteout (Linux 5.8+), so later ones carry a link name;
* a metacopy file (``metacopy=on``) holds no data: its entry carries the data
  of the file below it, read through the layers under the layer (``lowers``),
  so a layer's tar and DiffID do not depend on how the layer is stored;
* a directory the overlay renamed (a ``redirect``: ``redirect_dir=on``, or
  ``metacopy=on``, which turns it on) holds only what changed in it: a tar has
  no redirects, so its entry is followed by an opaque marker and by everything
  the merged view shows below it, as moby's naive diff would give the whole
  moved tree (its overlay2 driver uses that diff when the kernel makes
  redirects);
* a whiteout (char device 0/0) is an empty regular file ``.wh.<name>`` (mode
  0600 without type bits, its owner and mtime); an opaque directory is
  followed by an empty ``<dir>/.wh..wh..opq`` (the directory's permission
  bits and owner, mtime 0);
* the archive ends with exactly 1024 zero bytes, as Go's ``tar.Writer`` ends
  it (Python's ``tarfile`` pads to 10240, which would change every digest):
  the empty layer hashes to Docker's ``sha256:5f70bf18...``.

Extraction (``pylayerfs import``, ``ADD archive.tar``) turns ``.wh.`` entries
back into overlay whiteouts, keeps every entry's mtime (a symlink's too) and
refuses every entry that would land outside the destination: absolute names,
``..``, hard links to outside, and any path that goes through a symlink the
archive made. :func:`extract_keeping` also gives the stream's own bytes and
digest (an imported layer's DiffID is that of the tar as given).
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import functools
import grp
import gzip
import hashlib
import io
import lzma
import os
import pwd
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import zstandard

from pylayerfs.overlay import realfs
from pylayerfs.overlay.markers import (
    OPAQUE_XATTR,
    OPAQUE_YES,
    TAR_META_PREFIX,
    TAR_OPAQUE_MARKER,
    TAR_WHITEOUT_PREFIX,
    has_redirect,
    is_metacopy_file,
    is_opaque_dir,
    is_whiteout,
    make_whiteout,
)

EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
BLOCK = 512
TRAILER = b"\0" * 1024
CAPABILITY = "security.capability"
SHARED_WHITEOUT = object()  # the one inode of every whiteout in a layer (see _write_layer)


if TYPE_CHECKING:
    from pylayerfs.overlay.filesystem import Overlay
    from pylayerfs.overlay.lookup import Node


class ArchiveError(Exception):
    """A tar that cannot be extracted safely (the message names the entry)."""


def header(info: tarfile.TarInfo) -> bytes:
    """The header block(s) of ``info`` as Go's ``archive/tar`` writes them for moby (``tar.Writer.WriteHeader``).

    ``info.mode`` is the whole mode, file-type bits included (Go's ``c_ISDIR``... are the stat ``S_IF*`` values):
    ``0100644`` for a regular file. USTAR when every field fits (a long name split at the last ``/`` that leaves a
    prefix of at most 155 bytes, Go's ``splitUSTARPath``); else PAX: an extended header named
    ``<dir>/PaxHeaders.0/<base>`` (mode, uid, gid, mtime 0) with the records sorted by key, then the main header
    with the names cut to their fields and non-ASCII bytes dropped. Numbers are zero-filled octal ending in NUL
    (``devmajor``/``devminor`` included); ``info.pax_headers`` (the ``SCHILY.xattr.*`` records, latin-1 text for raw
    bytes) force PAX. Returns 512 bytes per block.
    """
    name = info.name.encode("utf-8", "surrogateescape")
    strings = {"path": name, "linkpath": info.linkname.encode("utf-8", "surrogateescape"),
               "uname": info.uname.encode("utf-8", "surrogateescape"),
               "gname": info.gname.encode("utf-8", "surrogateescape")}  # fmt: skip
    numbers = {"uid": (info.uid, 8), "gid": (info.gid, 8), "size": (info.size, 12), "mtime": (int(info.mtime), 12)}
    records = {k: v.encode("latin-1") for k, v in info.pax_headers.items()}
    ustar = not records
    for key, value in strings.items():
        if len(value) > _FIELD_SIZES[key] or not value.isascii():
            records[key] = value
            ustar = ustar and key == "path" and _split_ustar(value) is not None
    for key, (number, size) in numbers.items():
        if not _fits_octal(number, size):
            records[key] = str(number).encode()
            ustar = False
    fields = {**strings, "mode": info.mode, "type": info.type, "devmajor": info.devmajor, "devminor": info.devminor,
              **{k: n for k, (n, _) in numbers.items()}}  # fmt: skip
    if ustar:
        prefix, fields["path"] = _split_ustar(name) or (b"", name)
        return _block(fields, prefix)
    data = b"".join(_pax_record(k.encode(), v) for k, v in sorted(records.items()))
    head, _, base = name.rpartition(b"/")
    pax_name = _ascii(b"/".join(p for p in (head, b"PaxHeaders.0", base) if p))[:100].rstrip(b"/")
    pax = {"path": pax_name, "mode": 0, "uid": 0, "gid": 0, "size": len(data), "mtime": 0, "type": tarfile.XHDTYPE}
    for key, value in strings.items():
        fields[key] = _ascii(value)
    return _block(pax, b"", raw=True) + data + b"\0" * (-len(data) % BLOCK) + _block(fields, b"")


_FIELD_SIZES = {"path": 100, "linkpath": 100, "uname": 32, "gname": 32}


def _fits_octal(number: int, size: int) -> bool:
    return 0 <= number < int(8 ** (size - 1))


def _ascii(value: bytes) -> bytes:
    """Go's ``toASCII``: the bytes below 0x80 but NUL (a multi-byte rune is dropped whole)."""
    return bytes(b for b in value if 0 < b < 0x80)


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """Go's ``splitUSTARPath``: (prefix, name) split at the last ``/`` within the first 156 bytes, or None."""
    if len(name) <= 100 or not name.isascii():
        return None
    length = min(len(name), 156)
    if length == len(name) and name.endswith(b"/"):
        length -= 1
    i = name.rfind(b"/", 0, length)
    if i <= 0 or len(name) - i - 1 > 100 or len(name) - i - 1 == 0 or i > 155:
        return None
    return name[:i], name[i + 1 :]


def _pax_record(key: bytes, value: bytes) -> bytes:
    """One PAX record, ``<length> <key>=<value>\\n``, the length counting itself (Go's ``formatPAXRecord``)."""
    size = len(key) + len(value) + 3
    size += len(str(size))
    record = b"%d %s=%s\n" % (size, key, value)
    return record if len(record) == size else b"%d %s=%s\n" % (len(record), key, value)


def _block(fields: dict[str, Any], prefix: bytes, raw: bool = False) -> bytes:
    """A 512-byte USTAR header block as Go's ``formatter`` fills it; ``raw``: a PAX extended header's (V7 fields only).

    Strings are cut to their field (NUL-ended when shorter; a cut name loses a trailing ``/``), numbers are
    zero-filled octal ending in NUL (0 when they do not fit: the PAX record holds them), the checksum is six octal
    digits, NUL and a space.
    """
    block = bytearray(BLOCK)

    def string(offset: int, size: int, value: bytes) -> None:
        cut = value[:size]
        if len(value) > size and cut.endswith(b"/"):
            cut = cut.rstrip(b"/")
        block[offset : offset + len(cut)] = cut

    def octal(offset: int, size: int, number: int) -> None:
        string(offset, size, b"%0*o" % (size - 1, number if _fits_octal(number, size) else 0))

    string(0, 100, fields["path"])
    octal(100, 8, fields["mode"])
    octal(108, 8, fields["uid"])
    octal(116, 8, fields["gid"])
    octal(124, 12, fields["size"])
    octal(136, 12, fields["mtime"])
    block[156:157] = fields["type"]
    block[257:265] = b"ustar\x0000"
    if not raw:
        string(157, 100, fields["linkpath"])
        string(265, 32, fields["uname"])
        string(297, 32, fields["gname"])
        octal(329, 8, fields["devmajor"])
        octal(337, 8, fields["devminor"])
        string(345, 155, prefix)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@functools.cache
def user_name(uid: int) -> str:
    """The host's name for ``uid`` ("" when it has none), as Go's ``tar.FileInfoHeader`` looks it up for moby."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@functools.cache
def group_name(gid: int) -> str:
    """The host's name for ``gid`` ("" when it has none), as :func:`user_name`."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


def tar_info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    """The header of ``name`` as moby's ``archive.FileInfoHeader`` fills it from ``st``: the whole mode (type bits
    included), numeric ids and the host's names for them, the mtime in whole seconds."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = st.st_mode
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname, info.gname = user_name(st.st_uid), group_name(st.st_gid)
    info.mtime = int(st.st_mtime)
    return info


def write_layer(diff: str, out: BinaryIO, lowers: Sequence[str] = ()) -> int:
    """Write the tar of the layer directory ``diff`` (over the layers ``lowers``, top first) to ``out``.

    Returns the number of bytes. Raises :class:`ArchiveError` for a metacopy file whose data no layer below holds, and
    the OSError of reading the layers or writing ``out``.
    """
    with _Below(diff, lowers) as below:
        return _write_layer(below, out)


def _write_layer(below: _Below, out: BinaryIO) -> int:
    written = 0
    links: dict[object, str] = {}  # moby's SeenFiles: the first name of each multiply-linked inode
    for rel, st, full, data_path, opaque in below.entries():
        data: BinaryIO | None = None
        if stat.S_ISSOCK(st.st_mode):
            continue  # moby skips sockets ("archive: skipping ... since it is a socket")
        if stat.S_ISDIR(st.st_mode):
            info = tar_info(rel + "/", st, tarfile.DIRTYPE)
        elif stat.S_ISLNK(st.st_mode):
            info = tar_info(rel, st, tarfile.SYMTYPE)
            info.linkname = os.readlink(full)
        elif stat.S_ISREG(st.st_mode):
            info = tar_info(rel, st, tarfile.REGTYPE)
            info.size = st.st_size
        else:
            kind = {stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE}.get(stat.S_IFMT(st.st_mode))
            info = tar_info(rel, st, kind or tarfile.FIFOTYPE)
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        # The kernel links every whiteout of a mount to one shared inode (fs/overlayfs/dir.c ovl_whiteout, Linux
        # 5.8+): moby sees them as one multiply-linked file whatever made them here.
        inode: object = SHARED_WHITEOUT if is_whiteout(st) else st.st_ino
        if not stat.S_ISDIR(st.st_mode) and (st.st_nlink > 1 or inode is SHARED_WHITEOUT):
            if inode in links:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, links[inode], 0
            else:
                links[inode] = rel
        if is_whiteout(st):  # moby's overlayWhiteoutConverter.ConvertWrite, after the link check
            head, _, name = rel.rpartition("/")
            info.name = f"{head}/{TAR_WHITEOUT_PREFIX}{name}".lstrip("/")
            info.type, info.mode, info.devmajor, info.devminor = tarfile.REGTYPE, 0o600, 0, 0
        elif info.type == tarfile.REGTYPE:
            data = open(data_path, "rb")  # noqa: SIM115 - closed by _emit
        if not is_whiteout(st) and not stat.S_ISLNK(st.st_mode):
            capability = _get_xattr(full, CAPABILITY)
            if capability is not None:
                info.pax_headers = {"SCHILY.xattr." + CAPABILITY: capability.decode("latin-1")}
        written += _emit(out, info, data)
        if opaque:
            marker = tar_info(f"{rel}/{TAR_OPAQUE_MARKER}", st, tarfile.REGTYPE)
            marker.mode, marker.mtime = st.st_mode & 0o777, 0
            written += _emit(out, marker, None)
    out.write(TRAILER)
    return written + len(TRAILER)


class _Below:
    """A layer directory's entries for its tar, with what the layers below give them: a metacopy file's data, a
    renamed directory's whole tree. Both are read through a read-only overlay of the layer itself over the layers
    below it (which follows the redirects), made when first needed."""

    def __init__(self, diff: str, lowers: Sequence[str]) -> None:
        self.diff = diff
        self.lowers = list(lowers)
        self.overlay: Overlay | None = None

    def __enter__(self) -> _Below:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.overlay is not None:
            self.overlay.close()

    def entries(self, rel: str = "") -> Iterator[tuple[str, os.stat_result, str, str, bool]]:
        """``(name, lstat, real path, path of its data, followed by an opaque marker)`` of each entry, in lexical
        walk order (Go's filepath.Walk); below a renamed directory, the merged view's (:meth:`_merged`)."""
        for name in sorted(os.listdir(os.path.join(self.diff, rel) if rel else self.diff)):
            path = f"{rel}/{name}" if rel else name
            full = os.path.join(self.diff, path)
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode) and has_redirect(full):
                yield path, st, full, full, True
                yield from self._merged(path)
                continue
            data = self._data(path) if is_metacopy_file(full, st) else full
            yield path, st, full, data, stat.S_ISDIR(st.st_mode) and is_opaque_dir(full)
            if stat.S_ISDIR(st.st_mode):
                yield from self.entries(path)

    def _merged(self, rel: str) -> Iterator[tuple[str, os.stat_result, str, str, bool]]:
        """The entries of the directory ``rel`` as the merged view shows them, each from its real object."""
        from pylayerfs.overlay.readdir import merged_entries

        ov = self._node(rel)[0]
        for name in sorted(e[0] for e in merged_entries(ov, rel) if e[0] not in (".", "..")):
            path = f"{rel}/{name}"
            node = self._node(path)[1]
            layer, real = ov.top_object(node)
            full = os.path.join(layer.root, real)
            data = os.path.join(node.data.layer.root, node.data.path) if node.data is not None else full
            yield path, node.st, full, data, False
            if node.is_dir:
                yield from self._merged(path)

    def _data(self, rel: str) -> str:
        """The real path of the data of the metacopy file ``rel`` (further down, where its redirect leads)."""
        node = self._node(rel)[1]
        if node.data is None:
            raise ArchiveError(f"{rel} is a metacopy file and no layer below holds its data")
        return os.path.join(node.data.layer.root, node.data.path)

    def _node(self, rel: str) -> tuple[Overlay, Node]:
        """The overlay of the layer over the layers below, and its node at ``rel``; ArchiveError if it cannot be
        looked up (a metacopy file whose data no layer holds: EIO)."""
        if self.overlay is None:
            from pylayerfs.overlay.filesystem import Overlay

            self.overlay = Overlay([self.diff, *self.lowers], metacopy=True)
        try:
            return self.overlay, self.overlay.lookup.lookup(rel)
        except OSError as exc:
            raise ArchiveError(f"{rel} cannot be read through the layers below: {exc.strerror}") from exc


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


class _Tee(io.RawIOBase):
    """A reader of ``source`` that writes every byte it reads to ``copy`` and hashes it."""

    def __init__(self, source: io.BufferedIOBase, copy: BinaryIO) -> None:
        self.source, self.copy, self.hash = source, copy, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        """The next ``size`` bytes at most, without the copy into a buffer of ``readinto`` (tarfile reads this way)."""
        data = self.source.read(size)
        self.copy.write(data)
        self.hash.update(data)
        return data


MAGIC = {b"\x1f\x8b\x08": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def compression(head: bytes) -> str | None:
    """The compression a stream starting with ``head`` (its first 6 bytes) is in, by its magic; None: plain."""
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def _decompressed(source: BinaryIO) -> io.BufferedIOBase:
    """``source`` uncompressed: gzip, bzip2, xz or zstd by their magic (moby's ``DecompressStream``), else as it is."""
    buffered = io.BufferedReader(cast(io.RawIOBase, source))
    kind = compression(buffered.peek(6)[:6])
    if kind == "gzip":
        return gzip.GzipFile(fileobj=buffered)
    if kind == "bzip2":
        return bz2.BZ2File(buffered)
    if kind == "xz":
        return lzma.LZMAFile(buffered)
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return io.BufferedReader(cast(io.RawIOBase, reader))
    return buffered


def extract_keeping(source: BinaryIO, name: str, dest: str, copy: BinaryIO,
                    seen: Callable[[tarfile.TarInfo | None], None] | None = None) -> str:  # fmt: skip
    """Extract the (maybe compressed) tar ``source`` into ``dest`` (as :func:`extract`) and write its uncompressed
    bytes to ``copy``, every one of them: what follows the end-of-archive blocks too, as moby's layer store reads the
    stream to its end. Returns their ``sha256:<hex>``: the layer's DiffID, as ``docker import`` gives it. ``seen`` is
    called with each member before it is extracted, then with None (a
    :class:`~pylayerfs.image.store.tarsplit.Splitter` keeps the bytes as a split).

    Raises ArchiveError for a stream that is not a tar or cannot be extracted safely, OSError for ``copy``'s writes.
    """
    tee = _Tee(_decompressed(source), copy)
    try:
        with tarfile.open(fileobj=tee, mode="r|") as tar:
            extract(tar, dest, seen=seen)
        if seen is not None:
            seen(None)
        while tee.read(1 << 20):
            pass
    except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zstandard.ZstdError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"cannot read '{name}' as a tar archive: {exc}") from exc
    return "sha256:" + tee.hash.hexdigest()


def _clean(name: str) -> str:
    """The member's path relative to the destination; ArchiveError when it would leave it."""
    if name.startswith("/"):
        raise ArchiveError(f"refusing '{name}': an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"refusing '{name}': '..' would leave the layer")
    return "/".join(parts)


def extract(tar: tarfile.TarFile, dest: str, merged: bool = False,
            seen: Callable[[tarfile.TarInfo], None] | None = None) -> Extracted:  # fmt: skip
    """Extract ``tar`` into the directory ``dest`` (as root: owners, modes, devices, times kept).

    Every write goes through ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``
    from ``dest``: a path that runs through a symlink is refused, not followed.
    ``merged``: ``dest`` is in a mounted root (``ADD x.tar`` in a step), where a whiteout entry ``.wh.X`` removes X
    and ``.wh..wh..opq`` removes what the directory held before this archive, as Docker's commit of the files
    moby's ``Unpack`` leaves there gives them; the overlay records both (whiteouts in the upper layer).
    ``seen(member)`` is called before each member is applied.
    """
    root = os.open(dest, os.O_PATH | os.O_DIRECTORY)
    entries = whiteouts = 0
    times: dict[str, int] = {}  # in the order last written: a directory after what it holds
    try:
        while (member := tar.next()) is not None:
            tar.members.clear()  # type: ignore[attr-defined]  # every header read is kept (~0.5 KB): not needed here
            if seen is not None:
                seen(member)
            rel = _clean(member.name)
            if not rel:
                continue
            parent, _, name = rel.rpartition("/")
            dirfd = _ensure_dir(root, parent, member.name)
            try:
                if merged and name == TAR_OPAQUE_MARKER:
                    _clear(dirfd, {r.rpartition("/")[2] for r in times if r.rpartition("/")[0] == parent})
                elif name == TAR_OPAQUE_MARKER:
                    os.setxattr(realfs.fd_path(dirfd), OPAQUE_XATTR, OPAQUE_YES)
                elif name.startswith(TAR_META_PREFIX):
                    continue  # AUFS metadata (.wh..wh.plnk): nothing to apply
                elif name.startswith(TAR_WHITEOUT_PREFIX):
                    if len(name) == len(TAR_WHITEOUT_PREFIX) or name[len(TAR_WHITEOUT_PREFIX) :] in (".", ".."):
                        raise ArchiveError(f"refusing '{member.name}': not a whiteout of any name")
                    _remove(dirfd, name[len(TAR_WHITEOUT_PREFIX) :])
                    if not merged:
                        make_whiteout(dirfd, name[len(TAR_WHITEOUT_PREFIX) :])
                    whiteouts += 1
                else:
                    _extract_one(tar, member, root, dirfd, name)
                    times.pop(rel, None)  # a name written again takes its last member's time, in its new place
                    times[rel] = int(member.mtime)  # a symlink's too (utimensat AT_SYMLINK_NOFOLLOW)
                    entries += 1
            finally:
                os.close(dirfd)
        _set_times(root, times)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"cannot extract: {exc}") from exc
    finally:
        os.close(root)
    return Extracted(entries, whiteouts)


def _set_times(root: int, times: dict[str, int]) -> None:
    """Give each path of ``times`` (relative to ``root``) its mtime, children before their directory.

    A later member may have removed a path or put a symlink where a directory was (``d/``, ``d/f``, then ``d`` a
    symlink to a host directory): each parent is opened beneath ``root`` without following a symlink, and a path that
    is no longer there is skipped, so no time is ever set outside the layer.
    """
    parent_rel, parent_fd = None, -1
    try:
        for rel, mtime in reversed(times.items()):
            parent, _, name = rel.rpartition("/")
            if parent != parent_rel:
                if parent_fd >= 0:
                    os.close(parent_fd)
                parent_rel, parent_fd = parent, -1
                with contextlib.suppress(OSError):  # gone, or not a directory beneath root any more (ELOOP...)
                    parent_fd = realfs.openat2(root, parent or ".", os.O_PATH | os.O_DIRECTORY)
            if parent_fd >= 0:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(name, (mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)
    finally:
        if parent_fd >= 0:
            os.close(parent_fd)


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


def _clear(dirfd: int, keep: set[str]) -> None:
    """Remove what the directory ``dirfd`` holds but the names in ``keep``."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dirfd)
    try:
        for child in set(os.listdir(fd)) - keep:
            _remove(fd, child)
    finally:
        os.close(fd)


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
        try:
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=dirfd)
        except PermissionError as exc:
            raise ArchiveError(f"refusing '{member.name}': a device node needs CAP_MKNOD, which this process "
                               "lacks (a rootless context)") from exc  # fmt: skip
    else:
        raise ArchiveError(f"refusing '{member.name}': unsupported entry type {member.type!r}")
    try:
        os.chown(name, member.uid, member.gid, dir_fd=dirfd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):
            raise
        raise ArchiveError(f"cannot give '{member.name}' its owner {member.uid}:{member.gid} ({exc.strerror}): "
                           "a rootless context has no such user") from exc  # fmt: skip
    if not member.issym():
        os.chmod(name, member.mode & 0o7777, dir_fd=dirfd)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            _set_xattr(dirfd, name, member, key[len("SCHILY.xattr.") :], value.encode("latin-1"))


def _set_xattr(dirfd: int, name: str, member: tarfile.TarInfo, key: str, value: bytes) -> None:
    """Set the xattr of the entry ``name`` just extracted; a file or directory through an fd of its own, since
    ``/proc/self/fd`` is not there in a step's chroot (``ADD x.tar``); a symlink or device through that path."""
    if not (member.isreg() or member.isdir()):
        os.setxattr(realfs.fd_path(dirfd, name), key, value, follow_symlinks=False)
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if member.isdir() else 0), dir_fd=dirfd)
    try:
        os.setxattr(fd, key, value)
    finally:
        os.close(fd)
