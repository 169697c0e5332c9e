"""``pylayerfs explain``: why the merged view shows what it shows at one path, layer by layer.

The lookup is walked the way overlayfs does it, top to bottom: for each layer,
what it holds at the path (a file, a directory, an opaque directory, a
whiteout, nothing), whether the lookup consults it at all (an ancestor may be
hidden or not merged there), and the rule that decides. For a directory the
merged entries are listed with the layer each comes from.

The layers come from an image (``IMAGE:/path``), a container
(``CONTAINER:/path``: its writable layer on top) or a path inside a mounted
overlay (pylayerfs's or the kernel's, read from the mount's options).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from pylayerfs.overlay.markers import OPAQUE_YES, TRUSTED_PREFIX, is_metacopy_file, is_whiteout
from pylayerfs.overlay.params import MountError, mountinfo, parse_options, split_escaped


class ExplainError(Exception):
    pass


@dataclass(frozen=True)
class Layer:
    label: str  # "upper (container layer)", "layer 3", ...
    root: str
    step: str = ""  # the history entry that made it, for image layers


@dataclass
class Finding:
    label: str
    root: str
    step: str
    holds: str  # file, directory, opaque directory, whiteout, symlink, nothing, ...
    consulted: bool
    rule: str


@dataclass
class Explanation:
    path: str
    layers: list[Finding]
    result: str
    source: str | None = None  # the layer whose object the merged view shows
    entries: dict[str, str] = field(default_factory=dict)  # a directory's names -> the layer each comes from


def _holds(layer: Layer, rel: str) -> tuple[str, os.stat_result | None]:
    """What ``layer`` has at ``rel``, never following a symlink of the layer (nor leaving it)."""
    parts = [p for p in rel.split("/") if p]
    path = layer.root
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except OSError:
            return "nothing", None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return "nothing", None  # an ancestor is not a directory in this layer
    st = os.lstat(path) if parts else os.stat(layer.root)
    if is_whiteout(st):
        return "whiteout", st
    if stat.S_ISDIR(st.st_mode):
        try:
            opaque = os.getxattr(path, TRUSTED_PREFIX + "opaque", follow_symlinks=False) == OPAQUE_YES
        except OSError:
            opaque = False
        return ("opaque directory" if opaque else "directory"), st
    if is_metacopy_file(path, st):
        return "metacopy file", st
    kinds = ((stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "device"))
    return next((name for test, name in kinds if test(st.st_mode)), "special file"), st


def _consulted(layers: list[Layer], rel: str) -> tuple[list[bool], str]:
    """Which layers the lookup of ``rel``'s parent leaves to consult for ``rel``, and why not the others."""
    consulted = [True] * len(layers)
    reason = ""
    parts = [p for p in rel.split("/") if p]
    for depth in range(1, len(parts)):
        ancestor = "/".join(parts[:depth])
        stopped = False
        for i, layer in enumerate(layers):
            if not consulted[i]:
                continue
            if stopped:
                consulted[i] = False
                continue
            holds, _ = _holds(layer, ancestor)
            if holds == "whiteout" or holds not in ("directory", "opaque directory", "nothing"):
                consulted[i] = False
                stopped = True
                reason = f"/{ancestor} is {'deleted' if holds == 'whiteout' else 'not a directory'} in {layer.label}"
            elif holds == "nothing":
                consulted[i] = False
            elif holds == "opaque directory":
                stopped = True
                reason = f"/{ancestor} is an opaque directory in {layer.label}"
    return consulted, reason


def explain(layers: list[Layer], path: str) -> Explanation:
    rel = path.strip("/")
    consulted, reason = _consulted(layers, rel)
    findings: list[Finding] = []
    result = f"/{rel} does not exist: no layer holds it"
    source: str | None = None
    merging: list[Layer] = []
    decided = False
    metadata: Layer | None = None  # the metacopy file above, while the lookup looks for its data
    for layer, asked in zip(layers, consulted, strict=True):
        holds, _ = _holds(layer, rel)
        if not asked or decided:
            why = "below the layer that decided" if decided else (reason or f"a parent of /{rel} is not here")
            findings.append(Finding(layer.label, layer.root, layer.step, holds, False, f"not consulted: {why}"))
            continue
        if holds == "nothing":
            rule = "nothing here: the lookup goes on below"
        elif holds == "whiteout":
            rule = "a whiteout: the name is deleted here and hidden in every layer below"
            result = f"/{rel} does not exist: a whiteout in {layer.label} deletes it"
            decided = True
        elif holds in ("directory", "opaque directory"):
            merging.append(layer)
            if source is None:
                source = layer.label
                result = f"/{rel} is a directory; its attributes are {layer.label}'s"
            if holds == "opaque directory":
                rule = "an opaque directory: nothing below it is merged"
                decided = True
            else:
                rule = "a directory: merged with the directories below (upper entries hide lower ones)"
        elif merging:
            rule = "a non-directory below a directory: the merge stops here, it is hidden"
            decided = True
        elif holds == "metacopy file" and metadata is None:
            metadata = layer
            rule = "a metacopy file (metacopy=on): its mode, owner, times and xattrs are shown; the data is below"
            result = f"/{rel} is a file whose metadata are {layer.label}'s, but no layer below holds its data"
        elif metadata is not None:
            rule = f"holds the data of the metacopy file in {metadata.label}: reads return these bytes"
            source = layer.label
            result = (f"/{rel} is a file with {metadata.label}'s metadata and {layer.label}'s data "
                      f"({os.path.join(layer.root, rel)})")  # fmt: skip
            decided = holds != "metacopy file"
        else:
            rule = f"the top-most object: the merged view shows this {holds}, and reads return these bytes"
            result = f"/{rel} is a {holds} from {layer.label} ({os.path.join(layer.root, rel)})"
            source = layer.label
            decided = True
        findings.append(Finding(layer.label, layer.root, layer.step, holds, True, rule))
    explanation = Explanation("/" + rel, findings, result, source)
    if merging:
        explanation.entries = _entries(merging, rel)
    return explanation


