"""Mounting pylayerfs and kernel overlayfs in tests: never hang, never leak a mount."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

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


def _upper_in_use() -> bool:
    """Did the kernel's last overlay mount refuse an upper in use by another superblock (its log says so)?"""
    log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=TIMEOUT, check=False).stdout
    lines = [line for line in log.splitlines() if "overlayfs:" in line]
    return bool(lines) and "is in-use as upperdir/workdir of another mount" in lines[-1]


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
    command = ["mount", "-t", "overlay", "overlay", "-o", options(lowers, upper, work, extra), mnt]
    # With index=on the kernel refuses an upper that another superblock still holds ("upperdir is in-use"): the one
    # just unmounted lives on while a copy of its mount in another mount namespace (a container or sandbox of a test
    # running beside) lets go. Such a refusal is retried for a few seconds; any other one fails at once.
    deadline = time.monotonic() + (5 if "index=on" in extra else 0)
    while True:
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=TIMEOUT)
            break
        except subprocess.CalledProcessError:
            if time.monotonic() >= deadline or not _upper_in_use():
                raise
            time.sleep(0.1)
    try:
        yield mnt
    finally:
        force_unmount(mnt)


# The filesystems the kernel-differential tests put their layers on: overlayfs behaves differently
# over each (issue 12 item 7: truncate to the same size changes mtime on one and not the other), and
# the kernel mounted over the same filesystem is the answer.
BACKINGS = ("tmpfs", "ext4")
EXT4_IMAGE_MIB = 64


def backings(**xfail: str) -> list[object]:
    """The parameters of ``backing``: every filesystem of ``BACKINGS``, in order.

    ``xfail`` maps a filesystem's name to the reason pylayerfs still differs from the kernel over it
    (an issue item): that case is marked ``xfail(strict=True)``, so it fails again once fixed.
    """
    unknown = set(xfail) - set(BACKINGS)
    if unknown:
        raise ValueError(f"unknown backing filesystems: {sorted(unknown)}")
    return [
        pytest.param(kind, marks=pytest.mark.xfail(strict=True, reason=xfail[kind])) if kind in xfail else kind
        for kind in BACKINGS
    ]


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def _loop_devices(image: str) -> list[str]:
    """The loop devices attached to ``image`` (``losetup -j``), normally none or one."""
    out = subprocess.run(["losetup", "-j", image], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return [line.split(":", 1)[0] for line in out.stdout.splitlines() if line.strip()]


@contextlib.contextmanager
def scratch_filesystem(kind: str, where: str) -> Iterator[str]:
    """A fresh, empty filesystem to put layers on; yields its mount point, ``where/mnt``.

    ``kind``: ``"tmpfs"`` (a new tmpfs instance) or ``"ext4"`` (``mkfs.ext4`` on a
    ``EXT4_IMAGE_MIB`` MiB image file ``where/ext4.img``, attached to a loop device and mounted).
    Whatever happens inside (an exception, a mount left below it), on exit the filesystem is
    unmounted (lazily as a last resort) and the loop device detached (if it is still busy, the kernel
    detaches it when it is released: ``losetup -d`` sets autoclear). Raises ValueError for another
    ``kind``, AssertionError when a command fails (nothing is left mounted or attached then).
    """
    if kind not in BACKINGS:
        raise ValueError(f"unknown backing filesystem {kind!r}: one of {', '.join(BACKINGS)}")
    mnt = os.path.join(where, "mnt")
    os.makedirs(mnt, exist_ok=True)
    image = os.path.join(where, "ext4.img")
    try:
        if kind == "tmpfs":
            _run("mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "pylayerfs-test", mnt)
        else:
            with open(image, "wb") as f:
                f.truncate(EXT4_IMAGE_MIB << 20)
            _run("mkfs.ext4", "-q", "-F", image)
            device = _run("losetup", "--find", "--show", image)
            _run("mount", "-t", "ext4", device, mnt)
        yield mnt
    finally:
        # the mounts the test made below it first (a daemon left running, a kernel overlay)
        for entry in sorted(mountinfo(), key=lambda e: -len(e.mountpoint)):
            if entry.mountpoint.startswith(os.path.realpath(mnt) + "/"):
                force_unmount(entry.mountpoint)
        force_unmount(mnt)
        if kind == "ext4":
            for device in _loop_devices(image):
                subprocess.run(["losetup", "-d", device], capture_output=True, timeout=TIMEOUT, check=False)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(image)


def _wait_unmounted(mnt: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _mounted(mnt):
        force_unmount(mnt)


def unique_seconds() -> str:
    """A sleep long enough for a test, and unlike any other test's (whose processes we look for, and stop)."""
    return str(600 + os.getpid() % 1000 + int(time.monotonic() * 1000) % 1000)


def processes(argv: list[str]) -> list[int]:
    """PIDs whose command line is exactly ``argv``."""
    wanted = "\0".join(argv) + "\0"
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline") as f:
            if f.read() == wanted:
                found.append(int(pid))
    return found


def need(tool: str) -> str:
    """The path of a program a test needs (``skopeo``, ``umoci``, ``dive`` from this venv...); skips when missing."""
    found = shutil.which(tool) or shutil.which(tool, path=os.path.dirname(sys.executable))
    if found is None:
        pytest.skip(f"{tool} is not installed (bash .ci/install installs it)")
    return found
