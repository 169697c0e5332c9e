"""Directory renames (``redirect_dir``) in the engine, in-process: what the kernel comparison in tests/test_redirect.py
cannot reach easily (open handles across a rename, malformed and hostile redirects, limits, refusals)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.markers import REDIRECT_MAX
from pylayerfs.overlay.state import Caller
from tests.test_metacopy import read_all
from tests.trees import WHITEOUT, build

pytestmark = pytest.mark.root  # trusted.* xattrs, whiteouts

REDIRECT = "trusted.overlay.redirect"


@pytest.fixture
def layers(tmp_path: Path) -> tuple[str, str, str]:
    lower = build(str(tmp_path / "l"), {"a/b/f": "deep", "a/g": "g", "c/x": "x", "top": "t"})
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    return lower, str(tmp_path / "u"), str(tmp_path / "w")


def _overlay(layers: tuple[str, str, str], redirect_dir: str | None = "on") -> Overlay:
    lower, upper, work = layers
    return Overlay([lower], upper, work, redirect_dir=redirect_dir)


def _append(ov: Overlay, path: str, data: bytes) -> None:
    fh = ov.open(path, os.O_WRONLY | os.O_APPEND)
    ov.write(fh, data, 0)  # O_APPEND: the offset is the end
    ov.release(fh)


def _names(ov: Overlay, path: str) -> list[str]:
    return sorted(name for name, _, _ in ov.readdir(path) if name not in (".", ".."))


def test_a_handle_opened_before_its_directory_moved_reads_what_is_written_after(layers):
    """The file stays in its lower layer when its directory moves; a write through the new path copies it up, and a
    handle opened before the move is switched to the copy, as for any copy-up (the kernel's ovl_real_fdget)."""
    ov = _overlay(layers)
    before = ov.open("a/b/f", os.O_RDONLY)
    ov.rename("a", "c/moved")
    _append(ov, "c/moved/b/f", b"+more")
    assert ov.read(before, 100, 0) == b"deep+more" == read_all(ov, "c/moved/b/f")
    ov.release(before)
    ov.close()


def test_a_move_is_one_copy_up_and_the_tree_stays_below(layers):
    upper = layers[1]
    ov = _overlay(layers)
    ino = ov.getattr("a")["st_ino"]
    ov.rename("a", "c/moved")
    assert sorted(os.listdir(upper)) == ["a", "c"] and os.listdir(f"{upper}/c/moved") == []
    assert os.getxattr(f"{upper}/c/moved", REDIRECT) == b"/a" and ov.getattr("c/moved")["st_ino"] == ino
    assert _names(ov, "c/moved") == ["b", "g"] and read_all(ov, "c/moved/b/f") == b"deep"
    ov.rename("c/moved", "c/again")  # same parent: an absolute redirect is kept
    assert os.getxattr(f"{upper}/c/again", REDIRECT) == b"/a"
    ov.rename("c/again", "a")  # back over the whiteout at its old name
    assert _names(ov, "") == ["a", "c", "top"] and _names(ov, "a") == ["b", "g"]
    ov.close()


def test_a_new_directory_at_the_old_name_is_empty(layers):
    ov = _overlay(layers)
    ov.rename("a", "moved")
    ov.mkdir("a", 0o755, Caller.me())
    assert _names(ov, "a") == [] and _names(ov, "moved") == ["b", "g"]
    ov.rmdir("a")
    ov.unlink("moved/b/f")
    ov.unlink("moved/g")
    ov.rmdir("moved/b")
    ov.rmdir("moved")
    assert _names(ov, "") == ["c", "top"]
    ov.close()


@pytest.mark.parametrize("mode", ["follow", "nofollow", None])
def test_without_redirect_dir_on_a_lower_directory_does_not_move(layers, mode):
    ov = _overlay(layers, mode)
    with pytest.raises(OSError) as exc:
        ov.rename("a", "moved")
    assert exc.value.errno == errno.EXDEV
    ov.rename("top", "c/top")  # files move as before
    ov.mkdir("new", 0o755, Caller.me())
    ov.rename("new", "c/new")  # and pure-upper directories
    ov.close()


def test_a_redirect_too_long_for_the_kernel_is_exdev_and_mv_copies(tmp_path):
    deep = "/".join(["d" * 60] * 5)  # 304 bytes of directories: the absolute redirect would be over 256
    lower = build(str(tmp_path / "l"), {f"{deep}/x/f": "f"})
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    ov = Overlay([lower], str(tmp_path / "u"), str(tmp_path / "w"), redirect_dir="on")
    with pytest.raises(OSError) as exc:
        ov.rename(f"{deep}/x", "moved")
    assert exc.value.errno == errno.EXDEV and len(f"/{deep}/x") > REDIRECT_MAX
    ov.rename(f"{deep}/x", f"{deep}/y")  # within its directory: the bare name, no limit reached
    assert read_all(ov, f"{deep}/y/f") == b"f"
    ov.close()


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (b"", errno.EINVAL),
        (b"//a", errno.EINVAL),
        (b"/a/", errno.EINVAL),
        (b"a/b", errno.EINVAL),
        (b"..", errno.EACCES),
        (b"/..", errno.EACCES),
        (b"/a/../../etc", errno.EACCES),
        (b".", errno.EACCES),
    ],
)
def test_a_malformed_or_escaping_redirect_is_refused_as_the_kernel_refuses_it(layers, value, code):
    """The kernel's answers (checked on Linux 6.18): no redirect reads outside a layer."""
    upper = layers[1]
    os.mkdir(f"{upper}/z")
    os.setxattr(f"{upper}/z", REDIRECT, value)
    ov = _overlay(layers, "follow")
    with pytest.raises(OSError) as exc:
        ov.getattr("z")
    assert exc.value.errno == code
    ov.close()


