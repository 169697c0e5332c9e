"""The implementations the checker can drive: the model, the engine in-process, and real mounts.

A :class:`Target` starts an :class:`Instance` on a :class:`Layout` (lower
directories, upper, workdir, mountpoint). Real mounts are any program that
takes overlayfs-style options: ``mount -t overlay``, ``pylayerfs mount``,
``fuse-overlayfs``, or a user's own, given as a command template with
``{options}`` and ``{mountpoint}``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from pylayerfs.fuse.mount import build_overlay
from pylayerfs.overlay.params import MountError, mountinfo, parse_options
from pylayerfs.testing.engine import EngineFileSystem
from pylayerfs.testing.lowers import Layer, flatten
from pylayerfs.testing.model import features
from pylayerfs.testing.ops import FileSystem, OsFileSystem

MOUNT_TIMEOUT = 30.0
KERNEL = "mount -t overlay overlay -o {options} {mountpoint}"
FUSE_OVERLAYFS = "fuse-overlayfs -o {options} {mountpoint}"
PYLAYERFS = "pylayerfs mount -o {options} {mountpoint}"


class TargetError(Exception):
    """An implementation could not be started or stopped (not a divergence: the check cannot run)."""


@dataclass(frozen=True)
class Layout:
    """Where one implementation runs, and the mount options it runs with besides its directories."""

    lowers: tuple[str, ...]
    upper: str
    work: str
    merged: str
    mount_options: str = ""  # e.g. "redirect_dir=on,metacopy=on", the same for every implementation

    @property
    def options(self) -> str:
        """What ``{options}`` becomes: ``lowerdir=...,upperdir=...,workdir=...`` and the mount options."""
        dirs = f"lowerdir={':'.join(self.lowers)},upperdir={self.upper},workdir={self.work}"
        return f"{dirs},{self.mount_options}" if self.mount_options else dirs


class Instance:
    """One implementation running on one layout (in memory: nothing to remount or close)."""

    fs: FileSystem

    def remount(self) -> None:
        """Stop and start again on the same directories (persistence)."""

    def close(self) -> None:
        """Stop; never raises for an instance that is already stopped."""


class Target(ABC):
    """An implementation under test."""

    name: str
    on_disk: bool = True  # keeps its upper in the overlayfs on-disk format (so others can mount it)

    @abstractmethod
    def start(self, layout: Layout, lowers: Sequence[Layer]) -> Instance: ...


class _ModelInstance(Instance):
    def __init__(self, lowers: Sequence[Layer], mount_options: str) -> None:
        try:
            followed = features(mount_options)
        except ValueError as exc:
            raise TargetError(f"model: -o {mount_options}: {exc}") from None
        self.fs = flatten(lowers)
        self.fs.features = followed


class ModelTarget(Target):
    """The reference model of overlay semantics (nothing on disk); it reads ``redirect_dir`` and ``metacopy``."""

    name = "model"
    on_disk = False

    def start(self, layout: Layout, lowers: Sequence[Layer]) -> Instance:
        return _ModelInstance(lowers, layout.mount_options)


class _EngineInstance(Instance):
    def __init__(self, layout: Layout) -> None:
        try:
            self.config = parse_options([layout.options])
        except MountError as exc:
            raise TargetError(f"engine: {exc}") from None
        self._locks: list[int] = []
        self._open()

    def _open(self) -> None:
        """Open the layers as ``pylayerfs mount`` does (:func:`build_overlay`: the same options, the same locks)."""
        try:
            self.overlay, self._locks = build_overlay(self.config)
        except MountError as exc:
            raise TargetError(f"engine: {exc}") from None
        self.fs = EngineFileSystem(self.overlay)

    def remount(self) -> None:
        self.close()
        self._open()

    def close(self) -> None:
        self.overlay.close()
        for fd in self._locks:
            os.close(fd)
        self._locks = []


class EngineTarget(Target):
    """pylayerfs's semantics in-process, without a mount, with the mount options ``pylayerfs mount`` would get."""

    name = "engine"

    def start(self, layout: Layout, lowers: Sequence[Layer]) -> Instance:
        return _EngineInstance(layout)


