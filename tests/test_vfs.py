"""The vfs storage driver: the naive diff, full copies per layer, the same images, its real disk cost."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pylayerfs.container.changes import changes
from pylayerfs.image import archive
from pylayerfs.image.drivers import overlay as rootfs
from pylayerfs.image.drivers import vfs as vfsdriver
from pylayerfs.image.sizes import human_size, layer_size
from pylayerfs.image.store import Store
from pylayerfs.overlay.markers import is_whiteout
from tests.test_build import pylayerfs


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below ``root``: mode, owner and content (or link target)."""
    out = {}
    for rel, st in archive.walk(str(root)):
        path = root / rel
        body = os.fsencode(os.readlink(path)) if stat.S_ISLNK(st.st_mode) else b""
        if stat.S_ISREG(st.st_mode):
            body = path.read_bytes()
        out[rel] = (st.st_mode, st.st_uid, body)
    return out


def listing(store: Store, ref: str) -> list[list[str]]:
    """Each layer's entries with type, mode, owner and size (RUN layers' times differ between any two builds)."""
    out = []
    for layer in store.layers_of(store.resolve(ref)):
        walk = archive.walk(store.layers.diff_dir(layer.cache_id))
        out.append(sorted(f"{rel}:{oct(st.st_mode)}:{st.st_uid}:{st.st_size}" for rel, st in walk))
    return out


@pytest.mark.root
def test_naive_diff_then_apply_gives_back_the_new_tree(tmp_path):
    base, new, diff = tmp_path / "base", tmp_path / "new", tmp_path / "diff"
    for d in (base, new, diff):
        d.mkdir()
    for root in (base, new):
        (root / "etc").mkdir()
        (root / "etc" / "same").write_text("same")
        (root / "etc" / "edited").write_text("old")
        os.utime(root / "etc" / "same", (1, 1))
        os.utime(root / "etc" / "edited", (1, 1))
    (base / "gone").write_text("bye")
    (base / "dir-gone").mkdir()
    (base / "dir-gone" / "inside").write_text("x")
    (base / "becomes-dir").write_text("file")
    (new / "etc" / "edited").write_text("new!")
    (new / "becomes-dir").mkdir()
    (new / "becomes-dir" / "f").write_text("f")
    (new / "up").symlink_to("/")  # a link out of the tree is only ever copied, never followed
    (new / "a").write_text("linked")
    os.link(new / "a", new / "b")
    os.chown(new / "etc" / "same", 1000, 1000)

    vfsdriver.naive_diff(str(base), str(new), str(diff))
    entries = {rel: st for rel, st in archive.walk(str(diff))}
    assert sorted(entries) == ["a", "b", "becomes-dir", "becomes-dir/f", "dir-gone", "etc", "etc/edited",
                               "etc/same", "gone", "up"]  # fmt: skip
    assert is_whiteout(entries["gone"]) and is_whiteout(entries["dir-gone"])
    assert entries["a"].st_ino == entries["b"].st_ino  # hard links stay linked
    assert sorted(changes(str(diff), [str(base)])) == [
        "A /a", "A /b", "A /becomes-dir/f", "A /up", "C /becomes-dir", "C /etc", "C /etc/edited", "C /etc/same",
        "D /dir-gone", "D /gone",
    ]  # fmt: skip

    vfsdriver.apply_diff(str(diff), str(base))
    assert tree(base) == tree(new)


