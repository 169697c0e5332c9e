"""Layers: a diff directory under ``overlay2/<cache-id>``, registered in ``layerdb`` by its ChainID.

A layer is built in place (a new ``overlay2/<cache-id>`` nobody refers to
yet), then registered: its DiffID and size are computed, and its layerdb
entry is written in ``tmp/`` and renamed into ``layerdb/sha256/<chain-id>``.
Only then does it exist; a build that dies before leaves an unreferenced
directory, which :meth:`LayerStore.collect_garbage` removes. A layer whose
ChainID is already registered is not stored twice: the new copy is dropped.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import BinaryIO, cast

from pylayerfs.image import archive
from pylayerfs.image.sizes import layer_size
from pylayerfs.image.store import tarsplit
from pylayerfs.image.store.layout import (
    COMMITTED_FILE,
    DIFF_DIR,
    LINK_DIR,
    LINK_FILE,
    LOWER_FILE,
    METACOPY_FILE,
    WORK_DIR,
    Layout,
    StoreError,
    hex_of,
    read_value,
    write_value,
)
from pylayerfs.overlay import realfs
from pylayerfs.overlay.markers import has_redirect, is_metacopy_file
from pylayerfs.overlay.params import mounts_below

LINK_ID_LENGTH = 26
INCOMPLETE = "incomplete"  # in a layerdb entry: registered by a load or pull whose image is not stored yet


@dataclass(frozen=True)
class Layer:
    """A registered layer, as ``layerdb/sha256/<chain-id>`` records it (moby's ``layer/filestore.go``).

    ``chain_id``, ``diff_id`` and ``parent`` (the ChainID of the layer below, None for a base layer) are
    ``sha256:<hex>`` strings; ``cache_id`` names ``overlay2/<cache-id>`` (64 hex); ``size`` is this layer's own bytes
    (moby's ``directory.Size`` of its diff).
    """

    chain_id: str
    diff_id: str
    cache_id: str
    parent: str | None  # the ChainID of the layer below
    size: int  # this layer's own bytes (layerdb "size")


def chain_id(parent: str | None, diff_id: str) -> str:
    """The OCI ChainID: ``sha256(parent_chain_id + " " + diff_id)``, prefixes included; a base layer's is its DiffID.

    Image spec, config.md "Layer ChainID"; returns ``sha256:<hex>``.
    """
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def random_id() -> str:
    """64 hex characters, never an all-digit 12-character prefix (moby's ``pkg/stringid``): a cache-id, an ID."""
    while True:
        value = secrets.token_hex(32)
        if not value[:12].isdigit():
            return value


class LayerStore:
    """The layers of a store: ``layerdb/sha256/<chain-id>`` entries and their ``overlay2/<cache-id>`` directories.

    Moby's ``layer/layer_store.go`` with the overlay2 driver's directories (``daemon/graphdriver/overlay2/overlay.go``).
    Writers hold the store lock (:meth:`Layout.locked <pylayerfs.image.store.layout.Layout.locked>`).
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def get(self, chain: str) -> Layer:
        """The layer whose ChainID is ``chain`` (``sha256:<hex>`` or ``<hex>``).

        Raises :class:`StoreError` when it is not registered or one of its values is missing or unreadable.
        """
        d = self.layout.chain(chain)
        try:
            parent = read_value(os.path.join(d, "parent")) if os.path.exists(os.path.join(d, "parent")) else None
            return Layer(
                chain_id="sha256:" + hex_of(chain),
                diff_id=read_value(os.path.join(d, "diff")),
                cache_id=read_value(os.path.join(d, "cache-id")),
                parent=parent,
                size=int(read_value(os.path.join(d, "size"))),
            )
        except (OSError, ValueError) as exc:
            raise StoreError(f"layer {chain} is missing or damaged in {self.layout.root}") from exc

    def exists(self, chain: str) -> bool:
        """Is a layer registered under the ChainID ``chain``?"""
        return os.path.isdir(self.layout.chain(chain))

    def all(self) -> list[Layer]:
        """Every registered layer, ordered by ChainID; raises :class:`StoreError` for a damaged one."""
        return [self.get(name) for name in sorted(os.listdir(self.layout.layerdb)) if len(name) == 64]

    def diff_dir(self, cache_id: str) -> str:
        """The contents of layer directory ``cache_id``: ``overlay2/<cache-id>/diff``."""
        return self.layout.layer(cache_id, DIFF_DIR)

    def stack(self, chain: str | None) -> list[Layer]:
        """The layer ``chain`` and every layer below it, top first; ``[]`` for None.

        Raises :class:`StoreError` when one of them is missing or damaged.
        """
        out = []
        while chain is not None:
            layer = self.get(chain)
            out.append(layer)
            chain = layer.parent
        return out

    # -- writing (with the store locked) --------------------------------------------------

    def new_dir(self, parent: str | None, cache_id: str | None = None, above: str | None = None) -> str:
        """A fresh ``overlay2/<cache-id>`` over the layer ``parent`` (a ChainID), for writing into; its cache-id.

        Laid out as moby's overlay2 ``create()`` lays one out: ``diff/``, ``work/``, ``link`` and its ``l/<LINKID>``
        symlink, ``lower`` (``l/<LINKID>:...``, top first) and ``committed`` in the layer right below. ``above`` names a
        directory (a container's init layer) between it and ``parent``; ``cache_id`` defaults to :func:`random_id`.
        Raises :class:`StoreError` for a missing ``parent``, FileExistsError when ``cache_id`` has a ``diff/`` already,
        and the OSError of a failed write (ENOSPC...).
        """
        cache_id = cache_id or random_id()
        d = self.layout.layer(cache_id)
        os.makedirs(os.path.join(d, DIFF_DIR), 0o755)
        os.chmod(d, 0o710)
        os.mkdir(os.path.join(d, WORK_DIR), 0o700)
        link = base64.b32encode(secrets.token_bytes(20)).decode()[:LINK_ID_LENGTH]
        write_value(os.path.join(d, LINK_FILE), link)
        os.symlink(f"../{cache_id}/{DIFF_DIR}", os.path.join(self.layout.links, link))
        below = ([above] if above else []) + self.lower_cache_ids(parent)
        if below:
            links = [read_value(self.layout.layer(c, LINK_FILE)) for c in below]
            write_value(os.path.join(d, LOWER_FILE), ":".join(f"{LINK_DIR}/{x}" for x in links))
            write_value(self.layout.layer(below[0], COMMITTED_FILE), "", 0o600)
        return cache_id

    def lower_cache_ids(self, parent: str | None) -> list[str]:
        """The cache-ids of ``parent`` (a ChainID) and every layer below it, top first; raises as :meth:`stack`."""
        return [layer.cache_id for layer in self.stack(parent)]

    def uses_metacopy(self, chain: str | None) -> bool:
        """Does a layer of the stack ``chain`` hold metacopy files? (Then mounts of it need ``metacopy=on``.)

        Raises :class:`StoreError` as :meth:`stack`.
        """
        return any(os.path.exists(self.layout.layer(c, METACOPY_FILE)) for c in self.lower_cache_ids(chain))

    def lower_dirs(self, parent: str | None) -> list[str]:
        """The diff directories (paths) a mount over ``parent`` stacks, top first; raises as :meth:`stack`."""
        return [self.diff_dir(c) for c in self.lower_cache_ids(parent)]

    def register(self, cache_id: str, parent: str | None, kept: tarsplit.Kept | str | None = None,
                 incomplete: bool = False) -> Layer | None:  # fmt: skip
        """Make the built directory ``cache_id`` a layer over ``parent``; the layer, or None if it holds nothing.

        Its DiffID is the sha256 of the layer tar moby would write (``pkg/archive``), its size moby's
        ``directory.Size`` of its diff; the layerdb entry is written in ``tmp/`` and renamed into place
        (``layer/layer_store.go``). ``kept`` is the tar the diff was extracted from (``import``, ``load``, ``pull``):
        a :class:`~pylayerfs.image.store.tarsplit.Kept` of a :meth:`splitter`, or the path of the uncompressed tar
        (split here, :func:`~pylayerfs.image.store.tarsplit.split_file`). Its bytes are the layer's (its DiffID is
        their sha256); its split (``tar-split.json.gz``, as moby keeps it; ``layer.tar.gz`` when a split cannot hold)
        moves into the entry so that :meth:`write_tar` gives them back, checked once first: what it gives back must
        hash to the DiffID (:class:`StoreError` if not). A diff holding names that start with ``.wh.`` (made by a RUN
        step) or redirects (a RUN step's renames with ``metacopy=on``) is replaced by the extraction of its tar,
        whiteouts made of those names, renamed trees whole, as moby's overlay2 commit applies the container's tar
        (:meth:`_apply_own_tar`): a layer of the store holds no redirect. An empty built diff (the empty tar's DiffID;
        an empty layer given as a tar is kept, as moby's ``Register`` keeps it) and an already registered ChainID drop
        the directory; the latter returns the existing layer. ``incomplete`` marks a new layer as not yet used by an
        image (a load or pull in progress): :meth:`complete` clears the mark, and :meth:`collect_garbage` removes a
        layer that still has it (its writer died). Raises :class:`StoreError` for a missing ``parent``,
        :class:`~pylayerfs.image.archive.ArchiveError` for a diff that cannot be applied, and the OSError of reading
        the diff or writing the entry.
        """
        diff = self.diff_dir(cache_id)
        made = isinstance(kept, str)  # a split made here, removed when not taken
        if isinstance(kept, str):
            kept = tarsplit.split_file(kept, self._split_path(), diff)
        elif kept is None and any(_needs_own_tar(diff, rel) for rel, _ in archive.walk(diff)):
            kept, made = self._apply_own_tar(cache_id, parent), True
        try:
            diff_id = kept.diff_id if kept else archive.diff_id(diff, self.lower_dirs(parent))
            if diff_id == archive.EMPTY_LAYER_DIFF_ID and kept is None:
                self.remove_dir(cache_id)
                return None
            chain = chain_id(parent, diff_id)
            if self.exists(chain):
                self.remove_dir(cache_id)
                return self.get(chain)
            staging = os.path.join(self.layout.tmp, f"layer-{random_id()}")
            os.mkdir(staging, 0o700)
            if any(is_metacopy_file(os.path.join(diff, rel), st) for rel, st in archive.walk(diff)):
                write_value(self.layout.layer(cache_id, METACOPY_FILE), "", 0o600)
            values = {"diff": diff_id, "size": str(layer_size(diff)), "cache-id": cache_id}
            if parent is not None:
                values["parent"] = parent
            for name, value in values.items():
                write_value(os.path.join(staging, name), value)
            if incomplete:
                write_value(os.path.join(staging, INCOMPLETE), "", 0o600)
            if kept:
                self._check_kept(kept, diff)
                os.rename(kept.path, os.path.join(staging, tarsplit.WHOLE if kept.whole else tarsplit.SPLIT))
            os.rename(staging, self.layout.chain(chain))
        finally:
            if made and kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kept.path)
        return self.get(chain)

    def splitter(self, cache_id: str) -> tarsplit.Splitter:
        """A :class:`~pylayerfs.image.store.tarsplit.Splitter` for the tar extracted into ``cache_id``'s diff, writing
        in the store's ``tmp/`` (its ``discard()`` removes what :meth:`register` did not take).
        """
        return tarsplit.Splitter(self._split_path(), self.diff_dir(cache_id))

    def _split_path(self) -> str:
        """A fresh path in the store's ``tmp/`` for a split being made (collected there if its writer dies)."""
        return os.path.join(self.layout.tmp, f"split-{random_id()}")

    @staticmethod
    def _check_kept(kept: tarsplit.Kept, diff: str) -> None:
        """Raise :class:`StoreError` unless the bytes ``kept`` gives back (from ``diff``) hash to its DiffID."""
        try:
            got = tarsplit.digest(kept.path, kept.whole, diff)
        except tarsplit.SplitError as exc:
            raise StoreError(f"the layer's tar cannot be kept: {exc}") from exc
        if got != kept.diff_id:
            raise StoreError(f"the layer's tar cannot be kept: it gives back {got}, not {kept.diff_id}")

    def is_incomplete(self, chain: str) -> bool:
        """Does the layer ``chain`` still carry the mark of a load or pull in progress (see :meth:`register`)?"""
        return os.path.exists(self.layout.chain(chain, INCOMPLETE))

    def complete(self, chain: str | None) -> None:
        """Clear the in-progress mark of the layer ``chain`` and of every layer below it (with the store locked).

        Raises :class:`StoreError` as :meth:`stack` when one of them is missing (removed by a failed concurrent load).
        """
        for layer in self.stack(chain):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.layout.chain(layer.chain_id, INCOMPLETE))

    def _apply_own_tar(self, cache_id: str, parent: str | None) -> tarsplit.Kept:
        """Put the extraction of the tar of ``cache_id``'s diff in the diff's place; that tar, kept as a split.

        What moby's overlay2 does with a container's layer: its tar (and DiffID) carries a ``.wh.x`` the RUN step made
        as it is, the image layer is that tar applied (``pkg/archive`` ``Unpack`` with the overlay ``ConvertRead``),
        where ``.wh.x`` is a whiteout of ``x``. So the layer on disk and the tar of its DiffID never disagree.
        """
        diff = self.diff_dir(cache_id)
        tar = os.path.join(self.layout.tmp, f"layer-{random_id()}.tar")
        applied = self.layout.layer(cache_id, "applied")
        splitter = tarsplit.Splitter(self._split_path(), applied)
        try:
            with open(tar, "wb") as out:
                archive.write_layer(diff, out, self.lower_dirs(parent))
            os.mkdir(applied, 0o755)
            with open(tar, "rb") as f:
                got = archive.extract_keeping(f, tar, applied, cast(BinaryIO, splitter), splitter.seen)
            kept = splitter.close(got)
            os.rename(diff, applied + "-old")
            os.rename(applied, diff)
            shutil.rmtree(applied + "-old")
        except BaseException:
            shutil.rmtree(applied, ignore_errors=True)
            splitter.discard()
            raise
        finally:
            os.unlink(tar)
        return kept

    def write_tar(self, layer: Layer, out: BinaryIO) -> None:
        """Write the layer's tar to ``out``: the bytes its DiffID is the sha256 of (kept ones, or its diff's tar).

        Raises :class:`StoreError` for a kept split that no longer matches the diff, the OSError of reading the layer
        or writing ``out``.
        """
        entry = self.layout.chain(layer.chain_id)
        for name, whole in ((tarsplit.SPLIT, False), (tarsplit.WHOLE, True)):
            if os.path.exists(os.path.join(entry, name)):
                try:
                    tarsplit.write(os.path.join(entry, name), whole, self.diff_dir(layer.cache_id), out)
                except tarsplit.SplitError as exc:
                    raise StoreError(f"layer {layer.chain_id}: {exc}") from exc
                return
        archive.write_layer(self.diff_dir(layer.cache_id), out, self.lower_dirs(layer.parent))

    def kept_size(self, layer: Layer) -> int | None:
        """The size in bytes of the layer's tar when it is kept as a split (known without reading its files), else
        None. Raises :class:`StoreError` for a damaged split.
        """
        split = os.path.join(self.layout.chain(layer.chain_id), tarsplit.SPLIT)
        if not os.path.exists(split):
            return None
        try:
            return tarsplit.size(split)
        except tarsplit.SplitError as exc:
            raise StoreError(f"layer {layer.chain_id}: {exc}") from exc

    def remove(self, layer: Layer) -> None:
        """Forget a layer: its layerdb entry renamed to ``<chain-id>-<random>-removing`` first, then its directories.

        Raises FileNotFoundError when it is not registered. Children and images that use it are the caller's to check.
        """
        removing = f"{self.layout.chain(layer.chain_id)}-{random_id()[:8]}-removing"
        os.rename(self.layout.chain(layer.chain_id), removing)
        self.remove_dir(layer.cache_id)
        shutil.rmtree(removing)

    def remove_dir(self, cache_id: str) -> None:
        """Remove ``overlay2/<cache-id>`` and its short link, and the vfs driver's tree of that name.

        Never raises: what is missing is skipped, what cannot be removed stays.
        """
        d = self.layout.layer(cache_id)
        try:
            link = read_value(os.path.join(d, LINK_FILE))
            os.unlink(os.path.join(self.layout.links, link))
        except OSError:
            pass
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.layout.vfs_dir(cache_id), ignore_errors=True)

    def container_dirs(self) -> set[str]:
        """The cache-ids of the layer directories containers use (``layerdb/mounts/<id>/{mount-id,init-id}``)."""
        found = set()
        for container in os.listdir(self.layout.mounts):
            for name in ("mount-id", "init-id"):
                path = os.path.join(self.layout.mounts, container, name)
                if os.path.exists(path):
                    found.add(read_value(path))
        return found

    def collect_garbage(self, in_use: set[str]) -> list[str]:
        """Remove what an interrupted writer left: layers a load or pull registered but never completed (see
        :meth:`register`), unregistered layer directories and staging entries; their names (ChainIDs, cache-ids).

        Directories in ``in_use`` or used by a container stay. A mount left behind inside one of them (a builder killed
        during RUN) is detached first (``umount2`` MNT_DETACH: EPERM without CAP_SYS_ADMIN). Take the store lock and the
        ``busy`` lock first (:meth:`Store.collect_garbage <pylayerfs.image.store.store.Store.collect_garbage>` does).
        """
        removed = []
        incomplete = [layer for layer in self.all() if self.is_incomplete(layer.chain_id)]
        for layer in sorted(incomplete, key=lambda layer: -len(self.stack(layer.chain_id))):  # top layers first
            self.remove(layer)
            removed.append(layer.chain_id)
        registered = {layer.cache_id for layer in self.all()} | in_use | self.container_dirs()
        vfs = os.listdir(self.layout.vfs) if os.path.isdir(self.layout.vfs) else []
        for name in sorted(set(os.listdir(self.layout.overlay2)) | set(vfs)):
            if name != LINK_DIR and name not in registered:
                for mountpoint in mounts_below(self.layout.layer(name)):
                    realfs.detach(mountpoint)
                self.remove_dir(name)
                removed.append(name)
        for name in os.listdir(self.layout.layerdb):
            if name.endswith("-removing"):
                shutil.rmtree(os.path.join(self.layout.layerdb, name), ignore_errors=True)
        for name in os.listdir(self.layout.tmp):
            path = os.path.join(self.layout.tmp, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
        return removed


def _needs_own_tar(diff: str, rel: str) -> bool:
    """Must the diff be replaced by the extraction of its own tar (:meth:`LayerStore._apply_own_tar`)? For a name
    starting with ``.wh.`` (a whiteout once in a tar) or an object with a redirect (no tar holds one)."""
    return rel.rpartition("/")[2].startswith(".wh.") or has_redirect(os.path.join(diff, rel))
