"""Storing an image that arrives from outside (``load``, ``pull``): its layers streamed in and checked, then the image.

Moby's ``image/tarexport/load.go`` and ``distribution/pull_v2.go`` meet at the layer store's ``Register``; so do
``load`` and ``pull`` here, at :func:`store_image`. Each layer blob is hashed as it is read (the digest its manifest
names) and extracted as it streams, decompressed by its magic (gzip, zstd; plain); its uncompressed bytes hash to
the layer's DiffID, which must be the config's ``rootfs.diff_ids[i]``, and are kept as the layer's own tar. A layer
whose ChainID is stored already is not read at all ("Already exists"). Nothing partial stays: a failure (or SIGINT)
removes the layers this call registered, and a killed process leaves them marked ``incomplete``, which the next
load, pull or build removes (:meth:`LayerStore.collect_garbage
<pylayerfs.image.store.layers.LayerStore.collect_garbage>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from pylayerfs.image import archive
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image, parse_time
from pylayerfs.image.store.layers import chain_id
from pylayerfs.image.store.layout import COMMITTED_FILE
from pylayerfs.image.store.references import is_digest, parse, parse_reference

Progress = Callable[[str, str], None]  # (DiffID, "exists" | "stored")


class TransferError(StoreError):
    """An image that cannot be stored as given (bad config, digest or size mismatch...); one line for the user."""


@dataclass(frozen=True)
class Blob:
    """A layer blob to read: ``open`` gives a fresh reader of its bytes as they travel (compressed or not).

    ``digest`` (``sha256:<hex>``) and ``size`` (bytes) are checked when given (a manifest's descriptor); ``name`` says
    where it comes from in messages (``blobs/sha256/<hex>``, a URL...).
    """

    open: Callable[[], contextlib.AbstractContextManager[BinaryIO]]
    name: str
    digest: str | None = None
    size: int | None = None


class _Hashing(io.RawIOBase):
    """A reader of ``source`` that counts every byte read through it, keeps the first 6 (``head``), and hashes them
    unless ``hashed`` is False (``hash`` is then None)."""

    def __init__(self, source: BinaryIO, hashed: bool = True) -> None:
        self.source, self.count, self.head = source, 0, b""
        self.hash = hashlib.sha256() if hashed else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        buffer[: len(data)] = data
        if self.hash is not None:
            self.hash.update(data)
        if len(self.head) < 6:
            self.head += data[: 6 - len(self.head)]
        self.count += len(data)
        return len(data)

    def drain(self) -> None:
        """Read what is left, so that the count and the hash cover the whole blob."""
        while self.read(1 << 20):
            pass


def diff_ids_of(config: bytes) -> list[str]:
    """The ``rootfs.diff_ids`` of image config bytes (OCI image spec, config.md), bottom layer first.

    The whole config is checked first as Docker's ``json.Unmarshal`` into ``image.Image`` checks it (moby
    ``image/image.go``): every field it knows has its type (``created`` and each history entry's an RFC 3339 time,
    ``history`` a list of objects, ``config`` an object or null, ``Env``, ``Cmd``... lists of strings), so that no
    command fails later on an image it let in. Raises :class:`TransferError` naming the first field that is not.
    """
    try:
        data = json.loads(config)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        _check_fields(data, _IMAGE_FIELDS, "")
        rootfs = data["rootfs"]
        diff_ids = rootfs["diff_ids"] or []
        if rootfs["type"] != "layers" or not all(isinstance(d, str) and is_digest(d) for d in diff_ids):
            raise ValueError("rootfs is not a list of sha256 layers")
    except (ValueError, KeyError, TypeError) as exc:
        raise TransferError(f"the image config is not valid: {exc}") from exc
    return list(diff_ids)


_STRINGS = "strings"  # a list of strings (or null)
_TIME = "time"  # an RFC 3339 string
_RUN_FIELDS: dict[str, Any] = {
    "User": str, "WorkingDir": str, "Env": _STRINGS, "Cmd": _STRINGS, "Entrypoint": _STRINGS, "Shell": _STRINGS,
    "OnBuild": _STRINGS, "Labels": dict, "ExposedPorts": dict, "Volumes": dict, "StopSignal": str, "Image": str,
}  # fmt: skip
_HISTORY_FIELDS: dict[str, Any] = {
    "created": _TIME, "created_by": str, "author": str, "comment": str, "empty_layer": bool,
}  # fmt: skip
_IMAGE_FIELDS: dict[str, Any] = {
    "created": _TIME, "author": str, "architecture": str, "os": str, "variant": str, "rootfs": dict,
    "history": [_HISTORY_FIELDS], "config": _RUN_FIELDS, "container_config": _RUN_FIELDS, "comment": str,
    "container": str, "docker_version": str,
}  # fmt: skip


def _check_fields(data: dict[str, Any], fields: dict[str, Any], where: str) -> None:
    """ValueError naming the first known field of ``data`` whose value is not of the kind ``fields`` gives."""
    for key, kind in fields.items():
        value = data.get(key)
        name = f"{where}{key}"
        if value is None:
            continue  # absent or null: Go leaves the zero value
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{name} is not an object")
            _check_fields(value, kind, name + ".")
        elif isinstance(kind, list):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"{name} is not a list of objects")
            for i, entry in enumerate(value):
                _check_fields(entry, kind[0], f"{name}[{i}].")
        elif kind == _STRINGS:
            if isinstance(value, str):
                continue  # Go's strslice takes a lone string too
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} is not a list of strings")
        elif kind == _TIME:
            if not isinstance(value, str):
                raise ValueError(f"{name} is not a time")
            try:
                when = parse_time(value)
                when.astimezone()  # a time this machine can show (year 1 to 9999 in its time zone)
            except (ValueError, OverflowError) as exc:
                raise ValueError(f"{name} is not an RFC 3339 time: {value[:40]!r}") from exc
        elif not isinstance(value, kind):
            raise ValueError(f"{name} is not a {kind.__name__}")


def store_image(store: Store, config: bytes, layers: Sequence[Blob], tags: Sequence[str] = (),
                repo_digests: Sequence[str] = (), progress: Progress | None = None) -> Image:  # fmt: skip
    """Store the image of ``config`` (its bytes as given: their sha256 is the image ID) with its ``layers``.

    ``layers`` are the blobs of ``rootfs.diff_ids``, bottom first; ``tags`` (``name[:tag]``) and ``repo_digests``
    (``name@sha256:<hex>``) are pointed at the image once it is whole. ``progress(diff_id, event)`` is called per
    layer, ``event`` ``"exists"`` (not read) or ``"stored"``. Returns the image. Raises :class:`TransferError` for a
    bad config, a layer count, size, digest or DiffID that does not match, :class:`StoreError` for a bad reference,
    :class:`~pylayerfs.image.archive.ArchiveError` for a layer that cannot be extracted safely, and the OSError of
    reading a blob or writing the store; the store is then as it was.
    """
    diff_ids = diff_ids_of(config)
    if len(diff_ids) != len(layers):
        raise TransferError(f"the image config names {len(diff_ids)} layers, the manifest {len(layers)}")
    for ref in tags:
        parse_reference(ref)
    for ref in repo_digests:
        if parse(ref).digest is None:
            raise StoreError(f"invalid reference format: '{ref}' (name@sha256:<hex> expected)")
    store.collect_garbage()
    created: list[str] = []
    below: str | None = None  # the layer under the first new one: new_dir marks it ``committed``
    with store.busy():
        try:
            parent = None
            for diff_id, blob in zip(diff_ids, layers, strict=True):
                chain = chain_id(parent, diff_id)
                if store.layers.exists(chain):
                    event = "exists"
                else:
                    if not created and parent is not None:
                        committed = store.layout.layer(store.layers.get(parent).cache_id, COMMITTED_FILE)
                        below = None if os.path.exists(committed) else committed
                    created.append(chain)
                    _store_layer(store, parent, diff_id, blob)
                    event = "stored"
                if progress is not None:
                    progress(diff_id, event)
                parent = chain
            with store.locked():
                store.layers.complete(parent)
                image = store.images.put_raw(config)
                for ref in tags:
                    store.refs.tag(ref, image.id)
                for ref in repo_digests:
                    name, _, digest = ref.partition("@")
                    store.refs.add_digest(name, digest, image.id)
            return image
        except BaseException:
            _roll_back(store, created, below)
            raise


def _store_layer(store: Store, parent: str | None, diff_id: str, blob: Blob) -> None:
    """Extract ``blob`` into a new layer over ``parent``, check it, register it marked ``incomplete``."""
    with store.locked():
        cache_id = store.layers.new_dir(parent)
    splitter = store.layers.splitter(cache_id)
    try:
        # A blob whose digest is the DiffID is the tar itself: the extraction's DiffID check covers its digest (a
        # compressed blob cannot have it), so it is not hashed twice (0.6 s a GiB: docker save's layers).
        tar_itself = blob.digest == diff_id
        with blob.open() as raw:
            hashing = _Hashing(raw, hashed=blob.digest is not None and not tar_itself)
            try:
                got = archive.extract_keeping(cast(BinaryIO, hashing), blob.name, store.layers.diff_dir(cache_id),
                                              cast(BinaryIO, splitter), splitter.seen)  # fmt: skip
            except archive.ArchiveError as exc:
                raise _cause(blob, hashing, exc) from exc
            hashing.drain()
        kept = splitter.close(got)
        if blob.size is not None and hashing.count != blob.size:
            raise TransferError(f"{blob.name}: {hashing.count} bytes, the manifest says {blob.size}")
        if hashing.hash is not None and "sha256:" + hashing.hash.hexdigest() != blob.digest:
            raise TransferError(f"{blob.name}: digest sha256:{hashing.hash.hexdigest()}, expected {blob.digest}")
        if tar_itself and archive.compression(hashing.head) is not None:
            raise TransferError(f"{blob.name}: {archive.compression(hashing.head)}-compressed, so its digest cannot be "
                                f"{blob.digest}, its tar's DiffID")  # fmt: skip
        if got != diff_id:
            raise TransferError(f"{blob.name}: its tar has DiffID {got}, the image config says {diff_id}")
        with store.locked():
            store.layers.register(cache_id, parent, kept, incomplete=True)
    except BaseException:
        store.layers.remove_dir(cache_id)
        raise
    finally:
        splitter.discard()


def _cause(blob: Blob, hashing: _Hashing, error: archive.ArchiveError) -> Exception:
    """Why a blob could not be extracted: its digest, when its bytes are not the ones its manifest names (read on to
    their end, never past the size the manifest gives: a tampered gzip fails to decompress before its digest is
    known), else the extraction's error, naming the blob."""
    if hashing.hash is not None and blob.size is not None:
        with contextlib.suppress(OSError, StoreError):
            while hashing.count < blob.size and hashing.read(min(1 << 20, blob.size - hashing.count)):
                pass
            got = "sha256:" + hashing.hash.hexdigest()
            if hashing.count == blob.size and got != blob.digest:
                return TransferError(f"{blob.name}: digest {got}, expected {blob.digest}")
    text = str(error)
    return error if blob.name in text else archive.ArchiveError(f"{blob.name}: {text}")


def _roll_back(store: Store, created: list[str], committed: str | None) -> None:
    """Remove the layers of ``created`` (bottom first) that are still incomplete, top first, and the ``committed``
    mark the first of them left in the layer below (a path; None when it was there before); never raises."""
    with contextlib.suppress(OSError, StoreError), store.locked():
        for chain in reversed(created):
            if store.layers.exists(chain) and store.layers.is_incomplete(chain):
                store.layers.remove(store.layers.get(chain))
        if committed is not None:
            os.unlink(committed)
