"""The workloads: each takes a mountpoint showing the data set and returns named timings in seconds.

The client is this Python process for every implementation, so the same
client cost is in every number; ratios between implementations are what count.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

from pylayerfs.bench.data import Sizes

Timing = tuple[str, float]
CHUNK = 1 << 20


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def walk(root: str) -> int:
    """scandir + lstat of every entry below ``root`` (W1, M1)."""
    n = 0
    todo = [root]
    while todo:
        with os.scandir(todo.pop()) as it:
            for entry in it:
                os.lstat(entry.path)
                n += 1
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
    return n


def w1(mnt: str) -> Iterator[Timing]:
    for phase in ("cold", "warm"):
        yield f"W1 {phase}", _timed(lambda: walk(f"{mnt}/tree"))


def w2(mnt: str) -> Iterator[Timing]:
    for phase in ("cold", "warm"):
        yield f"W2 {phase}", _timed(lambda: os.listdir(f"{mnt}/wide"))


def _read_all(path: str) -> None:
    buf = bytearray(CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def w3(mnt: str) -> Iterator[Timing]:
    for phase in ("cold", "warm"):
        yield f"W3 {phase}", _timed(lambda: _read_all(f"{mnt}/big"))


def w4(scratch: str, sizes: Sizes) -> Iterator[Timing]:
    zeros = memoryview(bytes(CHUNK))

    def write() -> None:
        fd = os.open(f"{scratch}/w4", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for _ in range(sizes.write_mib):
                os.write(fd, zeros)
        finally:
            os.close(fd)

    yield "W4 write", _timed(write)


def w5(scratch: str, sizes: Sizes) -> Iterator[Timing]:
    data = b"p" * 1024

    def create() -> None:
        os.mkdir(f"{scratch}/w5")
        for i in range(sizes.create_files):
            fd = os.open(f"{scratch}/w5/s{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.close(fd)

    yield "W5 create", _timed(create)


def _append(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")
    os.close(fd)


def w6(mnt: str) -> Iterator[Timing]:
    yield "W6 copy-up", _timed(lambda: _append(f"{mnt}/low"))


W6_WALK_DELAY = 0.02  # seconds between the copy-up's open and the walk's start: the open reaches the daemon first


def _walk_waits(root: str) -> float:
    """:func:`walk` of ``root``; return the longest wait between two entries (s): how long the mount stalled."""
    longest, last = 0.0, time.perf_counter()
    todo = [root]
    while todo:
        with os.scandir(todo.pop()) as it:
            for entry in it:
                os.lstat(entry.path)
                now = time.perf_counter()
                longest, last = max(longest, now - last), now
                if entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
    return longest


def w6_walk(mnt: str) -> Iterator[Timing]:
    """W6 with a concurrent walk, on a mount whose kernel caches nothing (timeout=0: every lstat asks the daemon).

    Yields the time of a walk of ``tree`` alone (the caller walked it once: the kernel knows the tree) and its
    longest wait between two entries, then the same for a walk started :data:`W6_WALK_DELAY` s after another
    thread opened ``low`` for append (the W6 copy-up), and that copy-up's time (the open, the write of one byte and
    the close; its requests are counted with the walk's). A daemon that stalls during a copy-up makes the walk wait
    for the copy to end: its longest wait is then about the copy-up's time.
    """
    waits: list[float] = []
    yield "W6 walk alone", _timed(lambda: waits.append(_walk_waits(f"{mnt}/tree")))
    copy: list[float] = []
    thread = threading.Thread(target=lambda: copy.append(_timed(lambda: _append(f"{mnt}/low"))))
    thread.start()
    time.sleep(W6_WALK_DELAY)
    during = _timed(lambda: waits.append(_walk_waits(f"{mnt}/tree")))
    thread.join()
    yield "W6 walk during copy-up", during
    yield "W6 copy-up during walk", copy[0]
    yield "W6 walk's longest wait alone", waits[0]
    yield "W6 walk's longest wait during copy-up", waits[1]


def w7(mnt: str, sizes: Sizes, depth: int) -> Iterator[Timing]:
    def stat_all() -> None:
        for d in range(10):
            for i in range(sizes.depth_files):
                os.lstat(f"{mnt}/d{d}/f{i:03d}")

    yield f"W7 {depth} layers", _timed(stat_all)


def w8(mnt: str, sizes: Sizes) -> Iterator[Timing]:
    def fstats() -> None:
        fd = os.open(f"{mnt}/big", os.O_RDONLY)
        try:
            for _ in range(sizes.round_trips):
                os.fstat(fd)
        finally:
            os.close(fd)

    yield "W8 round trip", _timed(fstats)
