"""``pylayerfs explain``: why the merged view shows what it shows at one path, layer by layer.

The lookup is walked the way overlayfs does it, top to bottom: for each layer,
what it holds at the path (a file, a directory, an opaque directory, a
whiteout, a metacopy file, nothing), whether the lookup consults it at all (an
ancestor may be hidden or not merged there), and the rule that decides. For a
directory the merged entries are listed with the layer each comes from.

Nothing here knows the lookup rules: every answer comes from the engine's own
objects (:class:`~pylayerfs.overlay.lookup.Lookup` over
:class:`~pylayerfs.overlay.layers.LowerLayer` listings, with the mount's
:class:`~pylayerfs.overlay.markers.Markers`), built over the same directories
the mount uses, so explain and the mount cannot disagree. This module only
puts the engine's decisions into words. The layers are opened read-only
(``O_PATH`` and directory listings): nothing is written to them.

The layers come from an image (``IMAGE:/path``), a container
(``CONTAINER:/path``: its writable layer on top) or a path inside a mounted
overlay: a pylayerfs mount's daemon records its options (see
:mod:`pylayerfs.fuse.mount`), a kernel mount's are in ``mountinfo``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import posixpath
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

from pylayerfs.container.records import Container
from pylayerfs.container.runtime import Runtime
from pylayerfs.fuse.mount import recorded_config, records_dir
from pylayerfs.fuse.native.device import FSTYPE
from pylayerfs.image.store import Store
from pylayerfs.overlay import layers as engine
from pylayerfs.overlay.lookup import Lookup, Node
from pylayerfs.overlay.markers import Markers, is_whiteout
from pylayerfs.overlay.params import MountConfig, MountEntry, MountError, mountinfo, split_escaped, unescape


class ExplainError(Exception):
    pass


@dataclass(frozen=True)
class Layer:
    label: str  # "upper (container layer)", "layer 3", ...
    root: str
    step: str = ""  # the history entry that made it, for image layers


@dataclass(frozen=True)
class Stack:
    """The layers of one merged view, top first, and the mount options that change the lookup."""

    layers: Sequence[Layer]
    upper: bool = False  # layers[0] is the writable upper layer (its whiteouts are 0/0 devices only)
    userxattr: bool = False  # markers are user.overlay.* (else trusted.overlay.*)
    metacopy: bool = True  # metacopy files are followed (metacopy=on); without it an upper one is refused


@dataclass
class Finding:
    label: str
    root: str
    step: str
    holds: str  # file, directory, opaque directory, whiteout, symlink, metacopy file, nothing, ...
    consulted: bool
    rule: str


@dataclass
class Explanation:
    path: str
    layers: list[Finding]
    result: str
    source: str | None = None  # the layer whose object the merged view shows (a metacopy file's: its data's)
    entries: dict[str, str] = field(default_factory=dict)  # a directory's names -> the layer each comes from


# How a name's lookup ended (_Step.stop): the layer _Step.stopper decided it.
WHITEOUT, NON_DIRECTORY, OPAQUE, OBJECT, REFUSED = "whiteout", "non-directory", "opaque", "object", "refused"


@dataclass
class _Step:
    """The engine's lookup of one merged path, over the layers its parent's merge leaves to consult."""

    consulted: list[int]  # layer positions, top first
    node: Node | None  # None: the merged view has no such name
    members: list[int]  # the layers whose objects make the merged object (engine order)
    error: OSError | None = None  # the engine refused the name (a metacopy file: EPERM, EIO)
    stopper: int | None = None  # the layer where the lookup ended
    stop: str = ""  # why it ended there: WHITEOUT, NON_DIRECTORY, OPAQUE, OBJECT, REFUSED
    paths: dict[int, str] = field(default_factory=dict)  # where each layer is looked at, when not the merged path

    def at(self, i: int, rel: str) -> str:
        """The path the lookup reads in layer ``i`` for the merged path ``rel`` (another one below a redirect)."""
        return self.paths.get(i, rel)


class _Walk:
    """The engine over one stack (opened read-only), and its decisions in the words of the rules."""

    def __init__(self, stack: Stack, lookup: Lookup, opened: list[engine.Layer]) -> None:
        self.stack = stack
        self.lookup = lookup
        self.opened = opened  # position i: the engine's object for stack.layers[i]
        self._holds: dict[tuple[int, str], str] = {}

    # -- what one layer holds -------------------------------------------------------------------

    def holds(self, i: int, rel: str) -> str:
        """What layer ``i`` has at ``rel``, by the engine's reading of it (its symlinks are never followed)."""
        key = (i, rel)
        if key not in self._holds:
            layer = self.opened[i]
            is_upper = self.stack.upper and i == 0
            self._holds[key] = self._upper_holds(layer, rel) if is_upper else self._lower_holds(layer, rel)
        return self._holds[key]

    def holds_at(self, step: _Step, i: int, rel: str) -> str:
        """What layer ``i`` has where ``step``'s lookup of the merged path ``rel`` reads it (:meth:`_Step.at`)."""
        return self.holds(i, step.at(i, rel))

    def _lower_holds(self, layer: engine.Layer, rel: str) -> str:
        assert isinstance(layer, engine.LowerLayer)
        if not rel:
            return "directory"  # a marker on a layer's root is no marker: the kernel never looks the root up
        parent, name = engine.split(rel)
        listing = layer.listing(parent)  # empty where the parent is not a directory of this layer
        if name in listing.whiteouts:  # the 0/0 device, or the xattr form in a directory marked opaque="x"
            return "whiteout"
        st = listing.entries.get(name)
        if st is None:
            return "nothing"
        if stat.S_ISDIR(st.st_mode):
            below = layer.listing(rel)
            return "opaque directory" if below.opaque else "renamed directory" if below.redirect else "directory"
        if stat.S_ISREG(st.st_mode) and layer.is_metacopy(rel):
            return "metacopy file"
        return _kind(st.st_mode)

    def _upper_holds(self, layer: engine.Layer, rel: str) -> str:
        markers = self.lookup.markers
        try:
            st = layer.lstat(rel)
        except OSError:
            return "nothing"
        if is_whiteout(st):
            return "whiteout"
        if stat.S_ISDIR(st.st_mode) and not rel:
            return "directory"  # as a lower layer's root
        if stat.S_ISDIR(st.st_mode):
            fd = layer.open(rel, os.O_PATH | os.O_DIRECTORY)
            try:
                if markers.is_opaque(fd):
                    return "opaque directory"
                return "renamed directory" if markers.redirect_of(fd) is not None else "directory"
            finally:
                os.close(fd)
        if stat.S_ISREG(st.st_mode):
            with layer.parent(rel) as (fd, name):
                if markers.is_metacopy(fd, name):
                    return "metacopy file"
        return _kind(st.st_mode)

    # -- the engine's decisions -----------------------------------------------------------------

    def members(self, node: Node) -> list[int]:
        """The layers whose objects make ``node``: the upper one, then the lower stack's."""
        upper = [0] if node.upper is not None else []
        return upper + [hit.layer.index for hit in node.lower.hits]

    def step(self, rel: str, consulted: list[int], where: dict[int, str] | None = None) -> _Step:
        """The engine's lookup of ``rel`` (whose parent is a merged directory consulting ``consulted``, each layer at
        the path ``where`` gives, the merged one by default)."""
        step = _Step(consulted, None, [], paths=dict(where or {}))
        if not consulted:
            return step
        try:
            step.node = self.lookup.lookup(rel)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                step.error = exc
        if step.node is not None:
            step.members = self.members(step.node)
            step.paths.update({hit.layer.index: hit.path for hit in step.node.lower.hits})
            last = step.members[-1]
            if not step.node.is_dir:
                step.stopper, step.stop = last, OBJECT
            elif self.holds_at(step, last, rel) == "opaque directory" or (
                last == 0 and self.stack.upper and step.node.opaque
            ):
                step.stopper, step.stop = last, OPAQUE
            else:  # the merge went on below the last directory: the first thing found there ended it
                below = consulted[consulted.index(last) + 1 :] if last in consulted else []
                found = [i for i in below if self.holds_at(step, i, rel) != "nothing"]
                if found:
                    step.stopper = found[0]
                    step.stop = WHITEOUT if self.holds_at(step, found[0], rel) == "whiteout" else NON_DIRECTORY
            return step
        found = [i for i in consulted if self.holds_at(step, i, rel) != "nothing"]
        if found:
            step.stopper = found[0]
            step.stop = REFUSED if step.error is not None else WHITEOUT
        return step

    def walk(self, rel: str) -> tuple[_Step, dict[int, str]]:
        """The lookup of ``rel`` and, for each layer its parent's merge leaves out, why."""
        consulted = list(range(len(self.stack.layers)))
        where: dict[int, str] = {}
        why: dict[int, str] = {}
        parts = rel.split("/") if rel else []
        for depth in range(len(parts)):
            ancestor = "/".join(parts[:depth])
            step = self.step(ancestor, consulted, where)
            merged = step.members if step.node is not None and step.node.is_dir else []
            for i in consulted:
                if i not in merged:
                    why[i] = self._left_out(i, ancestor, step)
            consulted = merged
            where = {i: engine.join(step.at(i, ancestor), parts[depth]) for i in merged}
        return self.step(rel, consulted, where), why

    def _left_out(self, i: int, ancestor: str, step: _Step) -> str:
        """Why the lookup below ``/ancestor`` does not consult layer ``i`` (consulted for the ancestor)."""
        shown = "/" + ancestor
        s = step.stopper
        if s is None or step.consulted.index(i) < step.consulted.index(s):
            if step.node is None and s is None:
                return f"{shown} is in no layer"
            return f"{shown} is not in this layer"
        label = self.stack.layers[s].label
        if step.stop == WHITEOUT:
            return f"{shown} is deleted in {label}"
        if step.stop == OPAQUE:
            return f"{shown} is an opaque directory in {label}"
        if step.stop == REFUSED:
            return f"{shown} cannot be looked up in {label}"
        top = self.stack.layers[step.members[0]].label if step.stop == OBJECT else label
        return f"{shown} is not a directory in {top}"

    # -- the words ----------------------------------------------------------------------------

    def explain(self, rel: str) -> Explanation:
        step, why = self.walk(rel)
        labels = [layer.label for layer in self.stack.layers]
        findings: list[Finding] = []
        for i, layer in enumerate(self.stack.layers):
            holds = self.holds_at(step, i, rel)
            if step.at(i, rel) != rel and holds != "nothing":
                holds += f" at /{step.at(i, rel)}"  # a redirect above led the lookup there
            if i not in step.consulted:
                rule, asked = f"not consulted: {why.get(i, f'a parent of /{rel} is not here')}", False
            elif step.stopper is not None and step.consulted.index(i) > step.consulted.index(step.stopper):
                rule, asked = "not consulted: below the layer that decided", False
            else:
                rule, asked = self._rule(i, holds, step), True
            findings.append(Finding(layer.label, layer.root, layer.step, holds, asked, rule))
        result, source = self._result(rel, step, why)
        explanation = Explanation("/" + rel, findings, result, source)
        if step.node is not None and step.node.is_dir:
            explanation.entries = {name: labels[i] for name, i in self.entries(step.node).items()}
        return explanation

    def _rule(self, i: int, holds: str, step: _Step) -> str:
        node = step.node
        labels = [layer.label for layer in self.stack.layers]
        if node is not None and i in step.members:
            if node.is_dir:
                if step.stop == OPAQUE and i == step.stopper:
                    return "an opaque directory: nothing below it is merged"
                if holds.startswith("renamed directory"):
                    return "a directory renamed here (its redirect): the layers below are merged from where it was"
                return "a directory: merged with the directories below (upper entries hide lower ones)"
            if node.data is not None:
                top, data = step.members[0], step.members[-1]
                if i == top:
                    return (
                        "a metacopy file (metacopy=on): its mode, owner, times and xattrs are shown; the data is below"
                    )
                if i == data:
                    return f"holds the data of the metacopy file in {labels[top]}: reads return these bytes"
                return "another metacopy file: the lookup goes on down to the data"
            rule = f"the top-most object: the merged view shows this {holds}, and reads return these bytes"
            if holds.startswith("metacopy file"):
                rule += " (the mount is not metacopy=on: it is shown as it is on disk)"
            return rule
        if i == step.stopper:
            if step.stop == REFUSED:
                assert step.error is not None
                if step.error.errno == errno.EIO:
                    return "a metacopy file, but no layer below holds its data: the lookup fails (EIO)"
                if not self.stack.metacopy:
                    return "a metacopy file: refused (EPERM) without metacopy=on"
                return f"refused ({errno.errorcode.get(step.error.errno or 0, '?')}): {step.error.strerror}"
            if step.stop == WHITEOUT:
                if step.members:
                    return "a whiteout below a directory: the merge stops here, nothing below is merged"
                return "a whiteout: the name is deleted here and hidden in every layer below"
            return "a non-directory below a directory: the merge stops here, it is hidden"
        if holds == "nothing":
            return "nothing here: the lookup goes on below"
        return f"a {holds} the lookup passes over"

    def _result(self, rel: str, step: _Step, why: dict[int, str]) -> tuple[str, str | None]:
        shown = "/" + rel
        labels = [layer.label for layer in self.stack.layers]
        node = step.node
        if node is None:
            if step.stop == REFUSED and step.stopper is not None and step.error is not None:
                where = labels[step.stopper]
                if step.error.errno == errno.EIO:
                    return f"{shown} is a file whose metadata are {where}'s, but no layer below holds its data", None
                if not self.stack.metacopy:
                    return f"{shown} cannot be looked up: {where} holds a metacopy file and metacopy is off", None
                return f"{shown} cannot be looked up: {step.error.strerror} in {where}", None
            if step.stop == WHITEOUT and step.stopper is not None:
                return f"{shown} does not exist: a whiteout in {labels[step.stopper]} deletes it", None
            if not step.consulted and why:  # an ancestor is missing or not a directory: say where it ended
                ends = [w for _, w in sorted(why.items()) if not w.endswith("is not in this layer")]
                return f"{shown} does not exist: {ends[0] if ends else why[min(why)]}", None
            anywhere = any(self.holds(i, rel) not in ("nothing", "whiteout") for i in range(len(labels)))
            return f"{shown} does not exist: no layer {'the lookup consults ' if anywhere else ''}holds it", None
        top = step.members[0]
        if node.is_dir:
            return f"{shown} is a directory; its attributes are {labels[top]}'s", labels[top]
        if node.data is not None:
            data = step.members[-1]
            path = os.path.join(self.stack.layers[data].root, step.at(data, rel))
            return f"{shown} is a file with {labels[top]}'s metadata and {labels[data]}'s data ({path})", labels[data]
        path = os.path.join(self.stack.layers[top].root, step.at(top, rel))
        return f"{shown} is a {self.holds_at(step, top, rel)} from {labels[top]} ({path})", labels[top]

    def entries(self, node: Node) -> dict[str, int]:
        """The names the merged directory ``node`` lists, each with the layer its object is taken from."""
        candidates: dict[str, int] = {}  # name -> the top-most layer having it
        if node.upper_fd >= 0:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=node.upper_fd)
            try:
                with os.scandir(fd) as it:
                    for entry in it:
                        candidates.setdefault(entry.name, 0)
            finally:
                os.close(fd)
        if node.lower.is_dir:
            for hit in node.lower.hits:
                for name in hit.layer.listing(hit.path).entries:
                    candidates.setdefault(name, hit.layer.index)
        out: dict[str, int] = {}
        for name, top in sorted(candidates.items()):
            try:
                child = self.lookup.child(node, name)
            except OSError:  # a metacopy file the engine refuses: listed, but not looked up
                out[name] = top
                continue
            if child is not None:
                out[name] = self.members(child)[0]
        return out


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
             (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"), (stat.S_ISSOCK, "socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "special file")


