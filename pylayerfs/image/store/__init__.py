"""The image store: layers and images on disk, laid out as Docker's overlay2 graphdriver store.

See :mod:`pylayerfs.image.store.layout` for the directories, :mod:`.layers` for
layers (DiffID, ChainID, size), :mod:`.images` for image configs and their
metadata, :mod:`.references` for names and tags.
"""

from pylayerfs.image.store.layout import StoreError
from pylayerfs.image.store.store import Store, default_root

__all__ = ["Store", "StoreError", "default_root"]
