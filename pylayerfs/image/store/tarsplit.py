"""A layer's original tar kept as a *split*: the bytes between file payloads verbatim, the payloads read from the diff.

An imported, loaded or pulled layer's DiffID is the sha256 of its tar as it came, so ``save`` and ``push`` must give
those bytes back. Keeping the whole tar costs a compression pass and a second copy of every file; moby keeps
``tar-split.json.gz`` instead (vbatts/tar-split, written by ``layer/layer_store.go`` ``applyTar``), and so does
pylayerfs, in the same file with moby's records, one JSON object a line, gzip'd:

* ``{"type": 2, "payload": "<base64>", "position": N}``: raw bytes of the tar (headers, PAX and GNU long-name
  records, padding, the end blocks and anything after them), written back as they are;
* ``{"type": 1, "name": "<path>", "size": N, "position": N}``: the payload of a regular file, ``size`` bytes read
  from ``<path>`` in the layer's diff directory (the member's name as extraction cleans it, ``./`` and ``//`` gone).

Unlike tar-split, a file record carries no crc64 of the file (``payload``): the reassembly is checked against the
layer's DiffID instead (:func:`reassemble` hashes it once, at register time). ``position`` counts the records.

A split holds only when every referenced file is still, in the diff, what its payload was: a later member of the
same tar at the same path, at a directory above it, or a whiteout of either would change it. :class:`Splitter`
watches for that as the tar streams; at the first such member it turns into a keeper of the whole tar
(``layer.tar.gz``, gzip level 1), made of the split so far (its files still intact in the diff, as the member has
not been extracted yet) and every byte after. Payloads it cannot point at (a sparse file's, a ``.wh.`` name's) stay
in the split as raw bytes. Memory stays bounded: raw bytes are written out as soon as they are known not to be
payload, payloads are never held.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Protocol, cast

from pylayerfs.overlay import realfs
from pylayerfs.overlay.markers import TAR_META_PREFIX, TAR_WHITEOUT_PREFIX

SPLIT = "tar-split.json.gz"  # in a layerdb entry: the split of the layer's own tar (this module)
WHOLE = "layer.tar.gz"  # in a layerdb entry: the layer's own tar, whole (when a split cannot hold)
SEGMENT, FILE = 2, 1  # tar-split's record types (storage.SegmentType, storage.FileType)
FLUSH = 1 << 20  # raw bytes known to be raw are written out past this many
CHUNK = 1 << 20


class Sink(Protocol):
    """Where a tar is written (a binary file, a gzip writer, a hash)."""

    def write(self, data: bytes, /) -> int:
        """Take ``data``; its length."""
        ...


class SplitError(Exception):
    """A split that does not give its tar back: a referenced file missing, of another size or type (one line)."""


@dataclass(frozen=True)
class Kept:
    """A layer's original tar as a :class:`Splitter` kept it: ``path`` (in the store's ``tmp/``) holds a split
    (``whole`` False, :data:`SPLIT`) or the gzip'd tar (``whole`` True, :data:`WHOLE`); ``diff_id`` is the sha256 of
    the tar as it streamed (``sha256:<hex>``).
    """

    path: str
    whole: bool
    diff_id: str


def _clean(name: str) -> str:
    """A member's path in the diff, as extraction cleans it (``archive._clean`` without its checks)."""
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _stored(member: tarfile.TarInfo) -> int:
    """The bytes of ``member``'s data in the stream, as tarfile skips them: a sparse file's stored regions, a regular
    (or unknown) entry's size, nothing for the others whatever their size field says."""
    if member.issparse():
        regions = cast(list[tuple[int, int]], member.sparse)  # (offset, size) pairs; typeshed says bytes
        return sum(size for _, size in regions)
    return member.size if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES else 0


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class Splitter:
    """A writer of a tar's bytes (in order, as :func:`archive.extract_keeping
    <pylayerfs.image.archive.extract_keeping>` tees them) that keeps their split at ``path``.

    ``seen(member)`` must be called with each member as its header is parsed, before it is extracted into ``diff``,
    and with None after the last one (all bytes from there on are raw). :meth:`close` gives the :class:`Kept`. Bytes
    arrive ahead of the parse (the tar reader's buffer), so those not yet known to be raw wait in ``pending``.
    Raises the OSError of writing ``path`` (and, when it turns whole, of reading ``diff``).
    """

    def __init__(self, path: str, diff: str) -> None:
        self.path, self.diff = path, diff
        self.out = gzip.GzipFile(path, "wb", compresslevel=1)
        self.whole = False
        self.received = 0  # bytes written so far
        self.pending = bytearray()  # bytes from offset `base`, not written out yet
        self.base = 0
        self.raw_until = 0  # below this offset every byte is raw
        self.skip_until = 0  # the payload being dropped ends here
        self.records = 0
        self.files: set[int] = set()  # hash() of the referenced paths (a collision only costs a needless whole tar)
        self.dirs: set[str] = set()  # the directories above them

    # -- the writer ------------------------------------------------------------------------

    def writable(self) -> bool:
        """Always: it is a writer (as io's writers say)."""
        return True

    def write(self, data: bytes) -> int:
        """Take the next bytes of the tar; returns their count."""
        n = len(data)
        if self.whole:
            self.out.write(data)
        else:
            view = memoryview(data)
            if self.received < self.skip_until:
                view = view[self.skip_until - self.received :]  # a payload's: dropped
            self.pending += view
            if len(self.pending) > FLUSH:
                self._flush(min(self.raw_until, self.received + n))
        self.received += n
        return n

    def seen(self, member: tarfile.TarInfo | None) -> None:
        """The header of ``member`` is parsed (None: the archive ended); it is not extracted yet."""
        if self.whole:
            return
        if member is None:
            self.raw_until = 1 << 62
            return
        rel = _clean(member.name)
        parent, _, name = rel.rpartition("/")
        whiteout = name.startswith(TAR_WHITEOUT_PREFIX)
        if whiteout and not name.startswith(TAR_META_PREFIX):  # not the opaque marker nor AUFS metadata
            removed = f"{parent}/{name[len(TAR_WHITEOUT_PREFIX) :]}".lstrip("/")
            conflict = hash(removed) in self.files or removed in self.dirs
        else:  # extraction replaces what is at `rel` but a directory by a directory
            conflict = hash(rel) in self.files or (rel in self.dirs and not member.isdir())
        if conflict:
            self._turn_whole()
            return
        end = member.offset_data + _stored(member)
        if member.isreg() and not member.issparse() and member.size > 0 and rel and not whiteout:
            self._flush(member.offset_data)
            self._record({"type": FILE, "name": rel, "size": member.size})
            del self.pending[: min(end, self.received) - self.base]
            self.base = self.raw_until = self.skip_until = end
            self.files.add(hash(rel))
            self.dirs.update(_ancestors(rel))
        else:
            self.raw_until = end  # its payload, if any, is kept as raw bytes

    def close(self, diff_id: str) -> Kept:
        """Write out what is left and close ``path``; the :class:`Kept` (``diff_id``: the stream's sha256)."""
        if not self.whole:
            self._flush(self.received)
        self.out.close()
        return Kept(self.path, self.whole, diff_id)

    def discard(self) -> None:
        """Close and remove ``path`` (a failed extraction); never raises."""
        with contextlib.suppress(OSError):
            self.out.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- inside ----------------------------------------------------------------------------

    def _record(self, record: dict[str, object]) -> None:
        record["position"] = self.records
        self.records += 1
        self.out.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")

    def _flush(self, upto: int) -> None:
        """Write out the pending bytes below offset ``upto`` as one raw record."""
        count = upto - self.base
        if count > 0:
            self._record({"type": SEGMENT, "payload": base64.b64encode(self.pending[:count]).decode()})
            del self.pending[:count]
            self.base = upto

    def _turn_whole(self) -> None:
        """Keep the whole tar from now on: the split so far reassembled (gzip'd), then the pending bytes."""
        self.out.close()
        split = self.path + ".split"
        os.rename(self.path, split)
        try:
            self.out = gzip.GzipFile(self.path, "wb", compresslevel=1)
            reassemble(split, self.diff, self.out)
        finally:
            os.unlink(split)
        self.out.write(self.pending)
        self.pending = bytearray()
        self.whole = True


