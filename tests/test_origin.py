"""``trusted.overlay.origin`` in the kernel's format (issue 16): pylayerfs and ``mount -t overlay`` over the SAME
lower directory write the same bytes at copy-up, and each reports the other's copied-up objects with the lower
object's inode number."""

from __future__ import annotations

import os

import pytest

from pylayerfs.overlay.markers import OriginHandle, decode_origin, encode_origin
from tests.mounts import backings, kernel_mount, pylayerfs_mount
from tests.trees import Spec, build

ORIGIN = "trusted.overlay.origin"
LOWER: Spec = {"f": "f", "d/x": "x", "ln": ("symlink", "f"), "h1": "hard", "deep/er/g": "g"}
COPIED = ("f", "d", "ln", "deep", "deep/er", "deep/er/g")  # what _copy_up copies up, with an origin each


def _layers(root, name):
    """Fresh upper, work and mountpoint directories named ``name`` below ``root``."""
    dirs = [str(root / name / d) for d in ("u", "w", "m")]
    for d in dirs:
        os.makedirs(d)
    return dirs


def _lower(root):
    lower = build(str(root / "l"), LOWER)
    os.link(os.path.join(lower, "h1"), os.path.join(lower, "h2"))  # two links: copied up without an origin
    return lower


def _copy_up(mnt):
    """Copy up, keeping everything as it was: a file, a directory, a symlink, a hard link, a deep file."""
    for path in ("f", "d", "h1", "deep/er/g"):
        st = os.stat(os.path.join(mnt, path))
        os.utime(os.path.join(mnt, path), ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chown(os.path.join(mnt, "ln"), 0, 0, follow_symlinks=False)


def _origin(upper, path):
    try:
        return os.getxattr(os.path.join(upper, path), ORIGIN, follow_symlinks=False)
    except OSError:
        return None


def _inos(mnt):
    return {path: os.lstat(os.path.join(mnt, path)).st_ino for path in COPIED}


def test_an_origin_round_trips_and_a_foreign_or_malformed_one_is_ignored():
    origin = OriginHandle(bytes(range(16)), 1, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    value = encode_origin(origin)
    assert value[:5] == bytes([0, 0xFB, 29, 0, 1]) and value[5:21] == origin.uuid and value[21:] == origin.handle
    assert decode_origin(value) == origin
    assert decode_origin(b"") is None  # the kernel's null origin: "copied up", nothing to decode
    assert decode_origin(value[:-1]) is None  # len disagrees
    assert decode_origin(bytes([1]) + value[1:]) is None  # version
    assert decode_origin(value[:1] + b"\xfa" + value[2:]) is None  # magic
    assert decode_origin(value[:3] + b"\x01" + value[4:]) is None  # encoded on a big-endian machine
    assert decode_origin(value[:3] + b"\x02" + value[4:]) == origin  # any endian
    assert decode_origin(value[:3] + b"\x08" + value[4:]) is None  # unknown flag


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize("extra", ["", "uuid=off"])
@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_copy_up_writes_the_kernels_origin_and_each_reads_the_others(backing, extra):
    """Same lower directory, two uppers: the origins are equal byte for byte, and st_ino agrees both ways.

    With ``uuid=off`` the handles carry the null UUID, and only such handles are followed."""
    lower = _lower(backing)
    k_upper, k_work, k_mnt = _layers(backing, "kernel")
    p_upper, p_work, p_mnt = _layers(backing, "pylayerfs")
    lower_inos = {path: os.lstat(os.path.join(lower, path)).st_ino for path in COPIED}
    with kernel_mount(k_mnt, [lower], k_upper, k_work, extra):
        _copy_up(k_mnt)
        k_inos = _inos(k_mnt)
    with pylayerfs_mount(p_mnt, [lower], p_upper, p_work, extra):
        _copy_up(p_mnt)
        p_inos = _inos(p_mnt)
    for path in COPIED:
        kernel = _origin(k_upper, path)
        assert kernel is not None and len(kernel) > 21, path
        assert _origin(p_upper, path) == kernel, path
        assert (kernel[5:21] == bytes(16)) == (extra == "uuid=off"), path
    assert _origin(k_upper, "h1") is None and _origin(p_upper, "h1") is None
    assert not any(name.startswith("trusted.overlay.pylayerfs") for name in os.listxattr(os.path.join(p_upper, "f")))
    assert p_inos == k_inos
    assert k_inos == lower_inos  # one filesystem: the lower inode numbers
    # Each mounts the other's upper: the same inode numbers, the mount works.
    with pylayerfs_mount(p_mnt, [lower], k_upper, k_work, extra):
        assert _inos(p_mnt) == k_inos
    with kernel_mount(k_mnt, [lower], p_upper, p_work, extra):
        assert _inos(k_mnt) == k_inos
        assert open(os.path.join(k_mnt, "deep/er/g")).read() == "g"


@pytest.mark.root
@pytest.mark.fuse
def test_a_stale_origin_gives_the_upper_inode_number_as_on_the_kernel(tmp_path):
    """The lower file is replaced after copy-up: its handle no longer opens, both report the upper's own number."""
    lower = _lower(tmp_path)
    upper, work, mnt = _layers(tmp_path, "o")
    with pylayerfs_mount(mnt, [lower], upper, work):
        _copy_up(mnt)
    os.unlink(os.path.join(lower, "f"))
    with open(os.path.join(lower, "f"), "w") as f:
        f.write("new")
    upper_ino = os.lstat(os.path.join(upper, "f")).st_ino
    with pylayerfs_mount(mnt, [lower], upper, work):
        p_ino = os.lstat(os.path.join(mnt, "f")).st_ino
    with kernel_mount(mnt, [lower], upper, work):
        k_ino = os.lstat(os.path.join(mnt, "f")).st_ino
    assert p_ino == k_ino == upper_ino


@pytest.mark.root
@pytest.mark.fuse
def test_an_older_pylayerfs_upper_keeps_its_recorded_inode_numbers(tmp_path):
    lower = _lower(tmp_path)
    upper, work, mnt = _layers(tmp_path, "o")
    os.makedirs(os.path.join(upper, "d"))
    os.setxattr(os.path.join(upper, "d"), "trusted.overlay.pylayerfs.origin", b"4242")
    with pylayerfs_mount(mnt, [lower], upper, work):
        assert os.lstat(os.path.join(mnt, "d")).st_ino == 4242
