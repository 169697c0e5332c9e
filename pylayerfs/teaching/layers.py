"""``pylayerfs layers``: each layer of an image, what it added, modified and removed, and the waste.

Layers are applied bottom-up to a running view of the image, the way a
runtime unpacks them: a whiteout removes the name (and a directory with all
below it), an opaque directory hides what the layers below put in it, a file
is Added where the view had nothing and Modified where it had something.

Efficiency follows dive (``filetree/efficiency.go``): for every path, the sum
of its sizes over all layers that hold it (a whiteout counts 0, or the size
of the directory tree it deletes) and the smallest of those sizes; the score
is Σ smallest / Σ sums. dive's *wasted bytes* sums every copy of a path seen
in two or more layers, the copy the image keeps included (dive issue #684);
pylayerfs reports that number as dive does, labelled, and its own: the bytes
lower layers hold that no one can see in the image (overwritten or deleted).

Sizes are dive's too (``image/docker/image_archive.go`` reads them from the layer tars): a layer's size is the sum of
its tar entries' sizes, so a regular file counts its bytes once per layer however many names link to it (the later
names are link entries of size 0), and a symlink counts 0; Docker's layer size (``docker history``) counts a
symlink's target length. ``sizeBytes``, ``userSizeBytes`` (the layers above the first), the efficiency and the
wasted bytes are the figures ``dive --ci --source docker-archive`` prints for a ``pylayerfs save`` of the image.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from pylayerfs.image.archive import walk
from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store
from pylayerfs.overlay.markers import is_metacopy_file, is_opaque_dir, is_whiteout

DIR = -1


@dataclass
class Change:
    path: str
    change: str  # added, modified, removed
    size: int


@dataclass
class LayerReport:
    index: int
    id: str  # ChainID
    digestId: str  # DiffID
    sizeBytes: int
    command: str
    fileList: list[Change] = field(default_factory=list)


@dataclass
class ImageReport:
    sizeBytes: int
    inefficientBytes: int
    unseenBytes: int
    userSizeBytes: int
    efficiencyScore: float
    fileReference: list[dict[str, Any]]


def analyse(store: Store, ref: str) -> tuple[list[LayerReport], ImageReport]:
    image = store.resolve(ref)
    steps = [h.get("created_by", "") for h in image.history if not h.get("empty_layer")]
    layers = list(reversed(store.layers_of(image)))  # bottom first
    view: dict[str, int] = {}  # path -> size, or DIR
    cumulative: dict[str, int] = {}
    smallest: dict[str, int] = {}
    counts: dict[str, int] = {}
    stored = 0  # bytes of files in all layers
    reports = []
    for index, layer in enumerate(layers):
        command = steps[index] if len(steps) == len(layers) else ""
        report = LayerReport(index, layer.chain_id, layer.diff_id, 0, command.removeprefix("/bin/sh -c "))
        diff = store.layers.diff_dir(layer.cache_id)
        linked: set[int] = set()  # inodes whose data this layer's tar holds already (a later name is a link entry)
        for rel, st in walk(diff):
            below = [p for p in view if p == rel or p.startswith(rel + "/")]
            if is_whiteout(st):  # counts 0, or the files of the directory it deletes (dive)
                freed = sum(max(view[p], 0) for p in below) if view.get(rel) == DIR else 0
                for p in below:
                    report.fileList.append(Change(p, "removed", max(view.pop(p), 0)))
                _account(rel, freed, cumulative, smallest, counts)
            elif stat.S_ISDIR(st.st_mode):
                if is_opaque_dir(os.path.join(diff, rel)):
                    for p in below:
                        if p != rel:
                            report.fileList.append(Change(p, "removed", max(view.pop(p), 0)))
                if rel not in view:
                    report.fileList.append(Change(rel, "added", 0))
                view[rel] = DIR
            elif is_metacopy_file(os.path.join(diff, rel), st):  # metadata only: the bytes below stay in view
                report.fileList.append(Change(rel, "modified", 0))
                _account(rel, st.st_size, cumulative, smallest, counts)  # dive reads the tar, which has the data
                report.sizeBytes += st.st_size
            else:
                size = st.st_size if stat.S_ISREG(st.st_mode) and st.st_ino not in linked else 0  # the tar's size
                if st.st_nlink > 1:
                    linked.add(st.st_ino)
                report.sizeBytes += size
                report.fileList.append(Change(rel, "modified" if rel in view else "added", size))
                view[rel] = size
                stored += size
                _account(rel, size, cumulative, smallest, counts)
        reports.append(report)
    total = sum(cumulative.values())
    score = sum(smallest.values()) / total if total else 1.0
    inefficient = {p: cumulative[p] for p in cumulative if counts[p] > 1}
    unseen = stored - sum(size for size in view.values() if size > 0)
    user = sum(r.sizeBytes for r in reports[1:])
    references: list[dict[str, Any]] = [
        {"count": counts[p], "sizeBytes": size, "file": "/" + p} for p, size in inefficient.items()
    ]
    references.sort(key=lambda r: int(r["sizeBytes"]), reverse=True)
    summary = ImageReport(sum(r.sizeBytes for r in reports), sum(inefficient.values()), unseen, user, score,
                          references)  # fmt: skip
    return reports, summary


def _account(
    path: str, size: int, cumulative: dict[str, int], smallest: dict[str, int], counts: dict[str, int]
) -> None:
    cumulative[path] = cumulative.get(path, 0) + size
    smallest[path] = min(smallest.get(path, size), size)
    counts[path] = counts.get(path, 0) + 1


def render(reports: list[LayerReport], image: ImageReport, files: bool = False) -> str:
    lines = ["Layer  Size      Command"]  # numbered from 1 at the bottom, as explain and diagram do; dive's sizes
    for r in reports:
        lines.append(f"{r.index + 1:<5}  {human_size(r.sizeBytes):<8}  {r.command}")
        changes = {kind: [c for c in r.fileList if c.change == kind] for kind in ("added", "modified", "removed")}
        lines.append(f"       {len(changes['added'])} added, {len(changes['modified'])} modified, "
                     f"{len(changes['removed'])} removed")  # fmt: skip
        if files:
            marks = {"added": "A", "modified": "M", "removed": "D"}
            lines += [f"         {marks[c.change]} /{c.path}  {human_size(c.size)}" for c in r.fileList]
    lines += [
        "",
        f"Total image size (dive's: the sizes in the layer tars): {human_size(image.sizeBytes)}",
        f"Image efficiency score: {int(100 * image.efficiencyScore)} %",
        f"Potential wasted space (dive's count: every copy of a file seen in 2+ layers): "
        f"{human_size(image.inefficientBytes)}",
        f"Space no one can see (pylayerfs's count: bytes of lower layers overwritten or deleted above): "
        f"{human_size(image.unseenBytes)}",
    ]
    if image.fileReference:
        lines += ["", "Count  Total Space  Path"]
        lines += [f"{r['count']:<5}  {human_size(r['sizeBytes']):<11}  {r['file']}" for r in image.fileReference]
    return "\n".join(lines)


def as_json(reports: list[LayerReport], image: ImageReport) -> str:
    return json.dumps({"layer": [asdict(r) for r in reports], "image": asdict(image)}, indent=2)


def ci(
    image: ImageReport, lowest_efficiency: float, highest_wasted: int | None, highest_user_wasted: float
) -> tuple[bool, str]:
    """dive's CI rules; a rule is off when its threshold is None."""
    user_wasted = image.inefficientBytes / image.userSizeBytes if image.userSizeBytes else 0.0
    rules = [
        ("lowestEfficiency", image.efficiencyScore < lowest_efficiency),
        ("highestWastedBytes", highest_wasted is not None and image.inefficientBytes > highest_wasted),
        ("highestUserWastedPercent", user_wasted > highest_user_wasted),
    ]
    lines = [
        f"  efficiency: {100 * image.efficiencyScore:.4f} %",
        f"  wastedBytes: {image.inefficientBytes} bytes ({human_size(image.inefficientBytes)})",
        f"  userWastedPercent: {100 * user_wasted:.4f} %",
        "Results:",
    ]
    lines += [f"  {'FAIL' if failed else 'PASS'}: {name}" for name, failed in rules]
    ok = not any(failed for _, failed in rules)
    lines.append(f"Result:{'PASS' if ok else 'FAIL'} [Total:{len(rules)}] [Passed:{sum(not f for _, f in rules)}] "
                 f"[Failed:{sum(f for _, f in rules)}]")  # fmt: skip
    return ok, "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments)."""
    from pylayerfs.image.store import Store, StoreError

    try:
        reports, image = analyse(Store(args.root), args.image)
    except (StoreError, OSError) as exc:
        print(f"pylayerfs layers: {exc}", file=sys.stderr)
        return 1
    if args.format == "tree":
        from pylayerfs.teaching import diagram

        print(diagram.text(f"image {args.image}", diagram.image_boxes(Store(args.root), args.image)))
        return 0
    if args.ci:
        ok, text = ci(image, args.lowest_efficiency, args.highest_wasted_bytes,
                               args.highest_user_wasted_percent)  # fmt: skip
        print(text)
        return 0 if ok else 1
    print(as_json(reports, image) if args.format == "json" else render(reports, image, args.files))
    return 0
