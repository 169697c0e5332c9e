"""``pylayerfs bench --quick`` works end to end (no timing is asserted: benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pylayerfs.overlay.params import mounts_below

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.mark.timeout(600)
def test_quick_bench_runs_every_workload(tmp_path):
    argv = [sys.executable, "-m", "pylayerfs", "bench", "--quick", "--format", "json", "--dir", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    workloads = report["workloads"]
    for name in ("W1 cold", "W1 warm", "W2 cold", "W2 warm", "W3 cold", "W3 warm", "W4 write", "W5 create",
                 "W6 copy-up", "W7 1 layers", "W7 10 layers", "W8 round trip"):  # fmt: skip
        assert workloads[name]["pylayerfs"]["median_s"] > 0, name
    assert "ratio_to_kernel" in workloads["W1 cold"]
    assert report["M1"]["peak_rss"] > 0 and len(report["M1"]["rss_after_each_walk"]) == 5
    assert report["B1"]["rebuild_s"] > 0 and report["B1"]["ps_s"] > 0
    assert mounts_below(str(tmp_path)) == []
