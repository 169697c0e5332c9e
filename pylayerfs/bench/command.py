"""``pylayerfs bench``: the command line of the benchmark."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from pylayerfs.bench.run import CHOICES
from pylayerfs.image.drivers import overlay as rootfs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small data set and one round (seconds, not minutes)")
    parser.add_argument("--rounds", type=int, help="rounds of every workload (default 5; 1 with --quick)")
    parser.add_argument("--impl", action="append", choices=list(CHOICES),
                        help="implementations to measure, repeatable (default: all available): pylayerfs (the "
                             "native transport), libfuse (the mfusepy binding), no-passthrough (native, every read "
                             "and write served), fuse-overlayfs, kernel, bare (the directory itself)")  # fmt: skip
    parser.add_argument("--no-builder", action="store_true", help="leave out B1 (the builder and ps -s)")
    parser.add_argument("--dir", help="where to put the data set (default: a new tmpfs, or a temporary directory)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON report (every sample) to FILE")
    parser.add_argument(
        "--images",
        action="store_true",
        help="measure images in and out instead: save, load, pull, push (import while load is "
        "missing) against skopeo copy between the same endpoints, with each command's peak RSS",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        metavar="MIB",
        help="--images: the image's layer size in MiB (default 256; 32 with --quick)",
    )
    parser.add_argument("--explain", action="store_true",
                        help="say what each workload (W1-W8, M1, B1) measures, with --quick's sizes or the full "
                             "run's, and exit")  # fmt: skip


@contextlib.contextmanager
def _workspace(directory: str | None) -> Iterator[str]:
    """A tmpfs (as root), so that the layer under test is measured, not the disk."""
    root = os.path.abspath(directory) if directory else tempfile.mkdtemp(prefix="pylayerfs-bench-")
    os.makedirs(root, exist_ok=True)
    mounted = False
    if directory is None and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16G", "tmpfs", root], check=False).returncode == 0
    try:
        yield root
    finally:
        for name in os.listdir(root):
            path = os.path.join(root, name)
            for mountpoint in reversed(sorted(_mounts(path))):
                rootfs.unmount(mountpoint)
        if mounted:
            subprocess.run(["umount", "-l", root], check=False)
        if directory is None:
            shutil.rmtree(root, ignore_errors=True)


def _mounts(path: str) -> list[str]:
    from pylayerfs.overlay.params import mounts_below

    return mounts_below(path)


def run(args: argparse.Namespace) -> int:
    from pylayerfs.bench import data
    from pylayerfs.bench.builder import builder
    from pylayerfs.bench.run import IMPLEMENTATIONS, PYLAYERFS, BenchError, as_json, available, report
    from pylayerfs.bench.run import run as run_workloads

    sizes = data.QUICK if args.quick else data.FULL
    if args.explain:
        from pylayerfs.bench.run import legend

        print("\n".join(legend(sizes)))
        return 0
    rounds = args.rounds or (1 if args.quick else 5)
    if rounds < 1:
        print("pylayerfs bench: --rounds must be at least 1", file=sys.stderr)
        return 1

    try:
        save = open(args.save, "w") if args.save else None  # noqa: SIM115 (closed once the report is written)
    except OSError as exc:
        print(f"pylayerfs bench: cannot write the report to {args.save}: {exc.strerror}", file=sys.stderr)
        return 1

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    if args.images:
        return _images(args, rounds, save, progress)
    try:
        impls = available([CHOICES[name] for name in args.impl] if args.impl else list(IMPLEMENTATIONS))
        with _workspace(args.dir) as root:
            progress(f"making the data set in {root}")
            data.make(root, sizes)
            results = run_workloads(root, sizes, rounds, impls, progress)
            if not args.no_builder and PYLAYERFS in impls:
                progress("B1: the builder's cache and ps -s")
                results.extra["B1"] = builder(root, sizes)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"pylayerfs bench: {exc}", file=sys.stderr)
        return 1
    if save is not None:
        with save:
            save.write(as_json(results) + "\n")
    print(as_json(results) if args.format == "json" else report(results))
    return 0


def _images(args: argparse.Namespace, rounds: int, save: TextIO | None, progress: Callable[[str], None]) -> int:
    """``bench --images`` (:mod:`pylayerfs.bench.images`); 0, or 1 after one line on stderr."""
    import json

    from pylayerfs.bench import images

    size = (args.image_size or (32 if args.quick else 256)) << 20
    try:
        with _workspace(args.dir) as root:
            result = images.run(root, size, rounds, progress)
    except (images.ImagesBenchError, OSError) as exc:
        print(f"pylayerfs bench: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(images.as_json(result), indent=2)
    if save is not None:
        with save:
            save.write(text + "\n")
    print(text if args.format == "json" else images.report(result))
    return 0
