"""The overlay semantics in-process: no FUSE, no mount (the ``Overlay`` object called directly)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from pylayerfs.overlay import realfs
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.state import Caller
from tests.trees import WHITEOUT, build, tree_hash

ME = Caller.me()


@pytest.fixture
def make(tmp_path):
    """make(lower specs top-first, upper spec=None, writable=True) -> Overlay; lowers hashed and checked after."""
    made: list[tuple[Overlay, list[str], list[str]]] = []

    def factory(*lowers, upper=None, writable=True, prepare=None):
        dirs = [build(str(tmp_path / f"l{i}"), spec) for i, spec in enumerate(lowers)]
        if prepare is not None:
            prepare()
        up = build(str(tmp_path / "u"), upper or {}) if writable else None
        work = str(tmp_path / "w") if writable else None
        if work:
            os.makedirs(work, exist_ok=True)
        ov = Overlay(dirs, up, work)
        made.append((ov, dirs, [tree_hash(d) for d in dirs]))
        return ov

    yield factory
    for ov, dirs, hashes in made:
        ov.close()
        assert [tree_hash(d) for d in dirs] == hashes, "a lower layer was modified"


def names(ov, path=""):
    return sorted(n for n, _, _ in ov.readdir(path) if n not in (".", ".."))


def read(ov, path):
    fh = ov.open(path, os.O_RDONLY)
    try:
        return ov.read(fh, 1 << 20, 0)
    finally:
        ov.release(fh)


def write(ov, path, data, flags=os.O_WRONLY | os.O_APPEND):
    fh = ov.open(path, flags)
    try:
        ov.write(fh, data, 0)
    finally:
        ov.release(fh)


def enoent(ov, path):
    with pytest.raises(FileNotFoundError):
        ov.getattr(path)
    return True


# -- lookup ------------------------------------------------------------------------------


def test_upper_hides_lower_and_first_lower_wins(make):
    ov = make({"a": "L1", "b": "L1"}, {"a": "L2", "c": "L2"}, upper={"b": "U"})
    assert read(ov, "a") == b"L1" and read(ov, "b") == b"U" and read(ov, "c") == b"L2"


def test_non_directory_stops_the_merge(make):
    ov = make({"d": "file on top"}, {"d/x": "hidden"})
    assert stat.S_ISREG(ov.getattr("d")["st_mode"])
    with pytest.raises(NotADirectoryError):
        ov.getattr("d/x")


@pytest.mark.root  # trusted.* xattrs (the opaque marker)
def test_directories_merge_down_to_an_opaque_one(make):
    ov = make({"d/a": "1"}, {"d": ("opaque",), "d/b": "2"}, {"d/c": "3"})
    assert names(ov, "d") == ["a", "b"]
    assert ov.getattr("d")["st_nlink"] == 1  # merged directory


def test_whiteout_hides_the_name_in_every_lower_layer(make):
    ov = make({"f": WHITEOUT, "d/x": WHITEOUT}, {"f": "below", "d/x": "below", "d/y": "y"})
    assert enoent(ov, "f") and enoent(ov, "d/x")
    assert names(ov) == ["d"] and names(ov, "d") == ["y"]


@pytest.mark.root  # trusted.* xattrs
def test_xattr_whiteout_in_lower_layer(make, tmp_path):
    def prepare():
        os.setxattr(tmp_path / "l0/d", "trusted.overlay.opaque", b"x")
        os.setxattr(tmp_path / "l0/d/z", "trusted.overlay.whiteout", b"")

    ov = make({"d/z": ""}, {"d/z": "below", "d/k": "kept"}, prepare=prepare)
    assert names(ov, "d") == ["k"]
    assert enoent(ov, "d/z")


def test_symlink_in_lower_layer_never_leads_outside(make, tmp_path):
    secret = tmp_path / "host"
    build(str(secret), {"secret": "host data"})
    ov = make({"a/mine": "top"}, {"a": ("symlink", str(secret))})
    assert names(ov, "a") == ["mine"]
    assert enoent(ov, "a/secret")


def test_readdir_has_dot_entries_and_inodes_agree_with_getattr(make):
    ov = make({"d/a": "1", "f": "x"}, {"d/b": "2", "g": ("symlink", "f")}, upper={"d/c": "3"})
    for path in ("", "d"):
        entries = ov.readdir(path)
        assert [n for n, _, _ in entries[:2]] == [".", ".."]
        for name, mode, ino in entries[2:]:
            attrs = ov.getattr(f"{path}/{name}".lstrip("/"))
            assert (stat.S_IFMT(attrs["st_mode"]), attrs["st_ino"]) == (mode, ino)
        assert entries == ov.readdir(path)  # deterministic


def test_getattr_entries_is_getattr_of_each_name_and_none_for_a_name_gone(make):
    """READDIRPLUS's batch: what getattr says of each name (a merged directory, a whiteout, an upper file, a lower
    symlink), None for a name the merged view does not have; ENOTDIR for a file."""
    ov = make({"d/a": "1", "d/sub/x": "1", "d/w": "1"}, {"d/b": "2", "d/s": ("symlink", "a")},
              upper={"d/c": "3", "d/sub/y": "4", "d/w": WHITEOUT})  # fmt: skip
    names = ["a", "b", "c", "s", "sub", "w", "missing"]
    got = list(ov.getattr_entries("d", names))
    for name, attrs in zip(names, got, strict=True):
        if name in ("w", "missing"):
            assert attrs is None, name
        else:
            assert attrs == ov.getattr(f"d/{name}"), name
    with pytest.raises(OSError) as exc:
        list(ov.getattr_entries("d/a", ["x"]))
    assert exc.value.errno == errno.ENOTDIR


# -- copy-up -----------------------------------------------------------------------------


def test_open_for_write_copies_up_even_without_writing(make, tmp_path):
    ov = make({"d/f": "data"})
    fh = ov.open("d/f", os.O_WRONLY)
    ov.release(fh)
    assert (tmp_path / "u/d/f").read_text() == "data"


def test_o_trunc_copies_no_data(make, tmp_path):
    ov = make({"f": "x" * 10000})
    write(ov, "f", b"new", os.O_WRONLY | os.O_TRUNC)
    assert (tmp_path / "u/f").read_bytes() == b"new"


@pytest.mark.root  # chown to other owners, trusted.overlay.origin
def test_copy_up_keeps_metadata(make, tmp_path):
    lower = tmp_path / "l0/d"

    def prepare():
        os.chown(lower / "f", 1234, 5678)
        os.chmod(lower / "f", 0o4751)
        os.setxattr(lower / "f", "user.color", b"red")
        os.utime(lower / "f", ns=(1_000_000_000, 2_000_000_000))
        os.chown(lower, 42, 43)
        os.chmod(lower, 0o750)

    ov = make({"d/f": "data", "d/l": ("symlink", "f")}, prepare=prepare)
    before = ov.getattr("d/f")
    ov.chmod("d/f", 0o4751)  # a copy-up that changes nothing visible
    up = os.lstat(tmp_path / "u/d/f")
    assert (stat.S_IMODE(up.st_mode), up.st_uid, up.st_gid) == (0o4751, 1234, 5678)
    assert up.st_mtime_ns == 2_000_000_000
    assert (tmp_path / "u/d/f").read_text() == "data"
    assert os.getxattr(tmp_path / "u/d/f", "user.color") == b"red"
    updir = os.lstat(tmp_path / "u/d")
    assert (stat.S_IMODE(updir.st_mode), updir.st_uid, updir.st_gid) == (0o750, 42, 43)
    assert ov.getattr("d/f")["st_ino"] == before["st_ino"]  # stable across copy-up
    ov.chown("d/l", 7, 8)
    assert os.readlink(tmp_path / "u/d/l") == "f" and os.lstat(tmp_path / "u/d/l").st_uid == 7


def test_copy_up_keeps_holes(make, tmp_path):
    def prepare():
        with open(tmp_path / "l0/sparse", "wb") as f:
            f.truncate(64 << 20)
            f.write(b"head")

    ov = make({}, prepare=prepare)
    ov.chmod("sparse", 0o600)
    st = os.stat(tmp_path / "u/sparse")
    assert st.st_size == 64 << 20 and st.st_blocks * 512 < 1 << 20
    assert read(ov, "sparse")[:4] == b"head"


def test_fd_opened_before_copy_up_reads_new_data(make):
    ov = make({"f": "old"})
    ro = ov.open("f", os.O_RDONLY)
    write(ov, "f", b"new", os.O_WRONLY | os.O_TRUNC)
    assert ov.read(ro, 100, 0) == b"new"
    ov.release(ro)


def test_special_files_opened_for_write_are_not_copied_up(make, tmp_path):
    ov = make({"p": ("fifo",)})
    fd = os.open(tmp_path / "l0/p", os.O_RDONLY | os.O_NONBLOCK)
    fh = ov.open("p", os.O_WRONLY | os.O_NONBLOCK)
    ov.release(fh)
    os.close(fd)
    assert not (tmp_path / "u/p").exists()


# -- whiteouts and opaque directories ---------------------------------------------------


def is_whiteout(path):
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def test_unlink_leaves_whiteout_only_over_lower_names(make, tmp_path):
    ov = make({"low": "x"})
    ov.create("pure", 0o644, os.O_WRONLY, ME)
    ov.unlink("low")
    ov.unlink("pure")
    assert is_whiteout(tmp_path / "u/low") and not os.path.lexists(tmp_path / "u/pure")
    assert names(ov) == []


def test_rmdir_of_merged_directory(make, tmp_path):
    ov = make({"d/a": "1"}, {"d/b": "2"})
    with pytest.raises(OSError) as exc:
        ov.rmdir("d")
    assert exc.value.errno == errno.ENOTEMPTY
    ov.unlink("d/a")
    ov.unlink("d/b")
    ov.rmdir("d")
    assert is_whiteout(tmp_path / "u/d") and names(ov) == []


@pytest.mark.root  # trusted.overlay.opaque
def test_mkdir_over_whiteout_is_opaque_and_create_replaces_whiteout(make, tmp_path):
    ov = make({"d/x": "1", "f": "old"})
    ov.unlink("d/x")
    ov.rmdir("d")
    ov.mkdir("d", 0o755, ME)
    assert os.getxattr(tmp_path / "u/d", "trusted.overlay.opaque") == b"y" and names(ov, "d") == []
    ov.unlink("f")
    ov.symlink("f", "target", ME)
    assert ov.readlink("f") == "target"


def test_mknod_whiteout_is_refused(make):
    ov = make({})
    with pytest.raises(PermissionError):
        ov.mknod("w", stat.S_IFCHR | 0o644, 0, ME)


# -- rename --------------------------------------------------------------------------------


def test_rename_lower_directory_is_exdev(make):
    ov = make({"d/x": "1"})
    with pytest.raises(OSError) as exc:
        ov.rename("d", "e")
    assert exc.value.errno == errno.EXDEV


def test_rename_lower_file_leaves_whiteout(make, tmp_path):
    ov = make({"a": "1"})
    ov.rename("a", "b")
    assert is_whiteout(tmp_path / "u/a") and read(ov, "b") == b"1" and names(ov) == ["b"]


@pytest.mark.root  # trusted.overlay.opaque
def test_upper_directory_moved_over_lower_name_becomes_opaque(make, tmp_path):
    ov = make({"d/old": "1"})
    ov.mkdir("n", 0o755, ME)
    ov.unlink("d/old")
    ov.rmdir("d")
    ov.rename("n", "d")
    assert names(ov, "d") == []
    assert os.getxattr(tmp_path / "u/d", "trusted.overlay.opaque") == b"y"


def test_rename_flags(make):
    ov = make({"a": "A", "b": "B"})
    with pytest.raises(FileExistsError):
        ov.rename("a", "b", realfs.RENAME_NOREPLACE)
    ov.rename("a", "b", realfs.RENAME_EXCHANGE)
    assert (read(ov, "a"), read(ov, "b")) == (b"B", b"A")
    with pytest.raises(OSError) as exc:
        ov.rename("a", "b", realfs.RENAME_WHITEOUT)
    assert exc.value.errno == errno.EINVAL


def test_rename_type_rules(make):
    ov = make({"f": "1", "d/x": "2", "e": None})
    for old, new, code in [("f", "e", errno.EISDIR), ("e", "f", errno.ENOTDIR)]:
        with pytest.raises(OSError) as exc:
            ov.rename(old, new)
        assert exc.value.errno == code
    ov.mkdir("n", 0o755, ME)
    with pytest.raises(OSError) as exc:
        ov.rename("n", "d")
    assert exc.value.errno == errno.ENOTEMPTY


# -- xattrs, links, read-only ---------------------------------------------------------------


@pytest.mark.root  # trusted.* xattrs
def test_private_xattrs_are_hidden_and_escaped(make, tmp_path):
    ov = make({"d": ("opaque",), "d/f": "1"})
    assert ov.listxattr("d") == []
    with pytest.raises(OSError) as exc:
        ov.getxattr("d", "trusted.overlay.opaque")
    assert exc.value.errno == errno.ENODATA
    ov.setxattr("d/f", "trusted.overlay.mine", b"v")
    assert ov.listxattr("d/f") == ["trusted.overlay.mine"]
    assert os.getxattr(tmp_path / "u/d/f", "trusted.overlay.overlay.mine") == b"v"


def test_link_copies_up_and_shares_the_inode(make, tmp_path):
    ov = make({"a": "1"})
    ov.link("a", "b")
    assert os.stat(tmp_path / "u/a").st_ino == os.stat(tmp_path / "u/b").st_ino
    assert ov.getattr("a")["st_ino"] == ov.getattr("b")["st_ino"]
    assert ov.getattr("a")["st_nlink"] == 2


def test_read_only_stack_refuses_writes(make):
    ov = make({"a": "1"}, {"b": "2"}, writable=False)
    for call in (
        lambda: ov.open("a", os.O_WRONLY),
        lambda: ov.unlink("a"),
        lambda: ov.mkdir("n", 0o755, ME),
        lambda: ov.setxattr("a", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EROFS
    assert names(ov) == ["a", "b"]


@pytest.mark.root  # chown to the caller
def test_new_objects_belong_to_the_caller(make, tmp_path):
    ov = make({"d": None})
    fh = ov.create("d/f", 0o4755, os.O_WRONLY, Caller(1000, 1000))
    ov.release(fh)
    st = os.lstat(tmp_path / "u/d/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o4755)


@pytest.mark.root  # chmod/chown to other owners in the upper layer
def test_mkdir_over_whiteout_in_setgid_directory_keeps_setgid(make, tmp_path):
    """Built in the workdir and swapped in, the directory still inherits the parent's setgid bit and group."""

    def prepare():
        os.chmod(tmp_path / "l0" / "d", 0o2775)
        os.chown(tmp_path / "l0" / "d", 0, 42)

    ov = make({"d/x": "lower"}, prepare=prepare)
    ov.unlink("d/x")  # a whiteout in the upper's d
    ov.mkdir("d/x", 0o755, Caller(1000, 1000))
    st = ov.getattr("d/x")
    assert stat.S_IMODE(st["st_mode"]) == 0o2755 and st["st_gid"] == 42
    ov.mkdir("d/y", 0o755, Caller(1000, 1000))  # not over a whiteout: the same
    assert stat.S_IMODE(ov.getattr("d/y")["st_mode"]) == 0o2755


