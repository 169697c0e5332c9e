"""Image archives: ``save`` writes one tar that is a docker-archive and an OCI image layout; ``load`` reads them back.

**Save** writes what Docker >= 25 writes (moby ``daemon/internal/image/tarexport/save.go``): an OCI image layout
(``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) whose blobs are each image's config (its bytes as stored: the
image ID), its OCI manifest, its layers as uncompressed tars (``application/vnd.oci.image.layer.v1.tar``: the blob
digest is the DiffID) and one legacy v1 ``json`` per layer; plus the docker-archive files ``manifest.json`` (Config,
RepoTags, Layers: blob paths) and ``repositories`` (``{name: {tag: <top DiffID hex>}}``). Docker 25 dropped the
per-layer ``<v1-id>/{VERSION,json,layer.tar}`` directories of earlier versions (and their ``layer.tar`` symlinks for
a layer saved twice): a layer is one blob, however many images share it, and the v1 ``json`` is a blob too. Docker's
own ``docker load`` (20.10 too) reads only ``manifest.json``; skopeo reads either half, umoci the OCI half.

The tar is streamed: a layer kept as a split goes straight into the archive (its size known from the split); any
other is written to a file in the store's ``tmp/`` first (its size goes in the tar header before its bytes), copied
into the archive and removed; no layer is ever held in memory. Entries come in the order
they are written (blobs, then ``index.json``, ``manifest.json``, ``oci-layout``, ``repositories``), not sorted as
Docker's walk of its temporary directory gives them: no reader depends on the order.

**Load** reads docker-archives of Docker 20.10 (``manifest.json`` naming ``<id>/layer.tar``, maybe gzip'd layers,
``layer.tar`` symlinks to another layer's) and of Docker >= 25, and OCI image layouts (a directory, or a tar of one:
``index.json`` -> manifest, or an index from which linux/<this machine's architecture> is picked -> config and
layers, plain, gzip or zstd), everything through :func:`~pylayerfs.image.transfer.ingest.store_image`. An archive is
read by random access: a plain tar in a regular file is read in place; one that arrives through a pipe, or
compressed (``docker save | gzip``), is first spooled, uncompressed, to the store's ``tmp/`` (removed at the end,
or by the next command's garbage collection after a kill). A one-pass reader would have to trust the archive's
order, which nothing guarantees (``manifest.json`` comes last in Docker's saves). Every entry is checked before
anything is read: an absolute name, a ``..``, a symlink or hard link leading out of the archive is refused by name.
Every image is planned (manifest, config, media types, every blob present) before any is stored, so a bad archive
leaves the store as it was; a layer found bad while it is stored rolls back its image (the images stored before it
stay, as with ``docker load``).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import json
import lzma
import os
import platform
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard

from pylayerfs.image import archive
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image
from pylayerfs.image.store.layers import Layer, chain_id, random_id
from pylayerfs.image.store.references import is_digest, parse
from pylayerfs.image.transfer import media
from pylayerfs.image.transfer.ingest import Blob, TransferError, diff_ids_of, store_image

MANIFEST_JSON = "manifest.json"
REPOSITORIES = "repositories"
INDEX_JSON = "index.json"
OCI_LAYOUT = "oci-layout"
OCI_LAYOUT_CONTENT = b'{"imageLayoutVersion": "1.0.0"}'  # moby writes it with the space
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
EPOCH_CREATED = "1970-01-01T00:00:00Z"  # Go's time.Unix(0, 0) in UTC, the v1 json of every layer but the top
MAX_JSON = 64 << 20  # bytes: a manifest, index or config larger than this is refused, not read into memory
# The Go zero value of moby's container.Config, as json.Marshal writes it in a v1 json's container_config.
EMPTY_CONTAINER_CONFIG: dict[str, Any] = {
    "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False, "AttachStdout": False,
    "AttachStderr": False, "Tty": False, "OpenStdin": False, "StdinOnce": False, "Env": None, "Cmd": None,
    "Image": "", "Volumes": None, "WorkingDir": "", "Entrypoint": None, "OnBuild": None, "Labels": None,
}  # fmt: skip


def go_json(value: Any, newline: bool = False) -> bytes:
    """``value`` as Go's ``json.Marshal`` writes it: compact, ``<``, ``>``, ``&`` escaped, UTF-8; dict order kept
    (callers order struct fields as Go declares them, and sort maps). ``newline``: as ``json.Encoder.Encode``."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return (text + ("\n" if newline else "")).encode()


