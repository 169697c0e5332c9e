"""``pylayerfs explain``: every lookup rule on constructed stacks, and the CLI on real mounts."""

from __future__ import annotations

import json
import os

import pytest

from pylayerfs.teaching.explain import Layer, explain
from tests.mounts import kernel_mount, pylayerfs_mount, run_pylayerfs
from tests.trees import WHITEOUT, build

pytestmark = pytest.mark.root  # whiteouts and trusted.* xattrs


@pytest.fixture
def stack(tmp_path):
    top = build(str(tmp_path / "top"), {"f": "top", "gone": WHITEOUT, "o": ("opaque",), "o/new": "n",
                                        "d/a": "top a", "x": None, "x/inner": "i"})  # fmt: skip
    mid = build(str(tmp_path / "mid"), {"f": "mid", "gone": "hidden", "o/old": "hidden", "d/b": "mid b",
                                        "d/gone2": WHITEOUT, "x": "a file below a directory"})  # fmt: skip
    low = build(str(tmp_path / "low"), {"d/gone2": "hidden", "d/c": "low c", "only": "low", "x/deep": "unreachable"})
    return [Layer("top", top, "RUN top"), Layer("mid", mid), Layer("low", low)]


def test_upper_hides_lower(stack):
    e = explain(stack, "/f")
    assert e.source == "top" and [f.consulted for f in e.layers] == [True, False, False]
    assert "top-most object" in e.layers[0].rule and e.layers[1].holds == "file"


def test_whiteout_hides_everything_below(stack):
    e = explain(stack, "gone")
    assert e.source is None and "a whiteout in top deletes it" in e.result
    assert e.layers[0].holds == "whiteout" and not e.layers[1].consulted


def test_opaque_directory_stops_the_merge(stack):
    e = explain(stack, "/o")
    assert e.layers[0].holds == "opaque directory" and e.entries == {"new": "top"}
    assert not e.layers[1].consulted
    assert not explain(stack, "/o/old").layers[1].consulted


def test_directories_merge_and_entries_name_their_layer(stack):
    e = explain(stack, "/d")
    assert e.entries == {"a": "top", "b": "mid", "c": "low"}, "gone2 is whited out in mid"
    assert [f.holds for f in e.layers] == ["directory", "directory", "directory"]


def test_a_file_below_a_directory_ends_the_merge(stack):
    e = explain(stack, "/x")
    assert "non-directory below a directory" in e.layers[1].rule and not e.layers[2].consulted
    assert e.entries == {"inner": "top"}
    deep = explain(stack, "/x/deep")
    assert deep.layers[2].holds == "file" and not deep.layers[2].consulted
    assert "does not exist" in deep.result


def test_lower_only_and_missing(stack):
    assert explain(stack, "/only").source == "low"
    missing = explain(stack, "/nowhere")
    assert missing.source is None and "no layer holds it" in missing.result


@pytest.mark.fuse
def test_cli_on_a_pylayerfs_mount_and_a_kernel_mount(stack, tmp_path):
    lowers = [layer.root for layer in stack]
    upper, work = str(tmp_path / "u"), str(tmp_path / "w")
    for d in (upper, work):
        os.makedirs(d)
    with pylayerfs_mount(str(tmp_path / "m"), lowers, upper, work) as mnt:
        with open(f"{mnt}/d/new", "w") as f:
            f.write("upper")
        out = run_pylayerfs("explain", f"{mnt}/d").stdout
        assert "new  <- the upper layer" in out and "c  <- lower layer 1" in out
        data = json.loads(run_pylayerfs("explain", "--format", "json", f"{mnt}/f").stdout)
        assert data["source"] == "lower layer 3" and data["layers"][0]["holds"] == "nothing"
    upper2, work2 = str(tmp_path / "u2"), str(tmp_path / "w2")
    for d in (upper2, work2):
        os.makedirs(d)
    with kernel_mount(str(tmp_path / "k"), lowers, upper2, work2) as mnt:
        out = run_pylayerfs("explain", f"{mnt}/gone").stdout
        assert "a whiteout in lower layer 3 deletes it" in out
    bad = run_pylayerfs("explain", str(tmp_path), check=False)
    assert bad.returncode == 1 and "is not inside an overlay mount" in bad.stderr
