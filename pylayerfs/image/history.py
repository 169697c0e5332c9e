"""An image's history as ``docker history`` lists it (moby's ``daemon/images`` ``ImageHistory``).

One row per history entry of the image's config, newest first, each with the
size of the layer it made (0 for an empty layer), and the image ID along the
chain of local parents; where that chain ends, ``<missing>``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pylayerfs.image.store import Store
from pylayerfs.image.store.images import Image, parse_time


@dataclass(frozen=True)
class HistoryRow:
    id: str  # full, or "<missing>"
    created: datetime.datetime
    created_by: str
    size: int
    comment: str


def history_rows(store: Store, image: Image) -> list[HistoryRow]:
    """The rows of ``image``'s history, newest first; sizes in bytes; IDs ``sha256:...`` or ``<missing>``."""
    sizes = [layer.size for layer in reversed(store.layers_of(image))]
    rows = []
    layer = 0
    for entry in image.history:
        size = 0
        if not entry.get("empty_layer"):
            size = sizes[layer] if layer < len(sizes) else 0
            layer += 1
        created = entry.get("created")
        rows.append(HistoryRow("<missing>", image.created if created is None else parse_time(created),
                               entry.get("created_by", ""), size, entry.get("comment", "")))  # fmt: skip
    rows.reverse()
    current: str | None = image.id
    for i, row in enumerate(rows):
        if current is None:
            break
        rows[i] = HistoryRow(current, row.created, row.created_by, row.size, row.comment)
        current = store.images.parent(current)
    return rows
