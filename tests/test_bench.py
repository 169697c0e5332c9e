"""``pylayerfs bench --quick`` works end to end (no timing is asserted: benchmarks are not tests).

What is asserted is what the report claims: every row and workload is there, the request counts are the
kernel's (they agree with the native daemon's own count), and the passthrough column says what happened.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pylayerfs.bench.run import FUSE_OVERLAYFS, FUSE_ROWS, LIBFUSE, NO_PASSTHROUGH, PYLAYERFS
from pylayerfs.bench.trace import open_tracer
from pylayerfs.overlay.params import mounts_below
from tests.mounts import pylayerfs_mount

pytestmark = [pytest.mark.fuse, pytest.mark.root]

WORKLOADS = ("W1 cold", "W1 warm", "W2 cold", "W2 warm", "W3 cold", "W3 warm", "W4 write", "W5 create",
             "W6 copy-up", "W6 walk alone", "W6 walk during copy-up", "W6 copy-up during walk",
             "W6 walk's longest wait alone", "W6 walk's longest wait during copy-up", "W7 1 layers", "W7 10 layers",
             "W8 round trip")  # fmt: skip


def _kernel_counts_fuse_requests() -> bool:
    """Whether this kernel has the tracepoint the bench counts with (then the counts must be there)."""
    with open("/proc/kallsyms") as f:
        return any(line.split()[2] == "__traceiter_fuse_request_send" for line in f)


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``bench --quick`` run for the module (all rows): its JSON report."""
    where = tmp_path_factory.mktemp("bench")
    argv = [sys.executable, "-m", "pylayerfs", "bench", "--quick", "--format", "json", "--dir", str(where)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert mounts_below(str(where)) == []
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.timeout(600)
def test_quick_bench_runs_every_workload_on_every_row(quick):
    report = quick
    workloads = report["workloads"]
    for name in WORKLOADS:
        for impl in (PYLAYERFS, LIBFUSE, NO_PASSTHROUGH):
            assert workloads[name][impl]["median_s"] > 0, (name, impl)
            if FUSE_OVERLAYFS in report["implementations"]:
                assert workloads[name][impl]["ratio_to_fuse-overlayfs"] > 0, (name, impl)
    assert "ratio_to_kernel" in workloads["W1 cold"]
    assert report["M1"]["peak_rss"] > 0 and len(report["M1"]["rss_after_each_walk"]) == 5
    assert report["B1"]["rebuild_s"] > 0 and report["B1"]["ps_s"] > 0
    assert report["daemon_log"] == {}, "the daemons logged warnings or errors"


@pytest.mark.timeout(600)
def test_quick_bench_counts_requests_and_says_where_passthrough_was_used(quick):
    report = quick
    if not _kernel_counts_fuse_requests():
        pytest.skip("this kernel has no fuse_request_send tracepoint")
    assert report["requests_counted"]
    workloads = report["workloads"]
    rows = [impl for impl in report["implementations"] if impl in FUSE_ROWS]
    for impl in rows:
        (fstats,) = workloads["W8 round trip"][impl]["requests"]
        assert fstats.get("GETATTR", 0) >= 2_000, (impl, fstats)  # one request per fstat with caching off
        assert not workloads["W8 round trip"][impl]["requests_lost"]
    # a passed-through write never reaches the daemon: 8 MiB written, no WRITE request
    assert workloads["W4 write"][PYLAYERFS]["requests"][0].get("WRITE", 0) == 0
    assert workloads["W4 write"][NO_PASSTHROUGH]["requests"][0]["WRITE"] >= 8
    assert workloads["W4 write"][LIBFUSE]["requests"][0]["WRITE"] >= 8
    verdicts = {impl: report["passthrough"][impl]["in_use"] for impl in rows}
    assert verdicts[PYLAYERFS] is True and verdicts[LIBFUSE] is False and verdicts[NO_PASSTHROUGH] is False
    # the path API (libfuse's high-level binding) looks up every name a READDIRPLUS answer already gave
    lookups = {impl: workloads["W1 cold"][impl]["requests"][0].get("LOOKUP", 0) for impl in (PYLAYERFS, LIBFUSE)}
    assert lookups[LIBFUSE] >= 550 > lookups[PYLAYERFS], lookups


@pytest.mark.timeout(300)
def test_text_report_has_the_passthrough_column_and_the_requests(tmp_path):
    argv = [sys.executable, "-m", "pylayerfs", "bench", "--quick", "--rounds", "1", "--no-builder",
            "--impl", "pylayerfs", "--impl", "libfuse",
            "--dir", str(tmp_path / "d"), "--save", str(tmp_path / "r.json")]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("implementation"))
    assert header.split()[:3] == ["implementation", "binding", "passthrough"]
    rows = {line.split("  ")[0].strip(): line for line in lines[lines.index(header) + 2 :][:2]}
    assert re.search(r"\snative\s+yes\s", rows[PYLAYERFS]), rows
    assert re.search(r"\slibfuse\s+no\s", rows[LIBFUSE]), rows
    if _kernel_counts_fuse_requests():
        assert any(line.startswith("FUSE requests per workload") for line in lines)
        assert any(re.match(r"\s+W8 round trip\s+pylayerfs\s+[\d,]+ waited [\d.]+ ms: GETATTR", line) for line in lines)
    assert mounts_below(str(tmp_path)) == []
    saved = json.loads((tmp_path / "r.json").read_text())  # --save: the JSON report beside the text one
    assert saved["implementations"] == [PYLAYERFS, LIBFUSE] and saved["passthrough"][PYLAYERFS]["in_use"] is True


