"""``pylayerfs layers``: sizes, changes and waste on an image with a known duplicate and deletion."""

from __future__ import annotations

import json

import pytest

from pylayerfs.image.store import Store
from tests.test_build import context_with, pylayerfs

pytestmark = [pytest.mark.fuse, pytest.mark.root]


def test_layers_report_changes_and_waste(tmp_path):
    store = tmp_path / "store"
    pylayerfs(store, "base", "alpine")
    ctx = context_with(tmp_path / "ctx", "FROM alpine\nRUN head -c 1000 /dev/zero > /big && mkdir /d && "
                       "echo 123 > /d/f\nRUN echo more >> /big\nRUN rm /big && rm -r /d\n")  # fmt: skip
    pylayerfs(store, "build", "-t", "waste", str(ctx))
    data = json.loads(pylayerfs(store, "layers", "--format", "json", "waste").stdout)
    layers = data["layer"]
    assert [layer["sizeBytes"] for layer in layers[1:]] == [1004, 1005, 0]
    changes = [{(c["change"], c["path"]) for c in layer["fileList"]} for layer in layers[1:]]
    assert changes[0] == {("added", "big"), ("added", "d"), ("added", "d/f")}
    assert changes[1] == {("modified", "big")}
    assert changes[2] == {("removed", "big"), ("removed", "d"), ("removed", "d/f")}
    image = data["image"]
    assert image["sizeBytes"] == layers[0]["sizeBytes"] + 2009  # dive's sizes: a symlink counts 0
    assert layers[0]["sizeBytes"] < Store(str(store)).size(Store(str(store)).resolve("alpine")), "Docker's counts them"
    assert image["inefficientBytes"] == 1000 + 1005  # dive: every copy of /big (seen in 3 layers)
    assert image["unseenBytes"] == 2009, "nothing of the three layers is visible in the image"
    assert image["fileReference"][0] == {"count": 3, "sizeBytes": 2005, "file": "/big"}
    failing = pylayerfs(store, "layers", "--ci", "waste", check=False)
    assert failing.returncode == 1 and "FAIL: highestUserWastedPercent" in failing.stdout
    assert pylayerfs(store, "layers", "--ci", "alpine").stdout.endswith("[Failed:0]\n")


def test_diagram_is_valid_svg_with_one_box_per_layer(tmp_path):
    import shutil
    import subprocess
    import xml.etree.ElementTree as ET

    store = tmp_path / "store"
    pylayerfs(store, "base", "alpine")
    ctx = context_with(tmp_path / "ctx", 'FROM alpine\nRUN echo 12345678901 > /eleven\nCMD ["sleep", "600"]\n')
    pylayerfs(store, "build", "-t", "pic", str(ctx))
    pylayerfs(store, "run", "-d", "--name", "web", "pic")
    try:
        pylayerfs(store, "diagram", "web", "-o", str(tmp_path / "c.svg"))
        root = ET.parse(tmp_path / "c.svg").getroot()
        ns = {"svg": "http://www.w3.org/2000/svg"}
        boxes = root.findall("svg:g", ns)
        assert len(boxes) == 1 + 4, "the container layer, then the four history entries"
        texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
        assert "container layer (read-write)" in texts and "12B" in texts and "<missing>" in texts
        assert any(t.startswith("size 0B (virtual ") for t in texts)
        assert shutil.which("rsvg-convert"), "rsvg-convert is not installed (.ci/install installs librsvg2-bin)"
        subprocess.run(["rsvg-convert", "-o", str(tmp_path / "c.png"), str(tmp_path / "c.svg")], check=True)
        assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        text = pylayerfs(store, "diagram", "pic").stdout
        assert text.startswith("image pic\n+") and text.count("| <missing>") == 1
        assert pylayerfs(store, "history", "--format", "tree", "pic").stdout == text
    finally:
        pylayerfs(store, "rm", "-f", "web")
