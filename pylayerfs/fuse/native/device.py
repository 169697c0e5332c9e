"""The FUSE device: a mount's connection to the kernel, made with mount(2) as root or by ``fusermount3`` otherwise.

As root, :func:`mount` opens ``/dev/fuse`` and calls ``mount(2)`` with the fd in the data string
(``fd=N,rootmode=40000,user_id=U,group_id=G``). A user who is not root cannot call ``mount(2)``:
``fusermount3`` (setuid root) opens the device, mounts, and hands the fd back over the unix socket
whose number it finds in ``_FUSE_COMMFD`` (SCM_RIGHTS). Either way the caller gets the fd on which
requests arrive; after the mount is gone a read of it fails with ENODEV.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import subprocess

from pylayerfs.fuse.native.protocol import MAX_READ

FUSE_DEVICE = "/dev/fuse"
# mount(2) flags (<sys/mount.h>) for the generic options a user may give
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2
_FLAG_OPTIONS = {  # option -> (flags it sets, flags it clears)
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0),
    "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0),
    "noatime": (MS_NOATIME, 0),
    "nodiratime": (MS_NODIRATIME, 0),
    "relatime": (MS_RELATIME, 0),
    "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0),
    "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0),
    "nolazytime": (0, MS_LAZYTIME),
}
FSTYPE = "fuse.pylayerfs"


class DeviceError(Exception):
    """Mounting or unmounting failed: ``str()`` is one line for the user, ``errno`` the cause (0 if none)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def mount_flags(options: list[str]) -> int:
    """The ``mount(2)`` flags for the generic options (``ro``, ``noexec``...): ``nosuid,nodev`` unless undone.

    As libfuse does: a FUSE mount is ``nosuid`` and ``nodev`` unless ``suid`` / ``dev`` is given.
    Options that are not mount flags are ignored here.
    """
    flags = MS_NOSUID | MS_NODEV
    for option in options:
        sets, clears = _FLAG_OPTIONS.get(option, (0, 0))
        flags = (flags | sets) & ~clears
    return flags


def _data(fd: int, allow_other: bool, default_permissions: bool) -> str:
    data = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},max_read={MAX_READ}"
    return data + (",allow_other" if allow_other else "") + (",default_permissions" if default_permissions else "")


def mount(
    mountpoint: str, *, fsname: str, options: list[str], allow_other: bool, default_permissions: bool
) -> tuple[int, bool]:
    """Mount a FUSE filesystem of type ``fuse.pylayerfs`` on ``mountpoint``; return ``(device fd, by fusermount3)``.

    ``fsname`` is the mount's source (what ``mount`` lists), ``options`` the generic mount options
    (:func:`mount_flags`). As root the mount is made here; otherwise by ``fusermount3``. Raises
    :class:`DeviceError`: EACCES when ``/dev/fuse`` cannot be opened, ``mount(2)``'s errno, or
    fusermount3's own message when it refuses.
    """
    if os.geteuid() != 0:
        return _fusermount(mountpoint, fsname, options, allow_other, default_permissions), True
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise DeviceError(f"cannot open {FUSE_DEVICE}: {exc.strerror}", exc.errno or 0) from exc
    data = _data(fd, allow_other, default_permissions)
    libc = _libc()
    if libc.mount(os.fsencode(fsname), os.fsencode(mountpoint), FSTYPE.encode(), mount_flags(options),
                  data.encode()) != 0:  # fmt: skip
        err = ctypes.get_errno()
        os.close(fd)
        raise DeviceError(f"mount(2) failed: {os.strerror(err)}", err)
    return fd, False


def _fusermount(mountpoint: str, fsname: str, options: list[str], allow_other: bool, default_permissions: bool) -> int:
    """Have ``fusermount3`` mount ``mountpoint`` and hand over the device fd (see the module docstring)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise DeviceError("fusermount3 is not installed (apt-get install fuse3)")
    opts = [o for o in options if o in _FLAG_OPTIONS] or ["rw"]
    opts += ["nosuid", "nodev"] if not {"suid", "dev"} & set(options) else []
    opts += [f"fsname={fsname}", "subtype=pylayerfs"]
    opts += ["allow_other"] if allow_other else []
    opts += ["default_permissions"] if default_permissions else []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(
            [tool, "-o", ",".join(opts), "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        fds: list[int] = []
        with contextlib.suppress(OSError):
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        _, stderr = proc.communicate(timeout=30)
        if not fds:
            message = stderr.decode(errors="replace").strip().splitlines()
            raise DeviceError(f"fusermount3 failed: {message[-1] if message else f'exit status {proc.returncode}'}")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount(mountpoint: str, *, lazy: bool = True, by_fusermount: bool | None = None) -> None:
    """Unmount ``mountpoint`` (lazily by default: processes inside keep working until they leave).

    With umount2(2) as root, ``fusermount3 -u`` otherwise (``by_fusermount`` forces the choice).
    Raises :class:`DeviceError` with the errno (EINVAL: not a mountpoint, EBUSY) or fusermount3's message.
    """
    if by_fusermount is None:
        by_fusermount = os.geteuid() != 0
    if not by_fusermount:
        if _libc().umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            raise DeviceError(f"cannot unmount '{mountpoint}': {os.strerror(err)}", err)
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise DeviceError("fusermount3 is not installed (apt-get install fuse3)", errno.ENOENT)
    result = subprocess.run([tool, "-u", *(["-z"] if lazy else []), mountpoint], capture_output=True, text=True,
                            check=False, timeout=30)  # fmt: skip
    if result.returncode != 0:
        raise DeviceError(f"cannot unmount '{mountpoint}': {result.stderr.strip()}")


def set_readahead(mountpoint: str, kib: int) -> bool:
    """Set the kernel's readahead for the FUSE mount on ``mountpoint`` to ``kib`` KiB; False where it cannot.

    Readahead decides the size of the kernel's READs of a cached file (at most the mount's max_read): its
    default, 128 KiB, cannot be raised through INIT, so it is written to the mount's backing device
    (``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb``, found in ``/proc/self/mountinfo``; the kernel's
    Documentation/ABI/testing/sysfs-class-bdi). Only root may write it. Never looks at the mountpoint
    itself (its daemon may be the caller). Call it after INIT is answered: the INIT reply sets it again.
    """
    from pylayerfs.overlay.params import mountinfo

    where = os.path.abspath(mountpoint)
    devices = [entry.dev for entry in mountinfo() if entry.mountpoint == where and entry.fstype == FSTYPE]
    if not devices:
        return False
    try:
        with open(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError:
        return False
    return True