@pytest.mark.parametrize(
    ("mode", "value", "shows"),
    [
        ("follow", b"/a", ["b", "g"]),
        ("follow", b"a", ["b", "g"]),
        ("follow", b"/a/b", ["f"]),
        ("follow", b"/nowhere", []),
        ("follow", b"/top", []),  # a file is no directory's lower part
        ("follow", b"a\0junk", ["b", "g"]),  # a C string: the value ends at its NUL
        ("nofollow", b"/a", errno.EPERM),
        ("nofollow", b"/nowhere", errno.EPERM),  # refused as soon as it is read
    ],
)
def test_a_redirect_is_followed_or_refused(layers, mode, value, shows):
    upper = layers[1]
    os.mkdir(f"{upper}/z")
    os.setxattr(f"{upper}/z", REDIRECT, value)
    ov = _overlay(layers, mode)
    if isinstance(shows, int):
        with pytest.raises(OSError) as exc:
            ov.getattr("z")
        assert exc.value.errno == shows
    else:
        assert _names(ov, "z") == shows
    ov.close()


def test_redirects_in_a_lower_layer_are_followed_for_the_layers_below_it(tmp_path):
    """A former upper (the kernel renamed a/ to n/ there) used as a lower layer, and an absolute redirect under an
    opaque directory, which the kernel follows too."""
    former = build(str(tmp_path / "former"), {"n": None, "a": WHITEOUT, "o": ("opaque",), "o/m": None})
    os.setxattr(f"{former}/n", REDIRECT, b"a")
    os.setxattr(f"{former}/o/m", REDIRECT, b"/a/b")
    base = build(str(tmp_path / "base"), {"a/b/f": "deep", "a/g": "g", "o/hidden": "h"})
    ov = Overlay([former, base])
    assert _names(ov, "") == ["n", "o"]
    assert _names(ov, "n") == ["b", "g"] and read_all(ov, "n/b/f") == b"deep"
    assert _names(ov, "o") == ["m"] and _names(ov, "o/m") == ["f"]
    ov.close()
    with pytest.raises(OSError) as exc:
        Overlay([former, base], redirect_dir="nofollow").getattr("n")
    assert exc.value.errno == errno.EPERM
    assert _names(Overlay([base, former], redirect_dir="nofollow"), "") == ["a", "n", "o"]  # the bottom's: not read


def test_a_handle_opened_through_another_name_reads_the_data_a_write_brings_up(tmp_path):
    """metacopy=on: a hard link makes two names of one metacopy file; the data copy-up through one name (after a
    rename) switches the handles opened through the other, as every name is one inode (found by a new user)."""
    lower = build(str(tmp_path / "l"), {"d/h": "x3\n"})
    os.link(f"{lower}/d/h", f"{lower}/d/h2")
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    ov = Overlay([lower], str(tmp_path / "u"), str(tmp_path / "w"), metacopy=True)
    ov.link("d/h", "d/h4")
    before = ov.open("d/h4", os.O_RDONLY)
    ov.rename("d/h", "d/hh")
    _append(ov, "d/hh", b"append\n")
    assert ov.read(before, 100, 0) == b"x3\nappend\n" == read_all(ov, "d/h4")
    ov.release(before)
    ov.close()


@pytest.mark.parametrize("options", [{"redirect_dir": "on"}, {"index": True}])
def test_a_new_directory_in_a_merged_one_is_opaque_when_lowers_may_not_change_offline(layers, options):
    """The kernel's ovl_create_upper with ovl_allow_offline_changes false (redirect_dir=on, index=on, metacopy=on)."""
    lower, upper, work = layers
    ov = Overlay([lower], upper, work, **options)
    ov.mkdir("new", 0o755, Caller.me())
    ov.mkdir("new/inner", 0o755, Caller.me())  # its parent is not merged: no marker needed
    assert os.getxattr(f"{upper}/new", "trusted.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(f"{upper}/new/inner")
    ov.close()


def test_a_name_the_mount_refuses_does_not_hide_its_directory(layers):
    """nofollow: the redirected directory's own lookup is EPERM; its directory still lists (it is not impure), as
    the kernel's readdir lists it (found by a new user: ls, find, tar and rm -rf lost the whole directory)."""
    upper = layers[1]
    os.mkdir(f"{upper}/a")
    os.mkdir(f"{upper}/a/moved")
    os.setxattr(f"{upper}/a/moved", REDIRECT, b"/c")
    ov = _overlay(layers, "nofollow")
    assert _names(ov, "a") == ["b", "g", "moved"]
    with pytest.raises(OSError) as exc:
        ov.getattr("a/moved")
    assert exc.value.errno == errno.EPERM
    ov.close()
