"""Running something inside a root filesystem, as a container runtime does (without the isolation).

The process gets a mount namespace of its own (mounts it makes vanish with
it), ``/proc`` and a few host devices mounted into the root, a hostname (a UTS
namespace), then ``chroot`` into the root, the working directory (created if
missing, as Docker does), and the user: ``USER`` names are looked up in the
image's own ``/etc/passwd`` after the chroot. There are no pid, network or
user namespaces and no cgroups: pylayerfs is about the filesystem.

Paths from the image are only ever used after the chroot, so an image's
absolute symlinks resolve inside the image, never on the host.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# What Docker's init layer holds: mountpoints and files the runtime mounts over.
INIT_DIRS = ("proc", "sys", "dev", "dev/pts", "dev/shm", "etc")
INIT_FILES = (
    ".dockerenv",
    "etc/resolv.conf",
    "etc/hosts",
    "etc/hostname",
    "dev/console",
    *(f"dev/{d}" for d in DEVICES),
)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class SandboxError(Exception):
    pass


class CommandNotFound(SandboxError):
    """The command is not in the image (Docker answers exit status 127)."""

    exit_code = 127


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def make_init_layer(root: str) -> None:
    """The mountpoints a process needs, in their own layer (below the one it writes into).

    In a tree that has them already (the vfs driver's copy, chrooted), they replace what is there,
    as the init layer hides what is below it.
    """
    for d in INIT_DIRS:
        path = os.path.join(root, d)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)
        os.makedirs(path, 0o755, exist_ok=True)
    for f in INIT_FILES:
        _replace(os.path.join(root, f))
        with open(os.path.join(root, f), "w"):
            pass
    _replace(os.path.join(root, "etc", "mtab"))
    os.symlink("/proc/mounts", os.path.join(root, "etc", "mtab"))


def _replace(path: str) -> None:
    """Make room for an init entry at ``path``."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


@dataclass
class Process:
    rootfs: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: str = ""  # "", "name", "uid", "name:group", "uid:gid"
    hostname: str = "pylayerfs"


def _enter(rootfs: str, cwd: str, hostname: str) -> None:
    """In the child: private mounts, /proc and devices, hostname, chroot, working directory."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    proc = os.path.join(rootfs, "proc")
    if os.path.isdir(proc) and not os.path.islink(proc):
        _check(_libc.mount(b"proc", os.fsencode(proc), b"proc", 0, None), "mount /proc")
    for device in DEVICES:
        target = os.path.join(rootfs, "dev", device)
        if os.path.isfile(target) and not os.path.islink(target) and os.path.exists(f"/dev/{device}"):
            _libc.mount(os.fsencode(f"/dev/{device}"), os.fsencode(target), None, MS_BIND, None)
    name = hostname.encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    os.chroot(rootfs)
    os.chdir("/")
    os.makedirs(cwd, 0o755, exist_ok=True)
    os.chdir(cwd)


def lookup_user(user: str) -> tuple[int, int]:
    """uid and gid of ``user`` (``name``, ``uid``, ``name:group``...) from the current root's /etc files."""
    name, _, group = user.partition(":")
    passwd = _entries("/etc/passwd")
    if name.isdigit():
        uid = int(name)
        gid = next((int(f[3]) for f in passwd if f[2] == name and f[3].isdigit()), 0)
    else:
        entry = next((f for f in passwd if f[0] == name), None)
        if entry is None or not (entry[2].isdigit() and entry[3].isdigit()):
            raise SandboxError(f"unable to find user {name}: no matching entries in passwd file")
        uid, gid = int(entry[2]), int(entry[3])
    if group.isdigit():
        gid = int(group)
    elif group:
        found = next((f for f in _entries("/etc/group") if f[0] == group and f[2].isdigit()), None)
        if found is None:
            raise SandboxError(f"unable to find group {group}: no matching entries in group file")
        gid = int(found[2])
    return uid, gid


def _entries(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [fields for line in f if len(fields := line.rstrip("\n").split(":")) >= 4]
    except OSError:
        return []


def start(process: Process, stdout: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``process``; its output (stdout and stderr) goes to ``stdout``, default ours."""

    def child() -> None:
        _enter(process.rootfs, process.cwd, process.hostname)
        if process.user:
            uid, gid = lookup_user(process.user)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    try:
        return subprocess.Popen(
            list(process.argv),
            env=process.env,
            preexec_fn=child,  # noqa: PLW1509 - pylayerfs starts no threads before this
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
        )
    except subprocess.SubprocessError as exc:
        raise SandboxError(str(exc)) from exc
    except FileNotFoundError as exc:
        raise CommandNotFound(f'exec: "{process.argv[0]}": executable file not found in $PATH') from exc
    except PermissionError as exc:
        raise CommandNotFound(f'exec: "{process.argv[0]}": permission denied') from exc


def run(process: Process) -> int:
    """Run ``process`` to the end, its output on ours; returns its exit status (a signal as 128+n)."""
    code = start(process).wait()
    return 128 - code if code < 0 else code


def call(rootfs: str, work: Callable[[], None], cwd: str = "/", *, mounts: bool = True) -> None:
    """Run ``work`` in a child process inside ``rootfs``; re-raise its error here as SandboxError.

    ``mounts=False``: only ``chroot``, no /proc or devices mounted (to work on the tree itself).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        status = 0
        try:
            if mounts:
                _enter(rootfs, cwd, "pylayerfs")
            else:
                os.chroot(rootfs)
                os.chdir(cwd)
            work()
        except BaseException as exc:  # reported to the parent, which raises it
            message = str(exc) or type(exc).__name__
            os.write(write, message.encode(errors="replace")[:65536])
            status = 1
        finally:
            sys.stdout.flush()
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SandboxError(message.strip() or f"failed with status {status}")
