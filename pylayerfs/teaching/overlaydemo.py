"""``pylayerfs demo``: three real layers, one mount, and what overlay does to the disk.

It builds three lower layers the way an image's layers look on disk, mounts
them with an empty upper directory, and shows each rule of overlayfs at work:
lookup (upper hides lower), a whiteout deleting a file, an opaque directory
replacing a directory, copy-up on write, and the whiteout a deletion leaves.
Its temporary directory is removed afterwards, also on an error or Ctrl-C,
unless ``--keep`` (or ``--dir``) asks to keep it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile

from pylayerfs.fuse import mount
from pylayerfs.overlay.markers import (
    OPAQUE_XATTR,
    OPAQUE_YES,
    is_opaque_dir,
    is_whiteout,
    make_whiteout,
)
from pylayerfs.overlay.params import MountConfig, MountError, check
from pylayerfs.teaching.demo import error


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _build_layers(root: str) -> list[str]:
    """Three layers, bottom first: a base, a layer that deletes and replaces, an app layer."""
    base, middle, top = (os.path.join(root, "layers", n) for n in ("1-base", "2-cleanup", "3-app"))
    _write(f"{base}/etc/motd", "welcome to the base layer\n")
    _write(f"{base}/etc/hostname", "base\n")
    _write(f"{base}/cache/a.tmp", "stale\n")
    _write(f"{base}/cache/b.tmp", "stale\n")
    os.makedirs(f"{middle}/etc")
    os.makedirs(f"{middle}/cache")
    os.setxattr(f"{middle}/cache", OPAQUE_XATTR, OPAQUE_YES)  # like RUN rm -rf /cache && mkdir /cache
    _write(f"{middle}/cache/fresh", "rebuilt\n")
    fd = os.open(f"{middle}/etc", os.O_RDONLY | os.O_DIRECTORY)
    make_whiteout(fd, "hostname")  # like RUN rm /etc/hostname
    os.close(fd)
    _write(f"{top}/app/app.sh", "echo hello\n")
    _write(f"{top}/etc/motd", "welcome to the app\n")
    return [top, middle, base]  # lowerdir order: top first


def _describe(path: str) -> str:
    st = os.lstat(path)
    if is_whiteout(st):
        return "whiteout (char 0/0)"
    if stat.S_ISDIR(st.st_mode):
        return "directory, opaque" if is_opaque_dir(path) else "directory"
    with open(path) as f:
        return f"file: {f.read().strip()!r}"


def _tree(title: str, root: str) -> None:
    print(f"  {title}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            print(f"    /{os.path.relpath(full, root):<18} {_describe(full)}")


def run_demo(where: str | None = None, keep: bool = False) -> int:
    """Show the rules on three layers in ``where`` (default: a new temporary directory, removed at the end
    unless ``keep``); 0 when shown, 1 with one line on stderr when it could not be (KeyboardInterrupt is
    re-raised after the clean-up)."""
    if os.geteuid() != 0:
        error("pylayerfs demo --overlay: needs root (its layers hold whiteouts and trusted.overlay.* xattrs)")
        return 1
    if where is not None and os.path.exists(os.path.join(where, "layers")):
        error(f"pylayerfs demo --overlay: '{where}' already holds a demo (layers/): choose another --dir")
        return 1
    root = where or tempfile.mkdtemp(prefix="pylayerfs-demo-")
    merged = os.path.join(root, "merged")
    try:
        _show(root)
    except (MountError, OSError) as exc:
        error(f"pylayerfs demo --overlay: {exc}")
        return 1
    finally:
        _clean_up(root, merged, remove=where is None and not keep)
    if keep and where is None:
        print(f"\nThe layers are kept in {root}.")
    return 0


def _clean_up(root: str, merged: str, remove: bool) -> None:
    """Unmount ``merged`` if it is still mounted (lazily as a last resort); remove ``root`` if asked and safe."""
    if mount.is_mountpoint(merged):
        try:
            mount.umount(merged)
        except MountError:
            with contextlib.suppress(MountError):
                mount.umount(merged, lazy=True)
    if remove:
        mount.remove_tree(root)


def _show(root: str) -> None:
    lowers = _build_layers(root)
    upper, work, merged = (os.path.join(root, n) for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        os.makedirs(d, exist_ok=True)
    print(f"pylayerfs demo in {root}\n")
    print("1. Three lower layers, as an image's layers sit on disk (top first):")
    for layer in lowers:
        _tree(os.path.basename(layer) + "/", layer)
    config = MountConfig(lowerdirs=lowers, upperdir=upper, workdir=work)
    mountpoint = check(config, merged)
    print(f"\n2. pylayerfs mount -o lowerdir={':'.join(lowers)},upperdir={upper},workdir={work} {merged}")
    sys.stdout.flush()  # the daemon is forked: it must not inherit (and later repeat) unwritten output
    mount.mount_background(config, mountpoint, "pylayerfs-demo")
    try:
        _tree("merged view:", merged)
        print("   /etc/motd comes from 3-app (the top-most layer that has it hides the ones below);")
        print("   /etc/hostname is gone: 2-cleanup holds a whiteout for it;")
        print("   /cache shows only 'fresh': 2-cleanup's /cache is opaque, 1-base's is not merged.\n")
        print("3. echo 'tuned' >> merged/etc/motd   (copy-up: the file is copied to upper, then written)")
        with open(f"{merged}/etc/motd", "a") as f:
            f.write("tuned\n")
        _tree("upper/:", upper)
        print(f"   the lower file is untouched: {_describe(lowers[0] + '/etc/motd')}\n")
        print("4. rm merged/app/app.sh   (the name exists below: upper gets a whiteout)")
        os.unlink(f"{merged}/app/app.sh")
        _tree("upper/:", upper)
        _tree("merged view:", merged)
    finally:
        mount.umount(merged)
    print(f"\n5. pylayerfs umount {merged}: upper/ keeps the changes, in the kernel's format,")
    print("   so 'mount -t overlay' with the same options shows the same merged view.")
