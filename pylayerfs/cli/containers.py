"""The container commands' output: ``ps``, ``commit`` and ``system df``, as docker/cli prints them.

Sizes are read from the directories on disk, never from a mount:

* a container's **size** is its read-write layer alone (the upper directory,
  ``directory.Size``), the init layer not counted;
* its **virtual size** adds the image's size: the read-only layers it shares
  with every other container of the image, counted again for each one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from typing import Any

from pylayerfs.cli import formats
from pylayerfs.container.records import Container, ContainerStatus
from pylayerfs.container.runtime import Runtime, container_size
from pylayerfs.dockercli import ellipsis, render
from pylayerfs.image import archive
from pylayerfs.image.builder import imageconfig as cfg
from pylayerfs.image.builder.build import CONFIG_STEPS, Stage
from pylayerfs.image.builder.dockerfile import DockerfileError, parse
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.image.drivers import vfs as vfsdriver
from pylayerfs.image.sizes import human_duration, human_size, layer_size
from pylayerfs.image.store import StoreError
from pylayerfs.image.store.images import Image, format_time, parse_time
from pylayerfs.overlay.params import MountError

COMMAND_WIDTH = 20


def _ago(when: str, now: datetime.datetime) -> str:
    return human_duration((now - parse_time(when)).total_seconds())


def status(container: Container, now: datetime.datetime) -> str:
    state = container.state
    if state.running:
        return f"Up {_ago(state.started_at, now)}"
    if state.status is ContainerStatus.EXITED:
        return f"Exited ({state.exit_code}) {_ago(state.finished_at, now)} ago"
    return "Created"


def command_text(container: Container) -> str:
    """``docker ps``' COMMAND: the daemon's ``Path args`` (an argument with a space in single quotes), cut to 20
    runes and quoted as Go's ``strconv.Quote``."""
    args = [f"'{a}'" if " " in a else a for a in container.args]
    return json.dumps(ellipsis(" ".join([container.path, *args]), COMMAND_WIDTH), ensure_ascii=False)


def _size_text(size: int, virtual: int) -> str:
    return f"{human_size(size)} (virtual {human_size(virtual)})" if virtual > 0 else human_size(size)


PS_HEADERS = {"ID": "CONTAINER ID", "Image": "IMAGE", "Command": "COMMAND", "CreatedAt": "CREATED AT",
              "RunningFor": "CREATED", "Ports": "PORTS", "State": "STATE", "Status": "STATUS", "Size": "SIZE",
              "Names": "NAMES", "Labels": "LABELS", "Mounts": "MOUNTS", "LocalVolumes": "LOCAL VOLUMES",
              "Networks": "NETWORKS"}  # fmt: skip


def ps(runtime: Runtime, show_all: bool = False, sizes: bool = False, quiet: bool = False,
       fmt: str = "table") -> str:  # fmt: skip
    """``docker ps [-a] [-s] [-q] [--format F]`` (docker/cli's ``ContainerContext``), newest first.

    Sizes are measured with ``-s``, or when a template uses them (``.Size``, ``{{json .}}``), as docker/cli
    asks for them (``--format json`` is ``{{json .}}`` without them: ``0B`` unless ``-s``); ``Networks`` is
    ``none``: pylayerfs's containers have no network.
    """
    from pylayerfs.cli.images import go_time

    now = datetime.datetime.now(datetime.UTC)
    containers = [runtime.reconcile(c) for c in runtime.containers.all()]
    containers = [c for c in containers if show_all or c.state.running]
    if quiet:
        return "\n".join(c.short_id for c in containers)
    measure = sizes or any(f in fmt for f in (".Size", "json ."))  # not for the plain "json": add -s
    rows = []
    for c in containers:
        rows.append({
            "Command": command_text(c), "CreatedAt": go_time(parse_time(c.created)), "ID": c.short_id,
            "Image": c.image_name, "Labels": "", "LocalVolumes": "0", "Mounts": "", "Names": c.name,
            "Networks": "none", "Ports": "", "RunningFor": f"{_ago(c.created, now)} ago",
            "Size": _size_text(*container_size(runtime, c)) if measure else "0B", "State": c.state.status.value,
            "Status": status(c, now),
        })  # fmt: skip
    default = ["ID", "Image", "Command", "RunningFor", "Status", "Ports", "Names"] + (["Size"] if sizes else [])
    return formats.write(fmt, PS_HEADERS, rows, default)


