"""``pylayerfs diagram``: an image's (or a container's) layer stack as a picture, like the blog's figures.

One box per image, top first: the image ID, its parent, the step that made it
and the size of its layer (0B for configuration steps). A container adds its
thin writable layer on top, with its size and virtual size. The same stack can
be drawn as text for a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from xml.sax.saxutils import escape

from pylayerfs.container.records import Container
from pylayerfs.container.runtime import Runtime
from pylayerfs.dockercli import ellipsis
from pylayerfs.image.history import history_rows
from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store

WIDTH = 640
BOX_HEIGHT = 56
GAP = 10
MARGIN = 20


@dataclass(frozen=True)
class Box:
    title: str  # "4d85107b2c59" or "container layer (R/W)"
    lines: tuple[str, ...]
    writable: bool = False


def image_boxes(store: Store, ref: str) -> list[Box]:
    """One box per history entry, newest first, named as ``history`` names them."""
    rows = history_rows(store, store.resolve(ref))
    boxes = []
    for i, row in enumerate(rows):
        ident = row.id if row.id == "<missing>" else row.id.removeprefix("sha256:")[:12]
        parent = rows[i + 1].id if i + 1 < len(rows) else ""
        parent_text = "none" if not parent else parent if parent == "<missing>" else parent.removeprefix("sha256:")[:12]
        step = row.created_by.removeprefix("/bin/sh -c ").replace("#(nop) ", "").strip()
        boxes.append(Box(ident, (f"parent {parent_text}", ellipsis(step, 70), human_size(row.size))))
    return boxes


def container_boxes(runtime: Runtime, container: Container) -> list[Box]:
    from pylayerfs.container.runtime import container_size

    size, virtual = container_size(runtime, container)
    top = Box("container layer (read-write)", (f"container {container.short_id} ({container.name})",
                                               "every layer below is read-only, shared by the image's containers",
                                               f"size {human_size(size)} (virtual {human_size(virtual)})"),
              writable=True)  # fmt: skip
    return [top, *image_boxes(runtime.store, container.image_id)]


def svg(title: str, boxes: list[Box]) -> str:
    height = MARGIN * 2 + 30 + len(boxes) * (BOX_HEIGHT + GAP)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 14}" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    y = MARGIN + 30
    for box in boxes:
        fill, stroke, dash = (
            ("#fff4d6", "#c08000", ' stroke-dasharray="6 3"') if box.writable else ("#e8f0fb", "#3060a0", "")
        )
        out.append(f'<g class="layer"><rect x="{MARGIN}" y="{y}" width="{WIDTH - 2 * MARGIN}" height="{BOX_HEIGHT}" '
                   f'rx="6" fill="{fill}" stroke="{stroke}"{dash}/>')  # fmt: skip
        out.append(f'<text x="{MARGIN + 10}" y="{y + 18}" font-weight="bold">{escape(box.title)}</text>')
        out.append(f'<text x="{WIDTH - MARGIN - 10}" y="{y + 18}" text-anchor="end">{escape(box.lines[-1])}</text>')
        for n, line in enumerate(box.lines[:-1]):
            out.append(f'<text x="{MARGIN + 10}" y="{y + 34 + 14 * n}">{escape(line)}</text>')
        out.append("</g>")
        y += BOX_HEIGHT + GAP
    out.append("</svg>")
    return "\n".join(out) + "\n"


def text(title: str, boxes: list[Box]) -> str:
    """The same stack for a terminal."""
    width = max(len(line) for b in boxes for line in (b.title, *b.lines)) + 4
    lines = [title]
    for box in boxes:
        edge = "+" + ("~" if box.writable else "-") * (width - 2) + "+"
        lines.append(edge)
        for line in (box.title, *box.lines):
            lines.append("| " + line.ljust(width - 4) + " |")
    lines.append("+" + "-" * (width - 2) + "+")
    return "\n".join(lines)


CONVERTER = "rsvg-convert"
CONVERTER_MISSING = "needs rsvg-convert to write a PNG (apt-get install librsvg2-bin)"


class OutputError(Exception):
    """The picture could not be written; the message is one line for the user."""


def to_png(svg_text: str, png_path: str) -> None:
    """Render ``svg_text`` into ``png_path`` with rsvg-convert, atomically.

    The PNG is written to a temporary name in the same directory and renamed into place once whole, so
    ``png_path`` is either the complete picture or untouched; nothing else is left behind. Raises
    OutputError with the converter's own message (or how to install it), OSError when the directory
    cannot be written.
    """
    converter = shutil.which(CONVERTER)
    if converter is None:
        raise OutputError(CONVERTER_MISSING)
    tmp = _temporary(png_path)
    try:
        result = subprocess.run([converter, "-f", "png", "-o", tmp], input=svg_text.encode(), capture_output=True,
                                check=False)  # fmt: skip
        if result.returncode != 0:
            said = [line.strip() for line in result.stderr.decode(errors="replace").splitlines() if line.strip()]
            raise OutputError(f"{CONVERTER} failed: {said[-1] if said else f'exit status {result.returncode}'}")
        if os.path.getsize(tmp) == 0:
            raise OutputError(f"{CONVERTER} wrote nothing")
        os.replace(tmp, png_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_svg(svg_text: str, path: str) -> None:
    """Write ``svg_text`` to ``path`` atomically (a temporary name, then rename); raises OSError."""
    tmp = _temporary(path)
    try:
        with open(tmp, "w") as f:
            f.write(svg_text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _temporary(path: str) -> str:
    """A new empty file next to ``path`` (same filesystem, so rename is atomic), hidden by a leading dot."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments)."""
    from pylayerfs.container.runtime import Runtime
    from pylayerfs.image.store import Store, StoreError

    if args.output and not args.output.lower().endswith((".svg", ".png")):
        print(f"pylayerfs diagram: -o {args.output}: name a .svg or a .png file", file=sys.stderr)
        return 1
    try:
        runtime = Runtime(Store(args.root))
        try:
            container = runtime.containers.find(args.target)
            title = f"container {container.name} of {container.image_name}"
            boxes = container_boxes(runtime, container)
        except StoreError:
            title = f"image {args.target}"
            boxes = image_boxes(runtime.store, args.target)
        if not args.output:
            print(text(title, boxes))
            return 0
        picture = svg(title, boxes)
        if args.output.lower().endswith(".png"):
            to_png(picture, args.output)
        else:
            write_svg(picture, args.output)
    except (StoreError, OutputError) as exc:
        print(f"pylayerfs diagram: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pylayerfs diagram: {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