@pytest.mark.fuse
@pytest.mark.root
def test_vfs_builds_the_same_layers_and_keeps_full_copies(tmp_path):
    root = tmp_path / "store"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "app.sh").write_text('#!/bin/sh\necho "hello, layers!!"\n')
    (ctx / "Dockerfile").write_text("FROM alpine\nCOPY app.sh ./app.sh\nRUN chmod +x app.sh\n"
                                    'RUN rm /etc/os-release && echo hi > /hi\nCMD ["./app.sh"]\n')  # fmt: skip
    pylayerfs(root, "base", "alpine")
    pylayerfs(root, "build", "--storage-driver", "vfs", "-t", "on-vfs", str(ctx))
    pylayerfs(root, "build", "--no-cache", "-t", "on-fuse", str(ctx))
    store = Store(str(root))
    assert listing(store, "on-vfs") == listing(store, "on-fuse") and len(listing(store, "on-vfs")) == 4
    diff_ids = [store.resolve(ref).diff_ids for ref in ("on-vfs", "on-fuse")]
    assert diff_ids[0][:2] == diff_ids[1][:2]  # COPY layers: same bytes, same times, same DiffIDs
    stack = store.layers_of(store.resolve("on-vfs"))
    assert sorted(os.listdir(store.layout.vfs_dir())) == sorted(layer.cache_id for layer in stack)
    for layer in stack:  # each tree is what a mount of the layers up to it shows
        with rootfs.mounted(store.layers.lower_dirs(layer.chain_id), None, None, str(tmp_path / "merged")) as merged:
            assert tree(Path(store.layout.vfs_dir(layer.cache_id))) == tree(Path(merged))
    top = Path(store.layout.vfs_dir(stack[0].cache_id))
    assert (top / "hi").read_text() == "hi\n" and not (top / "etc" / "os-release").exists()
    assert os.stat(top / "app.sh").st_mode & 0o111
    assert not (top / ".dockerenv").exists()  # the init files are not part of any layer
    assert os.listdir(store.layout.tmp) == []


@pytest.mark.fuse
@pytest.mark.root
def test_vfs_containers_diff_size_commit_and_system_df(tmp_path):
    root = tmp_path / "store"
    pylayerfs(root, "base", "alpine")
    script = "echo x > /new; rm /bin/ls; chmod 600 /etc/hosts; ln -s / /root/up"
    for driver in ("vfs", "fuse"):
        pylayerfs(root, "run", "--storage-driver", driver, "--name", driver, "alpine", "sh", "-c", script)
    store = Store(str(root))
    image = store.size(store.resolve("alpine"))
    ps = pylayerfs(root, "ps", "-a", "-s", "--format", "json").stdout
    rows = {r["Names"]: r for r in map(json.loads, ps.splitlines())}
    # "x\n" and the link "/"
    assert rows["vfs"]["Size"] == rows["fuse"]["Size"] == f"3B (virtual {human_size(image + 3)})"
    assert pylayerfs(root, "diff", "vfs").stdout == pylayerfs(root, "diff", "fuse").stdout
    assert "A /new" in pylayerfs(root, "diff", "vfs").stdout

    df = pylayerfs(root, "system", "df").stdout
    vfs_row = next(line for line in df.splitlines() if line.startswith("vfs/dir"))
    vfs_bytes = layer_size(store.layout.vfs_dir())
    mtab, ls = len("/proc/mounts"), len("/bin/busybox")  # the init layer's one link; the link the script removed
    # the layer's tree, the init copy, the container's copy with its changes
    assert vfs_bytes == image + (image + mtab) + (image + mtab - ls + 3)
    assert vfs_row.split()[2:5] == ["1", "1", human_size(vfs_bytes, 4)]

    pylayerfs(root, "commit", "vfs", "from-vfs")
    pylayerfs(root, "commit", "fuse", "from-fuse")
    assert listing(store, "from-vfs") == listing(store, "from-fuse")
    pylayerfs(root, "rm", "vfs", "fuse")
    assert sorted(os.listdir(store.layout.vfs_dir())) == [store.layers_of(store.resolve("alpine"))[0].cache_id]


@pytest.mark.fuse
@pytest.mark.root
def test_vfs_init_files_stay_inside_an_image_whose_etc_points_out(tmp_path):
    """An image whose /etc is a link to a host path: the init layer replaces the link, inside the chroot."""
    outside = tmp_path / "outside"
    outside.mkdir()
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").symlink_to(outside)
    tar = tmp_path / "evil.tar"
    import tarfile

    with tarfile.open(tar, "w") as t:
        t.add(rootfs, arcname=".")
    root = tmp_path / "store"
    pylayerfs(root, "import", str(tar), "evil")
    pylayerfs(root, "create", "--storage-driver", "vfs", "--name", "vfs1", "evil", "/bin/true")
    assert os.listdir(outside) == []