def _entries(merging: list[Layer], rel: str) -> dict[str, str]:
    entries: dict[str, str] = {}
    hidden: set[str] = set()
    for layer in merging:
        directory = os.path.join(layer.root, rel)
        for name in sorted(os.listdir(directory)):
            if name in entries or name in hidden:
                continue
            if is_whiteout(os.lstat(os.path.join(directory, name))):
                hidden.add(name)
            else:
                entries[name] = layer.label
    return dict(sorted(entries.items()))


def render(explanation: Explanation) -> str:
    lines = [f"{explanation.path}: the lookup, top layer first"]
    for n, f in enumerate(explanation.layers, start=1):
        lines.append(f"  {n}. {f.label}: {f.root}")
        if f.step:
            lines.append(f"     made by: {f.step}")
        lines.append(f"     holds: {f.holds}; {f.rule}")
    lines.append(f"Result: {explanation.result}.")
    if explanation.entries:
        lines.append("Entries (and the layer each comes from):")
        lines += [f"  {name}  <- {label}" for name, label in explanation.entries.items()]
    return "\n".join(lines)


def as_json(explanation: Explanation) -> str:
    return json.dumps(asdict(explanation), indent=2)


# -- where the layers come from -----------------------------------------------------------------


def image_layers(store: Any, ref: str) -> list[Layer]:
    image = store.resolve(ref)
    steps = [h.get("created_by", "") for h in image.history if not h.get("empty_layer")]
    layers = store.layers_of(image)  # top first
    out = []
    for n, layer in enumerate(layers):
        step = steps[len(layers) - 1 - n] if len(steps) == len(layers) else ""
        out.append(Layer(f"layer {len(layers) - n}", store.layers.diff_dir(layer.cache_id), step))
    return out


def container_layers(runtime: Any, container: Any) -> list[Layer]:
    image = runtime.store.images.get(container.image_id)
    if not container.driver.mounts:  # no stack to walk: the container's own full copy is all there is
        return [Layer("the container's full copy (vfs)", runtime.merged(container))]
    return [
        Layer("the container layer (upper)", runtime.upper(container)),
        Layer("the init layer", runtime.lowers(container)[0]),
        *image_layers(runtime.store, image.id),
    ]


def mount_layers(path: str) -> tuple[list[Layer], str]:
    """The layers of the overlay mounted at or above ``path`` (kernel or pylayerfs), and ``path`` inside it."""
    real = os.path.realpath(path)
    for entry in sorted(mountinfo(), key=lambda e: len(e.mountpoint), reverse=True):
        inside = real == entry.mountpoint or real.startswith(entry.mountpoint.rstrip("/") + "/")
        if not inside:
            continue
        options = None
        if entry.fstype == "overlay":
            options = entry.super_options
        elif entry.fstype == "fuse.pylayerfs":
            options = _daemon_options(entry.mountpoint)
        if options is None:
            break
        config = parse_options([",".join(o for o in split_escaped(options, ",", keep_escapes=True)
                                         if o.split("=")[0] in ("lowerdir", "upperdir", "workdir"))])  # fmt: skip
        layers = [Layer("the upper layer", config.upperdir)] if config.upperdir else []
        n = len(config.lowerdirs)
        layers += [Layer(f"lower layer {n - i}", d) for i, d in enumerate(config.lowerdirs)]
        return layers, os.path.relpath(real, entry.mountpoint)
    raise ExplainError(f"{path} is not inside an overlay mount (and not IMAGE:/path or CONTAINER:/path)")


def _daemon_options(mountpoint: str) -> str | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                words = [w.decode(errors="surrogateescape") for w in f.read().split(b"\0")]
        except OSError:
            continue
        args = [w for w in words if w]
        if "mount" in args and "-o" in args[:-1] and os.path.realpath(args[-1]) == mountpoint:
            return args[args.index("-o") + 1]
    return None


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments)."""
    from pylayerfs.image.store import Store, StoreError

    try:
        name, sep, path = args.target.partition(":")
        if sep and path.startswith("/") and not os.path.exists(args.target):
            from pylayerfs.container.runtime import Runtime

            runtime = Runtime(Store(args.root))
            try:
                layers = container_layers(runtime, runtime.containers.find(name))
            except StoreError:
                layers = image_layers(runtime.store, name)
        else:
            layers, path = mount_layers(args.target)
        result = explain(layers, path)
    except (ExplainError, StoreError, MountError, OSError) as exc:
        print(f"pylayerfs explain: {exc}", file=sys.stderr)
        return 1
    print(as_json(result) if args.format == "json" else render(result))
    return 0
