"""Metadata-only copy-up (``metacopy=on``): in-process, then against the kernel's, both ways."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pylayerfs.overlay.filesystem import Overlay
from tests.mounts import backings, kernel_mount, pylayerfs_mount
from tests.test_kernel import run
from tests.trees import build, disk_form, tree_hash, view

APP = b'#!/bin/sh\necho "hello, layers!!"\n'  # the blog's app.sh: 33 bytes
METACOPY = "trusted.overlay.metacopy"


@pytest.fixture
def stack(tmp_path: Path) -> tuple[list[str], str, str]:
    lowers = [build(str(tmp_path / "l0"), {"top": "top's"}), build(str(tmp_path / "l1"), {"app.sh": APP.decode()})]
    for d in ("u", "w"):
        (tmp_path / d).mkdir()
    return lowers, str(tmp_path / "u"), str(tmp_path / "w")


def overlay(stack: tuple[list[str], str, str], metacopy: bool = True) -> Overlay:
    lowers, upper, work = stack
    return Overlay(lowers, upper, work, metacopy=metacopy)


def all_hole(path: Path | str) -> bool:
    """No data stored: the file is one hole (st_blocks may still count an xattr block)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    finally:
        os.close(fd)
    return False


def read_all(ov: Overlay, path: str) -> bytes:
    fh = ov.open(path, os.O_RDONLY)
    try:
        return ov.read(fh, 1 << 20, 0)
    finally:
        ov.release(fh)


@pytest.mark.root  # trusted.* xattrs
def test_chmod_copies_metadata_only_and_the_first_write_copies_the_data(stack):
    ov = overlay(stack)
    before = ov.open("app.sh", os.O_RDONLY)  # opened before any copy-up
    ov.chmod("app.sh", 0o755)
    upper = os.path.join(stack[1], "app.sh")
    st = os.stat(upper)
    assert (st.st_size, stat.S_IMODE(st.st_mode)) == (33, 0o755) and all_hole(upper)  # no data stored
    assert os.getxattr(upper, METACOPY) == b""
    assert read_all(ov, "app.sh") == APP
    attrs = ov.getattr("app.sh")
    assert stat.S_IMODE(attrs["st_mode"]) == 0o755 and attrs["st_blocks"] == os.stat(stack[0][1] + "/app.sh").st_blocks
    assert stat.S_IMODE(ov.getattr("app.sh", before)["st_mode"]) == 0o755  # the handle shows the new metadata
    ov.chown("app.sh", 1000, 1000)
    ov.setxattr("app.sh", "user.note", b"kept")
    assert METACOPY in os.listxattr(upper) and METACOPY not in ov.listxattr("app.sh")

    fh = ov.open("app.sh", os.O_WRONLY | os.O_APPEND)
    ov.write(fh, b"# more\n", 33)
    ov.release(fh)
    assert METACOPY not in os.listxattr(upper)
    assert Path(upper).read_bytes() == APP + b"# more\n"
    st = os.stat(upper)
    assert (st.st_uid, stat.S_IMODE(st.st_mode), os.getxattr(upper, "user.note")) == (1000, 0o755, b"kept")
    assert ov.read(before, 100, 0) == APP + b"# more\n"  # switched to the upper copy, as after any copy-up
    ov.release(before)
    ov.close()


@pytest.mark.root
@pytest.mark.parametrize(
    ("change", "name", "redirect"),
    [
        (lambda ov: ov.rename("app.sh", "moved.sh"), "moved.sh", b"app.sh"),  # same directory: the old name
        (lambda ov: ov.link("app.sh", "moved.sh"), "app.sh", b"/app.sh"),  # every name finds the data: absolute
    ],
    ids=["rename", "link"],
)
def test_renaming_or_linking_a_metacopy_file_records_a_redirect_and_copies_no_data(stack, change, name, redirect):
    """As the kernel's ovl_rename and ovl_link with metacopy=on (checked against it in tests/test_redirect.py)."""
    ov = overlay(stack)
    ov.chmod("app.sh", 0o700)
    change(ov)
    upper = os.path.join(stack[1], name)
    assert os.getxattr(upper, METACOPY) == b"" and os.getxattr(upper, "trusted.overlay.redirect") == redirect
    assert all_hole(upper)
    assert read_all(ov, "moved.sh") == APP
    ov.close()


