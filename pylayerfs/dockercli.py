"""Tables as docker/cli prints them: Go's tabwriter with minwidth 10, padding 3, spaces.

Every column but the last is as wide as its widest cell plus 3, and at least
10; the last is not padded, so a row whose last cell is empty ends in spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

ELLIPSIS = "…"


def render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(max(len(row[i]) for row in table) + 3, 10) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("".join(cells) + row[-1])
    return "\n".join(lines)


def ellipsis(text: str, length: int) -> str:
    """docker/cli's Ellipsis: at most ``length`` runes, the last one an ellipsis when cut."""
    return text if len(text) <= length else text[: length - 1] + ELLIPSIS