def is_mounted(path: str) -> bool:
    real = os.path.realpath(path)
    return any(entry.mountpoint == real for entry in mountinfo())


def unmount(path: str) -> None:
    """Unmount however we can, lazily as a last resort; wait until the mount is gone."""
    commands = [["umount", path], ["umount", "-l", path]]
    if os.geteuid() != 0:
        fusermount = shutil.which("fusermount3") or "fusermount"
        commands = [[fusermount, "-u", path], [fusermount, "-uz", path]]
    for command in commands:
        if not is_mounted(path):
            return
        subprocess.run(command, capture_output=True, timeout=MOUNT_TIMEOUT, check=False)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while is_mounted(path):
        if time.monotonic() > deadline:
            raise TargetError(f"cannot unmount {path}")
        time.sleep(0.02)


def held(*paths: str) -> bool:
    """Whether a process has one of the directories ``paths`` open (a daemon on its way out holds its upper)."""
    real = {os.path.realpath(p) for p in paths}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in real for fd in os.listdir(f"/proc/{pid}/fd")):
                return True
    return False


class _MountInstance(Instance):
    def __init__(self, target: MountTarget, layout: Layout) -> None:
        self.target = target
        self.layout = layout
        self.fs = OsFileSystem(layout.merged)
        self._mount()

    def _mount(self) -> None:
        os.makedirs(self.layout.merged, exist_ok=True)
        argv = self.target.argv(self.layout)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:  # a daemon that just unmounted may hold its upper a moment longer; nothing else is retried
            result = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, check=False)
            if result.returncode == 0 or time.monotonic() > deadline or not held(self.layout.upper, self.layout.work):
                break
            time.sleep(0.05)
        if result.returncode != 0:  # the program's last words first: it may refuse the options
            message = (result.stderr or result.stdout).strip().splitlines()
            reason = message[-1].strip() if message else f"exit status {result.returncode}"
            raise TargetError(f"{self.target.name} cannot mount: {reason} (ran: {shlex.join(argv)})")
        while not is_mounted(self.layout.merged):
            if time.monotonic() > deadline:
                raise TargetError(f"{self.target.name}: {self.layout.merged} did not appear in mountinfo")
            time.sleep(0.02)

    def remount(self) -> None:
        self.close()
        self._mount()

    def close(self) -> None:
        unmount(self.layout.merged)


class MountTarget(Target):
    """Any program that mounts with overlayfs-style options, from a command template."""

    def __init__(self, name: str, command: str) -> None:
        if "{options}" not in command or "{mountpoint}" not in command:
            raise TargetError(f"the command for '{name}' needs {{options}} and {{mountpoint}}: {command}")
        self.name = name
        self.command = command

    def argv(self, layout: Layout) -> list[str]:
        words = [w.replace("{options}", layout.options).replace("{mountpoint}", layout.merged) for w in
                 shlex.split(self.command)]  # fmt: skip
        if words[0] == "pylayerfs":  # this very pylayerfs, whatever PATH says
            words[:1] = [sys.executable, "-m", "pylayerfs"]
        return words

    def start(self, layout: Layout, lowers: Sequence[Layer]) -> Instance:
        return _MountInstance(self, layout)


def target(spec: str) -> Target:
    """A target from its name (engine, model, pylayerfs, kernel, fuse-overlayfs) or ``NAME=COMMAND``."""
    name, sep, command = spec.partition("=")
    if sep:
        return MountTarget(name, command)
    known: dict[str, Target] = {"model": ModelTarget(), "engine": EngineTarget()}
    commands = {"pylayerfs": PYLAYERFS, "kernel": KERNEL, "fuse-overlayfs": FUSE_OVERLAYFS}
    if name in known:
        return known[name]
    if name not in commands:
        raise TargetError(
            f"unknown implementation '{name}' (model, engine, pylayerfs, kernel, fuse-overlayfs, or NAME=COMMAND)"
        )
    program = shlex.split(commands[name])[0]
    if name == "fuse-overlayfs" and shutil.which(program) is None:
        raise TargetError("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")
    if name == "kernel" and os.geteuid() != 0:
        raise TargetError("the kernel's overlayfs needs root")
    return MountTarget(name, commands[name])