@pytest.mark.root
def test_truncating_a_metacopy_file_copies_its_data_first(stack):
    ov = overlay(stack)
    ov.chmod("app.sh", 0o700)
    ov.truncate("app.sh", 10)
    upper = os.path.join(stack[1], "app.sh")
    assert METACOPY not in os.listxattr(upper)
    assert Path(upper).read_bytes() == APP[:10] and os.stat(upper).st_blocks > 0
    assert read_all(ov, "app.sh") == APP[:10]
    ov.close()


@pytest.mark.root
def test_without_metacopy_on_a_metacopy_file_is_refused_and_one_without_data_is_eio(stack, tmp_path):
    ov = overlay(stack)
    ov.chmod("app.sh", 0o755)
    ov.close()
    with pytest.raises(OSError) as refused:
        overlay(stack, metacopy=False).getattr("app.sh")
    assert refused.value.errno == errno.EPERM  # as the kernel: "refusing to follow metacopy origin"

    # the metacopy file as a lower layer over the data: followed; over nothing: EIO
    lowers = [stack[1], *stack[0]]
    assert read_all(Overlay(lowers, metacopy=True), "app.sh") == APP
    assert stat.S_IMODE(Overlay(lowers, metacopy=True).getattr("app.sh")["st_mode"]) == 0o755
    with pytest.raises(OSError) as orphan:
        Overlay([stack[1]], metacopy=True).getattr("app.sh")
    assert orphan.value.errno == errno.EIO


def test_metacopy_and_userxattr_conflict_as_in_the_kernel():
    from pylayerfs.overlay.params import MountError, parse_options

    assert parse_options(["lowerdir=a,metacopy=on"]).metacopy
    with pytest.raises(MountError, match="conflicting options: userxattr,metacopy=on"):
        parse_options(["lowerdir=a,metacopy=on,userxattr"])


# -- the kernel as the oracle -----------------------------------------------------------------

LOWER = {"app.sh": APP.decode(), "d/f": "data", "d/g": "more data", "big": "x" * 100_000, "keep": "keep"}


def _write(p: str) -> None:
    with open(p, "a") as f:
        f.write("!")


OPERATIONS: list[tuple[str, Callable[[str], object]]] = [
    ("chmod", lambda m: os.chmod(f"{m}/app.sh", 0o755)),
    ("chown", lambda m: os.chown(f"{m}/d/f", 1000, 1000)),
    ("utimes", lambda m: os.utime(f"{m}/big", (1, 1))),
    ("setxattr", lambda m: os.setxattr(f"{m}/d/g", "user.k", b"v")),
    ("read a metacopy file", lambda m: Path(f"{m}/app.sh").read_bytes()),
    ("its size and blocks", lambda m: (os.stat(f"{m}/big").st_size, os.stat(f"{m}/big").st_blocks > 0)),
    ("append to a metacopy file", lambda m: _write(f"{m}/d/g")),
    ("truncate a metacopy file", lambda m: os.truncate(f"{m}/big", 50_000)),
]


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_same_metacopy_uppers_as_the_kernel_and_interop_both_ways(backing):
    def fresh(name: str) -> tuple[list[str], str, str, str]:
        lower = build(str(backing / name / "l"), LOWER)
        dirs = [str(backing / name / d) for d in ("u", "w", "m")]
        for d in dirs:
            os.makedirs(d)
        return [lower], *dirs  # type: ignore[return-value]

    k_lowers, k_upper, k_work, k_mnt = fresh("kernel")
    p_lowers, p_upper, p_work, p_mnt = fresh("pylayerfs")
    lower_hash = tree_hash(p_lowers[0])
    with kernel_mount(k_mnt, k_lowers, k_upper, k_work, "metacopy=on"):
        k_results, k_view = run(k_mnt, OPERATIONS), view(k_mnt)
    with pylayerfs_mount(p_mnt, p_lowers, p_upper, p_work, "metacopy=on"):
        p_results, p_view = run(p_mnt, OPERATIONS), view(p_mnt)
    assert p_results == k_results
    assert p_view == k_view
    assert disk_form(p_upper) == disk_form(k_upper)
    assert ("metacopy", b"") in disk_form(p_upper)["app.sh"]  # chmod and chown left metacopy files
    assert tree_hash(p_lowers[0]) == lower_hash

    with kernel_mount(k_mnt, k_lowers, p_upper, p_work, "metacopy=on"):
        assert view(k_mnt) == p_view, "the kernel reads pylayerfs's metacopy upper differently"
    shutil.rmtree(p_work)
    os.makedirs(p_work)
    with pylayerfs_mount(p_mnt, p_lowers, k_upper, k_work, "metacopy=on"):
        assert view(p_mnt) == k_view, "pylayerfs reads the kernel's metacopy upper differently"
    shutil.rmtree(p_work)
    os.makedirs(p_work)
    with kernel_mount(k_mnt, k_lowers, p_upper, p_work), pytest.raises(PermissionError):
        os.stat(f"{k_mnt}/app.sh")  # both refuse a metacopy file without metacopy=on
    shutil.rmtree(p_work)
    os.makedirs(p_work)
    with pylayerfs_mount(p_mnt, p_lowers, p_upper, p_work), pytest.raises(PermissionError):
        os.stat(f"{p_mnt}/app.sh")