@contextlib.contextmanager
def _engine(stack: Stack) -> Iterator[tuple[Lookup, list[engine.Layer]]]:
    """The engine's lookup over ``stack``'s directories, opened read-only; closed on exit.

    Raises ExplainError when a layer directory cannot be opened.
    """
    markers = Markers.for_mount(stack.userxattr)
    opened: list[engine.Layer] = []
    try:
        for i, layer in enumerate(stack.layers):
            try:
                upper = stack.upper and i == 0
                opened.append(engine.Layer(i, layer.root) if upper else engine.LowerLayer(i, layer.root, markers))
            except OSError as exc:
                raise ExplainError(f"cannot open {layer.label} ({layer.root}): {exc.strerror}") from None
        lowers = [o for o in opened if isinstance(o, engine.LowerLayer)]
        lookup = Lookup(opened[0] if stack.upper else None, lowers, markers, stack.metacopy)
        try:
            yield lookup, opened
        finally:
            lookup.invalidate_all()
    finally:
        for real in opened:
            real.close()


def explain(layers: Stack | Sequence[Layer], path: str) -> Explanation:
    """Explain the merged view of ``layers`` (a Stack, or lower layers top first) at ``path``.

    ``path`` is a path in the merged view (``/`` its root; ``..`` taken lexically). Raises ExplainError
    when a layer cannot be opened, OSError when a layer cannot be read.
    """
    stack = layers if isinstance(layers, Stack) else Stack(list(layers))
    if not stack.layers:
        raise ExplainError("no layers to explain")
    rel = posixpath.normpath("/" + path).strip("/")
    with _engine(stack) as (lookup, opened):
        return _Walk(stack, lookup, opened).explain(rel)


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


