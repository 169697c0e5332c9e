"""The store as one object: layers, images and references under one root, and the rules across them."""

from __future__ import annotations

import contextlib
import fcntl
import os

from pylayerfs.image.store.images import Image, ImageStore
from pylayerfs.image.store.layers import Layer, LayerStore
from pylayerfs.image.store.layout import Layout, StoreError, hex_of
from pylayerfs.image.store.references import References

ENV_ROOT = "PYLAYERFS_ROOT"
BUSY = "busy"


def default_root() -> str:
    """``$PYLAYERFS_ROOT``, else /var/lib/pylayerfs for root, else ``$XDG_DATA_HOME/pylayerfs``."""
    if os.environ.get(ENV_ROOT):
        return os.environ[ENV_ROOT]
    if os.geteuid() == 0:
        return "/var/lib/pylayerfs"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "pylayerfs")


class Store:
    """The store under ``root`` (default: :func:`default_root`): layers, images and references, created if absent.

    Raises the OSError of creating the directories (EACCES...).
    """

    def __init__(self, root: str | None = None) -> None:
        self.layout = Layout(root or default_root())
        self.layout.create()
        self.layers = LayerStore(self.layout)
        self.images = ImageStore(self.layout)
        self.refs = References(self.layout)

    @property
    def root(self) -> str:
        """The store's root directory (absolute)."""
        return self.layout.root

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Exclusive ``flock`` on ``<root>/lock``, waited for: the short moments that register layers, images, tags."""
        return self.layout.locked()

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Shared ``flock`` on ``<root>/busy``, while a build or a container has unregistered directories here."""
        return self.layout.flock(BUSY, fcntl.LOCK_SH)

    def collect_garbage(self, in_use: frozenset[str] = frozenset()) -> list[str]:
        """Remove what interrupted writers left, unless a build or container is at work right now; the names removed.

        ``[]`` without looking when the ``busy`` lock is held. ``in_use`` names cache-ids to keep. Raises what
        :meth:`LayerStore.collect_garbage <pylayerfs.image.store.layers.LayerStore.collect_garbage>` raises.
        """
        try:
            with self.layout.flock(BUSY, fcntl.LOCK_EX | fcntl.LOCK_NB), self.locked():
                return self.layers.collect_garbage(set(in_use))
        except BlockingIOError:
            return []

    # -- images by name --------------------------------------------------------------------

    def resolve(self, ref: str) -> Image:
        """An image by ``name[:tag]``, full ID (``sha256:<hex>``) or unambiguous ID prefix (lowercase hex).

        Raises :class:`StoreError` for no such image, an ambiguous prefix, or a damaged image.
        """
        if ref.startswith("sha256:"):
            return self.images.get(ref)
        with contextlib.suppress(StoreError):  # not a valid name: maybe an ID prefix
            found = self.refs.lookup(ref)
            if found is not None:
                return self.images.get(found)
        if ref and all(c in "0123456789abcdef" for c in ref):
            matches = [i for i in self.images.ids() if hex_of(i).startswith(ref)]
            if len(matches) == 1:
                return self.images.get(matches[0])
            if len(matches) > 1:
                raise StoreError(f"image ID prefix '{ref}' is ambiguous ({len(matches)} images)")
        raise StoreError(f"no such image: {ref}")

    def layers_of(self, image: Image) -> list[Layer]:
        """The image's layers, top first; raises :class:`StoreError` for a missing or damaged layer."""
        return self.layers.stack(image.top_layer)

    def size(self, image: Image) -> int:
        """The image's size in bytes, its layers' own sizes summed (``docker images``' SIZE); raises as layers_of."""
        return sum(layer.size for layer in self.layers_of(image))
