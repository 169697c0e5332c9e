"""Running the benchmark: mount each implementation fresh, run the workloads, alternate the order, report.

The rows: ``pylayerfs`` (the native transport, passthrough where the kernel
allows it), ``pylayerfs (libfuse)`` (the same engine behind mfusepy),
``pylayerfs (native, no passthrough)``, fuse-overlayfs, the kernel's overlayfs
and the bare directory. Every round mounts every implementation anew (an empty
upper and workdir each time) in a shuffled order, so that a noisy moment of a
shared machine does not fall on one implementation only.

For the FUSE rows the kernel counts the requests each workload sends
(:mod:`pylayerfs.bench.trace`), which says why a number is what it is, and
whether passthrough was in use (a write passed through sends no WRITE request).
The report gives medians, the spread (max/min over the rounds), the ratios to
fuse-overlayfs and the kernel, the targets of issue 13, the requests per
workload and the warnings the pylayerfs daemons logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
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
from pylayerfs.bench.trace import Counts, Tracer, open_tracer
from pylayerfs.image.drivers import overlay as rootfs
from pylayerfs.image.sizes import human_size

PYLAYERFS = "pylayerfs"  # the default: the native transport, passthrough where the kernel allows it
LIBFUSE = "pylayerfs (libfuse)"  # the same engine behind mfusepy and libfuse's high-level path API
NO_PASSTHROUGH = "pylayerfs (native, no passthrough)"  # every read and write served by the daemon
FUSE_OVERLAYFS = "fuse-overlayfs"
KERNEL = "kernel"
BARE = "bare"  # the data set's directory itself: no layer at all
IMPLEMENTATIONS = (PYLAYERFS, LIBFUSE, NO_PASSTHROUGH, FUSE_OVERLAYFS, KERNEL, BARE)
PYLAYERFS_ROWS = IMPLEMENTATIONS[:3]
FUSE_ROWS = IMPLEMENTATIONS[:4]  # the rows whose requests the kernel can count
OVERLAYS = IMPLEMENTATIONS[:5]
# --impl's names (no spaces) for the rows
CHOICES = {"pylayerfs": PYLAYERFS, "libfuse": LIBFUSE, "no-passthrough": NO_PASSTHROUGH,
           "fuse-overlayfs": FUSE_OVERLAYFS, "kernel": KERNEL, "bare": BARE}  # fmt: skip
BINDING = {PYLAYERFS: "native", LIBFUSE: "libfuse", NO_PASSTHROUGH: "native", FUSE_OVERLAYFS: "libfuse 3 (C)",
           KERNEL: "in-kernel", BARE: "-"}  # fmt: skip
# Targets of issue 13 (the native transport): pylayerfs / fuse-overlayfs, medians of the same run.
TARGETS = {
    "W1 cold": 1.0, "W1 warm": 1.0, "W2 cold": 1.0, "W2 warm": 1.0, "W3 cold": 0.5, "W3 warm": 1.0,
    "W4 write": 0.5, "W5 create": 1.0, "W6 copy-up": 1.0, "W7 100 layers": 0.5, "W8 round trip": 1.3,
}  # fmt: skip
M1_TARGET = 150 * 1000 * 1000


class BenchError(Exception):
    pass


@dataclass
class Results:
    sizes: Sizes
    rounds: int
    implementations: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # workload -> impl -> seconds
    requests: dict[str, dict[str, list[Counts]]] = field(default_factory=dict)  # workload -> impl -> per round
    counted: bool = False  # whether the kernel counted the FUSE requests (see pylayerfs.bench.trace)
    daemon_log: dict[str, list[str]] = field(default_factory=dict)  # impl -> the warnings its daemons logged
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, impl: str, timings: Iterator[tuple[str, float]], tracer: Tracer | None = None) -> None:
        """Run the workloads of ``timings`` and keep their times (and, with ``tracer``, their requests)."""
        if tracer is not None:
            tracer.take()  # what the set-up cost (mkdir...) is no workload's
        for name, seconds in timings:
            self.samples.setdefault(name, {}).setdefault(impl, []).append(seconds)
            if tracer is not None:
                self.requests.setdefault(name, {}).setdefault(impl, []).append(tracer.take())

    def median(self, workload: str, impl: str) -> float | None:
        values = self.samples.get(workload, {}).get(impl)
        return statistics.median(values) if values else None

    def ratio(self, workload: str, impl: str, other: str) -> float | None:
        """``impl``'s median over ``other``'s for ``workload`` (None when either is missing)."""
        mine, theirs = self.median(workload, impl), self.median(workload, other)
        return mine / theirs if mine is not None and theirs else None

    def requests_median(self, workload: str, impl: str) -> Counts | None:
        """The requests of the round whose total is the median (None when they were not counted)."""
        rounds = self.requests.get(workload, {}).get(impl)
        if not rounds:
            return None
        return sorted(rounds, key=lambda c: c.total())[len(rounds) // 2]

    def passthrough(self, impl: str) -> tuple[str, str]:
        """Whether ``impl`` passed reads and writes through to the real files: (yes/no/?/-, the evidence).

        The evidence is the kernel's: a write passed through never reaches the daemon, so W4's new file
        written with no WRITE request at all was written by passthrough. Without counts: "?" (unless the
        daemon logged that the kernel refused backing files).
        """
        if impl not in FUSE_ROWS:
            return "-", "not FUSE"
        refused = [line for line in self.daemon_log.get(impl, []) if "passthrough is off" in line]
        w4 = self.requests_median("W4 write", impl)
        if w4 is None:
            return ("no", refused[0]) if refused else ("?", "requests not counted")
        writes = w4["WRITE"]
        evidence = f"W4 ({self.sizes.write_mib} MiB written): {writes:,} WRITE requests"
        if refused:
            evidence += f"; the daemon: {refused[0]}"
        return ("yes" if writes == 0 else "no"), evidence


def available(wanted: list[str]) -> list[str]:
    out = []
    for impl in wanted:
        if impl == FUSE_OVERLAYFS and shutil.which("fuse-overlayfs") is None:
            print("bench: fuse-overlayfs is not installed (apt-get install fuse-overlayfs): left out", file=sys.stderr)
            continue
        if impl in OVERLAYS and os.geteuid() != 0:
            raise BenchError("mounting needs root")
        out.append(impl)
    return out


def _slug(impl: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in impl).strip("-")


@contextlib.contextmanager
def mounted(impl: str, lowers: list[str], scratch: str, timeout: float | None = None,
            log: str | None = None) -> Iterator[str]:  # fmt: skip
    """A fresh mount of ``impl`` over ``lowers`` (an empty upper below ``scratch``); bare: the top lower.

    A pylayerfs daemon logs its warnings to ``log`` (when given). Raises BenchError when the mount fails.
    """
    if impl == BARE:
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
    env = None
    if impl in PYLAYERFS_ROWS:
        opts += f",binding={'libfuse' if impl == LIBFUSE else 'native'}" + (f",logfile={log}" if log else "")
        env = dict(os.environ, PYLAYERFS_PASSTHROUGH="off" if impl == NO_PASSTHROUGH else "on")
    argv = {
        FUSE_OVERLAYFS: ["fuse-overlayfs", "-o", opts, merged],
        KERNEL: ["mount", "-t", "overlay", "overlay", "-o", opts, merged],
    }.get(impl, [sys.executable, "-m", "pylayerfs", "mount", "-o", opts, merged])
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd, env=env)
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


class _Session:
    """One implementation's mounts in one round: the tracer pointed at each, the daemon's log kept."""

    def __init__(self, results: Results, impl: str, root: str, tracer: Tracer | None) -> None:
        self.results, self.impl, self.root, self.tracer = results, impl, root, tracer
        self.log = os.path.join(root, "logs", f"{_slug(impl)}.log") if impl in PYLAYERFS_ROWS else None

    @contextlib.contextmanager
    def mount(self, lowers: list[str], timeout: float | None = None) -> Iterator[str]:
        scratch = tempfile.mkdtemp(dir=self.root, prefix=f"{_slug(self.impl)}-")
        with mounted(self.impl, lowers, scratch, timeout, self.log) as mnt:
            tracer = self.tracer if self.impl in FUSE_ROWS else None
            if tracer is not None:
                tracer.watch(mnt)
            try:
                yield mnt
            finally:
                if tracer is not None:
                    tracer.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    def add(self, timings: Iterator[tuple[str, float]]) -> None:
        self.results.add(self.impl, timings, self.tracer if self.impl in FUSE_ROWS else None)

    def keep_log(self) -> None:
        """Keep the warnings the daemons logged (once each, without the process id)."""
        if self.log is None or not os.path.exists(self.log):
            return
        kept = self.results.daemon_log.get(self.impl, [])
        with open(self.log, errors="replace") as f:
            for line in f:
                text = re.sub(r"^pylayerfs\[\d+\]: ", "", line.rstrip())
                if text and text not in kept:
                    kept.append(text)
        if kept:
            self.results.daemon_log[self.impl] = kept
        os.unlink(self.log)


def run(root: str, sizes: Sizes, rounds: int, impls: list[str], progress: Callable[[str], None]) -> Results:
    """Every workload, ``rounds`` times, on every implementation of ``impls``, over the data set below ``root``."""
    results = Results(sizes, rounds, impls)
    dataset = os.path.join(root, "data")
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    rng = random.Random(0)
    with open_tracer(root) as tracer:
        results.counted = tracer is not None
        if tracer is None and any(impl in FUSE_ROWS for impl in impls):
            progress("the kernel cannot count FUSE requests here (no fuse tracepoint or tracefs): times only")
        for n in range(rounds):
            progress(f"round {n + 1}/{rounds}: W1-W8")
            order = impls[:]
            rng.shuffle(order)
            for impl in order:
                one = _Session(results, impl, root, tracer)
                writes = os.path.join(root, f"bare-writes-{n}")
                with one.mount([dataset]) as mnt:
                    one.add(workloads.w1(mnt))
                    one.add(workloads.w2(mnt))
                    one.add(workloads.w3(mnt))
                    if impl != BARE:
                        writes = os.path.join(mnt, "writes")
                    os.makedirs(writes, exist_ok=True)
                    one.add(workloads.w4(writes, sizes))
                    one.add(workloads.w5(writes, sizes))
                    if impl != BARE:
                        one.add(workloads.w6(mnt))
                shutil.rmtree(os.path.join(root, f"bare-writes-{n}"), ignore_errors=True)
                if impl != BARE:
                    for depth in sizes.depths:
                        with one.mount(data.depth_layers(root, depth, max(sizes.depths))) as mnt:
                            one.add(workloads.w7(mnt, sizes, depth))
                timeout = 0.0 if impl in FUSE_ROWS else None  # the kernel caches nothing: requests reach the daemon
                if impl != BARE:
                    with one.mount([dataset], timeout) as mnt:
                        workloads.walk(f"{mnt}/tree")  # the kernel learns the tree (its requests are no workload's)
                        one.add(workloads.w6_walk(mnt))
                with one.mount([dataset], timeout) as mnt:
                    one.add(workloads.w8(mnt, sizes))
                one.keep_log()
    if PYLAYERFS in impls:
        progress("M1: the daemon's memory")
        results.extra["M1"] = memory(root, sizes)
    return results


def memory(root: str, sizes: Sizes) -> dict[str, Any]:
    """The daemon's RSS after walking a tree of many files, five times (it must not keep growing)."""
    with mounted(PYLAYERFS, [os.path.join(root, "data")], tempfile.mkdtemp(dir=root)) as mnt:
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
        f"W6  copy-up: open a lower file of {_mib(sizes.low_mib)} for append and write one byte; "
        f"walk alone / during copy-up: W1's walk with caching off (timeout=0), alone, then started "
        f"{workloads.W6_WALK_DELAY * 1000:g} ms after W6's open in another thread (does a copy-up stall the mount?); "
        "copy-up during walk: that W6's time; longest wait: the longest time between two entries of the walk",
        f"W7  lstat {10 * sizes.depth_files:,} files that only the bottom layer holds, under {layers} lower layers "
        "whose directories all merge",
        f"W8  {sizes.round_trips:,} fstat calls on an open file with caching off (timeout=0): one request's cost",
        f"M1  the daemon's resident memory after walking {sizes.many:,} files, five times",
        f"B1  a cached rebuild of a {STEPS}-step Dockerfile; ps -a -s with a stopped container of "
        f"{sizes.many // 2:,} files (whole commands, start-up included)",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns aligned: the first to the left, the others to the right; a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return [line.rstrip() for line in lines]


