"""Running a command inside a root filesystem, as a container runtime (runc under Docker) does, without the isolation.

A command started with :func:`start` is PID 1 of a PID namespace of its own
(``exec`` joins it), so that when it exits, or is killed, the kernel kills
everything it left running: ``stop`` and ``rm -f`` stop the whole tree. It
also gets a mount, UTS and IPC namespace, and what Docker's default spec gives
(moby ``oci/defaults.go``, runc ``libcontainer``): ``/proc``, a tmpfs on
``/dev`` with runc's six devices and its links (``fd``, ``stdin``...,
``ptmx`` -> ``pts/ptmx``), ``/dev/pts`` (a new devpts instance),
``/dev/shm``, ``/dev/mqueue``, ``/sys`` read-only, and ``/etc/hosts``,
``/etc/hostname``, ``/etc/resolv.conf`` bind-mounted from the container's
directory (:func:`write_etc`). The user is looked up in the image's own
``/etc/passwd`` and ``/etc/group`` once inside, as runc's ``GetExecUser``
(:func:`exec_user`): uid, gid, supplementary groups, and ``HOME`` when the
environment has none. The environment starts as Docker's
(``PATH``, ``HOSTNAME``, then the image's), and the command is found as Go's
``exec.LookPath`` finds it, failing with Docker's words and statuses (127: not
found, 126: not executable, 125: anything else on the way in). There are no
network or user namespaces, no cgroups, capabilities, seccomp or masked /proc
paths: pylayerfs is about the filesystem.

Between the caller and PID 1 sits a *shim* (a forked child, as containerd's
shim): it creates the PID namespace, forks PID 1 into it, reports its pid
(as the host sees it, for signals), and waits for it; its own exit status is
the command's (128+n for a signal n). PID 1 dies with the shim, and the shim
with its caller (``PR_SET_PDEATHSIG``): a killed build leaves nothing running.
The shim ignores the terminal's signals: a foreground ``run`` forwards them to
PID 1, as ``docker run`` does.

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
import ipaddress
import os
import platform
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from pylayerfs.image.builder.imageconfig import DEFAULT_PATH

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
# The capabilities a container keeps (moby oci/caps/defaults.go), by number (linux/capability.h), but CAP_MKNOD:
# Docker keeps it and denies the use of device nodes with a device cgroup, which pylayerfs does not make. Every
# other capability leaves the bounding set before the command is executed, so no process of the container has
# CAP_SYS_ADMIN (mount), CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_NET_ADMIN, CAP_SYS_TIME, CAP_SYS_BOOT...
CAPABILITIES_KEPT = frozenset({
    0,  # CHOWN
    1,  # DAC_OVERRIDE
    3,  # FOWNER
    4,  # FSETID
    5,  # KILL
    6,  # SETGID
    7,  # SETUID
    8,  # SETPCAP
    10,  # NET_BIND_SERVICE
    13,  # NET_RAW
    18,  # SYS_CHROOT
    29,  # AUDIT_WRITE
    31,  # SETFCAP
})  # fmt: skip
# runc's defaults for /proc and /sys (moby oci/defaults.go): paths hidden (a directory behind an empty read-only
# tmpfs, a file behind /dev/null) and paths made read-only (root may otherwise write /proc/sysrq-trigger).
MASKED_PATHS = ("proc/asound", "proc/acpi", "proc/kcore", "proc/keys", "proc/latency_stats", "proc/timer_list",
                "proc/timer_stats", "proc/sched_debug", "proc/scsi", "sys/firmware")  # fmt: skip
READONLY_PATHS = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")
# pivot_root(2) has no glibc wrapper: its system call number, by machine (the generic table's 41 elsewhere).
SYS_PIVOT_ROOT = {"x86_64": 155, "i386": 217, "i686": 217, "armv7l": 218, "ppc64le": 203, "s390x": 217}.get(
    platform.machine(), 41
)
# What Docker's init layer holds (moby daemon/initlayer): mountpoints and files the runtime mounts over.
INIT_DIRS = ("proc", "sys", "dev", "dev/pts", "dev/shm", "etc")
INIT_FILES = (".dockerenv", "etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console")
# The mounts of Docker's default spec (moby oci/defaults.go), in its order: (target, source, type, flags, data).
_NOSUID_NODEV_NOEXEC = MS_NOSUID | MS_NODEV | MS_NOEXEC
MOUNTS = (
    ("proc", "proc", "proc", _NOSUID_NODEV_NOEXEC, ""),
    ("dev", "tmpfs", "tmpfs", MS_NOSUID, "mode=755,size=65536k"),
    ("dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("sys", "sysfs", "sysfs", _NOSUID_NODEV_NOEXEC | MS_RDONLY, ""),
    ("dev/mqueue", "mqueue", "mqueue", _NOSUID_NODEV_NOEXEC, ""),
    ("dev/shm", "shm", "tmpfs", _NOSUID_NODEV_NOEXEC, "mode=1777,size=65536k"),
)
# runc's default devices (libcontainer/specconv), made in the /dev tmpfs: name, major, minor (crw-rw-rw- root).
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("tty", 5, 0), ("random", 1, 8), ("urandom", 1, 9))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))  # fmt: skip
# The files bind-mounted over the init layer's, from the container's directory, in Docker's order.
ETC_FILES = ("resolv.conf", "hostname", "hosts")
# libnetwork's etchosts default content; a container without a network gets no line for itself.
HOSTS = """127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
fe00::0	ip6-localnet
ff00::0	ip6-mcastprefix
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
"""
DEFAULT_DNS = "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"  # libnetwork resolvconf's defaultIPv4Dns
# The signals a foreground ``run`` forwards to PID 1 (docker/cli's ForwardAllSignals, the ones a terminal sends).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class SandboxError(Exception):
    """Entering the root failed (the message says which step, and why), or the user is unknown.

    ``exit_code`` is the status Docker answers for it: 125 (the runtime's own error).
    """

    exit_code = 125

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CommandNotFound(SandboxError):
    """The command cannot be executed in the root: 127 (not found) or 126 (not executable), as Docker answers."""

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
        os.chmod(os.path.join(root, f), 0o755)  # as moby's initlayer creates them
    _replace(os.path.join(root, "etc", "mtab"))
    os.symlink("/proc/mounts", os.path.join(root, "etc", "mtab"))


def _replace(path: str) -> None:
    """Make room for an init entry at ``path``."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def write_etc(directory: str, hostname: str, host_resolv: str = "/etc/resolv.conf") -> None:
    """Write ``hosts``, ``hostname`` and ``resolv.conf`` into ``directory`` (created), as Docker writes them
    into a container's directory.

    ``resolv.conf`` is the host's (``host_resolv``; systemd-resolved's upstream file when the host's only
    nameserver is its stub 127.0.0.53) without localhost and IPv6 nameservers (the container has neither),
    Google's two when none is left (libnetwork ``resolvconf.FilterResolvDNS``).
    """
    os.makedirs(directory, 0o710, exist_ok=True)
    lines = _read_lines(host_resolv)
    if _nameservers(lines) == ["127.0.0.53"] and os.path.exists("/run/systemd/resolve/resolv.conf"):
        lines = _read_lines("/run/systemd/resolve/resolv.conf")
    kept = [line for line in lines if not _local_or_v6_nameserver(line)]
    resolv = "".join(kept)
    if not _nameservers(kept):
        resolv += ("\n" if resolv and not resolv.endswith("\n") else "") + DEFAULT_DNS
    for name, text in (("hosts", HOSTS), ("hostname", hostname + "\n"), ("resolv.conf", resolv)):
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(directory, name), 0o644)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


