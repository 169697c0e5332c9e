"""Running the benchmark: mount each implementation fresh, run the workloads, alternate the order, report.

Every round mounts every implementation anew (an empty upper and workdir each
time) in a shuffled order, so that a noisy moment of a shared machine does not
fall on one implementation only. The report gives medians, the spread
(max/min over the rounds) and the ratios of pylayerfs to fuse-overlayfs and to
the kernel, next to the targets of the performance issue.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pylayerfs.bench import data, workloads
from pylayerfs.bench.data import Sizes
from pylayerfs.image.drivers import overlay as rootfs
from pylayerfs.image.sizes import human_size

IMPLEMENTATIONS = ("pylayerfs", "fuse-overlayfs", "kernel", "native")
OVERLAYS = IMPLEMENTATIONS[:3]
# Targets of the performance issue: pylayerfs / fuse-overlayfs, medians of the same run.
TARGETS = {
    "W1 cold": 2.5, "W1 warm": 2.5, "W2 cold": 1.0, "W2 warm": 8.0, "W3 cold": 1.5, "W3 warm": 1.3,
    "W4 write": 1.3, "W5 create": 1.0, "W6 copy-up": 1.5, "W7 100 layers": 1.0, "W8 round trip": 1.5,
}  # fmt: skip


class BenchError(Exception):
    pass


@dataclass
class Results:
    sizes: Sizes
    rounds: int
    implementations: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # workload -> impl -> seconds
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, impl: str, timings: Iterator[tuple[str, float]]) -> None:
        for name, seconds in timings:
            self.samples.setdefault(name, {}).setdefault(impl, []).append(seconds)

    def median(self, workload: str, impl: str) -> float | None:
        values = self.samples.get(workload, {}).get(impl)
        return statistics.median(values) if values else None


def available(wanted: list[str]) -> list[str]:
    out = []
    for impl in wanted:
        if impl == "fuse-overlayfs" and shutil.which("fuse-overlayfs") is None:
            print("bench: fuse-overlayfs is not installed (apt-get install fuse-overlayfs): left out", file=sys.stderr)
            continue
        if impl in OVERLAYS and os.geteuid() != 0:
            raise BenchError("mounting needs root")
        out.append(impl)
    return out


@contextlib.contextmanager
def mounted(impl: str, lowers: list[str], scratch: str, timeout: float | None = None) -> Iterator[str]:
    """A fresh mount of ``impl`` over ``lowers`` (an empty upper below ``scratch``); native: the top lower."""
    if impl == "native":
        yield lowers[0]
        return
    upper, work, merged = (os.path.join(scratch, n) for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        os.makedirs(d)
    cwd = None
    if len(":".join(lowers)) > 2048:  # the kernel takes one page of options: name the layers from a cwd
        cwd = os.path.commonpath(lowers)
        lowers = [os.path.relpath(lower, cwd) for lower in lowers]
    opts = rootfs.options(lowers, upper, work)
    if timeout is not None:
        opts += f",timeout={timeout:g}"
    argv = {
        "pylayerfs": [sys.executable, "-m", "pylayerfs", "mount", "-o", opts, merged],
        "fuse-overlayfs": ["fuse-overlayfs", "-o", opts, merged],
        "kernel": ["mount", "-t", "overlay", "overlay", "-o", opts, merged],
    }[impl]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    if result.returncode != 0:
        raise BenchError(f"{impl} did not mount: {result.stderr.strip()}")
    try:
        yield merged
    finally:
        rootfs.unmount(merged)
        _wait_gone(merged)
        shutil.rmtree(scratch, ignore_errors=True)


def _wait_gone(path: str) -> None:
    from pylayerfs.overlay.params import mounts_below

    deadline = time.monotonic() + 10
    while mounts_below(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def _daemon_pid(merged: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().split(b"\0")
            if b"mount" in words and os.fsencode(merged) in words:
                return int(pid)
    raise BenchError(f"no daemon found for {merged}")


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def run(root: str, sizes: Sizes, rounds: int, impls: list[str], progress: Callable[[str], None]) -> Results:
    results = Results(sizes, rounds, impls)
    dataset = os.path.join(root, "data")
    rng = random.Random(0)
    for n in range(rounds):
        progress(f"round {n + 1}/{rounds}: W1-W8")
        order = impls[:]
        rng.shuffle(order)
        for impl in order:
            scratch = tempfile.mkdtemp(dir=root, prefix=f"{impl}-")
            with mounted(impl, [dataset], scratch) as mnt:
                results.add(impl, workloads.w1(mnt))
                results.add(impl, workloads.w2(mnt))
                results.add(impl, workloads.w3(mnt))
                writes = os.path.join(mnt if impl != "native" else scratch, "writes")
                os.makedirs(writes, exist_ok=True)
                results.add(impl, workloads.w4(writes, sizes))
                results.add(impl, workloads.w5(writes, sizes))
                if impl != "native":
                    results.add(impl, workloads.w6(mnt))
            shutil.rmtree(scratch, ignore_errors=True)
            if impl != "native":
                for depth in sizes.depths:
                    lowers = data.depth_layers(root, depth, max(sizes.depths))
                    with mounted(impl, lowers, tempfile.mkdtemp(dir=root)) as mnt:
                        results.add(impl, workloads.w7(mnt, sizes, depth))
            timeout = 0.0 if impl in ("pylayerfs", "fuse-overlayfs") else None
            with mounted(impl, [dataset], tempfile.mkdtemp(dir=root), timeout) as mnt:
                results.add(impl, workloads.w8(mnt, sizes))
    if "pylayerfs" in impls:
        progress("M1: the daemon's memory")
        results.extra["M1"] = memory(root, sizes)
    return results


def memory(root: str, sizes: Sizes) -> dict[str, Any]:
    """The daemon's RSS after walking a tree of many files, five times (it must not keep growing)."""
    with mounted("pylayerfs", [os.path.join(root, "data")], tempfile.mkdtemp(dir=root)) as mnt:
        pid = _daemon_pid(mnt)
        rss = []
        for _ in range(5):
            workloads.walk(f"{mnt}/many")
            rss.append(_status(pid, "VmRSS"))
        return {"files": sizes.many, "rss_after_each_walk": rss, "peak_rss": _status(pid, "VmHWM")}