def test_chmod_of_a_symlink_is_refused_and_never_reaches_its_target(make, tmp_path):
    target = tmp_path / "outside"
    target.write_text("x")
    target.chmod(0o644)
    ov = make({"l": ("symlink", str(target)), "f": "f"})
    with pytest.raises(OSError) as exc:
        ov.chmod("l", 0o600)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not os.path.lexists(tmp_path / "u" / "l"), "refused before any copy-up"
    ov.chown("l", 0, 0)  # copied up: the symlink itself is in the upper now
    with pytest.raises(OSError) as exc:
        ov.chmod("l", 0o600)
    assert exc.value.errno == errno.EOPNOTSUPP
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


@pytest.mark.parametrize("value", ["-1", "abc", "inf", "nan", "1e30"])
def test_a_timeout_the_kernel_cannot_take_is_refused_in_one_line(value: str) -> None:
    """timeout=inf mounted and then answered EIO to everything on the native transport (found by a user)."""
    from pylayerfs.overlay.params import MountError, parse_options

    with pytest.raises(MountError, match=r"^timeout needs a number of seconds"):
        parse_options([f"lowerdir=a,timeout={value}"])
    assert parse_options(["lowerdir=a,timeout=0"]).timeout == 0


def test_nodefault_permissions_needs_noallow_other() -> None:
    """Without default_permissions nothing checks permissions: other users may not use such a mount."""
    from pylayerfs.overlay.params import MountError, parse_options

    with pytest.raises(MountError, match="needs noallow_other"):
        parse_options(["lowerdir=a,nodefault_permissions"])
    config = parse_options(["lowerdir=a,nodefault_permissions,noallow_other"])
    assert not config.default_permissions and not config.allow_other