def commit(runtime: Runtime, container: Container, ref: str | None, message: str = "", author: str = "",
           changes: list[str] | None = None) -> Image:  # fmt: skip
    """The container's read-write layer becomes a new image layer (as Docker: tar it, apply the tar).

    The config is the container's (moby's ``daemon/commit.go``: ``Config`` is the container's config with the
    ``changes`` applied, ``ContainerConfig`` the container's as it is; its Cmd the container's command, its Image
    the name the container was created with).
    """
    store = runtime.store
    image = store.images.get(container.image_id)
    config = container_config(container)
    stage = Stage(None, image, dict(config), image.history, image.diff_ids)
    for change in changes or []:
        try:
            ins = parse(f"FROM scratch\n{change}", "--change").instructions[1]
            if ins.keyword not in CONFIG_STEPS:
                raise StoreError(f"{ins.keyword} is not supported by commit --change")
            CONFIG_STEPS[ins.keyword](stage, ins, ins.args)  # raises as the build step (EXPOSE notaport)
        except (DockerfileError, ValueError) as exc:
            raise StoreError(f"invalid --change '{change}': {exc}") from exc
    with store.busy():
        with store.locked():
            cache_id = store.layers.new_dir(image.top_layer)
        try:
            with tempfile.TemporaryFile(dir=store.layout.tmp) as tar, runtime.read_write_layer(container) as rw:
                archive.write_layer(rw[0], tar, rw[1])
                tar.seek(0)
                with archive.open_archive(tar, "the container layer") as stream:
                    archive.extract(stream, store.layers.diff_dir(cache_id))
            with store.locked():
                layer = store.layers.register(cache_id, image.top_layer)
        except BaseException:
            store.layers.remove_dir(cache_id)
            raise
    created = format_time(datetime.datetime.now(datetime.UTC))
    entry: dict[str, Any] = {"created": created, "created_by": " ".join(container.config.get("Cmd") or [])}
    for key, value in (("author", author), ("comment", message)):
        if value:
            entry[key] = value
    if layer is None:
        entry["empty_layer"] = True
    new_config = cfg.image_config(stage.run, config, container.id, created, [*image.history, entry],
                                  [*image.diff_ids, *([layer.diff_id] if layer else [])])  # fmt: skip
    if author:
        new_config["author"] = author
    if message:
        new_config["comment"] = message
    with store.locked():
        new = store.images.put(new_config, image.id)
        if ref:
            store.refs.tag(ref, new.id)
            store.images.touch(new.id, datetime.datetime.now(datetime.UTC))
    return new


def container_config(container: Container) -> dict[str, Any]:
    """The container's config as Docker keeps it: its hostname (the short ID), the image name it was created with,
    the image's labels (``{}`` when none), and no network (``NetworkDisabled``: pylayerfs's containers have none,
    as Docker's on a daemon without a bridge)."""
    config = {**container.config, "Hostname": container.config.get("Hostname") or container.short_id,
              "Image": container.image_name}  # fmt: skip
    config["Labels"] = config.get("Labels") or {}
    config["NetworkDisabled"] = True
    return config


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def diff(runtime: Runtime, container: Container) -> str:
    """``docker diff``: A, C and D lines for what the container changed."""
    from pylayerfs.container.changes import changes

    with runtime.read_write_layer(container) as (upper, lowers):
        return "\n".join(changes(upper, lowers))


def storage_drivers(runtime: Runtime, containers: list[Container]) -> str:
    """What each storage driver's directories hold on disk in this root, measured (``directory.Size``).

    Every driver keeps each layer's diff in ``overlay2/<cache-id>/diff`` (it is the layer: its DiffID hashes
    it). fuse and overlay mount those diffs, a container adding only its changes; vfs also keeps a full tree
    per layer and two per container in ``vfs/dir``. When vfs was not used here, its row is an estimate.
    """
    store = runtime.store
    layers = store.layers.all()
    overlay2 = sum(layer_size(store.layers.diff_dir(d)) for d in _dirs(store.layout.overlay2) if d != "l")
    vfs_dirs = _dirs(store.layout.vfs_dir())
    in_vfs = [c for c in containers if not c.driver.mounts]
    mounting = ", ".join(d for d in StorageDriver if d.mounts)
    if vfs_dirs:
        vfs = human_size(vfsdriver.disk_usage(store), 4)
    else:  # every layer's tree is the layers below it and itself; a container copies its image's tree twice
        below = {la.chain_id: sum(x.size for x in store.layers.stack(la.chain_id)) for la in layers}
        trees = [2 * store.size(store.images.get(c.image_id)) + container_size(runtime, c)[0] for c in containers]
        vfs = f"~{human_size(sum(below.values()) + sum(trees), 4)}"
    rows = [
        ["overlay2", mounting, str(len(layers)), str(len(containers) - len(in_vfs)), human_size(overlay2, 4),
         "each layer's files once; a container only what it changed"],
        ["vfs/dir", StorageDriver.VFS.value, str(sum(la.cache_id in vfs_dirs for la in layers)), str(len(in_vfs)), vfs,
         "every layer a full copy of the files below it; a container two (init, read-write)"],
    ]  # fmt: skip
    return "Storage drivers on disk (pylayerfs's own table, not in Docker's output):\n" + render(
        ["DIRECTORY", "DRIVERS", "LAYERS", "CONTAINERS", "SIZE", "WHAT IS STORED"], rows
    )


