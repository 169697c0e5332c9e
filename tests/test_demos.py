"""Every numbered demo runs end to end and shows what its README promises (so the docs cannot drift)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store
from pylayerfs.overlay.params import mounts_below

pytestmark = [pytest.mark.fuse, pytest.mark.root]
DEMOS = Path(__file__).parent.parent / "demos"
EXPECTED = {
    "01-two-directories-stacked": ["issue\nmotd", "from the middle layer", "bottom only"],
    "02-whiteouts-and-opaque-directories": [
        "character special file 0:0",
        "trusted.overlay.opaque = y",
        "a whiteout in the upper layer deletes it",
    ],
    "03-copy-up": [
        "total 0",
        "-rwxr-xr-x 1 root root 33",
        "app.sh: 33 bytes, ",  # blocks: 0, or the xattr block where the inode has no room (ext4, 128-byte inodes)
        'trusted.overlay.metacopy=""',
        'echo "hello, layers!!"',
    ],
    "04-build-and-history": [
        "Successfully tagged bitphile/my-new-image:latest",
        " ---> Using cache",
        "<missing>",
        "33B",
    ],
    "05-containers": ["0B (virtual {alpine})", "12B (virtual {alpine_12})", "A /file.txt", "hello world"],
    "06-explain-layers-diagram": [
        "/big is a file from layer 3",
        "a whiteout in layer 4 deletes it",
        "1 modified",
        "| <missing>",
    ],
    "07-storage-drivers": [
        "overlay2    fuse, overlay   3         2            {overlay2}",
        "vfs/dir     vfs             3         2            {vfs}",
        "/bin/sh -c chmod +x app.sh                      0B",
        "/app.sh is a file with layer 3's metadata and layer 2's data",
        "hello, layers!!",
    ],
    "08-images-in-and-out": [
        "manifest.json\noci-layout\nrepositories",
        "-rwxr-xr-x root/root        33",
        ": Pushed",
        "blob   sha256:",
        "Status: Downloaded newer image for 127.0.0.1:",
        "hello, layers!!",
    ],
}


@pytest.fixture(scope="module")
def sizes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The sizes demos 05 and 07 print, derived from the layers of this host's ``base alpine`` (its busybox).

    07: overlay2 holds busybox's layer, COPY app.sh and the chmod's copy-up (33 bytes each) and, for the
    fuse and overlay containers, an init layer each (the /etc/mtab link); vfs/dir holds three layer trees
    (busybox, +app.sh, +app.sh) and, for each of the two vfs containers, two copies of the image with the init
    layer's link.
    """
    root = tmp_path_factory.mktemp("base") / "store"
    subprocess.run([sys.executable, "-m", "pylayerfs", "--root", str(root), "base", "alpine"], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    store = Store(str(root))
    alpine = store.size(store.resolve("alpine"))
    app, mtab = len('#!/bin/sh\necho "hello, layers!!"\n'), len("/proc/mounts")
    overlay2 = alpine + app + app + 2 * mtab
    vfs = alpine + 2 * (alpine + app) + 2 * 2 * (alpine + app + mtab)
    return {"alpine": human_size(alpine), "alpine_12": human_size(alpine + 12), "overlay2": human_size(overlay2, 4),
            "vfs": human_size(vfs, 4)}  # fmt: skip


@pytest.mark.parametrize("demo", sorted(EXPECTED))
def test_demo(demo, sizes):
    env = {**os.environ, "PYLAYERFS": f"{sys.executable} -m pylayerfs"}
    result = subprocess.run(["sh", str(DEMOS / demo / "run.sh")], capture_output=True, text=True, env=env,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for text in (_with_sizes(t, sizes) for t in EXPECTED[demo]):
        assert text in result.stdout, f"{demo}: {text!r} missing from\n{result.stdout}"
    assert (DEMOS / demo / "README.md").exists()
    assert not [m for m in mounts_below("/tmp") if "pylayerfs-demo." in m], "a demo left a mount behind"


def _with_sizes(text: str, sizes: dict[str, str]) -> str:
    """``text`` with each ``{name}`` of ``sizes`` replaced by its value (other braces stay)."""
    for name, size in sizes.items():
        text = text.replace("{" + name + "}", size)
    return text
