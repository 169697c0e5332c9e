"""The archive commands: ``save`` and ``load``, as docker/cli's ``image save`` and ``image load``.

``save`` writes to ``-o FILE`` (through a temporary file beside it, renamed when whole, as docker/cli's
``CopyToFile``) or to stdout, never to a terminal. ``load`` reads ``-i FILE`` (or a directory: an OCI layout) or
stdin, prints docker's ``Loaded image: name:tag`` / ``Loaded image ID: sha256:...`` lines, and on a terminal (without
``-q``) a ``<id>: Loading layer [=====>     ]  1.2MB/3.4MB`` line per layer read, as docker/cli's jsonmessage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

from pylayerfs.image import archive
from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image
from pylayerfs.image.store.layers import random_id
from pylayerfs.image.transfer import archives
from pylayerfs.image.transfer.ingest import Blob, diff_ids_of

BAR_WIDTH = 50  # jsonmessage's progress bar


def progress_line(layer_id: str, current: int, total: int) -> str:
    """docker/cli's ``JSONProgress.String`` after ``<id>: Loading layer``: a 50-wide bar and the sizes (bytes)."""
    filled = min(BAR_WIDTH, int(current * 100 / total) // 2) if total else BAR_WIDTH
    bar = "=" * filled + ">" + " " * (BAR_WIDTH - filled)
    return f"{layer_id}: Loading layer [{bar}] {human_size(current):>8}/{human_size(total)}"


class _Counting:
    """A reader that draws the progress line of a layer as it is read (at most every 0.1 s, and at the end)."""

    def __init__(self, source: BinaryIO, layer_id: str, total: int) -> None:
        self.source, self.layer_id, self.total, self.count, self.drawn = source, layer_id, total, 0, 0.0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        if time.monotonic() - self.drawn > 0.1 or not data:
            self.drawn = time.monotonic()
            sys.stdout.write("\r" + progress_line(self.layer_id, self.count, self.total))
            sys.stdout.flush()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


def _with_progress(planned: archives.Planned) -> archives.Planned:
    """``planned`` whose layer blobs draw their progress on stdout as they are read."""

    def wrap(blob: Blob, diff_id: str) -> Blob:
        @contextlib.contextmanager
        def opened() -> Iterator[BinaryIO]:
            try:
                with blob.open() as f:
                    yield _Counting(f, diff_id.removeprefix("sha256:")[:12], blob.size or 0)  # type: ignore[misc]
            finally:
                sys.stdout.write("\n")  # the line stays, as docker's does; an error is printed below it

        return Blob(open=opened, name=blob.name, digest=blob.digest, size=blob.size)

    layers = [wrap(b, d) for b, d in zip(planned.layers, diff_ids_of(planned.config), strict=True)]
    return archives.Planned(planned.config, layers, planned.tags)


def save(store: Store, names: list[str], output: str | None) -> None:
    """``docker save [-o FILE] IMAGE...``; raises StoreError, OSError (``FILE`` untouched then)."""
    if output is None:
        if sys.stdout.isatty():
            raise StoreError("cowardly refusing to save to a terminal. Use the -o flag or redirect")
        archives.save(store, names, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    temporary = os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.{random_id()[:8]}")
    try:
        with open(temporary, "wb") as out:
            archives.save(store, names, out)
        os.rename(temporary, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def load(store: Store, path: str | None, quiet: bool) -> None:
    """``docker load [-i FILE] [-q]``: stores the images, prints their names; raises StoreError, ArchiveError,
    OSError with the store as it was for the image that failed."""
    if path is None and sys.stdin.isatty():
        raise StoreError("requested load from stdin, but stdin is empty")
    show = not quiet and sys.stdout.isatty()

    def loaded(planned: archives.Planned, image: Image) -> None:
        print("\n".join(f"Loaded image: {t}" for t in planned.tags) or f"Loaded image ID: {image.id}", flush=True)

    archives.load(store, path, sys.stdin.buffer, loaded, _with_progress if show else None)


def run(args: argparse.Namespace) -> int:
    """The command line's handler for ``save`` and ``load`` (cli/main.py parses the arguments)."""
    try:
        store = Store(args.root)
        if args.command == "save":
            save(store, args.images, args.output)
        else:
            load(store, args.input, args.quiet)
    except (StoreError, archive.ArchiveError, OSError) as exc:
        sys.stdout.flush()
        print(f"pylayerfs {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
