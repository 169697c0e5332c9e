"""Every numbered demo runs end to end and shows what its README promises (so the docs cannot drift)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
        "33 bytes, 0 blocks, -rwxr-xr-x",
        'trusted.overlay.metacopy=""',
        'echo "hello, layers!!"',
    ],
    "04-build-and-history": [
        "Successfully tagged bitphile/my-new-image:latest",
        " ---> Using cache",
        "<missing>",
        "33B",
    ],
    "05-containers": ["0B (virtual 1.99MB)", "12B (virtual 1.99MB)", "A /file.txt", "hello world"],
    "06-explain-layers-diagram": [
        "/big is a file from layer 3",
        "a whiteout in layer 4 deletes it",
        "1 modified",
        "| <missing>",
    ],
    "07-storage-drivers": [
        "overlay2    fuse, overlay   3         2            1.986MB",
        "vfs/dir     vfs             3         2            13.9MB",
        "/bin/sh -c chmod +x app.sh                      0B",
        "/app.sh is a file with layer 3's metadata and layer 2's data",
        "hello, layers!!",
    ],
}


@pytest.mark.parametrize("demo", sorted(EXPECTED))
def test_demo(demo):
    env = {**os.environ, "PYLAYERFS": f"{sys.executable} -m pylayerfs"}
    result = subprocess.run(["sh", str(DEMOS / demo / "run.sh")], capture_output=True, text=True, env=env,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for text in EXPECTED[demo]:
        assert text in result.stdout, f"{demo}: {text!r} missing from\n{result.stdout}"
    assert (DEMOS / demo / "README.md").exists()
    assert not [m for m in mounts_below("/tmp") if "pylayerfs-demo." in m], "a demo left a mount behind"
