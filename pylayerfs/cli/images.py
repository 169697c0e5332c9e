"""The image commands: history, images, tag, rmi, inspect, import, and a busybox base image.

Output follows docker/cli: the same columns, IDs cut to 12 hex digits, sizes
and ages as go-units prints them, ``<missing>`` where the local parent chain
ends, ``Untagged:``/``Deleted:`` lines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import stat
import subprocess
import sys
from typing import Any

from pylayerfs.dockercli import ellipsis, render
from pylayerfs.image import archive
from pylayerfs.image.builder import imageconfig as cfg
from pylayerfs.image.history import history_rows
from pylayerfs.image.sizes import human_duration, human_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image, format_time
from pylayerfs.image.store.layout import LOWER_FILE, hex_of

CREATED_BY_WIDTH = 45  # docker history cuts CREATED BY to 44 runes and an ellipsis
NONE = "<none>"


def _since(when: datetime.datetime, now: datetime.datetime | None = None) -> str:
    if when <= datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC):
        return "N/A"
    return human_duration(((now or datetime.datetime.now(datetime.UTC)) - when).total_seconds()) + " ago"


def history(
    store: Store, ref: str, no_trunc: bool = False, as_json: bool = False, now: datetime.datetime | None = None
) -> str:
    rows = history_rows(store, store.resolve(ref))
    if as_json:
        return "\n".join(
            json.dumps({"Comment": r.comment, "CreatedAt": r.created.isoformat(), "CreatedBy": r.created_by,
                        "CreatedSince": _since(r.created), "ID": r.id, "Size": human_size(r.size)})
            for r in rows
        )  # fmt: skip
    table = []
    for r in rows:
        ident = r.id if no_trunc or r.id == "<missing>" else hex_of(r.id)[:12]
        created_by = r.created_by if no_trunc else ellipsis(r.created_by.replace("\t", " "), CREATED_BY_WIDTH)
        table.append([ident, _since(r.created, now), created_by, human_size(r.size), r.comment])
    return render(["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"], table)


def images(store: Store, show_all: bool = False) -> str:
    """``docker images``: one row per tag; untagged leaves as ``<none>``; intermediates with ``-a``."""
    rows = []
    tags = store.refs.all()
    for image_id in store.images.ids():
        image = store.images.get(image_id)
        names = [ref for ref, target in tags.items() if target == image_id]
        if not names and store.images.children(image_id) and not show_all:
            continue
        for ref in names or [f"{NONE}:{NONE}"]:
            name, _, tag = ref.rpartition(":")
            rows.append(
                (image.created, [name, tag, image.short_id, _since(image.created), human_size(store.size(image))])
            )
    rows.sort(key=lambda r: r[0], reverse=True)
    return render(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], [r[1] for r in rows])


def tag(store: Store, source: str, target: str) -> None:
    image = store.resolve(source)
    with store.locked():
        store.refs.tag(target, image.id)
        store.images.touch(image.id, datetime.datetime.now(datetime.UTC))


def layers_in_use(store: Store, ignore: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    """ChainIDs that an image (other than ``ignore``) or a container uses."""
    used: set[str] = set()
    for image_id in store.images.ids():
        if image_id not in ignore:
            used.update(layer.chain_id for layer in store.layers_of(store.images.get(image_id)))
    for container in os.listdir(store.layout.mounts):
        try:
            with open(os.path.join(store.layout.mounts, container, "parent")) as f:
                used.update(layer.chain_id for layer in store.layers.stack(f.read()))
        except OSError:
            continue
    return used


def rmi(store: Store, refs: list[str], force: bool = False) -> list[str]:
    """Untag, and delete images nothing else needs (their untagged, childless parents too)."""
    out: list[str] = []
    with store.locked():
        for ref in refs:
            image = store.resolve(ref)
            tags = store.refs.tags_of(image.id)
            by_name = not hex_of(image.id).startswith(ref.removeprefix("sha256:"))
            if by_name:
                out.append(f"Untagged: {store.refs.untag(ref)}")
                if len(tags) > 1:
                    continue
            elif len(tags) > 1 and not force:
                raise StoreError(f"conflict: unable to delete {image.short_id} (must be forced) - image is "
                                 "referenced in multiple repositories")  # fmt: skip
            else:
                out.extend(f"Untagged: {store.refs.untag(t)}" for t in tags)
            out.extend(_delete(store, image))
    return out


def _delete(store: Store, image: Image) -> list[str]:
    if store.images.children(image.id):
        raise StoreError(f"conflict: unable to delete {image.short_id} (cannot be forced) - image has dependent "
                         "child images")  # fmt: skip
    out = []
    current: Image | None = image
    while current is not None and not store.refs.tags_of(current.id) and not store.images.children(current.id):
        parent = store.images.parent(current.id)
        store.images.delete(current.id)
        out.append(f"Deleted: {current.id}")
        current = store.images.get(parent) if parent else None
    used = layers_in_use(store)
    for layer in store.layers_of(image):
        if layer.chain_id not in used:
            store.layers.remove(layer)
    return out


def inspect(store: Store, refs: list[str]) -> str:
    out = []
    for ref in refs:
        image = store.resolve(ref)
        layers = store.layers_of(image)
        graph: dict[str, Any] = {}
        if layers:
            top = store.layout.layer(layers[0].cache_id)
            graph = {"MergedDir": os.path.join(top, "merged"), "UpperDir": os.path.join(top, "diff"),
                     "WorkDir": os.path.join(top, "work")}  # fmt: skip
            if os.path.exists(os.path.join(top, LOWER_FILE)):
                graph["LowerDir"] = ":".join(store.layers.diff_dir(layer.cache_id) for layer in layers[1:])
        config = image.config
        out.append({
            "Id": image.id,
            "RepoTags": store.refs.tags_of(image.id),
            "RepoDigests": [],
            "Parent": store.images.parent(image.id) or "",
            "Comment": config.get("comment", ""),
            "Created": config.get("created"),
            "Container": config.get("container", ""),
            "ContainerConfig": config.get("container_config"),
            "DockerVersion": config.get("docker_version", ""),
            "Author": config.get("author", ""),
            "Config": config.get("config"),
            "Architecture": config.get("architecture"),
            "Os": config.get("os"),
            "Size": store.size(image),
            "GraphDriver": {"Data": graph or None, "Name": "overlay2"},
            "RootFS": {"Type": "layers", "Layers": image.diff_ids},
        })  # fmt: skip
    return json.dumps(out, indent=4)


def _commit_base(store: Store, cache_id: str, ref: str, history: list[dict[str, Any]], run: dict[str, Any]) -> Image:
    """Register the layer built in ``cache_id`` and make a one-layer image of it (with the store locked)."""
    layer = store.layers.register(cache_id, None)
    config = cfg.image_config(run, {**run, "Cmd": None}, "", history[-1]["created"], history,
                              [layer.diff_id] if layer else [])  # fmt: skip
    del config["container"], config["container_config"]
    image = store.images.put(config, None)
    store.refs.tag(ref, image.id)
    return image


def import_rootfs(store: Store, path: str, ref: str) -> Image:
    """``docker import``: a root filesystem tarball becomes a one-layer image."""
    from pylayerfs.image.store.references import parse_reference

    parse_reference(ref)
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
    with source, store.busy():
        with store.locked():
            cache_id = store.layers.new_dir(None)
        try:
            with archive.open_archive(source, path) as tar:
                archive.extract(tar, store.layers.diff_dir(cache_id))
            now = format_time(datetime.datetime.now(datetime.UTC))
            with store.locked():
                return _commit_base(store, cache_id, ref, [{"created": now, "comment": f"Imported from {path}"}], {})
        except BaseException:
            store.layers.remove_dir(cache_id)
            raise


BASE_DIRS = {"bin": 0o755, "sbin": 0o755, "usr/bin": 0o755, "usr/sbin": 0o755, "etc": 0o755, "root": 0o700,
             "tmp": 0o1777, "home": 0o755, "var": 0o755, "proc": 0o555, "sys": 0o555, "dev": 0o755}  # fmt: skip
BASE_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n",
    "etc/group": "root:x:0:root\nnogroup:x:65534:\n",
    "etc/os-release": 'NAME="pylayerfs busybox"\nID=busybox\nPRETTY_NAME="busybox base image made by pylayerfs"\n',
}


def make_base(store: Store, ref: str, busybox: str = "/bin/busybox") -> Image:
    """A small base image with a working /bin/sh: a static busybox and its applets, like alpine's layout."""
    from pylayerfs.image.store.references import parse_reference

    parse_reference(ref)
    try:
        applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
        if not os.stat(busybox).st_mode & stat.S_IXUSR:
            raise OSError("not executable")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StoreError(f"cannot use {busybox} as busybox ({exc}); on Debian: apt-get install busybox-static") from exc
    with store.busy():
        with store.locked():
            cache_id = store.layers.new_dir(None)
        try:
            root = store.layers.diff_dir(cache_id)
            for d, mode in BASE_DIRS.items():
                os.makedirs(os.path.join(root, d), exist_ok=True)
                os.chmod(os.path.join(root, d), mode)
            with open(busybox, "rb") as src, open(os.path.join(root, "bin", "busybox"), "wb") as dst:
                dst.write(src.read())
            os.chmod(os.path.join(root, "bin", "busybox"), 0o755)
            for applet in applets:
                target = os.path.join(root, applet.lstrip("/"))
                if os.path.isdir(os.path.dirname(target)) and not os.path.lexists(target):
                    os.symlink("/bin/busybox", target)
            for name, text in BASE_FILES.items():
                with open(os.path.join(root, name), "w") as f:
                    f.write(text)
            created = datetime.datetime.now(datetime.UTC)
            digest = hex_of(archive.diff_id(root))
            shell = cfg.DEFAULT_SHELL
            add = " ".join(cfg.nop(shell, f"ADD file:{digest} in / ", two_words=False))
            history: list[dict[str, Any]] = [
                {"created": format_time(created), "created_by": add},
                {"created": format_time(created), "created_by": " ".join(cfg.nop(shell, 'CMD ["/bin/sh"]')),
                 "empty_layer": True},
            ]  # fmt: skip
            run = {"Env": [cfg.DEFAULT_PATH], "Cmd": ["/bin/sh"]}
            with store.locked():
                return _commit_base(store, cache_id, ref, history, run)
        except BaseException:
            store.layers.remove_dir(cache_id)
            raise


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments)."""
    from pylayerfs.image import archive
    from pylayerfs.image.builder.build import Builder, BuildError, BuildOptions, FailedRun
    from pylayerfs.image.drivers import StorageDriver
    from pylayerfs.image.store import Store, StoreError

    try:
        store = Store(args.root)
        if args.command == "build":
            build_args = dict(a.partition("=")[::2] for a in args.build_arg)
            driver = StorageDriver(args.storage_driver)
            if args.metacopy and not driver.mounts:
                raise StoreError("--metacopy needs an overlay storage driver (fuse or overlay), not vfs")
            from pylayerfs.container.buildrun import keep_failed_run
            from pylayerfs.container.runtime import Runtime

            def keep(failed: FailedRun) -> None:  # a failed RUN's container stays, as Docker's
                keep_failed_run(Runtime(store, driver), failed)

            options = BuildOptions(args.context, args.file, args.tag, args.no_cache, build_args, driver,
                                   args.metacopy, keep)  # fmt: skip
            Builder(store, options).build()
        elif args.command == "history" and args.format == "tree":
            from pylayerfs.teaching import diagram

            print(diagram.text(f"image {args.image}", diagram.image_boxes(store, args.image)))
        elif args.command == "history":
            print(history(store, args.image, args.no_trunc, args.format == "json"))
        elif args.command == "images":
            print(images(store, args.all))
        elif args.command == "tag":
            tag(store, args.source, args.target)
        elif args.command == "rmi":
            print("\n".join(rmi(store, args.images, args.force)))
        elif args.command == "inspect":
            print(inspect(store, args.images))
        elif args.command == "import":
            print(import_rootfs(store, args.archive, args.reference).id)
        else:
            print(make_base(store, args.reference, args.busybox).id)
    except BuildError as exc:
        sys.stdout.flush()
        print(exc, file=sys.stderr)
        return exc.code
    except (StoreError, archive.ArchiveError, OSError) as exc:
        print(f"pylayerfs {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