def report(results: Results) -> str:
    """The text report: times and ratios, the implementations (passthrough), requests, M1, B1, the legend."""
    impls = results.implementations
    others = [i for i in (FUSE_OVERLAYFS, KERNEL) if i in impls]
    rows = []
    for workload in results.samples:
        row = [workload]
        for impl in impls:
            m = results.median(workload, impl)
            ratio = results.ratio(workload, impl, FUSE_OVERLAYFS) if impl in PYLAYERFS_ROWS else None
            row.append("-" if m is None else f"{m * 1000:.1f}" + ("" if ratio is None else f" ({ratio:.2f})"))
        if PYLAYERFS in impls:
            to_kernel = results.ratio(workload, PYLAYERFS, KERNEL)
            row.append("-" if to_kernel is None else f"{to_kernel:.2f}")
        target, ratio = TARGETS.get(workload), results.ratio(workload, PYLAYERFS, FUSE_OVERLAYFS)
        row.append("" if target is None or ratio is None else f"≤{target:g} {'ok' if ratio <= target else 'MISS'}")
        values = results.samples[workload].get(PYLAYERFS) or []
        row.append(f"{max(values) / min(values):.1f}" if values and min(values) > 0 else "-")
        rows.append(row)
    header = ["workload", *impls, *([f"{PYLAYERFS} x {KERNEL}"] if PYLAYERFS in impls else []), "target", "spread"]
    lines = _table(header, rows)
    lines.append("")
    lines.append(f"medians of {results.rounds} rounds, in ms; (x): the pylayerfs row / fuse-overlayfs (lower is "
                 f"better); target: issue 13's for {PYLAYERFS} / {FUSE_OVERLAYFS}; spread: {PYLAYERFS}'s max/min "
                 "over the rounds")  # fmt: skip
    if others != [FUSE_OVERLAYFS, KERNEL]:
        lines.append(f"(not measured: {', '.join(sorted({FUSE_OVERLAYFS, KERNEL} - set(others)))})")
    fuse = [i for i in impls if i in FUSE_ROWS]
    if fuse:
        lines += ["", *_table(["implementation", "binding", "passthrough", "how we know"],
                              [[i, BINDING[i], *results.passthrough(i)] for i in fuse])]  # fmt: skip
        lines += ["", *_requests(results, fuse)]
    m1 = results.extra.get("M1")
    if m1:
        rss = ", ".join(human_size(r) for r in m1["rss_after_each_walk"])
        lines.append(f"M1: after walking {m1['files']} files five times, the daemon's RSS was {rss}; "
                     f"peak {human_size(m1['peak_rss'])} (target ≤ {human_size(M1_TARGET)}, flat)")  # fmt: skip
    b1 = results.extra.get("B1")
    if b1:
        lines.append(f"B1: cached rebuild of a {b1['steps']}-step Dockerfile {b1['rebuild_s']:.2f} s (target < 1 s)")
        lines.append(f"B1: ps -s of a stopped container with {b1['files']} files {b1['ps_s']:.2f} s (target < 1 s)")
    for impl, logged in results.daemon_log.items():
        lines += ["", f"the {impl} daemons logged:", *(f"  {line}" for line in logged[:10])]
        if len(logged) > 10:
            lines.append(f"  ... and {len(logged) - 10} more lines")
    measured = {name.split()[0] for name in results.samples} | set(results.extra)
    lines += ["", *(line for line in legend(results.sizes) if line.split()[0] in measured)]
    return "\n".join(lines)