def image_layers(store: Store, ref: str) -> list[Layer]:
    image = store.resolve(ref)
    steps = [h.get("created_by", "") for h in image.history if not h.get("empty_layer")]
    layers = store.layers_of(image)  # top first
    out = []
    for n, layer in enumerate(layers):
        step = steps[len(layers) - 1 - n] if len(steps) == len(layers) else ""
        out.append(Layer(f"layer {len(layers) - n}", store.layers.diff_dir(layer.cache_id), step))
    return out


def image_stack(store: Store, ref: str) -> Stack:
    """An image's layers as its containers' mounts stack them (``metacopy=on`` if a layer needs it)."""
    image = store.resolve(ref)
    return Stack(image_layers(store, ref), metacopy=store.layers.uses_metacopy(image.top_layer))


def container_layers(runtime: Runtime, container: Container) -> list[Layer]:
    image = runtime.store.images.get(container.image_id)
    if not container.driver.mounts:  # no stack to walk: the container's own full copy is all there is
        return [Layer("the container's full copy (vfs)", runtime.merged(container))]
    return [
        Layer("the container layer (upper)", runtime.upper(container)),
        Layer("the init layer", runtime.lowers(container)[0]),
        *image_layers(runtime.store, image.id),
    ]


def container_stack(runtime: Runtime, container: Container) -> Stack:
    """A container's layers as its mount stacks them: its writable layer is the upper one."""
    layers = container_layers(runtime, container)
    if not container.driver.mounts:
        return Stack(layers, metacopy=False)
    metacopy = runtime.store.layers.uses_metacopy(runtime.store.images.get(container.image_id).top_layer)
    return Stack(layers, upper=True, metacopy=metacopy)