def test_save_where_it_cannot_write_is_one_line_before_any_work(tmp_path):
    argv = [sys.executable, "-m", "pylayerfs", "bench", "--quick", "--save", str(tmp_path / "no" / "r.json")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"pylayerfs bench: cannot write the report to {tmp_path}/no/r.json: "
                                          "No such file or directory"]  # fmt: skip


@pytest.mark.timeout(120)
def test_kernel_count_agrees_with_the_native_daemons_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracepoint counts what the daemon serves: the same CREATE, MKDIR, WRITE, UNLINK as its own log; the
    requests' summed waits are within the calls' time."""
    if not _kernel_counts_fuse_requests():
        pytest.skip("this kernel has no fuse_request_send tracepoint")
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work):
        d.mkdir()
    log = tmp_path / "daemon.log"
    monkeypatch.setenv("PYLAYERFS_PASSTHROUGH", "off")  # every write served, so counted by the daemon
    with open_tracer(str(tmp_path)) as tracer:
        assert tracer is not None
        with pylayerfs_mount(str(mnt), [str(lower)], str(upper), str(work), f"binding=native,debug,logfile={log}"):
            tracer.watch(str(mnt))
            started = time.perf_counter()
            os.mkdir(mnt / "d")
            for i in range(20):
                with open(mnt / "d" / f"f{i}", "wb", buffering=0) as f:
                    f.write(b"x" * 100)
                    f.write(b"y" * 100)
            for i in range(5):
                os.unlink(mnt / "d" / f"f{i}")
            elapsed = time.perf_counter() - started
            traced = tracer.take()
    served = _served(log)
    for op, n in (("MKDIR", 1), ("CREATE", 20), ("WRITE", 40), ("UNLINK", 5)):
        assert traced[op] == served[op] == n, (op, traced[op], served[op])
    # Every request here is synchronous: their waits (send to reply) are a part of the calls' time, and no wait is 0.
    assert traced.total() * 1e-6 <= traced.waited_s < elapsed + 0.01, (traced.waited_s, elapsed)


def _served(log: Path) -> dict[str, int]:
    """The native daemon's own count, from the line it logs when the session ends (waited for)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if log.exists() and (m := re.search(r"\d+ requests served \((.*)\)", log.read_text())):
            return {op: int(n) for op, n in (part.rsplit(" ", 1) for part in m.group(1).split(", "))}
        time.sleep(0.05)
    raise AssertionError(f"the daemon logged no count: {log.read_text() if log.exists() else 'no log'}")