def _sorted(mapping: dict[str, Any]) -> dict[str, Any]:
    """A Go map's JSON: keys sorted, nested maps too."""
    return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(mapping.items())}


def blob_path(digest: str) -> str:
    """``blobs/sha256/<hex>`` of ``sha256:<hex>``; :class:`TransferError` for any other digest."""
    if not is_digest(digest):
        raise TransferError(f"'{digest}' is not a sha256 digest")
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- save -------------------------------------------------------------------------------------------------------


@dataclass
class _Saving:
    image: Image
    tags: list[str] = field(default_factory=list)  # familiar name:tag


def select(store: Store, names: Sequence[str]) -> dict[str, _Saving]:
    """The images ``names`` name, with the tags each brings, as moby's ``parseNames``: ``name:tag`` that tag;
    a name alone every tag of that repository (or, with none, an image ID prefix); an ID, ID prefix or
    ``name@digest`` the image without a tag. By image ID, in order of first mention. Raises :class:`StoreError` for
    no such image.
    """
    chosen: dict[str, _Saving] = {}

    def add(image: Image, tag: str | None) -> None:
        saving = chosen.setdefault(image.id, _Saving(image))
        if tag is not None and tag not in saving.tags:
            saving.tags.append(tag)

    for name in names:
        try:
            ref = parse(name)
        except StoreError:
            ref = None
        if ref is None or ref.digest is not None or name.startswith("sha256:"):
            add(store.resolve(name), None)
        elif ":" not in name.rpartition("/")[2]:  # a name alone
            tags = [t for t in sorted(store.refs.all()) if parse(t).name == ref.name]
            for tag in tags:
                add(store.resolve(tag), tag)
            if not tags:
                add(store.resolve(name), None)
        else:
            image_id = store.refs.lookup(name)
            if image_id is None:
                raise StoreError(f"no such image: {name}")
            add(store.images.get(image_id), f"{ref.name}:{ref.tag}")
    return chosen


def v1_configs(image: Image) -> list[tuple[str, bytes]]:
    """The legacy v1 ``json`` of each layer of ``image``, bottom first, with its v1 ID (64 hex).

    Moby's ``tarexport`` ``saveImage`` with ``image/v1`` ``CreateID``: every layer but the top has an empty v1 image
    (created at the epoch; its ``os`` is set after its ID is computed), the top one the image config's v1 fields;
    the ID is the sha256 of that JSON without ``id``, plus ``layer_id`` (the layer's ChainID) and ``parent`` (the v1
    ID below), its top-level keys sorted (a Go map of raw messages: the nested objects keep their order). The same
    IDs name Docker 20.10's per-layer directories (checked by the tests against ``docker save``).
    """
    result: list[tuple[str, bytes]] = []
    chain = parent = None
    config = image.config
    for i, diff_id in enumerate(image.diff_ids):
        chain = chain_id(chain, diff_id)
        if i == len(image.diff_ids) - 1:
            fields = {"comment": config.get("comment"), "created": config.get("created"),
                      "container": config.get("container"),
                      "container_config": config.get("container_config") or EMPTY_CONTAINER_CONFIG,
                      "docker_version": config.get("docker_version"), "author": config.get("author"),
                      "config": config.get("config"), "architecture": config.get("architecture"),
                      "variant": config.get("variant"), "os": config.get("os"), "Size": config.get("Size")}  # fmt: skip
        else:  # moby sets os only after computing the ID
            fields = {"created": EPOCH_CREATED, "container_config": EMPTY_CONTAINER_CONFIG}
        v1 = {k: v for k, v in fields.items() if v or k in ("created", "container_config")}  # Go's omitempty
        keyed = {**v1, "layer_id": chain, **({"parent": parent} if parent else {})}
        if "os" not in v1 and config.get("os"):
            v1["os"] = config["os"]
        v1_id = hashlib.sha256(go_json({k: keyed[k] for k in sorted(keyed)})).hexdigest()
        head = {"id": v1_id, **({"parent": parent.removeprefix("sha256:")} if parent else {})}
        result.append((v1_id, go_json({**head, **v1})))
        parent = "sha256:" + v1_id
    return result