def _mib(n: int) -> str:
    return f"{n} MiB"


def legend(sizes: Sizes) -> list[str]:
    """One line per workload (W1-W8, M1, B1): what it measures, with this data set's sizes."""
    from pylayerfs.bench.builder import STEPS

    chunk = _mib(workloads.CHUNK >> 20)
    entries = sizes.tree_dirs * (sizes.tree_files + 1)
    layers = ", ".join(str(d) for d in sizes.depths)
    return [
        f"W1  scandir + lstat of every entry of a tree of {entries:,} entries ({sizes.tree_dirs:,} directories); "
        "cold: the first walk after the mount, warm: the second",
        f"W2  os.listdir of one directory of {sizes.wide:,} entries, cold then warm",
        f"W3  read a lower file of {_mib(sizes.big_mib)} sequentially in {chunk} reads, cold then warm",
        f"W4  write a new {_mib(sizes.write_mib)} file in {chunk} writes",
        f"W5  create, write 1 KiB into and close {sizes.create_files:,} new files",
        f"W6  copy-up: open a lower file of {_mib(sizes.low_mib)} for append and write one byte",
        f"W7  lstat {10 * sizes.depth_files:,} files that only the bottom layer holds, under {layers} lower layers "
        "whose directories all merge",
        f"W8  {sizes.round_trips:,} fstat calls on an open file with caching off (timeout=0): one request's cost",
        f"M1  the daemon's resident memory after walking {sizes.many:,} files, five times",
        f"B1  a cached rebuild of a {STEPS}-step Dockerfile; ps -a -s with a stopped container of "
        f"{sizes.many // 2:,} files (whole commands, start-up included)",
    ]


def report(results: Results) -> str:
    impls = results.implementations
    header = ["workload", *impls]
    ratio_to = [i for i in ("fuse-overlayfs", "kernel") if i in impls and "pylayerfs" in impls]
    header += [f"x {i}" for i in ratio_to] + ["target", "spread"]
    rows = []
    for workload in results.samples:
        row = [workload]
        for impl in impls:
            m = results.median(workload, impl)
            row.append("-" if m is None else f"{m * 1000:.1f}")
        p = results.median(workload, "pylayerfs")
        for other in ratio_to:
            o = results.median(workload, other)
            row.append("-" if p is None or not o else f"{p / o:.2f}")
        target = TARGETS.get(workload)
        ratio = p / o if p and "fuse-overlayfs" in impls and (o := results.median(workload, "fuse-overlayfs")) else None
        verdict = "" if target is None or ratio is None else f"≤{target:g} {'ok' if ratio <= target else 'MISS'}"
        values = results.samples[workload].get("pylayerfs") or []
        row += [verdict, f"{max(values) / min(values):.1f}" if values and min(values) > 0 else "-"]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"medians of {results.rounds} rounds, in ms; x: pylayerfs / the other (lower is better); "
                 "spread: pylayerfs's max/min over the rounds")  # fmt: skip
    m1 = results.extra.get("M1")
    if m1:
        rss = ", ".join(human_size(r) for r in m1["rss_after_each_walk"])
        lines.append(f"M1: after walking {m1['files']} files five times, the daemon's RSS was {rss}; "
                     f"peak {human_size(m1['peak_rss'])} (target ≤ 200MB, flat)")  # fmt: skip
    b1 = results.extra.get("B1")
    if b1:
        lines.append(f"B1: cached rebuild of a {b1['steps']}-step Dockerfile {b1['rebuild_s']:.2f} s (target < 1 s)")
        lines.append(f"B1: ps -s of a stopped container with {b1['files']} files {b1['ps_s']:.2f} s (target < 1 s)")
    measured = {name.split()[0] for name in results.samples} | set(results.extra)
    lines += ["", *(line for line in legend(results.sizes) if line.split()[0] in measured)]
    return "\n".join(lines)


def as_json(results: Results) -> str:
    out: dict[str, Any] = {"rounds": results.rounds, "implementations": results.implementations, "workloads": {}}
    for workload, by_impl in results.samples.items():
        out["workloads"][workload] = {
            impl: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "samples_s": v}
            for impl, v in by_impl.items()
        }
        if "pylayerfs" in by_impl:
            for other in ("fuse-overlayfs", "kernel"):
                if other in by_impl:
                    ratio = statistics.median(by_impl["pylayerfs"]) / max(statistics.median(by_impl[other]), 1e-9)
                    out["workloads"][workload][f"ratio_to_{other}"] = round(ratio, 3)
    out.update(results.extra)
    return json.dumps(out, indent=2)