# -- the builder ------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize("driver", ["fuse", "overlay"])
def test_build_with_metacopy_makes_the_chmod_layer_0B_with_the_same_diff_id(tmp_path, driver):
    from pylayerfs.image import archive
    from pylayerfs.image.store import Store
    from pylayerfs.teaching import explain
    from pylayerfs.teaching import layers as analysis
    from tests.test_build import DOCKERFILE_1, pylayerfs

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "app.sh").write_bytes(APP)
    (ctx / "Dockerfile").write_text(DOCKERFILE_1)
    root = tmp_path / "store"
    pylayerfs(root, "base", "alpine")
    pylayerfs(root, "build", "--metacopy", "--storage-driver", driver, "-t", "meta", str(ctx))
    history = pylayerfs(root, "history", "meta").stdout.splitlines()
    assert "chmod +x app.sh" in history[2] and history[2].split()[-1] == "0B"
    assert "COPY" in history[3] and history[3].split()[-1] == "33B"

    store = Store(str(root))
    image = store.resolve("meta")
    chmod_layer = store.layers_of(image)[0]
    diff = Path(store.layers.diff_dir(chmod_layer.cache_id))
    assert all_hole(diff / "app.sh") and METACOPY in os.listxattr(diff / "app.sh")
    with open(tmp_path / "layer.tar", "wb") as tar:  # the layer's tar carries the data, read from below
        archive.write_layer(str(diff), tar, store.layers.lower_dirs(chmod_layer.parent))
    with tarfile.open(tmp_path / "layer.tar") as t:
        member = t.getmember("app.sh")
        assert (member.mode, t.extractfile(member).read()) == (0o100755, APP)  # type: ignore[union-attr]

    # the same build without metacopy, in another store: the same layers (DiffIDs), stored differently
    plain = tmp_path / "plain"
    pylayerfs(plain, "base", "alpine")
    pylayerfs(plain, "build", "-t", "plain", str(ctx))
    plain_store = Store(str(plain))
    assert plain_store.resolve("plain").diff_ids[1:] == image.diff_ids[1:]
    assert [la.size for la in plain_store.layers_of(plain_store.resolve("plain"))][:2] == [33, 33]

    # a container over it reads the data; docker diff, layers and explain see a metadata-only change
    assert pylayerfs(root, "run", "--rm", "meta").stdout == "hello, layers!!\n"
    reports, summary = analysis.analyse(store, "meta")
    assert [(c.path, c.change, c.size) for c in reports[-1].fileList] == [("app.sh", "modified", 0)]
    assert summary.unseenBytes == 0
    found = explain.explain(explain.image_layers(store, "meta"), "/app.sh")
    assert [f.holds for f in found.layers][:2] == ["metacopy file", "file"] and found.source == "layer 2"
    # the vfs driver builds its full trees from these layers: metadata applied, data kept
    pylayerfs(root, "run", "--rm", "--storage-driver", "vfs", "meta")


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_a_metacopy_file_the_kernel_renamed_reads_its_own_data_not_the_file_now_at_its_name(backing):
    """The kernel (redirect_dir=on with metacopy) renames a lower file as metacopy plus a redirect.

    pylayerfs follows the redirect to the data (the file that now sits at the new name below is not it: `pylayerfs
    check` found the wrong-data case when redirects were not followed); with redirect_dir=nofollow it refuses the file
    (EPERM), as the kernel does.
    """
    lower = build(str(backing / "l"), {"a": "", "b": "1"})
    upper, work = backing / "u", backing / "w"
    upper.mkdir()
    work.mkdir()
    with kernel_mount(str(backing / "k"), [lower], str(upper), str(work), "metacopy=on") as mnt:
        os.rename(f"{mnt}/b", f"{mnt}/a")
        assert Path(f"{mnt}/a").read_text() == "1"
    assert "trusted.overlay.redirect" in os.listxattr(upper / "a")
    shutil.rmtree(work)
    work.mkdir()
    with pylayerfs_mount(str(backing / "p"), [lower], str(upper), str(work), "metacopy=on") as mnt:
        assert Path(f"{mnt}/a").read_text() == "1"
        assert not os.path.exists(f"{mnt}/b")
    with pylayerfs_mount(str(backing / "p"), [lower], str(upper), str(work), "redirect_dir=nofollow") as mnt:
        with pytest.raises(PermissionError):
            Path(f"{mnt}/a").read_text()
        assert not os.path.exists(f"{mnt}/b")


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize("driver", ["fuse", "overlay"])
def test_a_metacopy_build_that_renames_stores_whole_trees_and_no_redirect(tmp_path, driver):
    """With metacopy=on (so redirect_dir=on) a RUN step's renames leave redirects in its upper: a tar has none, so the
    layer's tar carries the moved tree whole and its data, and the layer on disk is that tar applied (as moby's
    overlay2 commits a container through its tar). Both storage drivers, whose overlays make the same redirects."""
    from pylayerfs.image.store import Store
    from tests.test_build import pylayerfs

    ctx = tmp_path / "ctx"
    build(str(ctx / "tree"), {"d/f": "deep data\n", "d/e/x": "x\n", "g": "file data\n", "keep": "k\n"})
    (ctx / "Dockerfile").write_text(
        "FROM alpine\nCOPY tree /tree\n"
        "RUN chmod 600 /tree/d/f && mv /tree/d /tree/moved && mv /tree/g /tree/g2 && mv /tree/moved/e /tree/e2\n"
        "RUN chmod 640 /tree/keep\n"  # a metacopy layer on top: containers of the image mount with metacopy=on
        'CMD ["sh", "-c", "cat /tree/moved/f /tree/g2 /tree/e2/x; ls /tree"]\n'
    )
    root = tmp_path / "store"
    pylayerfs(root, "base", "alpine")
    pylayerfs(root, "build", "--metacopy", "--storage-driver", driver, "-t", "moved", str(ctx))
    store = Store(str(root))
    layer = store.layers_of(store.resolve("moved"))[1]
    diff = Path(store.layers.diff_dir(layer.cache_id))
    assert not [p for p in diff.rglob("*") if "trusted.overlay.redirect" in os.listxattr(p, follow_symlinks=False)]
    assert (diff / "tree/moved/f").read_text() == "deep data\n" and (diff / "tree/g2").read_text() == "file data\n"
    with open(tmp_path / "layer.tar", "wb") as tar:  # what save and push send
        store.layers.write_tar(layer, tar)
    with tarfile.open(tmp_path / "layer.tar") as t:
        names = set(t.getnames())
        assert {"tree/moved/f", "tree/moved/.wh..wh..opq", "tree/g2", "tree/e2/x", "tree/.wh.d", "tree/.wh.g"} <= names
        assert t.extractfile("tree/moved/f").read() == b"deep data\n"  # type: ignore[union-attr]
    tar_digest = hashlib.sha256((tmp_path / "layer.tar").read_bytes()).hexdigest()
    assert f"sha256:{tar_digest}" == layer.diff_id
    out = pylayerfs(root, "run", "--rm", "moved").stdout
    assert out == "deep data\nfile data\nx\ne2\ng2\nkeep\nmoved\n"

    # a container renaming a directory (its mount is metacopy=on, so redirect_dir=on): docker diff lists the tree
    pylayerfs(root, "run", "-d", "--name", "mover", "moved", "sleep", "600")
    try:
        pylayerfs(root, "exec", "mover", "mv", "/tree/moved", "/tree/m3")
        redirects = [os.getxattr(p, "trusted.overlay.redirect") for p in (root / "overlay2").glob("*/diff/tree/m3")]
        assert redirects == [b"moved"]  # moved by the overlay, not copied by mv
        assert pylayerfs(root, "diff", "mover").stdout.splitlines() == ["C /tree", "A /tree/m3", "A /tree/m3/f",
                                                                        "D /tree/moved"]  # fmt: skip
    finally:
        pylayerfs(root, "rm", "-f", "mover")
