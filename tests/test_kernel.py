"""Kernel overlayfs is the oracle: the same operations on ``mount -t overlay`` and on pylayerfs.

Every operation's result (or errno), the merged view afterwards, and the upper
directory's on-disk form must match. Then each upper is mounted by the other
implementation (interop, both ways) and by the same one again (persistence).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence

import pytest

from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mountinfo
from tests.mounts import BACKINGS, backings, kernel_mount, pylayerfs_mount, scratch_filesystem
from tests.trees import WHITEOUT, Spec, build, disk_form, tree_hash, view

pytestmark = [pytest.mark.root, pytest.mark.fuse]

LOWERS: list[Spec] = [
    {  # top lower
        "d/a": "top a",
        "d/sub/x": "x",
        "f": "top f",
        "gone": WHITEOUT,
        "o": ("opaque",),
        "o/kept": "kept",
        "ln": ("symlink", "f"),
        "p": ("fifo",),
        "merged/m1": "1",
    },
    {  # bottom lower
        "d/a": "low a",
        "d/b": "low b",
        "gone": "hidden",
        "o/hidden": "hidden by opaque",
        "merged/m2": "2",
        "merged/deep/m3": "3",
        "only": "only in bottom",
        "emptyd/w": "w",
        "h1": "hard",
    },
]


def _append(p: str, data: str = "+") -> None:
    with open(p, "a") as f:
        f.write(data)


def _touch_w(p: str) -> None:
    os.close(os.open(p, os.O_WRONLY))


def _create(p: str, data: str = "new") -> None:
    with open(p, "w") as f:
        f.write(data)


def _replace_with_symlink(p: str, target: str) -> None:
    os.unlink(p)
    os.symlink(target, p)


def _mkdir_and_move(p: str, to: str) -> None:
    os.mkdir(p)
    os.rename(p, to)


def _unlink_all(d: str, *names: str) -> None:
    for n in names:
        os.unlink(f"{d}/{n}")


# (description, operation on the mountpoint root)
OPERATIONS: list[tuple[str, Callable[[str], object]]] = [
    ("append to lower file", lambda m: _append(f"{m}/d/a")),
    ("open for write without writing", lambda m: _touch_w(f"{m}/d/b")),
    ("O_TRUNC on lower file", lambda m: os.close(os.open(f"{m}/only", os.O_WRONLY | os.O_TRUNC))),
    ("truncate", lambda m: os.truncate(f"{m}/merged/m2", 1)),
    ("chmod", lambda m: os.chmod(f"{m}/merged/m1", 0o600)),
    ("chown", lambda m: os.chown(f"{m}/merged/deep/m3", 1000, 1001)),
    ("utime", lambda m: os.utime(f"{m}/f", (1, 2))),
    ("setxattr", lambda m: os.setxattr(f"{m}/d/sub/x", "user.tag", b"v")),
    ("removexattr missing", lambda m: os.removexattr(f"{m}/o/kept", "user.nope")),
    ("private xattr escaped", lambda m: os.setxattr(f"{m}/h1", "trusted.overlay.mine", b"1")),
    ("private xattr read", lambda m: os.getxattr(f"{m}/o", "trusted.overlay.opaque")),
    ("list xattrs of opaque dir", lambda m: sorted(os.listxattr(f"{m}/o"))),
    ("unlink lower file", lambda m: os.unlink(f"{m}/only")),
    ("unlink missing", lambda m: os.unlink(f"{m}/gone")),
    ("rmdir non-empty merged", lambda m: os.rmdir(f"{m}/merged")),
    ("unlink dir", lambda m: os.unlink(f"{m}/d")),
    ("rmdir file", lambda m: os.rmdir(f"{m}/f")),
    ("empty a lower dir", lambda m: os.unlink(f"{m}/emptyd/w")),
    ("rmdir emptied lower dir", lambda m: os.rmdir(f"{m}/emptyd")),
    ("mkdir over whiteout", lambda m: os.mkdir(f"{m}/emptyd")),
    ("file in opaque new dir", lambda m: _create(f"{m}/emptyd/n")),
    ("create over lower whiteout", lambda m: _create(f"{m}/gone")),
    ("symlink over whiteout", lambda m: _replace_with_symlink(f"{m}/f", "d/a")),
    ("rename lower file", lambda m: os.rename(f"{m}/d/b", f"{m}/d/b2")),
    ("rename over existing", lambda m: os.rename(f"{m}/merged/m1", f"{m}/d/a")),
    ("rename lower dir", lambda m: os.rename(f"{m}/d/sub", f"{m}/sub2")),
    ("rename merged dir", lambda m: os.rename(f"{m}/merged", f"{m}/merged2")),
    ("mkdir new", lambda m: os.mkdir(f"{m}/newdir")),
    ("file in new dir", lambda m: _create(f"{m}/newdir/x")),
    ("rename file over dir", lambda m: os.rename(f"{m}/h1", f"{m}/newdir")),
    ("rename dir over file", lambda m: os.rename(f"{m}/newdir", f"{m}/h1")),
    ("rename dir over non-empty", lambda m: os.rename(f"{m}/newdir", f"{m}/d")),
    ("hard link lower file", lambda m: os.link(f"{m}/h1", f"{m}/h2")),
    ("mknod whiteout", lambda m: os.mknod(f"{m}/wh", stat.S_IFCHR, 0)),
    ("mkfifo", lambda m: os.mkfifo(f"{m}/fifo2")),
    ("open lower fifo for write", lambda m: os.close(os.open(f"{m}/p", os.O_RDWR | os.O_NONBLOCK))),
    ("noreplace", lambda m: realfs.renameat2(-100, f"{m}/d/a", -100, f"{m}/f", realfs.RENAME_NOREPLACE)),
    ("exchange", lambda m: realfs.renameat2(-100, f"{m}/d/a", -100, f"{m}/gone", realfs.RENAME_EXCHANGE)),
    ("rename whiteout flag", lambda m: realfs.renameat2(-100, f"{m}/h2", -100, f"{m}/h3", realfs.RENAME_WHITEOUT)),
    ("move new dir into merged dir", lambda m: _mkdir_and_move(f"{m}/nd", f"{m}/emptyd2")),
    ("remove merged dir content", lambda m: _unlink_all(f"{m}/merged", "m1", "m2")),
]


def run(mnt: str, operations: Sequence[tuple[str, Callable[[str], object]]] = OPERATIONS) -> list[object]:
    """Each operation's value (a listing, bytes or a tuple), "ok", or the strerror of its errno."""
    results: list[object] = []
    for _, op in operations:
        try:
            value = op(mnt)
            results.append(value if isinstance(value, (list, bytes, tuple)) else "ok")
        except OSError as exc:
            results.append(os.strerror(exc.errno or 0))
    return results


