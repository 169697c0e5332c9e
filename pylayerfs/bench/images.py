"""``pylayerfs bench --images``: images in and out (save, load, pull, push) against ``skopeo copy``, same endpoints.

One image is made for the run: a docker-archive (``manifest.json``, the config, one ``layer.tar``) whose layer holds
many small files and a few big ones of random bytes (what compresses badly, as binaries do). Each operation runs
the pylayerfs command line and ``skopeo copy`` between the same kinds of endpoints, in alternating order, every
round on fresh targets (a new store, directory or registry), and the report gives medians, the speed ratio
(skopeo's time / pylayerfs's: 1.0 is as fast, the target is >= 0.8) and each command's peak RSS (``wait4``'s
``ru_maxrss``):

* ``load``: ``pylayerfs load -i ARCHIVE`` / ``skopeo copy docker-archive:ARCHIVE dir:D``; before ``load`` exists,
  ``import`` of the layer tar stands in (``import`` is also measured on its own: the layer path alone);
* ``save``: ``pylayerfs save -o F IMAGE`` / ``skopeo copy dir:D docker-archive:F``;
* ``pull``: ``pylayerfs pull --insecure HOST/REPO`` / ``skopeo copy docker://HOST/REPO dir:D``, from a local
  ``docker-registry`` filled once by skopeo;
* ``push``: ``pylayerfs push --insecure HOST/REPO`` / ``skopeo copy dir:D docker://HOST/REPO``, each into a fresh
  registry (no blob there yet: nothing skipped).

skopeo's ``dir:`` keeps blobs as files; a pylayerfs store extracts every layer (and keeps its tar as a split), so
``load`` and ``pull`` do more work than their skopeo row: the report says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pylayerfs.bench.registry import REGISTRY, RegistryUnavailable, private_registry
from pylayerfs.image.sizes import human_size

SKOPEO = "skopeo"
TARGET = 0.8  # issue 15: at least 80% of skopeo's speed
IMAGE = "bench/image:latest"


@dataclass
class Samples:
    """One operation's rounds: seconds and peak RSS (bytes) of each command, by tool."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {"pylayerfs": [], "skopeo": []})
    rss: dict[str, list[int]] = field(default_factory=lambda: {"pylayerfs": [], "skopeo": []})


@dataclass
class ImagesResult:
    layer_bytes: int
    files: int
    rounds: int
    ops: dict[str, Samples] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class ImagesBenchError(Exception):
    """The images bench cannot run (a tool missing, a command failing): one line."""