def _nameservers(lines: list[str]) -> list[str]:
    return [w[1] for line in lines if len(w := line.split()) >= 2 and w[0] == "nameserver"]


def _local_or_v6_nameserver(line: str) -> bool:
    words = line.split()
    if len(words) != 2 or words[0] != "nameserver":
        return False
    try:
        address = ipaddress.ip_address(words[1].partition("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.version == 6


@dataclass
class Process:
    """What to run: ``argv`` in ``rootfs`` (an absolute path), from ``cwd`` (inside it) as ``user``.

    ``env`` is the image's (and the caller's) environment, laid over Docker's ``PATH`` and ``HOSTNAME``;
    ``etc`` the directory whose ``hosts``, ``hostname``, ``resolv.conf`` are bind-mounted (None: written for
    this process only, from ``hostname``).
    """

    rootfs: str
    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: str = ""  # "", "name", "uid", "name:group", "uid:gid"
    hostname: str = "pylayerfs"
    etc: str | None = None


def _enter(rootfs: str, cwd: str, hostname: str, etc: str | None = None, *, runtime_mounts: bool = True) -> None:
    """In the child: private mounts, Docker's mounts, hostname, pivot_root into the root, working directory.

    ``rootfs`` is an absolute path to the root; ``cwd`` a path inside it (created if missing); ``etc`` the
    directory of the files bind-mounted on ``/etc`` (None: none); ``runtime_mounts=False``: none of Docker's
    mounts (the bare root, as the builder's COPY sees it). Afterwards the process's mount namespace holds the
    root and what was mounted into it, nothing of the host's.
    Raises SandboxError naming the step that failed and its errno text.
    """
    with _step(f"chroot {rootfs}"):  # a missing root fails here, before any mount
        os.stat(rootfs)
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC), "unshare")
    make_mounts_private(rootfs)
    root = os.fsencode(rootfs)
    _check(_libc.mount(root, root, None, MS_BIND | MS_REC, None), f"bind {rootfs} on itself")
    # No device node of the image opens (one a layer holds, one a command makes): only the /dev the runtime makes.
    _check(_libc.mount(root, root, None, MS_BIND | MS_REMOUNT | MS_NODEV, None), f"nodev {rootfs}")
    if runtime_mounts:
        _mount_defaults(rootfs)
        _mask_paths(rootfs)
    for file in ETC_FILES if etc else ():
        target = os.path.join(rootfs, "etc", file)
        if os.path.isfile(target) and not os.path.islink(target):
            source = os.fsencode(os.path.join(str(etc), file))
            _check(_libc.mount(source, os.fsencode(target), None, MS_BIND, None), f"mount /etc/{file}")
    name = hostname.encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    _pivot_root(rootfs)
    with _step(f"working directory {cwd}"):
        os.makedirs(cwd, 0o755, exist_ok=True)
        os.chdir(cwd)