def _requests(results: Results, fuse: list[str]) -> list[str]:
    """The requests table (totals per workload and FUSE row) and the kinds behind each total."""
    if not results.counted:
        return ["requests: not counted (the kernel's fuse tracepoint needs root, tracefs and Linux 6.15 or later)"]
    rows, kinds = [], []
    for workload in results.samples:
        row = [workload]
        for impl in fuse:
            counts = results.requests_median(workload, impl)
            row.append("-" if counts is None else f"{'≥' if counts.lost else ''}{counts.total():,}")
        rows.append(row)
        for impl in fuse:
            counts = results.requests_median(workload, impl)
            if counts:
                kinds.append(f"  {workload:<37} {impl:<35} {counts.summary()}")
    lines = ["FUSE requests per workload (the kernel's count, the median round):", *_table(["workload", *fuse], rows)]
    return [*lines, "", "by kind, and the requests' summed waits (send to reply, from the kernel):", *kinds, ""]


def as_json(results: Results) -> str:
    """Every sample, median, ratio and request count, the passthrough verdicts, M1 and B1, as JSON."""
    out: dict[str, Any] = {"rounds": results.rounds, "implementations": results.implementations, "workloads": {},
                           "requests_counted": results.counted}  # fmt: skip
    for workload, by_impl in results.samples.items():
        entry: dict[str, Any] = {}
        for impl, v in by_impl.items():
            entry[impl] = {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "samples_s": v}
            if impl in PYLAYERFS_ROWS:
                for other in (FUSE_OVERLAYFS, KERNEL):
                    ratio = results.ratio(workload, impl, other)
                    if ratio is not None:
                        entry[impl][f"ratio_to_{other}"] = round(ratio, 3)
            rounds = results.requests.get(workload, {}).get(impl)
            if rounds:
                entry[impl]["requests"] = [dict(c.most_common()) for c in rounds]
                entry[impl]["requests_lost"] = any(c.lost for c in rounds)
                entry[impl]["waited_s"] = [round(c.waited_s, 6) for c in rounds]
        for other in (FUSE_OVERLAYFS, KERNEL):  # the default row's ratios, at the workload's level too
            ratio = results.ratio(workload, PYLAYERFS, other)
            if ratio is not None:
                entry[f"ratio_to_{other}"] = round(ratio, 3)
        if workload in TARGETS:
            entry["target"] = TARGETS[workload]
        out["workloads"][workload] = entry
    out["passthrough"] = {}
    for impl in results.implementations:
        if impl in FUSE_ROWS:
            verdict, evidence = results.passthrough(impl)
            out["passthrough"][impl] = {"in_use": {"yes": True, "no": False}.get(verdict), "evidence": evidence}
    out["daemon_log"] = results.daemon_log
    out.update(results.extra)
    return json.dumps(out, indent=2)