def make_image(directory: str, layer_bytes: int, seed: int = 15) -> tuple[str, str, int]:
    """Write a one-layer docker-archive under ``directory``; its path, the layer tar's path and its file count.

    The layer: a tenth of ``layer_bytes`` in 16-64 KiB files, the rest in 32 MiB files, random bytes (seeded).
    """
    rng = random.Random(seed)
    layer = os.path.join(directory, "layer.tar")
    count = 0
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        written = 0
        while written < layer_bytes:
            size = rng.randint(16, 64) << 10 if written < layer_bytes // 10 else min(32 << 20, layer_bytes - written)
            info = tarfile.TarInfo(f"data/{count // 500:03d}/f{count:06d}")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
            written += size
            count += 1
    with open(layer, "rb") as f:
        diff_id = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    created = "2026-12-07T00:00:00Z"
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]}, "created": created,
                         "history": [{"created": created}], "rootfs": {"type": "layers", "diff_ids": [diff_id]}},
                        separators=(",", ":")).encode()  # fmt: skip
    config_hex = hashlib.sha256(config).hexdigest()
    archive = os.path.join(directory, "image.tar")
    with tarfile.open(archive, "w") as out:
        out.add(layer, f"{diff_id[7:]}/layer.tar")
        manifest = [{"Config": f"{config_hex}.json", "RepoTags": [IMAGE], "Layers": [f"{diff_id[7:]}/layer.tar"]}]
        for name, data in ((f"{config_hex}.json", config), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return archive, layer, count


# Runs argv[2:], writes "<seconds> <peak RSS KiB>" to argv[1], exits with its status. A command started straight
# from the bench would report the bench's own RSS as its peak (exec keeps the high-water mark of the memory it
# replaces: the bench's, after a vfork), so a small process forks it, as /usr/bin/time does.
_WRAPPER = """import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(argv: list[str], log: str) -> tuple[float, int]:
    """Run ``argv``; its wall time (s) and peak RSS (bytes). Raises ImagesBenchError when it fails."""
    measured = log + ".measured"
    with open(log, "wb") as err:
        done = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, measured, *argv], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err, check=False)  # fmt: skip
    if done.returncode != 0:
        with open(log, errors="replace") as f:
            raise ImagesBenchError(f"{' '.join(argv)} failed ({done.returncode}): {f.read().strip()[-500:]}")
    with open(measured) as f:
        seconds, kib = f.read().split()
    return float(seconds), int(kib) * 1024


def _measure(samples: Samples, ours: Callable[[], list[str]], theirs: Callable[[], list[str]], turn: int,
             log: str) -> None:  # fmt: skip
    """One round of an operation: pylayerfs's command and skopeo's, first one then the other by ``turn``."""
    order = [("pylayerfs", ours), ("skopeo", theirs)]
    for tool, argv in order if turn % 2 == 0 else reversed(order):
        seconds, rss = _run(argv(), log)
        samples.seconds[tool].append(seconds)
        samples.rss[tool].append(rss)


@contextlib.contextmanager
def registry(directory: str) -> Iterator[str]:
    """A ``docker-registry`` on 127.0.0.1 storing under ``directory``; yields ``127.0.0.1:PORT``; stopped after.

    Raises ImagesBenchError when it cannot start.
    """
    try:
        with private_registry(directory) as running:
            yield running.host
    except RegistryUnavailable as exc:
        raise ImagesBenchError(str(exc)) from exc


def commands() -> set[str]:
    """The image transfer commands this pylayerfs has (``save``, ``load``, ``pull``, ``push``), from its usage line."""
    usage = subprocess.run([sys.executable, "-m", "pylayerfs", "--help"], capture_output=True, text=True, check=False)
    listed = usage.stdout.partition("{")[2].partition("}")[0].split(",")
    return {"save", "load", "pull", "push"} & set(listed)


def run(root: str, layer_bytes: int, rounds: int, progress: Callable[[str], None]) -> ImagesResult:
    """Measure every operation ``rounds`` times under the directory ``root``; raises ImagesBenchError."""
    for tool in (SKOPEO, REGISTRY):
        if shutil.which(tool) is None:
            raise ImagesBenchError(f"{tool} is missing (apt-get install skopeo docker-registry)")
    have = commands()
    progress(f"images: making a {human_size(layer_bytes)} image")
    archive, layer, files = make_image(root, layer_bytes)
    result = ImagesResult(os.path.getsize(layer), files, rounds)
    scratch = tempfile.mkdtemp(prefix="images-", dir=root)
    log = os.path.join(scratch, "stderr")
    names = iter(range(1 << 30))

    def fresh(kind: str) -> str:
        """A new path in the scratch directory: every round writes to new targets."""
        return os.path.join(scratch, f"{kind}-{next(names)}")

    def py(*argv: str, store: str = "") -> list[str]:
        return [sys.executable, "-m", "pylayerfs", "--root", store or fresh("store"), *argv]

    def skopeo(src: str, dest: str) -> list[str]:
        return [SKOPEO, "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", src, dest]

    # the sources: a store holding the image, a dir: copy of it, a registry holding it
    store = fresh("source")
    _run(py("load", "-i", archive, store=store) if "load" in have else py("import", layer, IMAGE, store=store), log)
    source = fresh("source")
    _run(skopeo(f"docker-archive:{archive}", f"dir:{source}"), log)
    served = fresh("source")
    with registry(served) as host:
        _run(skopeo(f"dir:{source}", f"docker://{host}/{IMAGE}"), log)
        for turn in range(rounds):
            progress(f"images: round {turn + 1}/{rounds}")
            ops: dict[str, tuple[Callable[[], list[str]], Callable[[], list[str]]]] = {
                "import": (lambda: py("import", layer, IMAGE),
                           lambda: skopeo(f"docker-archive:{archive}", f"dir:{fresh('dir')}")),
                "load": (lambda: py("load", "-i", archive),
                         lambda: skopeo(f"docker-archive:{archive}", f"dir:{fresh('dir')}")),
                "save": (lambda: py("save", "-o", fresh("saved"), IMAGE, store=store),
                         lambda: skopeo(f"dir:{source}", f"docker-archive:{fresh('saved')}:{IMAGE}")),
                "pull": (lambda: py("pull", "--insecure", f"{host}/{IMAGE}"),
                         lambda: skopeo(f"docker://{host}/{IMAGE}", f"dir:{fresh('dir')}")),
            }  # fmt: skip
            for op, (ours, theirs) in ops.items():
                if op == "import" or op in have:
                    _measure(result.ops.setdefault(op, Samples()), ours, theirs, turn, log)
            if "push" in have:
                with registry(fresh("registry")) as empty:  # nothing there yet; a repository for each tool
                    _run(py("tag", IMAGE, f"{empty}/{IMAGE}", store=store), log)  # push sends a tagged image
                    _measure(result.ops.setdefault("push", Samples()),
                             lambda: py("push", "--insecure", f"{empty}/{IMAGE}", store=store),
                             lambda: skopeo(f"dir:{source}", f"docker://{empty}/other/image:latest"),
                             turn, log)  # fmt: skip
            for name in os.listdir(scratch):  # the targets are not read again: keep the tmpfs small
                if name.startswith(("store-", "dir-", "saved-", "registry-")):
                    path = os.path.join(scratch, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    missing = sorted({"save", "load", "pull", "push"} - have)
    if missing:
        result.notes.append(f"not in this pylayerfs yet, not measured: {', '.join(missing)}")
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(result: ImagesResult) -> str:
    """The text report: per operation the medians, the speed ratio to skopeo, throughput and peak RSS."""
    mib = result.layer_bytes / (1 << 20)
    lines = [f"images: one layer of {human_size(result.layer_bytes)} in {result.files} files, "
             f"{result.rounds} round(s); ratio = skopeo's time / pylayerfs's (target >= {TARGET})",
             f"{'op':8} {'pylayerfs s':>12} {'skopeo s':>9} {'ratio':>6} {'MiB/s':>7} {'peak RSS':>9} "
             f"{'skopeo RSS':>10}  spread"]  # fmt: skip
    for op, s in result.ops.items():
        ours, theirs = _median(s.seconds["pylayerfs"]), _median(s.seconds["skopeo"])
        spread = max(s.seconds["pylayerfs"]) / min(s.seconds["pylayerfs"])
        ok = "" if theirs / ours >= TARGET else "  below target"
        lines.append(f"{op:8} {ours:12.2f} {theirs:9.2f} {theirs / ours:6.2f} {mib / ours:7.0f} "
                     f"{human_size(max(s.rss['pylayerfs'])):>9} {human_size(max(s.rss['skopeo'])):>10}  "
                     f"x{spread:.2f}{ok}")  # fmt: skip
    lines.append(
        "import: pylayerfs import LAYER.tar (extract, split) vs skopeo copy docker-archive: dir: (blobs "
        "copied, not extracted)"
    )
    lines.extend(result.notes)
    return "\n".join(lines)


def as_json(result: ImagesResult) -> dict[str, Any]:
    return {"layer_bytes": result.layer_bytes, "files": result.files, "rounds": result.rounds, "notes": result.notes,
            "ops": {op: {"seconds": s.seconds, "peak_rss": s.rss} for op, s in result.ops.items()}}  # fmt: skip
