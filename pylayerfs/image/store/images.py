"""Images: config JSON in ``imagedb/content``, named by its sha256; parent and origin in ``imagedb/metadata``."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pylayerfs.image.store.layers import chain_id
from pylayerfs.image.store.layout import Layout, StoreError, hex_of, read_value, write_value

BUILT_LOCALLY = b"\x01"


@dataclass(frozen=True)
class Image:
    """An image: its ID (``sha256:<hex>``, the sha256 of ``raw``) and its config JSON, as stored (``raw`` bytes).

    The config is the OCI image spec's (config.md) with Docker's extra fields.
    """

    id: str  # sha256:<hex>
    raw: bytes

    @cached_property
    def config(self) -> dict[str, Any]:
        """The config JSON as a dict (parsed once); AssertionError if it is not a JSON object."""
        value = json.loads(self.raw)
        assert isinstance(value, dict)
        return value

    @property
    def short_id(self) -> str:
        """The first 12 hex digits of the ID, as ``docker images`` shows it."""
        return hex_of(self.id)[:12]

    @property
    def diff_ids(self) -> list[str]:
        """``rootfs.diff_ids``: the layers' DiffIDs (``sha256:<hex>``), bottom layer first; ``[]`` without layers."""
        return list((self.config.get("rootfs") or {}).get("diff_ids") or [])

    @property
    def history(self) -> list[dict[str, Any]]:
        """The config's ``history`` entries (``created``, ``created_by``, ``empty_layer``...), oldest first."""
        return list(self.config.get("history") or [])

    @property
    def created(self) -> datetime.datetime:
        """The config's ``created``, an aware UTC datetime (microseconds); Go's zero time when it has none (the
        field is optional in the OCI image spec). Raises ValueError when it is malformed (a load refuses those).
        """
        return parse_time(self.config.get("created") or "0001-01-01T00:00:00Z")

    @property
    def run_config(self) -> dict[str, Any]:
        """A copy of the config's ``config`` object (Env, Cmd, WorkingDir...); ``{}`` when absent or null."""
        return dict(self.config.get("config") or {})

    @property
    def top_layer(self) -> str | None:
        """The ChainID (``sha256:<hex>``) of the image's top layer (None for an image without layers)."""
        top = None
        for diff_id in self.diff_ids:
            top = chain_id(top, diff_id)
        return top


def parse_time(text: str) -> datetime.datetime:
    """RFC 3339 with nanoseconds (Go) -> an aware UTC datetime, truncated to microseconds.

    ``Z`` and a missing fraction are accepted; an offset other than ``Z`` is not honoured (the time is read as UTC:
    Docker writes UTC). Raises ValueError for a malformed time.
    """
    base, _, rest = text.rstrip("Z").partition(".")
    fraction = rest[:6]
    stamp = datetime.datetime.fromisoformat(base + (f".{fraction}" if fraction else ""))
    return stamp.replace(tzinfo=datetime.UTC)


def format_time(when: datetime.datetime) -> str:
    """Go's time.RFC3339Nano in UTC: ``2026-11-29T04:13:00.123456789Z`` (trailing zeros trimmed)."""
    when = when.astimezone(datetime.UTC)
    fraction = f"{when.microsecond:06d}000".rstrip("0")
    return when.strftime("%Y-%m-%dT%H:%M:%S") + (f".{fraction}" if fraction else "") + "Z"


def encode(config: dict[str, Any]) -> bytes:
    """Config bytes as Docker writes them: compact, top-level keys sorted, Go's HTML-safe escapes; UTF-8, no newline.

    Their sha256 is the image ID (moby's ``image/image.go`` ``MarshalJSON``).
    """
    text = json.dumps({k: config[k] for k in sorted(config)}, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return text.encode()


class ImageStore:
    """Image configs in ``imagedb/content/sha256``, their metadata in ``imagedb/metadata/sha256``.

    Moby's ``image/fs.go`` and ``image/store.go``. Writers hold the store lock.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def get(self, image_id: str) -> Image:
        """The image ``image_id`` (``sha256:<hex>`` or ``<hex>``), its config checked against its ID.

        Raises :class:`StoreError` when no config is stored under that ID (or it cannot be read), or it hashes to
        another ID (damaged).
        """
        try:
            with open(self.layout.config(image_id), "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise StoreError(f"no such image: {image_id}") from exc
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if digest != "sha256:" + hex_of(image_id):
            raise StoreError(f"image {image_id} is damaged: its config hashes to {digest}")
        return Image(digest, raw)

    def ids(self) -> list[str]:
        """The ID (``sha256:<hex>``) of every stored image config, sorted."""
        return ["sha256:" + name for name in sorted(os.listdir(self.layout.content)) if len(name) == 64]

    def parent(self, image_id: str) -> str | None:
        """The ID of the image ``image_id`` was built on (its ``parent`` metadata), None when it has none."""
        path = self.layout.image_metadata(image_id, "parent")
        return read_value(path) if os.path.exists(path) else None

    def children(self, image_id: str) -> list[str]:
        """The IDs of the images whose ``parent`` metadata is ``image_id`` (the builder cache's candidates), sorted."""
        return [i for i in self.ids() if self.parent(i) == image_id]

    def built_locally(self, image_id: str) -> bool:
        """Was the image built (or committed) here? Its ``builtLocally`` metadata exists."""
        return os.path.exists(self.layout.image_metadata(image_id, "builtLocally"))

    def put(self, config: dict[str, Any], parent: str | None) -> Image:
        """Store an image config built here (with the store locked); the same config is the same image. Returns it.

        Writes the config as :func:`encode` gives it, with ``builtLocally`` and ``parent``: see :meth:`put_raw`.
        """
        return self.put_raw(encode(config), parent, built_locally=True)

    def put_raw(self, raw: bytes, parent: str | None = None, built_locally: bool = False) -> Image:
        """Store config bytes as they are (a loaded or pulled image's: its ID is their sha256); returns the image.

        Writes the config (0600), ``builtLocally`` when ``built_locally`` and, with ``parent`` (an image ID),
        ``parent``; each atomically (moby's ``image/store.go`` ``Create``). Raises the OSError of a failed write.
        """
        image = Image("sha256:" + hashlib.sha256(raw).hexdigest(), raw)
        write_value(self.layout.config(image.id), raw, 0o600)
        meta = self.layout.image_metadata(image.id)
        os.makedirs(meta, 0o700, exist_ok=True)
        if built_locally:
            write_value(os.path.join(meta, "builtLocally"), BUILT_LOCALLY)
        if parent is not None:
            write_value(os.path.join(meta, "parent"), parent)
        return image

    def touch(self, image_id: str, when: datetime.datetime) -> None:
        """Record ``when`` as the image's ``lastUpdated`` (RFC 3339 with nanoseconds, UTC); raises OSError."""
        meta = self.layout.image_metadata(image_id)
        os.makedirs(meta, 0o700, exist_ok=True)
        write_value(os.path.join(meta, "lastUpdated"), format_time(when))

    def last_tagged(self, image_id: str) -> str:
        """The image's ``lastUpdated`` (when it was last tagged), or Go's zero time ``0001-01-01T00:00:00Z``."""
        path = self.layout.image_metadata(image_id, "lastUpdated")
        return read_value(path) if os.path.exists(path) else "0001-01-01T00:00:00Z"

    def delete(self, image_id: str) -> None:
        """Remove the image's config and metadata; what is already gone is skipped. Layers and tags are the caller's."""
        shutil.rmtree(self.layout.image_metadata(image_id), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layout.config(image_id))
