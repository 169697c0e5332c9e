"""The benchmark data set, made once per run (on a tmpfs where possible, so the layer under test is measured).

tree/dNNN/fNN   directories of small files (W1 walk)
wide/eNNNNN     one wide directory of empty files (W2 listing)
big             a large file (W3 sequential read)
low             a file to copy up (W6)
many/           a tree of many files (M1 memory)
layers/LNNN     lower layers for W7: every layer has d0..d9 (so every directory is merged);
                only the bottom one holds the files that are stat'ed
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    tree_dirs: int
    tree_files: int
    wide: int
    big_mib: int
    low_mib: int
    write_mib: int
    create_files: int
    many: int
    depths: tuple[int, ...]
    depth_files: int
    round_trips: int


FULL = Sizes(500, 20, 20_000, 512, 256, 256, 5_000, 100_000, (1, 10, 50, 100), 100, 20_000)
QUICK = Sizes(50, 10, 2_000, 16, 8, 8, 500, 5_000, (1, 10), 10, 2_000)


def _write(path: str, data: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(data)


def _big(path: str, mib: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)


def make(root: str, sizes: Sizes) -> None:
    """The data set below ``root``/data and the W7 layers below ``root``/layers."""
    data = os.path.join(root, "data")
    for d in range(sizes.tree_dirs):
        os.makedirs(f"{data}/tree/d{d:03d}")
        for i in range(sizes.tree_files):
            _write(f"{data}/tree/d{d:03d}/f{i:02d}", b"x" * 64)
    os.makedirs(f"{data}/wide")
    for i in range(sizes.wide):
        _write(f"{data}/wide/e{i:05d}")
    _big(f"{data}/big", sizes.big_mib)
    _big(f"{data}/low", sizes.low_mib)
    for i in range(sizes.many):
        group = f"{data}/many/d{i // 100:04d}"
        if i % 100 == 0:
            os.makedirs(group)
        _write(f"{group}/f{i % 100:02d}")
    deepest = max(sizes.depths)
    for layer in range(deepest):
        for d in range(10):
            os.makedirs(f"{root}/layers/L{layer:03d}/d{d}")
            if layer == deepest - 1:
                for i in range(sizes.depth_files):
                    _write(f"{root}/layers/L{layer:03d}/d{d}/f{i:03d}", b"y" * 64)
            else:
                _write(f"{root}/layers/L{layer:03d}/d{d}/layer{layer:03d}", b"z")


def depth_layers(root: str, depth: int, deepest: int) -> list[str]:
    """The top-first lowerdirs of a stack ``depth`` deep whose bottom layer holds the files."""
    return [f"{root}/layers/L{layer:03d}" for layer in range(deepest - depth, deepest)]