class _TarWriter:
    """Entries of a tar as Go's ``archive/tar`` writes them (:func:`pylayerfs.image.archive.header`), to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def _info(self, name: str, mode: int, size: int, mtime: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE if stat.S_ISDIR(mode) else tarfile.REGTYPE
        info.mode, info.size, info.mtime = mode, size, mtime
        return info

    def directory(self, name: str) -> None:
        self.out.write(archive.header(self._info(name + "/", stat.S_IFDIR | 0o755, 0, 0)))

    def file(self, name: str, data: bytes, mtime: int = 0) -> None:
        self.out.write(archive.header(self._info(name, stat.S_IFREG | 0o644, len(data), mtime)))
        self.out.write(data + b"\0" * (-len(data) % archive.BLOCK))

    def copy(self, name: str, source: BinaryIO, size: int, mtime: int) -> None:
        self.out.write(archive.header(self._info(name, stat.S_IFREG | 0o644, size, mtime)))
        shutil.copyfileobj(source, self.out, 1 << 20)
        self.out.write(b"\0" * (-size % archive.BLOCK))

    def close(self) -> None:
        self.out.write(archive.TRAILER)


class _HashingWriter(io.RawIOBase):
    """A writer to ``out`` that hashes and counts what goes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.hash, self.count = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.out.write(b)
        self.hash.update(b)
        self.count += len(b)
        return len(b)


def _created(image: Image) -> int:
    """The image's creation time in whole seconds (0 without one, or before 1970): its blobs' mtime in the archive."""
    try:
        return max(0, int(image.created.timestamp()))
    except ValueError:
        return 0