def _mount_defaults(rootfs: str) -> None:
    """Docker's default mounts (:data:`MOUNTS`) into the root, where the image has a directory for them (the init
    layer's), then runc's devices and links in the new ``/dev``. Raises SandboxError."""
    for target, source, kind, flags, data in MOUNTS:
        path = os.path.join(rootfs, target)
        if target.startswith("dev/") and os.path.ismount(os.path.join(rootfs, "dev")):
            os.makedirs(path, 0o755, exist_ok=True)  # in our tmpfs
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        _check(_libc.mount(source.encode(), os.fsencode(path), kind.encode(), flags, data.encode() or None),
               f"mount /{target}")  # fmt: skip
    dev = os.path.join(rootfs, "dev")
    if not os.path.ismount(dev):
        return
    with _step("make /dev"):
        for device, major, minor in DEVICES:
            os.mknod(os.path.join(dev, device), stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(os.path.join(dev, device), 0o666)  # mknod's mode is masked by the umask
        for link, target in DEV_LINKS:
            os.symlink(target, os.path.join(dev, link))


def _mask_paths(rootfs: str) -> None:
    """runc's masked and read-only paths (:data:`MASKED_PATHS`, :data:`READONLY_PATHS`) where the root has them.
    Without CAP_SYS_ADMIN (:func:`_drop_capabilities`) the container cannot undo them. Raises SandboxError."""
    for target in READONLY_PATHS:
        where = os.fsencode(os.path.join(rootfs, target))
        if os.path.lexists(where):
            _check(_libc.mount(where, where, None, MS_BIND | MS_REC, None), f"bind /{target}")
            _check(_libc.mount(where, where, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                               None), f"read-only /{target}")  # fmt: skip
    null = os.fsencode(os.path.join(rootfs, "dev", "null"))
    for target in MASKED_PATHS:
        path = os.path.join(rootfs, target)
        if os.path.isdir(path) and not os.path.islink(path):
            _check(_libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", MS_RDONLY, None), f"mask /{target}")
        elif os.path.exists(path) and os.path.exists(null):
            _check(_libc.mount(null, os.fsencode(path), None, MS_BIND, None), f"mask /{target}")


def _drop_capabilities() -> None:
    """Take every capability but :data:`CAPABILITIES_KEPT` out of the bounding set: the command executed next (and
    everything it starts, set-user-ID programs included) can never have them. Raises SandboxError."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for capability in range(last + 1):
        if capability not in CAPABILITIES_KEPT:
            _check(_libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0), f"drop capability {capability}")


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


@dataclass(frozen=True)
class ExecUser:
    """Who a container's process runs as: ids, supplementary groups, and the HOME it gets when it has none."""

    uid: int = 0
    gid: int = 0
    home: str = "/"
    groups: tuple[int, ...] = ()  # runc's Sgids; the process gets (gid, *groups), as moby's getUser gives it


def exec_user(user: str) -> ExecUser:
    """``user`` (``""``, ``name``, ``uid``, ``name:group``, ``uid:gid``...) as runc's ``GetExecUser`` resolves it
    with Docker's defaults (uid 0, gid 0, HOME ``/``), from the current root's ``/etc/passwd`` and ``/etc/group``.

    The first passwd entry of the name (or uid; the default uid 0 for ``""``) gives uid, gid and HOME; an unknown
    numeric uid keeps the defaults. An explicit group sets the gid (first match by gid or name); without one, the
    groups that list the matched user's name are the supplementary groups (moby ``daemon/oci_linux.go``
    ``getUser`` with runc's ``user.GetExecUserPath``). Raises SandboxError (Docker's words)
    for an unknown name or group.
    """
    name, _, group = user.partition(":")
    uid = name if name.isdigit() or not name else None  # "": the default uid's entry
    entry = next((f for f in _entries("/etc/passwd") if (f[2] == (uid or "0") if uid is not None else f[0] == name)),
                 None)  # fmt: skip
    if entry is not None:
        found = ExecUser(_int(entry[2]), _int(entry[3]), entry[5] if len(entry) > 5 else "")
    elif name and uid is None:
        raise SandboxError(f"unable to find user {name}: no matching entries in passwd file")
    else:
        found = ExecUser(int(name or 0))
    if not group:
        member = [_int(f[2]) for f in _entries("/etc/group") if entry is not None and entry[0] in f[3].split(",")]
        return ExecUser(found.uid, found.gid, found.home, tuple(member))
    named = [f for f in _entries("/etc/group") if (f[2] == group if group.isdigit() else f[0] == group)]
    if named:
        return ExecUser(found.uid, _int(named[0][2]), found.home)
    if group.isdigit():
        return ExecUser(found.uid, int(group), found.home)
    raise SandboxError(f"unable to find group {group}: no matching entries in group file")


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _entries(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [fields for line in f if len(fields := line.rstrip("\n").split(":")) >= 4]
    except OSError:
        return []


def look_path(name: str, path: str) -> str:
    """Where ``name`` is, as Go's ``exec.LookPath`` finds it (runc runs the command it finds): a name with a ``/``
    as it is, else the first executable regular file of that name in the ``:``-separated ``path`` directories.

    Raises CommandNotFound with Docker's message and status: 127 (not found), 126 (not executable).
    """
    if "/" in name:
        try:
            st = os.stat(name)
        except OSError as exc:
            raise CommandNotFound(f'exec: "{name}": stat {name}: {_go_text(exc)}') from exc
        if stat.S_ISDIR(st.st_mode) or not st.st_mode & 0o111:
            raise CommandNotFound(f'exec: "{name}": permission denied', 126)
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        with contextlib.suppress(OSError):
            st = os.stat(candidate)
            if not stat.S_ISDIR(st.st_mode) and st.st_mode & 0o111:
                return candidate
    raise CommandNotFound(f'exec: "{name}": executable file not found in $PATH')


@dataclass
class Started:
    """A started command: ``pid`` is PID 1 of its namespace (or the process ``exec`` started) as the host sees
    it, the one to signal; ``shim`` the process to wait for."""

    pid: int
    shim: int

    def wait(self) -> int:
        """Wait for the command (and every process of its namespace); its exit status, a signal n as 128+n."""
        code = os.waitstatus_to_exitcode(os.waitpid(self.shim, 0)[1])
        return 128 - code if code < 0 else code  # the shim itself killed

    def kill(self) -> None:
        """SIGKILL the command and wait for it (PID 1 takes its namespace with it)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            self.wait()


def start(process: Process, join: int = 0) -> Started:
    """Start ``process`` as PID 1 of a new PID namespace (``join``: in the namespaces of that host pid instead, as
    ``exec``), behind a shim (see the module's text); returns once the command runs.

    The command's stdin, stdout and stderr are ours. Raises CommandNotFound when the command cannot be executed
    in the root (127 or 126), SandboxError when anything else failed on the way in: the message says which step
    and why, as the child wrote it.
    """
    etc = process.etc
    if etc is None and not join:
        etc = tempfile.mkdtemp(prefix="pylayerfs-etc-")
        write_etc(etc, process.hostname)
    report_r, report_w = os.pipe()  # close-on-exec: "pid N" from the shim, "error CODE text" from the child
    caller = os.getpid()
    try:
        shim = os.fork()
        if shim == 0:
            _shim(process, etc, join, report_w, caller)
        os.close(report_w)
        with os.fdopen(report_r, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    finally:
        if etc is not None and process.etc is None:
            shutil.rmtree(etc, ignore_errors=True)  # its files stay mounted in the namespace
    pid = next((int(line[4:]) for line in lines if line.startswith("pid ") and line[4:].isdigit()), 0)
    error = next((line[6:] for line in lines if line.startswith("error ")), None)
    if error is not None or not pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(shim, 0)
        code, _, message = (error or "125 the shim exited before the command started").partition(" ")
        kind = CommandNotFound if code in ("126", "127") else SandboxError
        raise kind(message.replace("\\n", "\n"), int(code) if code.isdigit() else 125)
    return Started(pid, shim)


def _shim(process: Process, etc: str | None, join: int, report: int, caller: int) -> NoReturn:
    """In the forked shim: a session of its own, the PID namespace, PID 1 forked into it, its pid reported;
    then wait for it and exit with its status. The shim dies with ``caller`` (a killed build or monitor leaves
    no command running), and PID 1 with the shim. Never returns."""
    code = 125
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != caller:
            raise SandboxError("the caller exited")
        os.setsid()
        if join:
            _setns(join, "pid", CLONE_NEWPID)
        else:
            _check(_libc.unshare(CLONE_NEWPID), "unshare")
        pid = os.fork()
        if pid == 0:
            _child(process, etc, join, report)
        os.write(report, f"pid {pid}\n".encode())
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _close_fds(keep=(0, 1, 2))
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        code = 128 - status if status < 0 else status
    except BaseException as exc:
        _report(report, code, exc)
    os._exit(code)


def _child(process: Process, etc: str | None, join: int, report: int) -> NoReturn:
    """In the forked child (PID 1 of the new namespace, or a process joining one): enter the root, become the
    user, execute the command. Reports what failed, as ``error CODE text``, and exits. Never returns."""
    code = 125
    try:
        _close_fds(keep=(0, 1, 2, report))
        for sig in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores SIGPIPE and SIGXFSZ
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _drop_capabilities()  # from the bounding set: the mounts below still have this process's own
        if join:
            for name, kind in (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("mnt", CLONE_NEWNS)):
                _setns(join, name, kind)  # the mount namespace last: its root becomes ours
            try:
                os.chdir(process.cwd)
            except OSError as exc:
                text = f'chdir to cwd ("{process.cwd}") set in config.json failed: {_go_text(exc)}'
                raise SandboxError(text) from exc
        else:
            _enter(process.rootfs, process.cwd, process.hostname, etc)
        user = exec_user(process.user)
        env = {"PATH": DEFAULT_PATH.partition("=")[2], "HOSTNAME": process.hostname, **process.env}
        env.setdefault("HOME", user.home)
        with _step(f"set user {process.user}"):
            os.setgroups([user.gid, *user.groups])
            os.setgid(user.gid)
            os.setuid(user.uid)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        path = look_path(process.argv[0], env["PATH"])
        try:
            os.execve(path, list(process.argv), env)
        except OSError as exc:
            raise CommandNotFound(f"exec {path}: {_go_text(exc)}", 126) from exc
    except BaseException as exc:
        code = exc.exit_code if isinstance(exc, SandboxError) else 125
        _report(report, code, exc)
    os._exit(code)


def _go_text(exc: OSError) -> str:
    """The errno text as Go writes it (runc's messages): ``no such file or directory``."""
    text = os.strerror(exc.errno or errno.EIO)
    return text[:1].lower() + text[1:]


def _report(fd: int, code: int, exc: BaseException) -> None:
    text = (str(exc) or type(exc).__name__).replace("\n", "\\n")
    with contextlib.suppress(OSError):
        os.write(fd, f"error {code} {text}\n".encode(errors="replace")[:4096])


def _setns(pid: int, name: str, kind: int) -> None:
    """Join the ``name`` namespace (``pid``, ``mnt``...) of host process ``pid``. Raises SandboxError."""
    with _step(f"join the {name} namespace of {pid}"):
        fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY)
    try:
        _check(_libc.setns(fd, kind), f"join the {name} namespace of {pid}")
    finally:
        os.close(fd)


def _close_fds(keep: Sequence[int]) -> None:
    """Close every file descriptor but ``keep`` (what we inherited from the caller: not the command's)."""
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            with contextlib.suppress(OSError):
                os.close(int(name))


def run(process: Process) -> int:
    """Run ``process`` to the end, its output on ours; returns its exit status (a signal as 128+n).

    Interrupted (Ctrl-C on the caller), the command is killed, with its namespace, before the error goes up.
    """
    started = start(process)
    try:
        return started.wait()
    except BaseException:
        started.kill()
        raise


def call(rootfs: str, work: Callable[[], None], cwd: str = "/", *, mounts: bool = True) -> None:
    """Run ``work`` in a child process inside ``rootfs``; re-raise its error here as SandboxError.

    The message is the child's error text (for entering the root: the step and its errno text).
    The root is bare, as Docker's builder copies into it: nothing mounted on /proc, /dev... (a COPY to
    ``/dev/x`` lands in the layer). ``mounts=False``: only ``chroot`` (to work on the tree itself).
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        status = 0
        try:
            if mounts:
                _enter(rootfs, cwd, "pylayerfs", runtime_mounts=False)
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
