"""``pylayerfs bench --images`` works end to end (no timing is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pylayerfs.bench.images import SKOPEO, commands
from pylayerfs.bench.registry import REGISTRY
from tests.mounts import need

pytestmark = [pytest.mark.root, pytest.mark.ecosystem]


@pytest.mark.timeout(300)
def test_images_bench_measures_each_command_against_skopeo(tmp_path):
    need(SKOPEO)
    need(REGISTRY)
    argv = [sys.executable, "-m", "pylayerfs", "bench", "--images", "--quick", "--image-size", "4", "--rounds", "2",
            "--format", "json", "--dir", str(tmp_path)]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=280, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["layer_bytes"] >= 4 << 20
    assert set(report["ops"]) == {"import"} | commands()
    for op, samples in report["ops"].items():
        for tool in ("pylayerfs", "skopeo"):
            assert len(samples["seconds"][tool]) == 2 and all(s > 0 for s in samples["seconds"][tool]), (op, tool)
            # each command's own peak, not the bench's (which holds the image it made): a few tens of MB
            assert all(0 < rss < 100 << 20 for rss in samples["peak_rss"][tool]), (op, tool)
    missing = {"save", "load", "pull", "push"} - commands()
    assert bool(missing) == any("not measured" in note for note in report["notes"])
