"""Mounting pylayerfs and kernel overlayfs in tests: never hang, never leak a mount."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

from pylayerfs.overlay.params import mountinfo

PYLAYERFS = [sys.executable, "-m", "pylayerfs"]
TIMEOUT = 30


def _mounted(path: str) -> bool:
    real = os.path.realpath(path)
    return any(entry.mountpoint == real for entry in mountinfo())


def force_unmount(path: str) -> None:
    """Unmount however we can (lazily as a last resort); used in fixtures' cleanup."""
    for cmd in (["umount", path], ["umount", "-l", path]):
        if not _mounted(path):
            return
        subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, check=False)
    if _mounted(path) and shutil.which("fusermount3"):
        subprocess.run(["fusermount3", "-uz", path], capture_output=True, timeout=TIMEOUT, check=False)


def options(lowers: list[str], upper: str | None, work: str | None, extra: str = "") -> str:
    opts = "lowerdir=" + ":".join(lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    return opts + ("," + extra if extra else "")


def run_pylayerfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PYLAYERFS, *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"pylayerfs {' '.join(args)} failed: {result.stderr}")
    return result


@contextlib.contextmanager
def pylayerfs_mount(
    mnt: str, lowers: list[str], upper: str | None = None, work: str | None = None, extra: str = ""
) -> Iterator[str]:
    os.makedirs(mnt, exist_ok=True)
    run_pylayerfs("mount", "-o", options(lowers, upper, work, extra), mnt)
    try:
        yield mnt
    finally:
        if _mounted(mnt):
            result = run_pylayerfs("umount", mnt, check=False)
            if result.returncode != 0:
                force_unmount(mnt)
        _wait_unmounted(mnt)


@contextlib.contextmanager
def kernel_mount(
    mnt: str, lowers: list[str], upper: str | None = None, work: str | None = None, extra: str = ""
) -> Iterator[str]:
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options(lowers, upper, work, extra), mnt],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    try:
        yield mnt
    finally:
        force_unmount(mnt)


def _wait_unmounted(mnt: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _mounted(mnt):
        force_unmount(mnt)