def _fresh(tmp_path, name):
    lowers = [build(str(tmp_path / name / f"l{i}"), spec) for i, spec in enumerate(LOWERS)]
    upper, work, mnt = (str(tmp_path / name / d) for d in ("u", "w", "m"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    return lowers, upper, work, mnt


@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_same_operations_same_results_same_disk(backing):
    """Over each backing filesystem (tmpfs, ext4), against the kernel's overlay over the same one."""
    k_lowers, k_upper, k_work, k_mnt = _fresh(backing, "kernel")
    p_lowers, p_upper, p_work, p_mnt = _fresh(backing, "pylayerfs")
    lower_hashes = [tree_hash(d) for d in p_lowers]
    with kernel_mount(k_mnt, k_lowers, k_upper, k_work):
        k_results = run(k_mnt)
        k_view = view(k_mnt)
    with pylayerfs_mount(p_mnt, p_lowers, p_upper, p_work):
        p_results = run(p_mnt)
        p_view = view(p_mnt)
    table = [(d, k, p) for (d, _), k, p in zip(OPERATIONS, k_results, p_results, strict=False) if k != p]
    assert table == [], "operations that differ from the kernel (what, kernel, pylayerfs)"
    assert p_view == k_view
    assert disk_form(p_upper) == disk_form(k_upper)
    assert [tree_hash(d) for d in p_lowers] == lower_hashes

    # persistence: the same implementation again
    with pylayerfs_mount(p_mnt, p_lowers, p_upper, p_work):
        assert view(p_mnt) == p_view
    # interop: each upper under the other implementation (same lowers content, other copies)
    with kernel_mount(k_mnt, k_lowers, p_upper, p_work):
        assert view(k_mnt) == p_view, "kernel overlayfs reads pylayerfs's upper differently"
    shutil.rmtree(p_work)
    os.makedirs(p_work)
    with pylayerfs_mount(p_mnt, p_lowers, k_upper, k_work):
        assert view(p_mnt) == k_view, "pylayerfs reads the kernel's upper differently"


class _Boom(Exception):
    pass


@pytest.mark.parametrize("kind", BACKINGS)
def test_a_scratch_filesystem_is_fresh_and_left_unmounted_and_detached_even_on_failure(tmp_path, kind):
    """The ``backing`` fixture's filesystems: what they say they are, and gone afterwards, whatever happened."""
    where = str(tmp_path / "scratch")
    with pytest.raises(_Boom), scratch_filesystem(kind, where) as root:
        [entry] = [e for e in mountinfo() if e.mountpoint == os.path.realpath(root)]
        assert entry.fstype == kind
        assert sorted(os.listdir(root)) == (["lost+found"] if kind == "ext4" else [])
        lower = build(f"{root}/l", {"f": "x"})
        for d in ("u", "w"):
            os.makedirs(f"{root}/{d}")
        os.makedirs(f"{root}/m")
        # a mount left below it, as a failing test would leave one
        opts = f"lowerdir={lower},upperdir={root}/u,workdir={root}/w"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, f"{root}/m"], check=True, timeout=30)
        os.setxattr(f"{root}/m/f", "user.k", b"v")  # user xattrs on the upper: ext4 and tmpfs both
        raise _Boom
    assert not [e for e in mountinfo() if e.mountpoint.startswith(os.path.realpath(where))]
    assert not os.path.exists(f"{where}/ext4.img")
    losetup = subprocess.run(["losetup", "--list", "--noheadings", "-O", "BACK-FILE"], capture_output=True, text=True)
    assert where not in losetup.stdout, "a loop device is still attached to the image"


