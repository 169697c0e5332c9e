"""Mounting and unmounting: the daemon's life (the kernel's ``super.c`` side, in user space).

``mount()`` checks everything it can before touching anything, then starts the
daemon: it builds the :class:`~pylayerfs.overlay.filesystem.Overlay` (opening the layers,
locking the upper and work directories, emptying ``work/``), mounts, and tells
the parent it is ready through a pipe, so that ``pylayerfs mount`` returns only
once the mount can be used, or fails with the daemon's one-line reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import logging.handlers
import os
import select
import shutil
import subprocess
import sys
import time

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.params import MountConfig, MountError, mountinfo

log = logging.getLogger("pylayerfs")
READY = b"ready\n"
START_TIMEOUT = 30.0


def is_mountpoint(path: str) -> bool:
    """Is ``path`` the mountpoint of a pylayerfs mount right now?"""
    real = os.path.realpath(path)
    return any(e.mountpoint == real and e.fstype == "fuse.pylayerfs" for e in mountinfo())


def _lock(path: str, what: str) -> int:
    """Hold an exclusive lock on a directory for the life of the daemon (one mount per upper/work)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"{what} '{path}' is in use by another pylayerfs mount") from None
    return fd


def build_overlay(config: MountConfig) -> tuple[Overlay, list[int]]:
    locks = []
    if config.upperdir is not None and config.workdir is not None:
        locks = [_lock(config.upperdir, "upperdir"), _lock(config.workdir, "workdir")]
    try:
        overlay = Overlay(config.lowerdirs, config.upperdir, config.workdir, userxattr=config.userxattr,
                          metacopy=config.metacopy)  # fmt: skip
    except OSError as exc:
        for fd in locks:
            os.close(fd)
        raise MountError(f"cannot open the layers: {exc.strerror}: {exc.filename}") from exc
    return overlay, locks


def fuse_options(config: MountConfig) -> dict[str, object]:
    opts: dict[str, object] = {flag: True for flag in config.fuse_flags}
    if config.allow_other:
        opts["allow_other"] = True
    if config.default_permissions:
        opts["default_permissions"] = True
    return opts


def setup_logging(config: MountConfig, background: bool) -> None:
    """Where the daemon's log goes: ``logfile=``; else stderr in the foreground or with ``debug``; else syslog."""
    handler: logging.Handler
    if config.logfile:
        handler = logging.FileHandler(config.logfile)
    elif not background or config.debug:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("pylayerfs[%(process)d]: %(name)s: %(message)s"))
    root = logging.getLogger("pylayerfs")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if config.debug else logging.WARNING)


def serve(config: MountConfig, mountpoint: str, source: str, ready_fd: int | None = None) -> int:
    """Run the daemon in this process until unmounted; returns the exit status."""
    from pylayerfs.fuse import adapter  # the binding is loaded only by the process that serves

    os.umask(0)  # modes of new objects come from the caller, already masked by the kernel
    setup_logging(config, background=ready_fd is not None)
    overlay, locks = build_overlay(config)

    def ready() -> None:
        if ready_fd is not None:
            os.write(ready_fd, READY)

    try:
        adapter.serve(overlay, mountpoint, fsname=source, fuse_options=fuse_options(config), on_ready=ready,
                           timeout=config.timeout)  # fmt: skip
    except RuntimeError as exc:
        raise MountError(f"FUSE could not mount '{mountpoint}' (libfuse said: {exc})") from exc
    finally:
        for fd in locks:
            os.close(fd)
    return 0


def mount_background(config: MountConfig, mountpoint: str, source: str) -> None:
    """Start the daemon and return once the mount is ready (raise MountError with its reason if not)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.closerange(3, write_fd)  # hold nothing of the caller's: its pipes, its locks
        os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1) if config.debug and not config.logfile else (0, 1, 2):
            os.dup2(null, fd)  # never hold the caller's pipes open
        status = 1
        try:
            status = serve(config, mountpoint, source, ready_fd=write_fd)
        except MountError as exc:
            _write_quietly(write_fd, f"error: {exc}\n".encode())
        except BaseException as exc:  # a bug: say what, never a traceback on the user's terminal
            log.exception("daemon failed")
            _write_quietly(write_fd, f"error: daemon failed: {exc!r}\n".encode())
        os._exit(status)
    os.close(write_fd)
    _wait_ready(read_fd, pid, mountpoint)


def _write_quietly(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, data)


def _wait_ready(read_fd: int, pid: int, mountpoint: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    message = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.1)
            if ready:
                chunk = os.read(read_fd, 4096)
                if not chunk:
                    break
                message += chunk
                if message.startswith(READY):
                    return
        if message.startswith(b"error: "):
            raise MountError(message[len(b"error: ") :].decode(errors="replace").strip())
        _reap(pid)
        raise MountError(f"the daemon did not mount '{mountpoint}' (exited or timed out)")
    finally:
        os.close(read_fd)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def umount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount a pylayerfs mount; its daemon then exits."""
    real = os.path.realpath(mountpoint)
    if not is_mountpoint(real):
        raise MountError(f"'{mountpoint}' is not a pylayerfs mountpoint")
    if os.geteuid() == 0:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.umount2(os.fsencode(real), 2 if lazy else 0) != 0:  # 2: MNT_DETACH
            err = ctypes.get_errno()
            hint = " (busy: a process uses it; -l detaches it lazily)" if err == errno.EBUSY else ""
            raise MountError(f"cannot unmount '{mountpoint}': {os.strerror(err)}{hint}")
        return
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise MountError("fusermount3 is not installed (apt-get install fuse3)")
    result = subprocess.run(
        [fusermount, "-u", *(["-z"] if lazy else []), real], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise MountError(f"cannot unmount '{mountpoint}': {result.stderr.strip()}")