def save(store: Store, names: Sequence[str], out: BinaryIO) -> None:
    """Write the images ``names`` name (see :func:`select`) to ``out`` as one archive (see the module docstring).

    Raises :class:`StoreError` for no such image, an image without layers (moby: "empty export - not implemented")
    or a layer whose tar does not hash to its DiffID, and the OSError of reading the store or writing ``out``.
    """
    chosen = select(store, names)
    for saving in chosen.values():
        if not saving.image.diff_ids:
            raise StoreError(f"{saving.image.id}: an image without layers cannot be saved (empty export)")
    tar = _TarWriter(out)
    tar.directory("blobs")
    tar.directory("blobs/sha256")
    written: set[str] = set()
    sizes: dict[str, int] = {}  # DiffID -> the size of its tar
    manifest: list[dict[str, Any]] = []
    descriptors: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    with store.busy():  # our tmp/ files are not garbage
        for saving in chosen.values():
            image, created = saving.image, _created(saving.image)
            layers = list(reversed(store.layers_of(image)))
            for layer in layers:
                if layer.diff_id not in written:
                    sizes[layer.diff_id] = _save_layer(store, tar, layer, created)
                    written.add(layer.diff_id)
            for _, data in v1_configs(image):
                _save_blob(tar, written, data, created)
            _save_blob(tar, written, image.raw, created)
            oci_manifest = go_json({
                "schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                "config": {"mediaType": media.OCI_CONFIG, "digest": image.id, "size": len(image.raw)},
                "layers": [{"mediaType": media.OCI_LAYER, "digest": d, "size": sizes[d]} for d in image.diff_ids],
            })  # fmt: skip
            digest = _save_blob(tar, written, oci_manifest, 0)
            untagged = {"mediaType": media.OCI_MANIFEST, "digest": digest, "size": len(oci_manifest)}
            for tag in saving.tags:
                ref = parse(tag)
                name, _, short = tag.rpartition(":")
                full = f"{ref.registry}/{ref.repository}:{short}"
                descriptors.append({**untagged, "annotations": {IMAGE_NAME_ANNOTATION: full,
                                                                REF_NAME_ANNOTATION: short}})  # fmt: skip
                repositories.setdefault(name, {})[short] = image.diff_ids[-1].removeprefix("sha256:")
            if not saving.tags:  # moby means to list an untagged image too (its check is of the whole list)
                descriptors.append(untagged)
            item: dict[str, Any] = {"Config": blob_path(image.id), "RepoTags": saving.tags or None,
                                    "Layers": [blob_path(d) for d in image.diff_ids]}  # fmt: skip
            parent = store.images.parent(image.id)
            if parent in chosen:
                item["Parent"] = parent
            manifest.append(item)
    tar.file(INDEX_JSON, go_json({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": descriptors}))
    tar.file(MANIFEST_JSON, go_json(manifest, newline=True))
    tar.file(OCI_LAYOUT, OCI_LAYOUT_CONTENT)
    if repositories:
        tar.file(REPOSITORIES, go_json(_sorted(repositories), newline=True))
    tar.close()


def _save_blob(tar: _TarWriter, written: set[str], data: bytes, mtime: int) -> str:
    """Write ``data`` as ``blobs/sha256/<hex>`` unless it is there already; its digest."""
    digest = _sha256(data)
    if digest not in written:
        tar.file(blob_path(digest), data, mtime)
        written.add(digest)
    return digest


def _save_layer(store: Store, tar: _TarWriter, layer: Layer, mtime: int) -> int:
    """Write the layer's tar as ``blobs/sha256/<DiffID hex>``, through a file in ``tmp/`` (its size comes first)
    unless the store knows its size (a kept split: straight to the archive); its size in bytes."""
    size = store.layers.kept_size(layer)
    if size is not None:
        tar.out.write(archive.header(tar._info(blob_path(layer.diff_id), stat.S_IFREG | 0o644, size, mtime)))
        hashing = _HashingWriter(tar.out)
        store.layers.write_tar(layer, hashing)  # type: ignore[arg-type]
        _check_layer(layer, hashing, size)
        tar.out.write(b"\0" * (-size % archive.BLOCK))
        return size
    path = os.path.join(store.layout.tmp, f"save-{random_id()}.tar")
    try:
        with open(path, "w+b") as spool:
            hashing = _HashingWriter(spool)
            store.layers.write_tar(layer, hashing)  # type: ignore[arg-type]
            _check_layer(layer, hashing, hashing.count)
            spool.seek(0)
            tar.copy(blob_path(layer.diff_id), spool, hashing.count, mtime)
            return hashing.count
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _check_layer(layer: Layer, hashing: _HashingWriter, size: int) -> None:
    """Raise :class:`StoreError` unless what ``hashing`` saw is ``size`` bytes hashing to the layer's DiffID."""
    got = "sha256:" + hashing.hash.hexdigest()
    if got != layer.diff_id or hashing.count != size:
        raise StoreError(f"layer {layer.chain_id}: its tar ({hashing.count} bytes) hashes to {got}, "
                         f"not to its DiffID {layer.diff_id}: the store is damaged")  # fmt: skip


# -- load -------------------------------------------------------------------------------------------------------


class _Source(abc.ABC):
    """The files of an archive by their path inside it (``manifest.json``, ``blobs/sha256/<hex>``...): a tar
    (:class:`_TarSource`) or a directory (:class:`_DirSource`)."""

    @abc.abstractmethod
    def open(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A reader of the regular file at ``path``; :class:`TransferError` when there is none."""

    @abc.abstractmethod
    def has(self, path: str) -> bool:
        """Whether a regular file is at ``path`` (symlinks inside the archive followed)."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """The size in bytes of the regular file at ``path``."""

    def read(self, path: str, what: str) -> bytes:
        """The bytes of the (JSON) file at ``path``; :class:`TransferError` naming ``what`` names it when it is
        missing or larger than ``MAX_JSON``."""
        if not self.has(path):
            raise TransferError(f"{what} names {path}, which the archive does not hold")
        if self.size(path) > MAX_JSON:
            raise TransferError(f"{path}: {self.size(path)} bytes, too large for a manifest or config")
        with self.open(path) as f:
            return f.read()


def _clean(name: str) -> str:
    """A path inside the archive, normalised (no ``./``, no trailing ``/``); ArchiveError when it would leave it."""
    if name.startswith("/"):
        raise archive.ArchiveError(f"refusing '{name}': an absolute path in the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise archive.ArchiveError(f"refusing '{name}': '..' would leave the archive")
    return "/".join(parts)


class _TarSource(_Source):
    """A tar archive in a seekable file, read by random access (:mod:`tarfile`'s index of its members).

    Opening it checks every entry: no absolute name, no ``..``, no symlink whose target leads out of the archive,
    no hard link to a name outside it; and that the archive is whole (every member's data, then the end blocks).
    """

    def __init__(self, file: BinaryIO, name: str) -> None:
        self.file = file
        try:
            self.tar = tarfile.open(fileobj=file, mode="r:")  # noqa: SIM115 - lives as long as the source
            members = self.tar.getmembers()
        except (tarfile.TarError, EOFError) as exc:
            raise archive.ArchiveError(f"{name} is truncated or not a tar archive: {exc}") from exc
        end = os.fstat(file.fileno()).st_size
        self.members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            path = _clean(member.name)
            if member.issym():
                target = member.linkname
                if target.startswith("/"):
                    raise archive.ArchiveError(f"refusing '{member.name}': a symlink to the absolute '{target}'")
                joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
                if joined == ".." or joined.startswith("../"):
                    raise archive.ArchiveError(f"refusing '{member.name}': a symlink to '{target}', out of the archive")
            elif member.islnk():
                try:
                    _clean(member.linkname)
                except archive.ArchiveError as exc:
                    raise archive.ArchiveError(
                        f"refusing '{member.name}': a hard link to '{member.linkname}', out of the archive"
                    ) from exc
            if member.offset_data + member.size > end:
                raise archive.ArchiveError(f"{name} is truncated: '{member.name}' is cut short")
            self.members[path] = member
        file.seek(self.tar.offset)
        if file.read(archive.BLOCK) != b"\0" * archive.BLOCK:
            last = members[-1].name if members else ""
            raise archive.ArchiveError(f"{name} is truncated or corrupted after '{last}'")

    def _member(self, path: str, depth: int = 0) -> tarfile.TarInfo | None:
        """The regular file member at ``path``, symlinks (in any component) and hard links followed in the archive."""
        if depth > 40:
            raise archive.ArchiveError(f"too many levels of symbolic links at '{path}'")
        parts = _clean(path).split("/")
        for i in range(1, len(parts) + 1):
            head = "/".join(parts[:i])
            member = self.members.get(head)
            if member is None:
                if i == len(parts):
                    return None
                continue  # a directory without its own entry
            if member.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(head), member.linkname))
                return self._member("/".join([target, *parts[i:]]), depth + 1)
            if i == len(parts):
                if member.islnk():
                    return self._member(member.linkname, depth + 1)
                return member if member.isreg() else None
        return None

    def has(self, path: str) -> bool:
        return self._member(path) is not None

    def size(self, path: str) -> int:
        member = self._member(path)
        return member.size if member is not None else 0

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        member = self._member(path)
        if member is None:
            raise TransferError(f"the archive holds no file {path}")
        reader = self.tar.extractfile(member)
        assert reader is not None
        with reader:
            yield reader  # type: ignore[misc]


class _DirSource(_Source):
    """An OCI image layout in a directory; every open stays beneath it and follows no symlink (``openat2``)."""

    def __init__(self, root: str) -> None:
        self.root = os.open(root, os.O_PATH | os.O_DIRECTORY)

    def _open(self, path: str) -> int | None:
        from pylayerfs.overlay import realfs

        try:
            fd = realfs.openat2(self.root, _clean(path), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise archive.ArchiveError(f"refusing '{path}': {exc.strerror} (a symlink, or out of the layout)") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        return fd

    def has(self, path: str) -> bool:
        fd = self._open(path)
        if fd is not None:
            os.close(fd)
        return fd is not None

    def size(self, path: str) -> int:
        fd = self._open(path)
        if fd is None:
            return 0
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        fd = self._open(path)
        if fd is None:
            raise TransferError(f"the layout holds no file {path}")
        with os.fdopen(fd, "rb") as f:
            yield f


@dataclass
class Planned:
    """An image found in an archive, checked but not stored: its config bytes, layer blobs and tags."""

    config: bytes
    layers: list[Blob]
    tags: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """The image ID: ``sha256:`` and the hex sha256 of the config bytes."""
        return _sha256(self.config)


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise TransferError(f"{what} is not valid JSON: {exc}") from exc


def _layer_blob(source: _Source, path: str, digest: str | None = None, size: int | None = None) -> Blob:
    """The layer blob at ``path``; its size, when no descriptor gives it, is its file's."""
    return Blob(
        open=lambda: source.open(path), name=path, digest=digest, size=source.size(path) if size is None else size
    )


def plan_docker_archive(source: _Source) -> list[Planned]:
    """The images of a docker-archive's ``manifest.json`` (Docker 20.10's legacy layout or Docker >= 25's), as
    moby's ``tarexport/load.go`` reads them; raises :class:`TransferError` for a bad manifest or config, a file it
    names that the archive does not hold, a layer count that does not match the config's."""
    manifest = _json(source.read(MANIFEST_JSON, "the archive"), MANIFEST_JSON)
    if not isinstance(manifest, list) or not all(isinstance(m, dict) for m in manifest):
        raise TransferError(f"{MANIFEST_JSON} is not a list of images")
    planned = []
    for item in manifest:
        config_path, layers, tags = item.get("Config"), item.get("Layers"), item.get("RepoTags") or []
        if not isinstance(config_path, str) or not isinstance(layers, list) or not isinstance(tags, list):
            raise TransferError(f"{MANIFEST_JSON}: an image without Config and Layers")
        if not all(isinstance(p, str) for p in [*layers, *tags]):
            raise TransferError(f"{MANIFEST_JSON}: Layers and RepoTags are lists of strings")
        config = source.read(config_path, MANIFEST_JSON)
        if len(diff_ids_of(config)) != len(layers):
            raise TransferError(f"{config_path} names {len(diff_ids_of(config))} layers, {MANIFEST_JSON} {len(layers)}")
        blobs = []
        for path in layers:
            if not source.has(path):
                raise TransferError(f"{MANIFEST_JSON} names {path}, which the archive does not hold")
            name = _clean(path)
            named = "sha256:" + name.removeprefix("blobs/sha256/")  # a blob's name is its digest
            digest = named if name.startswith("blobs/sha256/") and is_digest(named) else None
            blobs.append(_layer_blob(source, path, digest))
        planned.append(Planned(config, blobs, [str(_tag(t)) for t in tags]))
    return planned


def _tag(text: str) -> str:
    """``name:tag`` in its familiar form (``docker.io/library/x:1`` -> ``x:1``); StoreError for a bad reference."""
    ref = parse(text)
    if ref.digest is not None:
        raise TransferError(f"'{text}' is not a name:tag")
    return f"{ref.name}:{ref.tag}"


def _descriptor(source: _Source, desc: Any, what: str) -> tuple[str, str, int | None]:
    """``(mediaType, blob path, size)`` of an OCI descriptor; :class:`TransferError` for a bad one."""
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
        raise TransferError(f"{what}: a descriptor without a digest")
    size = desc.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise TransferError(f"{what}: a descriptor with a bad size")
    path = blob_path(desc["digest"])
    if not source.has(path):
        raise TransferError(f"{what} names {path}, which the archive does not hold")
    return str(desc.get("mediaType") or ""), path, size


def _read_blob(source: _Source, path: str, size: int | None, what: str) -> bytes:
    """The bytes of a small blob, checked against its digest (its name) and ``size``."""
    data = source.read(path, what)
    if size is not None and len(data) != size:
        raise TransferError(f"{path}: {len(data)} bytes, {what} says {size}")
    if _sha256(data) != "sha256:" + path.rpartition("/")[2]:
        raise TransferError(f"{path}: its bytes hash to {_sha256(data)}, not to its name")
    return data


def machine_platform() -> tuple[str, str]:
    """This machine's ``(os, architecture)`` in OCI's words (``linux``, ``amd64``/``arm64``...)."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)
    return "linux", arch


def plan_oci_layout(source: _Source) -> list[Planned]:
    """The images of an OCI layout's ``index.json``: each manifest (an index: its linux/<this architecture> one)
    with its config and layers; tags from ``io.containerd.image.name``, else a ``ref.name`` that has a name and a tag
    (``app:1``; a bare tag names no repository). Raises :class:`TransferError` for a bad index, manifest or config,
    a missing blob, an unknown media type."""
    index = _json(source.read(INDEX_JSON, "the layout"), INDEX_JSON)
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise TransferError(f"{INDEX_JSON} is not an image index")
    planned = []
    for desc in index["manifests"]:
        annotations = desc.get("annotations") or {} if isinstance(desc, dict) else {}
        name = annotations.get(IMAGE_NAME_ANNOTATION) or annotations.get(REF_NAME_ANNOTATION) or ""
        tags = [_tag(name)] if name and ":" in name.rpartition("/")[2] else []
        planned.append(_plan_manifest(source, desc, INDEX_JSON, tags, 0))
    return planned


def _plan_manifest(source: _Source, desc: Any, what: str, tags: list[str], depth: int) -> Planned:
    media_type, path, size = _descriptor(source, desc, what)
    document = _json(_read_blob(source, path, size, what), path)
    if not isinstance(document, dict):
        raise TransferError(f"{path} is not a manifest")
    media_type = media_type or str(document.get("mediaType") or "")
    if media_type in media.INDEXES and depth < 4:
        wanted = machine_platform()
        for child in document.get("manifests") or []:
            p = child.get("platform") or {} if isinstance(child, dict) else {}
            if (p.get("os"), p.get("architecture")) == wanted:
                return _plan_manifest(source, child, path, tags, depth + 1)
        raise TransferError(f"{path}: no manifest for {'/'.join(wanted)} in this index")
    if media_type not in media.MANIFESTS:
        raise TransferError(f"{path}: unknown media type '{media_type}' for a manifest")
    config_type, config_path, config_size = _descriptor(source, document.get("config"), path)
    if config_type not in media.CONFIGS:
        raise TransferError(f"{path}: unknown media type '{config_type}' for a config")
    config = _read_blob(source, config_path, config_size, path)
    blobs = []
    for layer in document.get("layers") or []:
        layer_type, layer_path, layer_size = _descriptor(source, layer, path)
        if layer_type not in media.LAYERS:
            raise TransferError(f"{path}: unknown media type '{layer_type}' for a layer")
        blobs.append(_layer_blob(source, layer_path, "sha256:" + layer_path.rpartition("/")[2], layer_size))
    if len(diff_ids_of(config)) != len(blobs):
        raise TransferError(f"{config_path} names {len(diff_ids_of(config))} layers, {path} {len(blobs)}")
    return Planned(config, blobs, tags)


def plan(source: _Source) -> list[Planned]:
    """The images of an archive: a docker-archive when it has ``manifest.json`` (as ``docker load``), else an OCI
    layout; the same image named twice is planned once, with every tag. Raises :class:`TransferError`."""
    if source.has(MANIFEST_JSON):
        found = plan_docker_archive(source)
    elif source.has(INDEX_JSON):
        found = plan_oci_layout(source)
    else:
        raise TransferError(f"invalid archive: it holds neither {MANIFEST_JSON} nor {INDEX_JSON}")
    merged: dict[str, Planned] = {}
    for image in found:
        kept = merged.setdefault(image.id, image)
        kept.tags.extend(t for t in image.tags if t not in kept.tags)
    return list(merged.values())


@contextlib.contextmanager
def open_source(store: Store, path: str | None, stdin: BinaryIO) -> Iterator[_Source]:
    """The archive at ``path`` (a directory: an OCI layout; a file: a tar, maybe compressed), or on ``stdin``.

    A plain tar in a regular file is read in place; anything else (a pipe, a compressed tar) is spooled uncompressed
    to ``store``'s ``tmp/`` first, up to its end-of-archive blocks (what is not a tar stops at its first block),
    removed when done. Hold ``store.busy()`` around it: the spool is not garbage.
    Raises ArchiveError for what is not a tar, the OSError of opening or spooling.
    """
    if path is not None and os.path.isdir(path):
        source = _DirSource(path)
        try:
            yield source
        finally:
            os.close(source.root)
        return
    name = path or "stdin"
    with open(path, "rb") if path is not None else contextlib.nullcontext(stdin) as raw:
        head = raw.peek(6)[:6] if isinstance(raw, io.BufferedReader) else b""
        if stat.S_ISREG(os.fstat(raw.fileno()).st_mode) and archive.compression(head) is None:
            yield _TarSource(raw, name)
            return
        spool = os.path.join(store.layout.tmp, f"load-{random_id()}.tar")
        try:
            with open(spool, "w+b") as copy:
                try:  # up to the tar's end-of-archive blocks, not further: /dev/zero is an empty tar, not a spool
                    with tarfile.open(fileobj=archive._Tee(archive._decompressed(raw), copy), mode="r|") as tar:
                        while tar.next() is not None:
                            tar.members.clear()  # type: ignore[attr-defined]  # only the bytes are wanted here
                except (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zstandard.ZstdError) as exc:
                    raise archive.ArchiveError(f"cannot read {name} as a tar archive: {exc}") from exc
                copy.seek(0)
                yield _TarSource(copy, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool)


def load(store: Store, path: str | None, stdin: BinaryIO, loaded: Callable[[Planned, Image], None] | None = None,
         prepare: Callable[[Planned], Planned] | None = None) -> list[Image]:  # fmt: skip
    """Store every image of the archive at ``path`` or on ``stdin`` (see :func:`open_source`, :func:`plan`) through
    :func:`store_image`; the images, in order.

    What killed loads left is collected first. ``prepare(planned)`` may replace an image's plan before it is stored
    (progress drawing); ``loaded(planned, image)`` is called as each image is stored. Raises
    :class:`TransferError`, :class:`StoreError`, ArchiveError or OSError: nothing of a bad image is kept.
    """
    store.collect_garbage()  # before our busy lock, under which it would not run (and our spool is not garbage)
    images = []
    with store.busy(), open_source(store, path, stdin) as source:
        for found in plan(source):
            planned = prepare(found) if prepare is not None else found
            image = store_image(store, planned.config, planned.layers, planned.tags)
            if loaded is not None:
                loaded(planned, image)
            images.append(image)
    return images