def _device_and_setuid(mnt: str) -> tuple[object, ...]:
    """Write to a character device made in the merged view, and run a set-user-ID copy of id(1) as nobody."""
    os.mknod(f"{mnt}/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    fd = os.open(f"{mnt}/null", os.O_WRONLY)
    written = os.write(fd, b"discarded")
    os.close(fd)
    shutil.copy("/usr/bin/id", f"{mnt}/id")
    os.chmod(f"{mnt}/id", 0o4755)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"{mnt}/id", "-u"]
    euid = subprocess.run(as_nobody, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    flags = os.statvfs(mnt).f_flag
    return written, euid, bool(flags & os.ST_NODEV), bool(flags & os.ST_NOSUID)


def test_devices_and_setuid_work_as_on_the_kernel_mount(tmp_path):
    """As root, a mount honours device files and set-user-ID bits unless -o nodev/nosuid (mount -t overlay's
    defaults; libfuse's own are nodev,nosuid, which left a container's /dev/null unopenable and su powerless)."""
    answers = []
    for name, mount in (("kernel", kernel_mount), ("pylayerfs", pylayerfs_mount)):
        lowers, upper, work, mnt = _fresh(tmp_path, name)
        os.chmod(mnt, 0o755)
        with mount(mnt, lowers, upper, work):
            answers.append(_device_and_setuid(mnt))
    assert answers[0] == answers[1] == (9, "0", False, False)
    lowers, upper, work, mnt = _fresh(tmp_path, "nodev")
    with pylayerfs_mount(mnt, lowers, upper, work, "nodev,nosuid"), pytest.raises(PermissionError):
        _device_and_setuid(mnt)


def test_an_opaque_marker_on_a_layers_root_hides_nothing_as_on_the_kernel(tmp_path):
    """The kernel never looks the root up: an opaque marker on the top lower layer's root or on the upper root
    hides no layer below (found by a user's try: `RUN mkdir /.wh..wh..opq` made the next step's image empty on the
    FUSE driver, not on the kernel's)."""
    views = []
    for name, mount in (("kernel", kernel_mount), ("pylayerfs", pylayerfs_mount)):
        lowers, upper, work, mnt = _fresh(tmp_path, name)
        for marked in (lowers[0], upper):
            os.setxattr(marked, "trusted.overlay.opaque", b"y")
        with mount(mnt, lowers, upper, work):
            views.append(view(mnt))
    assert views[0] == views[1]
    assert {"d/b", "merged/m2", "only"} <= set(views[1]), "the lower layers below the marked roots show"
