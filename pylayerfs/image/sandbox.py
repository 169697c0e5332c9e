"""Running something inside a root filesystem, as a container runtime does (without the isolation).

The process gets a mount namespace of its own (mounts it makes vanish with
it), ``/proc`` and a few host devices mounted into the root, a hostname (a UTS
namespace), then enters the root with ``pivot_root``, the working directory
(created if missing, as Docker does), and the user: ``USER`` names are looked
up in the image's own ``/etc/passwd`` once inside. There are no pid, network or
user namespaces and no cgroups: pylayerfs is about the filesystem.

Paths from the image are only ever used inside the root, so an image's
absolute symlinks resolve inside the image, never on the host.

Mount propagation: the namespace starts as a copy of ours, and a copy of a
shared mount stays a peer of the original, so a /proc mounted into the root
would also appear on the host (and keep the root busy after we unmount it).
Every mount of the new namespace is therefore made private first, as
``unshare --propagation private`` does, before anything is mounted (or the
old root unmounted: an unmount propagates too). The kernel changes
propagation only at a mount's root: when our ``/`` is a plain directory inside
a bigger mount (a ``chroot`` made by debootstrap, some CI containers),
``mount(MS_PRIVATE)`` on ``/`` fails with EINVAL, and that bigger mount,
whose root we cannot name, is exactly the one that matters for a root which
is itself a plain directory (the vfs driver); a ``/`` that is a mount below
the top would leave the mounts beside it shared. The child therefore walks
``..`` from outside a temporary chroot up to the namespace's root, makes
everything private from there, and goes back to our ``/``. That is only
possible because the child is root in its own new namespace (a chroot never
confined a process holding CAP_SYS_CHROOT); nothing outside the new
namespace changes.

Entering the root: the copy of the namespace holds a copy of every mount the
host had, FUSE mounts included, and a copy keeps a FUSE mount's daemon alive
after the host unmounts it. A ``chroot`` would keep them all for as long as
the process runs (the host's ``pylayerfs umount`` then leaves the daemon
behind, and its upper directory locked). So, as container runtimes do, the
root is bind-mounted on itself (``pivot_root`` needs a mount point; the vfs
driver's roots are plain directories), the child goes up to the namespace's
root (the same ``..`` walk: in a chroot, ``/`` is neither a mount point nor
the top of the namespace, and ``pivot_root`` needs both), then
``pivot_root(".", ".")`` from the new root and ``umount2(".", MNT_DETACH)``
of the old one stacked on it: the namespace keeps only the root and what was
mounted into it. Where ``pivot_root`` is refused (EINVAL: the namespace's
root is the initial ramfs, which cannot be pivoted), the child falls back to
``chroot`` and keeps the copies.

Whatever fails in the child on the way in is reported to the parent as one
line naming the step and the errno text (``make mounts private: Invalid
argument``), as :class:`SandboxError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
# pivot_root(2) has no glibc wrapper: its system call number, by machine (the generic table's 41 elsewhere).
SYS_PIVOT_ROOT = {"x86_64": 155, "i386": 217, "i686": 217, "armv7l": 218, "ppc64le": 203, "s390x": 217}.get(
    platform.machine(), 41
)
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
    """Entering the root failed (the message says which step, and why), or the user is unknown."""


class CommandNotFound(SandboxError):
    """The command is not in the image (Docker answers exit status 127)."""

    exit_code = 127


def _check(result: int, what: str) -> None:
    """Raise SandboxError("what: errno text") when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn an OSError raised inside the block into SandboxError("what: errno text")."""
    try:
        yield
    except OSError as exc:
        raise SandboxError(f"{what}: {exc.strerror or exc}") from exc


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
    """In the child: private mounts, /proc and devices, hostname, pivot_root into the root, working directory.

    ``rootfs`` is an absolute path to the root; ``cwd`` a path inside it (created if missing). Afterwards the
    process's mount namespace holds the root and what was mounted into it, nothing of the host's.
    Raises SandboxError naming the step that failed and its errno text.
    """
    with _step(f"chroot {rootfs}"):  # a missing root fails here, before any mount
        os.stat(rootfs)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
    make_mounts_private(rootfs)
    root = os.fsencode(rootfs)
    _check(_libc.mount(root, root, None, MS_BIND | MS_REC, None), f"bind {rootfs} on itself")
    proc = os.path.join(rootfs, "proc")
    if os.path.isdir(proc) and not os.path.islink(proc):
        _check(_libc.mount(b"proc", os.fsencode(proc), b"proc", 0, None), "mount /proc")
    for device in DEVICES:
        target = os.path.join(rootfs, "dev", device)
        if os.path.isfile(target) and not os.path.islink(target) and os.path.exists(f"/dev/{device}"):
            _libc.mount(os.fsencode(f"/dev/{device}"), os.fsencode(target), None, MS_BIND, None)
    name = hostname.encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    _pivot_root(rootfs)
    with _step(f"working directory {cwd}"):
        os.makedirs(cwd, 0o755, exist_ok=True)
        os.chdir(cwd)


def _pivot_root(rootfs: str) -> None:
    """Make the mount point ``rootfs`` our ``/`` and detach the old root with every mount below it.

    From the namespace's root (``pivot_root`` needs the current root to be a mount point with a parent):
    ``pivot_root(".", ".")`` in the new root, then ``umount2(".", MNT_DETACH)`` of the old root stacked on
    it. Where ``pivot_root`` answers EINVAL (an initial ramfs as the namespace's root), ``chroot`` instead.
    Raises SandboxError.
    """
    with _step(f"chroot {rootfs}"):
        new_root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY)
    try:
        with _step(f"pivot_root {rootfs}"):
            _to_namespace_root(rootfs)
            os.fchdir(new_root)
        if _libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
            _check(_libc.umount2(b".", MNT_DETACH), "detach the old root")
        else:
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise SandboxError(f"pivot_root {rootfs}: {os.strerror(err)}")
        with _step(f"chroot {rootfs}"):
            os.chroot(".")
            os.chdir("/")
    finally:
        os.close(new_root)


def _to_namespace_root(rootfs: str) -> None:
    """Make the root of our mount namespace (the top-most mount at its ``/``) our root and working directory.

    A chroot into ``rootfs`` (a directory below ``/``) while the working directory stays above it lets ``..``
    climb past our old root, up to where it stays put. Raises OSError.
    """
    os.chdir("/")
    os.chroot(rootfs)
    for _ in range(4096):  # "..": up to the root of the namespace, where it stays put
        here, parent = os.stat("."), os.stat("..")
        if (here.st_dev, here.st_ino) == (parent.st_dev, parent.st_ino):
            break
        os.chdir("..")
    os.chroot(".")


def make_mounts_private(below: str) -> None:
    """In a new mount namespace: make every mount private, so nothing mounted or unmounted leaks out.

    From the namespace's real root, reached with :func:`_to_namespace_root` through ``below`` (any directory
    below our ``/``: our ``/`` may be a plain directory, or a mount below the top, when we run in a chroot),
    then the process returns to its ``/``. Raises SandboxError.
    """
    with _step("make mounts private"):
        home = os.open("/", os.O_PATH | os.O_DIRECTORY)
        try:
            _to_namespace_root(below)
            _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
            os.fchdir(home)
            os.chroot(".")
            os.chdir("/")
        finally:
            os.close(home)


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
    """Start ``process``; its output (stdout and stderr) goes to ``stdout``, default ours.

    Raises CommandNotFound when the command cannot be executed in the root (status 127), and
    SandboxError when entering the root failed: its message says which step and why, as the
    child wrote it on a pipe (subprocess itself only knows that "preexec_fn" raised).
    """
    read, write = os.pipe()  # close-on-exec: empty and closed once the command runs

    def child() -> None:
        try:
            _enter(process.rootfs, process.cwd, process.hostname)
            if process.user:
                uid, gid = lookup_user(process.user)
                with _step(f"set user {process.user}"):
                    os.setgroups([])
                    os.setgid(gid)
                    os.setuid(uid)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(write, (str(exc) or type(exc).__name__).encode(errors="replace")[:4096])
            raise

    try:
        try:
            return subprocess.Popen(
                list(process.argv),
                env=process.env,
                preexec_fn=child,  # noqa: PLW1509 - pylayerfs starts no threads before this
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
            )
        finally:
            os.close(write)
    except subprocess.SubprocessError as exc:
        with os.fdopen(read, "rb", closefd=False) as f:
            message = f.read().decode(errors="replace").strip()
        raise SandboxError(message or str(exc)) from exc
    except FileNotFoundError as exc:
        raise CommandNotFound(f'exec: "{process.argv[0]}": executable file not found in $PATH') from exc
    except PermissionError as exc:
        raise CommandNotFound(f'exec: "{process.argv[0]}": permission denied') from exc
    finally:
        os.close(read)


def run(process: Process) -> int:
    """Run ``process`` to the end, its output on ours; returns its exit status (a signal as 128+n)."""
    code = start(process).wait()
    return 128 - code if code < 0 else code


def call(rootfs: str, work: Callable[[], None], cwd: str = "/", *, mounts: bool = True) -> None:
    """Run ``work`` in a child process inside ``rootfs``; re-raise its error here as SandboxError.

    The message is the child's error text (for entering the root: the step and its errno text).
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
                with _step(f"chroot {rootfs}"):
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