def reassemble(split: str, diff: str, out: Sink) -> None:
    """Write the tar of the split file ``split`` (:data:`SPLIT`'s format) to ``out``, payloads read from the
    directory ``diff`` (never through a symlink). Raises :class:`SplitError` for a damaged split or a referenced file
    that is missing, not a regular file or not of its size; the OSError of reading or writing.
    """
    root = os.open(diff, os.O_PATH | os.O_DIRECTORY)
    try:
        with gzip.open(split, "rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                    kind = record["type"]
                    if kind == SEGMENT:
                        out.write(base64.b64decode(record["payload"]))
                        continue
                    if kind != FILE:
                        raise ValueError(f"record type {kind}")
                    name, size = str(record["name"]), int(record["size"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise SplitError(f"{split}: damaged record: {exc}") from exc
                _copy_file(root, name, size, out)
    except (EOFError, gzip.BadGzipFile) as exc:
        raise SplitError(f"{split}: damaged: {exc}") from exc
    finally:
        os.close(root)


def _copy_file(root: int, name: str, size: int, out: Sink) -> None:
    """Write exactly ``size`` bytes of the regular file ``name`` below ``root`` to ``out``."""
    try:
        fd = realfs.openat2(root, name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SplitError(f"the layer's file '{name}' cannot be read: {exc.strerror}") from exc
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise SplitError(f"the layer's file '{name}' is not the regular file of {size} bytes its tar held")
        left = size
        while left:
            chunk = f.read(min(left, CHUNK))
            if not chunk:
                raise SplitError(f"the layer's file '{name}' ended early")
            out.write(chunk)
            left -= len(chunk)


def size(split: str) -> int:
    """The size in bytes of the tar the split file ``split`` gives back, from its records alone (no file is read).

    Raises :class:`SplitError` for a damaged split, the OSError of reading it.
    """
    total = 0
    try:
        with gzip.open(split, "rb") as lines:
            for line in lines:
                record = json.loads(line)
                total += len(base64.b64decode(record["payload"])) if record["type"] == SEGMENT else int(record["size"])
    except (EOFError, gzip.BadGzipFile, ValueError, KeyError, TypeError) as exc:
        raise SplitError(f"{split}: damaged: {exc}") from exc
    return total


def write(path: str, whole: bool, diff: str, out: Sink) -> None:
    """Write the tar kept at ``path`` to ``out``: a split (:func:`reassemble` from ``diff``) or, ``whole``, a gzip'd
    tar. Raises :class:`SplitError` for a damaged file, and the OSError of reading or writing.
    """
    if not whole:
        reassemble(path, diff, out)
        return
    try:
        with gzip.open(path, "rb") as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
    except (EOFError, gzip.BadGzipFile) as exc:
        raise SplitError(f"{path}: damaged: {exc}") from exc


class _Digest:
    """A writer that only hashes."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


def digest(path: str, whole: bool, diff: str) -> str:
    """``sha256:<hex>`` of the tar kept at ``path`` (as :func:`write` gives it back); raises as :func:`write`."""
    sink = _Digest()
    write(path, whole, diff, sink)
    return "sha256:" + sink.hash.hexdigest()


def split_file(tar: str, path: str, diff: str) -> Kept:
    """Keep the uncompressed tar file ``tar``, already extracted into ``diff``, at ``path``: as a split when it gives
    ``tar`` back from ``diff``, else whole (gzip'd). Raises the OSError of reading ``tar`` or writing ``path``.

    For a tar extracted before it is kept (two passes over it); :class:`Splitter` does it while extracting.
    """
    with open(tar, "rb") as f:
        diff_id = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    splitter = Splitter(path, diff)
    try:
        with open(tar, "rb") as f, tarfile.open(fileobj=(feeding := _Feeding(f, splitter)), mode="r|") as members:
            for member in members:  # tarfile skips the payloads, reading them through the splitter
                splitter.seen(member)
                if splitter.whole:  # its split so far was read from the diff's final state: useless
                    break
            else:
                splitter.seen(None)
                while feeding.read(CHUNK):
                    pass
        kept = splitter.close(diff_id)
        if not kept.whole and digest(kept.path, False, diff) == diff_id:
            return kept
    except (SplitError, tarfile.TarError):
        splitter.discard()
    with open(tar, "rb") as src, gzip.GzipFile(path, "wb", compresslevel=1) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
    return Kept(path, True, diff_id)


class _Feeding(io.RawIOBase):
    """A reader of ``source`` that writes what it reads to ``splitter``."""

    def __init__(self, source: BinaryIO, splitter: Splitter) -> None:
        self.source, self.splitter = source, splitter

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.source.read(-1 if size is None else size)
        self.splitter.write(data)
        return data
