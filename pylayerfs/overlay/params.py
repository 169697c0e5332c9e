"""Mount options: parsing and checking, with the syntax of ``mount -t overlay`` (the kernel's ``params.c``).

``-o lowerdir=top:...:bottom,upperdir=U,workdir=W`` with ``\\`` escaping the
next character (so ``\\:`` and ``\\,`` stand for a colon and a comma inside a
path). Every problem becomes a :class:`MountError` with a one-line message; the
checks run before anything is mounted or written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

MAX_LOWERS = 500  # the kernel's OVL_MAX_STACK
BINDINGS = ("native", "libfuse")  # the FUSE transports (-o binding=): pylayerfs.fuse.native, pylayerfs.fuse.adapter

# Options of the kernel's overlayfs that pylayerfs accepts at the value it implements.
_KERNEL_DEFAULTS = {
    "index": ("off",),
    "nfs_export": ("off",),
    "xino": ("off", "auto"),
    "uuid": ("on", "off", "auto", "null"),
}
# Generic mount flags that libfuse applies to the mount.
_FUSE_MOUNT_FLAGS = {
    "rw", "ro", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync", "async", "dirsync",
    "noatime", "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
}  # fmt: skip
# What mount(8), mount.fuse and fstab pass along and a filesystem ignores.
_IGNORED = {"defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail", "_netdev", "atime",
            "diratime", "loud", "silent"}  # fmt: skip


REDIRECT_MODES = ("on", "follow", "nofollow", "off")  # redirect_dir= (overlayfs.rst, "Redirect")
MAX_TIMEOUT = 2**32 - 1  # seconds: FUSE replies carry cache times as 64-bit seconds; a century is plenty


class MountError(Exception):
    """A mount request that cannot be honoured; ``str()`` is the one-line message for the user."""


@dataclass
class MountConfig:
    """What ``-o`` asked for, as :func:`parse_options` reads it and :func:`check` completes it.

    ``lowerdirs`` top-first (``lowerdir=top:...:bottom``); ``upperdir`` and ``workdir`` both or neither (none: a
    read-only stack); ``fuse_flags`` the generic mount flags passed on to libfuse; ``timeout`` in seconds.
    """

    lowerdirs: list[str]
    upperdir: str | None = None
    workdir: str | None = None
    userxattr: bool = False
    allow_other: bool = True
    default_permissions: bool = True
    debug: bool = False
    logfile: str | None = None
    fuse_flags: list[str] = field(default_factory=list)
    metacopy: bool = False  # chmod, chown, utimes and xattrs copy a file's metadata only (the kernel's metacopy=on)
    redirect_dir: str | None = None  # as given (None: not given); redirect_mode() gives the mode the mount runs with
    redirect_always_follow: bool = True  # the kernel module parameter's counterpart: redirect_dir=off means follow
    uuid_off: bool = False  # uuid=off: origin file handles carry the null UUID instead of the lower fs's
    timeout: float = 86400.0  # how long the kernel may cache entries and attributes (fuse-overlayfs's timeout=)
    binding: str | None = None  # the FUSE transport, "native" or "libfuse" (None: the daemon's default)
    passthrough: bool | None = (
        None  # native: open files passed through to their real files (None: $PYLAYERFS_PASSTHROUGH)
    )

    @property
    def redirect_mode(self) -> str:
        """The redirect mode the mount runs with (:func:`redirect_mode`): ``"on"``, ``"follow"`` or ``"nofollow"``."""
        return redirect_mode(self.redirect_dir, self.metacopy, self.userxattr, self.redirect_always_follow)

    @property
    def read_only(self) -> bool:
        """True when the mount cannot write: no ``upperdir``, or the ``ro`` flag."""
        return self.upperdir is None or "ro" in self.fuse_flags


def redirect_mode(given: str | None, metacopy: bool, userxattr: bool, always_follow: bool = True) -> str:
    """The redirect mode a mount runs with: ``"on"``, ``"follow"`` or ``"nofollow"``, as the kernel's
    ``ovl_fs_params_verify`` (fs/overlayfs/params.c) resolves it.

    ``given`` is the ``redirect_dir=`` value (None: not given); ``off`` is ``follow``, or ``nofollow`` without
    ``always_follow`` (the kernel's ``redirect_always_follow`` module parameter, on by default). Not given, the mode is
    the kernel module's default, ``follow`` (``redirect_dir`` module parameter off, ``redirect_always_follow`` on), or
    ``on`` with ``metacopy=on``, which needs it; with ``userxattr`` it is ``nofollow``. Raises :class:`MountError` with
    the kernel's words for ``metacopy=on`` with another given mode, and ``userxattr`` with ``metacopy=on`` or a given
    mode other than ``nofollow``.
    """
    mode = given if given is not None else "follow"
    if mode == "off":
        mode = "follow" if always_follow else "nofollow"
    if metacopy and mode != "on":
        if given is not None:
            raise MountError(f"conflicting options: metacopy=on,redirect_dir={mode}")
        mode = "on"
    if userxattr:
        if given is not None and mode != "nofollow":
            raise MountError(f"conflicting options: userxattr,redirect_dir={mode}")
        if metacopy:
            raise MountError("conflicting options: userxattr,metacopy=on")
        mode = "nofollow"
    return mode


def split_escaped(text: str, sep: str, *, keep_escapes: bool = False) -> list[str]:
    """Split on ``sep`` except where a backslash escapes it; backslashes escape any character; a list of parts.

    ``keep_escapes`` leaves the backslashes in the parts, for a second split of each part. A trailing lone backslash is
    kept as itself. Never raises.
    """
    parts: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
            if keep_escapes:
                cur.append(ch)
        elif ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if escaped and not keep_escapes:
        cur.append("\\")
    parts.append("".join(cur))
    return parts


def unescape(text: str) -> str:
    """``text`` with its backslash escapes undone (``a\\:b`` -> ``a:b``)."""
    return split_escaped(text, "")[0]


def _split_options(options: str) -> list[str]:
    """Split an option string on unescaped commas, keeping escapes for the values to undo."""
    return [p for p in split_escaped(options, ",", keep_escapes=True) if p]


def parse_options(options: list[str]) -> MountConfig:
    """Parse the ``-o`` strings (several are joined, as mount does) into a :class:`MountConfig`.

    Checks the syntax only (the directories are checked by :func:`check`). Raises :class:`MountError` for an unknown
    option, a missing or bad value, an empty ``lowerdir`` entry, a kernel option at a value pylayerfs does not
    implement, and the combinations the kernel refuses (:func:`redirect_mode`).
    """
    config = MountConfig(lowerdirs=[])
    for opt in (o for text in options for o in _split_options(text)):
        key, has_value, value = opt.partition("=")
        if key == "lowerdir":
            config.lowerdirs = split_escaped(value, ":")
            if any(not d for d in config.lowerdirs):
                raise MountError("lowerdir has an empty entry (pylayerfs has no data-only layers '::')")
        elif key in ("upperdir", "workdir", "logfile"):
            if not value:
                raise MountError(f"{key} needs a directory")
            setattr(config, key, unescape(value))
        elif key == "timeout":
            try:
                config.timeout = float(value)
            except ValueError:
                raise MountError(f"timeout needs a number of seconds, not '{value}'") from None
            if not 0 <= config.timeout <= MAX_TIMEOUT:  # nan too
                raise MountError(f"timeout needs a number of seconds from 0 to {MAX_TIMEOUT}, not '{value}'")
        elif key == "binding":
            if value not in BINDINGS:
                raise MountError(f"binding needs {' or '.join(BINDINGS)}, not '{value}'")
            config.binding = value
        elif key == "redirect_dir":
            if value not in REDIRECT_MODES:
                raise MountError(f"redirect_dir needs {', '.join(REDIRECT_MODES[:-1])} or off, not '{value}'")
            config.redirect_dir = value
        elif key in ("metacopy", "passthrough", "redirect_always_follow"):
            if value not in ("on", "off"):
                raise MountError(f"{key} needs on or off, not '{value}'")
            setattr(config, key, value == "on")
        elif key in ("userxattr", "debug", "allow_other", "default_permissions") and not has_value:
            setattr(config, key, True)
        elif key in ("noallow_other", "nodefault_permissions") and not has_value:
            setattr(config, key[2:], False)
        elif key in _KERNEL_DEFAULTS:
            if value not in _KERNEL_DEFAULTS[key]:
                raise MountError(
                    f"{key}={value} is not supported (pylayerfs implements {key}={_KERNEL_DEFAULTS[key][0]})"
                )
            if key == "uuid":
                config.uuid_off = value == "off"
        elif key in _FUSE_MOUNT_FLAGS and not has_value:
            config.fuse_flags.append(key)
        elif key in _IGNORED or key.startswith("x-") or key in ("fsname", "subtype", "context"):
            pass
        else:
            raise MountError(f"unknown mount option '{opt}'")
    redirect_mode(config.redirect_dir, config.metacopy, config.userxattr, config.redirect_always_follow)
    if not config.default_permissions and config.allow_other:
        # Without default_permissions no one checks permissions (the daemon does not): with allow_other, every user
        # of the machine could read and change everything in the mount with the daemon's rights.
        raise MountError("nodefault_permissions turns off every permission check: it needs noallow_other "
                         "(only the mounting user may use the mount)")  # fmt: skip
    return config


def _check_no_overlap(config: MountConfig) -> None:
    """No layer may be, hold or sit inside another (raises MountError naming both).

    The kernel refuses the same with ELOOP ("overlapping lowerdir path", ovl_check_layer in
    fs/overlayfs/super.c), except for an upperdir inside a lowerdir, which it accepts and where writes
    would change that lower layer: pylayerfs refuses that too, lower layers are never modified.
    """
    named = [("lowerdir", d) for d in config.lowerdirs]
    if config.upperdir is not None and config.workdir is not None:
        named += [("upperdir", config.upperdir), ("workdir", config.workdir)]
    for i, (kind, path) in enumerate(named):
        for other_kind, other in named[i + 1 :]:
            if {kind, other_kind} != {"upperdir", "workdir"} and (_is_within(path, other) or _is_within(other, path)):
                same = "are the same directory" if path == other else "overlap (one is inside the other)"
                raise MountError(f"{kind} '{path}' and {other_kind} '{other}' {same}")


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _directory(kind: str, path: str) -> str:
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise MountError(f"{kind} '{path}' does not exist")
    if not os.path.isdir(real):
        raise MountError(f"{kind} '{path}' is not a directory")
    return real


def check(config: MountConfig, mountpoint: str) -> str:
    """Validate ``config`` against the filesystem; return the mountpoint's real path.

    Directories are replaced by their real paths, so that the daemon does not depend on the working directory it was
    started from. Raises :class:`MountError` for no or too many (over 500, OVL_MAX_STACK) lower directories, a missing
    or non-directory layer or mountpoint, an upperdir without a workdir (or the reverse), upperdir and workdir on
    different filesystems or nested, layers that are the same directory or nested (:func:`_check_no_overlap`), an
    upperdir or workdir a kernel overlay mount uses, and a mountpoint inside a layer.
    """
    if not config.lowerdirs:
        raise MountError("missing lowerdir= (at least one lower directory is needed)")
    if len(config.lowerdirs) > MAX_LOWERS:
        raise MountError(f"too many lower directories: {len(config.lowerdirs)} (the limit is {MAX_LOWERS})")
    if (config.upperdir is None) != (config.workdir is None):
        raise MountError("upperdir and workdir go together: give both or neither")
    config.lowerdirs = [_directory("lowerdir", d) for d in config.lowerdirs]
    layers = list(config.lowerdirs)
    if config.upperdir is not None and config.workdir is not None:
        config.upperdir = _directory("upperdir", config.upperdir)
        config.workdir = _directory("workdir", config.workdir)
        if os.stat(config.upperdir).st_dev != os.stat(config.workdir).st_dev:
            raise MountError("workdir and upperdir must be on the same filesystem")
        if _is_within(config.workdir, config.upperdir) or _is_within(config.upperdir, config.workdir):
            raise MountError("workdir and upperdir must be separate subtrees (neither inside the other)")
        layers += [config.upperdir, config.workdir]
        _check_not_in_use(config.upperdir, config.workdir)
    _check_no_overlap(config)
    mnt = _directory("mountpoint", mountpoint)
    for layer in layers:
        if _is_within(mnt, layer):
            raise MountError(f"mountpoint '{mountpoint}' is inside the layer '{layer}'")
    return mnt


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mountpoint: str
    fstype: str
    super_options: str  # as the kernel prints them: octal escapes (``\054`` for a comma) left in
    mount_id: int = 0  # unique among the mounts that exist now (reused after an unmount)
    dev: str = ""  # "major:minor" of the mounted filesystem (st_dev of its files)

    def option(self, key: str) -> str | None:
        """The value of the super option ``key`` (unescaped; ``""`` for a flag), None when absent."""
        for opt in _split_options(self.super_options):
            name, _, value = opt.partition("=")
            if name == key:
                return unoctal(value)
        return None


def mountinfo() -> list[MountEntry]:
    """The mounts this process sees (``/proc/self/mountinfo``), in its order; empty if it cannot be read."""
    entries = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                post = fields[fields.index("-") + 1 :]
                if len(post) >= 3:
                    entries.append(MountEntry(unoctal(fields[4]), post[0], post[2], int(fields[0]), fields[2]))
    except (OSError, ValueError):
        pass
    return entries


def unoctal(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _check_not_in_use(upperdir: str, workdir: str) -> None:
    """Refuse an upperdir/workdir that a kernel overlay mount is using (pylayerfs mounts hold a lock)."""
    for entry in mountinfo():
        if entry.fstype != "overlay":
            continue
        for opt in _split_options(entry.super_options):
            key, _, value = opt.partition("=")
            if key in ("upperdir", "workdir") and os.path.realpath(unescape(value)) in (upperdir, workdir):
                raise MountError(f"{key} '{value}' is in use by a mounted overlay")


def mounts_below(path: str) -> list[str]:
    """Mountpoints at or below ``path`` (real paths), deepest first; never raises (see :func:`mountinfo`)."""
    prefix = os.path.realpath(path)
    found = [e.mountpoint for e in mountinfo() if e.mountpoint == prefix or e.mountpoint.startswith(prefix + "/")]
    return sorted(found, key=len, reverse=True)