def _dirs(path: str) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _reclaimable(part: int, whole: int) -> str:
    """docker/cli's RECLAIMABLE cell: ``SIZE (PERCENT%)``, the percentage truncated; the size alone for a 0 total."""
    return f"{human_size(part, 4)} ({100 * part // whole}%)" if whole else human_size(part, 4)


def system_df(runtime: Runtime, verbose: bool = False) -> str:
    """``docker system df [-v]`` (moby's ``daemon/disk_usage.go``, docker/cli's ``formatter/disk_usage.go``), then
    pylayerfs's own table: what each storage driver's directories take on disk.

    Images are the top-level ones (tagged, or untagged without children), newest first; an image is active when a
    container (a failed build's too) was created from it; its unique size is what its layers alone hold.
    RECLAIMABLE is Docker's: all the images' layers, less the unique size of the active images; for containers,
    the read-write layers of those not running.
    """
    store = runtime.store
    now = datetime.datetime.now(datetime.UTC)
    containers = [runtime.reconcile(c) for c in runtime.containers.all()]
    tags = store.refs.all()
    images = [store.images.get(i) for i in store.images.ids()
              if any(t == i for t in tags.values()) or not store.images.children(i)]  # fmt: skip
    images.sort(key=lambda image: image.created, reverse=True)
    layers_of = {image.id: store.layers_of(image) for image in images}
    refs: dict[str, int] = {}
    for layers in layers_of.values():
        for layer in layers:
            refs[layer.chain_id] = refs.get(layer.chain_id, 0) + 1
    distinct = {layer.chain_id: layer.size for layers in layers_of.values() for layer in layers}
    users = {image.id: sum(c.image_id == image.id for c in containers) for image in images}
    rw = {c.id: container_size(runtime, c)[0] for c in containers}
    image_rows = []
    in_use = 0
    for image in images:
        size = sum(layer.size for layer in layers_of[image.id])
        shared = sum(layer.size for layer in layers_of[image.id] if refs[layer.chain_id] > 1)
        if users[image.id]:
            in_use += size - shared
        name = min((ref for ref, target in tags.items() if target == image.id), default="<none>:<none>")
        repo, _, tag = name.rpartition(":")  # docker/cli shows the first tag only
        age = human_duration((now - image.created).total_seconds())
        image_rows.append([repo, tag, image.short_id, f"{age} ago",
                           human_size(size, 4), human_size(shared, 4), human_size(size - shared, 4),
                           str(users[image.id])])  # fmt: skip
    images_size = sum(distinct.values())
    containers_size = sum(rw.values())
    stopped = sum(rw[c.id] for c in containers if not c.state.running)
    summary = render(["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"], [
        ["Images", str(len(images)), str(sum(1 for i in images if users[i.id])), human_size(images_size, 4),
         _reclaimable(images_size - in_use, images_size)],
        ["Containers", str(len(containers)), str(sum(c.state.running for c in containers)),
         human_size(containers_size, 4), _reclaimable(stopped, containers_size)],
        ["Local Volumes", "0", "0", "0B", "0B"],
        ["Build Cache", "0", "0", "0B", "0B"],
    ])  # fmt: skip
    own = ["", storage_drivers(runtime, containers)]
    if not verbose:
        return "\n".join([summary, *own])
    container_rows = [[c.short_id, c.image_name, command_text(c), "0", human_size(rw[c.id], 4),
                       f"{_ago(c.created, now)} ago", status(c, now), c.name] for c in containers]  # fmt: skip
    return "\n".join([
        "Images space usage:", "",
        render(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE", "SHARED SIZE", "UNIQUE SIZE", "CONTAINERS"],
               image_rows),
        "", "Containers space usage:", "",
        render(["CONTAINER ID", "IMAGE", "COMMAND", "LOCAL VOLUMES", "SIZE", "CREATED", "STATUS", "NAMES"],
               container_rows),
        "", "Local Volumes space usage:", "", render(["VOLUME NAME", "LINKS", "SIZE"], []),
        "", "Build cache usage: 0B", "",
        render(["CACHE ID", "CACHE TYPE", "SIZE", "CREATED", "LAST USED", "USAGE", "SHARED"], []), *own,
    ])  # fmt: skip