def mount_stack(path: str) -> tuple[Stack, str]:
    """The layers of the overlay mounted at or above ``path`` (kernel or pylayerfs), and ``path`` inside it.

    The innermost mount holding ``path`` decides (the last one made, where several share a mountpoint).
    A symlink at the end of ``path`` is explained, not followed (as ``lstat`` and image paths; a trailing
    ``/`` follows it). Raises ExplainError when it is not an overlay, or its layers cannot be known.
    """
    head, name = os.path.split(os.path.abspath(path))
    real = os.path.join(os.path.realpath(head), name) if name and not path.endswith("/") else os.path.realpath(path)
    holding: MountEntry | None = None
    for entry in mountinfo():  # in the order the mounts were made: a later one on the same point hides earlier
        inside = real == entry.mountpoint or real.startswith(entry.mountpoint.rstrip("/") + "/")
        if inside and (holding is None or len(entry.mountpoint) >= len(holding.mountpoint)):
            holding = entry
    if holding is None or holding.fstype not in ("overlay", FSTYPE):
        raise ExplainError(f"{path} is not inside an overlay mount (and not IMAGE:/path or CONTAINER:/path)")
    if holding.fstype == "overlay":
        config = kernel_config(holding)
    else:
        recorded = recorded_config(holding)
        if recorded is None:
            raise ExplainError(f"the pylayerfs mount on {holding.mountpoint} left no record of its layers in "
                               f"{records_dir()}: its daemon could not write there (for a user: no "
                               f"$XDG_RUNTIME_DIR; its log says why), was killed, or is older")  # fmt: skip
        config = recorded
    layers = [Layer("the upper layer", config.upperdir)] if config.upperdir else []
    n = len(config.lowerdirs)
    layers += [Layer(f"lower layer {n - i}", d) for i, d in enumerate(config.lowerdirs)]
    stack = Stack(layers, upper=config.upperdir is not None, userxattr=config.userxattr, metacopy=config.metacopy)
    return stack, os.path.relpath(real, holding.mountpoint)


