"""Mounting and unmounting: the daemon's life (the kernel's ``super.c`` side, in user space).

``mount()`` checks everything it can before touching anything, then starts the
daemon: it builds the :class:`~pylayerfs.overlay.filesystem.Overlay` (opening the layers,
locking the upper and work directories, emptying ``work/``), mounts, and tells
the parent it is ready through a pipe, so that ``pylayerfs mount`` returns only
once the mount can be used, or fails with the daemon's one-line reason.

Once mounted, the daemon records its parsed options (absolute layer paths,
``userxattr``, ``metacopy``) in ``/run/pylayerfs/mounts/<mount ID>.json`` (for
other users ``$XDG_RUNTIME_DIR/pylayerfs/mounts``), removed when it exits:
that is how ``pylayerfs explain`` finds a mount's layers, however it was
mounted (``pylayerfs mount``, ``mount -t fuse.pylayerfs``, fstab, the image
builder). :func:`recorded_config` checks a record against ``mountinfo`` (the
same mount ID, device and mountpoint, a live daemon), so a record left by a
killed daemon is ignored.

Two FUSE transports serve the same engine (``-o binding=``): ``libfuse``, the
mfusepy adapter on libfuse's path-based API (:mod:`pylayerfs.fuse.adapter`),
and ``native``, which speaks the kernel protocol on ``/dev/fuse`` itself
(:mod:`pylayerfs.fuse.native`). Without the option, the environment variable
``PYLAYERFS_BINDING`` chooses, else :data:`DEFAULT_BINDING`. Both end the same
way: on unmount, or on SIGTERM/SIGINT/SIGHUP, after a lazy unmount.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import gc
import json
import logging
import logging.handlers
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from pylayerfs.fuse.native.device import FSTYPE, FUSE_DEVICE
from pylayerfs.overlay import realfs
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.params import BINDINGS, MountConfig, MountEntry, MountError, mountinfo, mounts_below

log = logging.getLogger("pylayerfs")
DAEMON_EXIT_WAIT = 10.0  # seconds an unmounted daemon may take to close its layers and exit (umount, mount wait)
READY = b"ready\n"
START_TIMEOUT = 30.0
ROOT_RECORDS = "/run/pylayerfs/mounts"
FUSE_CONF = "/etc/fuse.conf"
DEFAULT_BINDING = "native"
BINDING_VARIABLE = "PYLAYERFS_BINDING"
PASSTHROUGH_VARIABLE = "PYLAYERFS_PASSTHROUGH"  # "off": the native transport serves every read and write itself
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def binding(config: MountConfig) -> str:
    """The FUSE transport for ``config``: its ``binding=``, else ``$PYLAYERFS_BINDING``, else the default.

    Raises MountError for a value of the variable that is not a binding.
    """
    if config.binding is not None:
        return config.binding
    chosen = os.environ.get(BINDING_VARIABLE) or DEFAULT_BINDING
    if chosen not in BINDINGS:
        raise MountError(f"{BINDING_VARIABLE}={chosen} is not a binding ({' or '.join(BINDINGS)})")
    return chosen


def is_mountpoint(path: str) -> bool:
    """Is ``path`` the mountpoint of a pylayerfs mount right now?"""
    real = os.path.realpath(path)
    return any(e.mountpoint == real and e.fstype == FSTYPE for e in mountinfo())


# -- mount records: what a live daemon serves, for explain -------------------------------------


def records_dir(uid: int | None = None) -> str:
    """Where the daemons of user ``uid`` (default: this process's) record their mounts.

    ``/run/pylayerfs/mounts`` for root; else ``$XDG_RUNTIME_DIR/pylayerfs/mounts`` (for another user than
    this process's, or without the variable, ``/run/user/UID/pylayerfs/mounts``, where logind puts it).
    """
    me = os.geteuid()
    uid = me if uid is None else uid
    if uid == 0:
        return ROOT_RECORDS
    runtime = os.environ.get("XDG_RUNTIME_DIR", "") if uid == me else ""
    return os.path.join(runtime or f"/run/user/{uid}", "pylayerfs", "mounts")


def _record_path(directory: str, mount_id: int) -> str:
    return os.path.join(directory, f"{mount_id}.json")


def write_record(config: MountConfig, mountpoint: str, before: set[int]) -> str | None:
    """Record the mount just made on ``mountpoint`` (its mount ID is not in ``before``); return the file.

    Best effort: a mount works without its record (only ``explain`` needs it), so a failure is logged
    and None returned. The layer paths are made absolute here whatever the caller's working directory
    was (``check`` already resolved them; a caller that skipped it gets them resolved against ours).
    """
    ours = [e for e in mountinfo() if e.mountpoint == mountpoint and e.fstype == FSTYPE and e.mount_id not in before]
    if not ours:
        log.warning("mounted %s but cannot find it in /proc/self/mountinfo: no record for explain", mountpoint)
        return None
    entry = ours[-1]  # mounts on the same mountpoint are listed in the order they were made
    record = {
        "mount_id": entry.mount_id,
        "dev": entry.dev,
        "mountpoint": entry.mountpoint,
        "pid": os.getpid(),
        "lowerdirs": [os.path.abspath(d) for d in config.lowerdirs],
        "upperdir": os.path.abspath(config.upperdir) if config.upperdir is not None else None,
        "workdir": os.path.abspath(config.workdir) if config.workdir is not None else None,
        "userxattr": config.userxattr,
        "metacopy": config.metacopy,
        "redirect_dir": config.redirect_mode,
        "binding": binding(config),
    }
    directory = records_dir()
    path = _record_path(directory, entry.mount_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(directory, 0o755, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the mount of %s in %s: %s", mountpoint, directory, exc.strerror)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    return path


def remove_record(path: str) -> None:
    """Remove this daemon's record (unless another daemon has since reused the mount ID and replaced it)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.unlink(path)


def _alive(pid: int) -> bool:
    """Is process ``pid`` running (not gone, and not a zombie that no one has reaped: a killed daemon)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _record(entry: MountEntry) -> dict[str, Any] | None:
    """The record of the live daemon of the pylayerfs mount ``entry`` (see :func:`write_record`).

    None when there is none, or it does not match ``entry`` (mount ID, device, mountpoint), or its daemon is gone,
    or it is not owned by the mount's user: a stale or foreign record is ignored. Never raises.
    """
    owner = entry.option("user_id")
    uid = int(owner) if owner is not None and owner.isdigit() else os.geteuid()
    path = _record_path(records_dir(uid), entry.mount_id)
    try:
        with open(path, encoding="utf-8") as f:
            if os.fstat(f.fileno()).st_uid != uid:
                return None
            record = json.load(f)
        if (record["mount_id"], record["dev"], record["mountpoint"]) != (entry.mount_id, entry.dev, entry.mountpoint):
            return None
        return record if isinstance(record, dict) and _alive(int(record["pid"])) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_config(entry: MountEntry) -> MountConfig | None:
    """The options the live daemon of the pylayerfs mount ``entry`` serves, from its record (None as
    :func:`_record`)."""
    record = _record(entry)
    if record is None:
        return None
    try:
        lowers, upper, work = record["lowerdirs"], record["upperdir"], record["workdir"]
        if not (isinstance(lowers, list) and lowers and all(isinstance(d, str) and os.path.isabs(d) for d in lowers)):
            return None
        if not all(d is None or (isinstance(d, str) and os.path.isabs(d)) for d in (upper, work)):
            return None
        redirect = record.get("redirect_dir")
        return MountConfig(lowerdirs=lowers, upperdir=upper, workdir=work, userxattr=record["userxattr"] is True,
                           metacopy=record["metacopy"] is True,
                           redirect_dir=redirect if redirect in ("on", "follow", "nofollow") else None)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- why a mount failed -------------------------------------------------------------------------


def user_allow_other(conf: str = FUSE_CONF) -> bool:
    """Does ``/etc/fuse.conf`` let users mount with ``allow_other`` (a ``user_allow_other`` line)?"""
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def mount_failure_hint(config: MountConfig) -> str:
    """Why libfuse could not mount, when it is a known limit of a user who is not root ("" if unknown).

    libfuse reports only "mounting failed" (4): it opens ``/dev/fuse`` itself, then has ``fusermount3``
    mount, which refuses ``allow_other`` to users unless ``/etc/fuse.conf`` says ``user_allow_other``.
    """
    if os.geteuid() == 0:
        return ""
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        return f"{FUSE_DEVICE} is not readable and writable for this user (it usually is: mode 0666)"
    if config.allow_other and not user_allow_other():
        return (f"allow_other (a default) needs root or 'user_allow_other' in {FUSE_CONF}; "
                "-o noallow_other turns it off (then only you can use the mount)")  # fmt: skip
    return ""


def _lock(path: str, what: str) -> int:
    """Hold an exclusive lock on a directory for the life of the daemon (one mount per upper/work); return its fd.

    A lock held by no mounted pylayerfs (the daemon of a mount just unmounted, a container stopped and started again,
    may still be closing its layers) is waited for up to :data:`DAEMON_EXIT_WAIT` seconds. Raises MountError at once
    when a mount uses the directory, or when the lock is still held then.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    deadline = time.monotonic() + DAEMON_EXIT_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline or _mounted_with(path):
                os.close(fd)
                raise MountError(f"{what} '{path}' is in use by another pylayerfs mount") from None
            time.sleep(0.02)


def _mounted_with(layer: str) -> bool:
    """Does a mounted pylayerfs (by its daemon's record) use the directory ``layer`` as its upper or work dir?"""
    configs = [recorded_config(e) for e in mountinfo() if e.fstype == FSTYPE]
    return any(c is not None and layer in (c.upperdir, c.workdir) for c in configs)


def build_overlay(config: MountConfig) -> tuple[Overlay, list[int]]:
    locks = []
    if config.upperdir is not None and config.workdir is not None:
        locks = [_lock(config.upperdir, "upperdir"), _lock(config.workdir, "workdir")]
    try:
        overlay = Overlay(config.lowerdirs, config.upperdir, config.workdir, userxattr=config.userxattr,
                          metacopy=config.metacopy, redirect_dir=config.redirect_mode,
                          uuid_off=config.uuid_off, index=config.index)  # fmt: skip
    except OSError as exc:
        for fd in locks:
            os.close(fd)
        raise MountError(f"cannot open the layers: {exc.strerror}: {exc.filename}") from exc
    return overlay, locks


def mount_flags(config: MountConfig) -> list[str]:
    """The generic mount flags for ``config``: what ``-o`` gave, and as root ``dev`` and ``suid`` unless refused.

    As on a ``mount -t overlay``, device files and set-user-ID bits work on a root mount unless ``nodev``/
    ``nosuid`` say otherwise (FUSE's own default is ``nodev,nosuid``: a container's ``/dev/null`` would refuse
    to open and its ``su`` would not be set-user-ID). Both transports take these.
    """
    flags = list(config.fuse_flags)
    if os.geteuid() == 0:
        flags += [flag for flag in ("dev", "suid") if f"no{flag}" not in flags and flag not in flags]
    return flags


def fuse_options(config: MountConfig) -> dict[str, object]:
    """libfuse's mount options for ``config``: the generic flags (:func:`mount_flags`), allow_other,
    default_permissions."""
    opts: dict[str, object] = dict.fromkeys(mount_flags(config), True)
    if config.allow_other:
        opts["allow_other"] = True
    if config.default_permissions:
        opts["default_permissions"] = True
    return opts


def setup_logging(config: MountConfig, background: bool) -> None:
    """Where the daemon's log goes: ``logfile=``; else stderr in the foreground or with ``debug``; else syslog.

    Raises MountError naming the log file when it cannot be opened for appending (ENOENT, EACCES, EINVAL...).
    """
    handler: logging.Handler
    if config.logfile:
        try:
            handler = logging.FileHandler(config.logfile)
        except OSError as exc:
            raise MountError(f"cannot write the log file '{config.logfile}': {exc.strerror}") from None
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
    """Run the daemon in this process until unmounted; returns the exit status.

    ``mountpoint`` is absolute (``check`` returns it so). Raises MountError (one line) when libfuse
    cannot mount, with the reason when it is a known one (see :func:`mount_failure_hint`).
    """
    if binding(config) == "native":
        passthrough(config)  # a bad $PYLAYERFS_PASSTHROUGH fails here, before anything is mounted
        return _serve_native(config, mountpoint, source, ready_fd)
    if config.index and config.upperdir is not None:  # its names would be kernel inodes of their own, each with its
        # cached pages and link count (without an upper layer index=on is ignored, as the kernel ignores it)
        raise MountError("index=on needs the native binding: libfuse's path API gives every name its own inode")
    from pylayerfs.fuse import adapter  # the binding is loaded only by the process that serves

    os.umask(0)  # modes of new objects come from the caller, already masked by the kernel
    setup_logging(config, background=ready_fd is not None)
    overlay, locks = build_overlay(config)
    before = {e.mount_id for e in mountinfo()}
    record: str | None = None
    mounted = False

    def ready() -> None:
        nonlocal record, mounted
        mounted = True
        record = write_record(config, mountpoint, before)
        if ready_fd is not None:
            os.write(ready_fd, READY)

    try:
        adapter.serve(overlay, mountpoint, fsname=source, fuse_options=fuse_options(config), on_ready=ready,
                           timeout=config.timeout)  # fmt: skip
    except RuntimeError as exc:
        if mounted:  # libfuse's loop ended by a signal (SIGTERM, SIGINT, SIGHUP): it has unmounted, all is well
            log.info("%s: stopped by a signal (libfuse said: %s), unmounted", mountpoint, exc)
            return 0
        hint = mount_failure_hint(config)
        reason = f": {hint}" if hint else f" (libfuse said: {exc})"
        raise MountError(f"FUSE could not mount '{mountpoint}'{reason}") from exc
    finally:
        if record is not None:
            remove_record(record)
        for fd in locks:
            os.close(fd)
    return 0


def passthrough(config: MountConfig) -> bool:
    """May the native transport pass open files through to their real files? ``-o passthrough=on|off``, else
    ``$PYLAYERFS_PASSTHROUGH`` ("on" or "off"), else yes (where the kernel and the daemon's privileges allow it).

    Raises MountError for a value of the variable other than "on" and "off".
    """
    if config.passthrough is not None:
        return config.passthrough
    chosen = os.environ.get(PASSTHROUGH_VARIABLE) or "on"
    if chosen not in ("on", "off"):
        raise MountError(f"{PASSTHROUGH_VARIABLE}={chosen} is neither on nor off")
    return chosen == "on"


def _serve_native(config: MountConfig, mountpoint: str, source: str, ready_fd: int | None) -> int:
    """:func:`serve` on the native transport (:mod:`pylayerfs.fuse.native`): the same life, records and signals."""
    from pylayerfs.fuse.native import session as native
    from pylayerfs.fuse.native.device import DeviceError

    os.umask(0)
    setup_logging(config, background=ready_fd is not None)
    overlay, locks = build_overlay(config)
    before = {e.mount_id for e in mountinfo()}
    record: str | None = None
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def ready() -> None:
        nonlocal record
        # A cold walk makes objects that live until FORGET (nodes, cached lookups): at the default threshold (700) the
        # collector took ~13% of a walk of 10,500 entries (W1 cold: 188 ms, 163 ms with it off, 176 ms at 20,000).
        gc.set_threshold(20_000, 10, 10)
        record = write_record(config, mountpoint, before)
        if ready_fd is not None:
            os.write(ready_fd, READY)

    def on_session(session: native.Session) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda _sig, _frame: session.stop())

    try:
        stopped = native.serve(overlay, mountpoint, fsname=source, options=mount_flags(config),
                               allow_other=config.allow_other, default_permissions=config.default_permissions,
                               timeout=config.timeout, on_ready=ready, on_session=on_session,
                               passthrough=passthrough(config))  # fmt: skip
        if stopped:
            log.info("%s: stopped by a signal, unmounted", mountpoint)
    except DeviceError as exc:
        hint = mount_failure_hint(config)
        reason = f": {hint}" if hint else f" ({exc})"
        raise MountError(f"FUSE could not mount '{mountpoint}'{reason}") from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if record is not None:
            remove_record(record)
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
    """Unmount a pylayerfs mount and wait for its daemon to exit (at most :data:`DAEMON_EXIT_WAIT` seconds), so that
    its upper and work directories are free for the next mount when this returns (not with ``lazy``, where the
    daemon serves until the last user leaves). Raises MountError for a path that is not a pylayerfs mountpoint, or
    one that cannot be unmounted (EBUSY...).
    """
    real = os.path.realpath(mountpoint)
    if not is_mountpoint(real):
        raise MountError(f"'{mountpoint}' is not a pylayerfs mountpoint")
    entries = [e for e in mountinfo() if e.mountpoint == real and e.fstype == FSTYPE]
    record = _record(entries[-1]) if entries and not lazy else None
    _unmount(mountpoint, real, lazy)
    deadline = time.monotonic() + DAEMON_EXIT_WAIT
    while record is not None and _alive(int(record["pid"])) and time.monotonic() < deadline:
        time.sleep(0.01)


def _unmount(mountpoint: str, real: str, lazy: bool) -> None:
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


def remove_tree(path: str) -> None:
    """Remove the directory ``path`` and all below it, after detaching every mount there (lazily, MNT_DETACH).

    For throw-away trees (a demo's store, a check's layers) that a run stopped half-way may leave mounted:
    nothing is ever deleted through a mount. Never raises: what cannot be removed stays.
    """
    for mountpoint in mounts_below(path):
        with contextlib.suppress(OSError):
            realfs.detach(mountpoint)
    if not mounts_below(path):
        shutil.rmtree(path, ignore_errors=True)