def _remove(runtime: Runtime, container: Container, force: bool) -> None:
    """``rm``: the container, then the layers only it still held (its image deleted by ``rmi -f``), as Docker's
    layer store frees them."""
    from pylayerfs.cli.images import free_layers

    try:
        with open(os.path.join(runtime.store.layout.mounts, container.id, "parent")) as f:
            top: str | None = f.read()
    except FileNotFoundError:
        top = None
    runtime.remove(container, force)
    with runtime.store.locked():
        free_layers(runtime.store, top)


def _start(runtime: Runtime, container: Container) -> None:
    """Start ``container`` in the background. With ``--rm`` it is removed once its command exited (by its monitor),
    or here when it could not start, as Docker's."""
    if not container.auto_remove:
        runtime.start_detached(container)
        return
    try:
        runtime.start_detached(container, lambda c: _remove(runtime, c, force=True))
    except StoreError:
        _remove(runtime, runtime.containers.load(container.id), force=True)
        raise


def _logs(runtime: Runtime, container: Container) -> None:
    """``logs``: the container's output, what it wrote on stdout to our stdout, on stderr to our stderr."""
    for stream, data in runtime.logs(container):
        out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        out.write(data)
        out.flush()


def _attached(runtime: Runtime, container: Container) -> None:
    """Record that the container's output goes to the client (docker/cli: every create and run but ``run -d``)."""
    container.config.update(AttachStdout=True, AttachStderr=True)
    with runtime.store.locked():
        runtime.containers.save(container)


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments)."""
    from pylayerfs.container.runtime import Runtime, StartError
    from pylayerfs.image.sandbox import SandboxError
    from pylayerfs.image.store import Store, StoreError

    try:
        runtime = Runtime(Store(args.root), StorageDriver(getattr(args, "storage_driver", StorageDriver.FUSE)))
        find = runtime.containers.find
        if args.command in ("create", "run"):
            container = runtime.create(args.image, args.command_args, args.name, args.env, args.workdir,
                                       args.user, auto_remove=args.command == "run" and args.rm)  # fmt: skip
            if args.command == "create" or not args.detach:
                _attached(runtime, container)
            if args.command == "create" or args.detach:
                if args.command == "run":
                    _start(runtime, container)  # with --rm, removed once it exited
                print(container.id)
                return 0
            try:
                return runtime.run_attached(container)
            finally:
                if args.rm:
                    _remove(runtime, runtime.containers.load(container.id), force=True)
        if args.command in ("start", "stop", "rm"):
            for ref in args.containers:
                container = find(ref)
                if args.command == "start":
                    _start(runtime, container)
                elif args.command == "stop":
                    runtime.stop(container, args.time)
                else:
                    _remove(runtime, container, args.force)
                print(ref)
            return 0
        if args.command == "exec":
            if not args.command_args:
                raise StoreError("exec needs a command")
            return runtime.exec(find(args.container), args.command_args, args.env, args.user, args.workdir)
        if args.command == "ps":
            text = ps(runtime, args.all, args.size, args.quiet, args.format)
        elif args.command == "logs":
            _logs(runtime, find(args.container))
            return 0
        elif args.command == "diff":
            text = diff(runtime, find(args.container))
        elif args.command == "commit":
            image = commit(runtime, find(args.container), args.reference, args.message, args.author,
                                         args.change)  # fmt: skip
            text = image.id
        else:
            text = system_df(runtime, args.verbose)
        if text:
            print(text)
    except StartError as exc:
        print(f"pylayerfs: {exc}", file=sys.stderr)
        return exc.code
    except (StoreError, SandboxError, MountError, OSError) as exc:
        print(f"pylayerfs {args.command}: {exc}", file=sys.stderr)
        return 125 if args.command == "run" else 1  # docker run answers 125 for its own errors
    return 0