def kernel_config(entry: MountEntry) -> MountConfig:
    """The layers and lookup options of a kernel overlay mount, from its super options in mountinfo.

    The kernel shows the paths as they were given (``\\:`` escaping a colon); relative ones cannot be
    resolved afterwards (raises ExplainError).
    """
    lowers = entry.option("lowerdir")
    if not lowers:
        raise ExplainError(f"the overlay on {entry.mountpoint} shows no lowerdir in its mount options")
    upper, work = entry.option("upperdir"), entry.option("workdir")
    config = MountConfig(
        lowerdirs=split_escaped(lowers, ":"),
        upperdir=unescape(upper) if upper else None,
        workdir=unescape(work) if work else None,
        userxattr=entry.option("userxattr") is not None,
        metacopy=entry.option("metacopy") == "on",
    )
    for d in [*config.lowerdirs, config.upperdir or "/"]:
        if not os.path.isabs(d):
            raise ExplainError(f"the overlay on {entry.mountpoint} was mounted with the relative layer path '{d}', "
                               "which the kernel keeps as given: its directory cannot be known afterwards")  # fmt: skip
    return config


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments)."""
    from pylayerfs.image.store import Store, StoreError

    try:
        name, sep, path = args.target.partition(":/")  # IMAGE[:TAG]:/PATH or CONTAINER:/PATH
        path = "/" + path
        if sep and not os.path.exists(args.target):
            from pylayerfs.container.runtime import Runtime

            runtime = Runtime(Store(args.root))
            try:
                stack = container_stack(runtime, runtime.containers.find(name))
            except StoreError:
                stack = image_stack(runtime.store, name)
        else:
            stack, path = mount_stack(args.target)
        result = explain(stack, path)
    except (ExplainError, StoreError, MountError, OSError) as exc:
        print(f"pylayerfs explain: {exc}", file=sys.stderr)
        return 1
    print(as_json(result) if args.format == "json" else render(result))
    return 0
