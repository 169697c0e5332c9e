"""Mounting a root filesystem for a build step or a container: layers below, a fresh upper on top.

``fuse`` is pylayerfs's own FUSE mount (the default); ``overlay`` is the
kernel's overlayfs (root only), so that the two can be compared on the same
job. Either way the upper directory is a layer's ``diff`` in the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import subprocess
from collections.abc import Iterator, Sequence

from pylayerfs.fuse.mount import mount_background
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import MountError, check, mounts_below, parse_options

DRIVERS = tuple(d for d in StorageDriver if d.mounts)
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def options(lowers: Sequence[str], upper: str | None, work: str | None, metacopy: bool = False) -> str:
    paths = [*lowers, upper or "", work or ""]
    if any(c in p for p in paths for c in ",:"):
        raise MountError("layer paths with ',' or ':' cannot be mounted; choose another store root")
    upper_options = f",upperdir={upper},workdir={work}" if upper else ""
    return f"lowerdir={':'.join(lowers)}{upper_options}" + (",metacopy=on" if metacopy else "")


@contextlib.contextmanager
def mounted(
    lowers: Sequence[str], upper: str | None, work: str | None, merged: str,
    driver: StorageDriver = StorageDriver.FUSE, metacopy: bool = False,
) -> Iterator[str]:  # fmt: skip
    """Mount the stack on ``merged`` (created if needed) for the ``with`` block; always unmount.

    ``driver``: fuse or overlay (vfs does not mount: MountError). Without ``upper`` the mount is read-only.
    ``metacopy``: mount with ``metacopy=on`` (needed to read layers that hold metacopy files, and making more
    of them). Raises MountError when the mount fails.
    """
    os.makedirs(merged, 0o755, exist_ok=True)
    opts = options(lowers, upper, work, metacopy)
    if driver is StorageDriver.FUSE:
        config = parse_options([opts])
        mount_background(config, check(config, merged), "pylayerfs")
    elif driver is StorageDriver.OVERLAY:
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, merged], capture_output=True,
                                text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            raise MountError(f"mount -t overlay failed: {result.stderr.strip()}")
    else:
        raise MountError(f"storage driver '{driver}' does not mount (the mounting ones: {', '.join(DRIVERS)})")
    try:
        yield merged
    finally:
        unmount(merged)


def unmount(path: str) -> None:
    """Unmount ``path`` (lazily if it is busy), reap the FUSE daemon, remove the directory."""
    real = os.path.realpath(path)
    if mounts_below(real) and _libc.umount2(os.fsencode(real), 0) != 0:
        with contextlib.suppress(OSError):
            realfs.detach(real)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:  # the daemon we forked exits once unmounted
            pass
    with contextlib.suppress(OSError):
        os.rmdir(real)
