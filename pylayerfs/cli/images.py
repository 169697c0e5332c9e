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

from pylayerfs.cli import formats
from pylayerfs.dockercli import ellipsis
from pylayerfs.image import archive
from pylayerfs.image.builder import imageconfig as cfg
from pylayerfs.image.history import history_rows
from pylayerfs.image.sizes import human_duration, human_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image, format_time
from pylayerfs.image.store.layout import LOWER_FILE, hex_of
from pylayerfs.image.store.references import parse

CREATED_BY_WIDTH = 45  # docker history cuts CREATED BY to 44 runes and an ellipsis
NONE = "<none>"


def _since(when: datetime.datetime, now: datetime.datetime | None = None) -> str:
    if when <= datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC):
        return "N/A"
    return human_duration(((now or datetime.datetime.now(datetime.UTC)) - when).total_seconds()) + " ago"


HISTORY_HEADERS = {"ID": "IMAGE", "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "CreatedBy": "CREATED BY",
                   "Size": "SIZE", "Comment": "COMMENT"}  # fmt: skip


def _local(when: datetime.datetime) -> datetime.datetime:
    """Go's ``time.Unix(s, 0)``: whole seconds, in the local time zone (UTC where that zone cannot show it: year 1)."""
    try:
        return datetime.datetime.fromtimestamp(int(when.timestamp())).astimezone()
    except (ValueError, OverflowError, OSError):
        return when


def rfc3339(when: datetime.datetime) -> str:
    """Go's ``time.Unix(s, 0).Format(time.RFC3339)``: ``2026-12-06T22:20:08Z`` (``Z`` for UTC)."""
    text = _local(when).isoformat()
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def history(store: Store, ref: str, no_trunc: bool = False, fmt: str = "table", human: bool = True,
            quiet: bool = False, now: datetime.datetime | None = None) -> str:  # fmt: skip
    """``docker history [--no-trunc] [-H=false] [-q] [--format F] IMAGE`` (docker/cli's ``historyContext``)."""
    rows = []
    for r in history_rows(store, store.resolve(ref)):
        created_by = r.created_by if no_trunc else ellipsis(r.created_by.replace("\t", " "), CREATED_BY_WIDTH)
        rows.append({
            "ID": r.id if no_trunc or r.id == "<missing>" else hex_of(r.id)[:12],
            "CreatedSince": _since(r.created, now) if human else rfc3339(r.created),
            "CreatedAt": rfc3339(r.created),
            "CreatedBy": created_by,
            "Size": human_size(r.size) if human else str(r.size),
            "Comment": r.comment,
        })  # fmt: skip
    if quiet:
        fmt = "{{.ID}}"
    return formats.write(fmt, HISTORY_HEADERS, rows, ["ID", "CreatedSince", "CreatedBy", "Size", "Comment"])


# docker/cli titles VirtualSize "SIZE" too
IMAGES_HEADERS = {"Repository": "REPOSITORY", "Tag": "TAG", "ID": "IMAGE ID", "Digest": "DIGEST",
                  "CreatedSince": "CREATED", "CreatedAt": "CREATED AT", "Size": "SIZE", "Containers": "CONTAINERS",
                  "SharedSize": "SHARED SIZE", "UniqueSize": "UNIQUE SIZE", "VirtualSize": "SIZE"}  # fmt: skip


def go_time(when: datetime.datetime) -> str:
    """Go's ``time.Unix(s, 0).String()`` in local time: ``2026-12-06 22:20:08 +0000 UTC``."""
    return _local(when).strftime("%Y-%m-%d %H:%M:%S %z %Z")


def images(store: Store, show_all: bool = False, fmt: str = "table", digests: bool = False) -> str:
    """``docker images [-a] [--digests] [--format F]``: one row per tag; untagged leaves as ``<none>``; intermediates
    with ``-a``.

    Newest first; the fields of docker/cli's ``imageContext`` (``Containers``, shared and unique sizes ``N/A``, as
    ``docker images`` leaves them). Rows as docker/cli's ``imageFormatTaggedAndDigest``: with ``digests``, a tag
    shows once per digest of its repository (RepoDigests); a repository known only by digest shows ``<none>`` as tag.
    """
    rows = []
    for image_id in store.images.ids():
        image = store.images.get(image_id)
        names = [(*ref.rpartition(":")[::2], NONE) for ref in store.refs.tags_of(image_id)]
        by_repo: dict[str, list[str]] = {}
        for ref in store.refs.digests_of(image_id):
            by_repo.setdefault(ref.partition("@")[0], []).append(ref.partition("@")[2])
        if digests:
            names = [(n, t, d) for n, t, _ in names for d in by_repo.get(n) or [NONE]]
        tagged = {n for n, _, _ in names}
        names += [(n, NONE, d if digests else NONE) for n, ds in by_repo.items() if n not in tagged for d in ds]
        names = list(dict.fromkeys(names))  # one row per repository without digests
        if not names and store.images.children(image_id) and not show_all:
            continue
        size = store.size(image)
        for name, tag_, digest in names or [(NONE, NONE, NONE)]:
            rows.append((image.created, {
                "Containers": "N/A", "CreatedAt": go_time(image.created), "CreatedSince": _since(image.created),
                "Digest": digest, "ID": image.short_id, "Repository": name, "SharedSize": "N/A",
                "Size": human_size(size), "Tag": tag_, "UniqueSize": "N/A", "VirtualSize": human_size(size, 4),
            }))  # fmt: skip
    rows.sort(key=lambda r: r[0], reverse=True)
    columns = ["Repository", "Tag", *(["Digest"] if digests else []), "ID", "CreatedSince", "Size"]
    return formats.write(fmt, IMAGES_HEADERS, [r[1] for r in rows], columns)


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


class NotFound(StoreError):
    """``rmi`` of a name or ID that names no image (``docker rmi`` treats it apart: not fatal with ``-f``)."""


Users = list[tuple[str, str, bool]]  # (image ID, container short ID, running) of every container


def containers_by_image(store: Store) -> Users:
    """Every container's image ID, short ID and whether it runs (reconciled: a dead monitor is Exited)."""
    from pylayerfs.container.runtime import Runtime

    runtime = Runtime(store)
    return [(c.image_id, c.short_id, runtime.reconcile(c).state.running) for c in runtime.containers.all()]


def _users(users: Users, image_id: str) -> tuple[str | None, str | None]:
    """The short IDs of a running and of a stopped container of ``image_id`` (None where there is none)."""
    running = next((c for i, c, up in users if i == image_id and up), None)
    stopped = next((c for i, c, up in users if i == image_id and not up), None)
    return running, stopped


def _conflict(store: Store, users: Users, image: Image, hard_only: bool, references: bool) -> str | None:
    """moby's ``checkImageDeleteConflict``: why ``image`` cannot be deleted (Docker's message), or None.

    Children and a running container always conflict ("cannot be forced"); without ``hard_only`` also other
    tags (with ``references``) and a stopped container ("must be forced").
    """
    running, stopped = _users(users, image.id)
    why = None
    if store.images.children(image.id):
        why = "(cannot be forced) - image has dependent child images"
    elif running:
        why = f"(cannot be forced) - image is being used by running container {running}"
    elif not hard_only and references and store.refs.tags_of(image.id):
        why = "(must be forced) - image is referenced in multiple repositories"
    elif not hard_only and stopped:
        why = f"(must be forced) - image is being used by stopped container {stopped}"
    return f"conflict: unable to delete {image.short_id} {why}" if why else None


def rmi_one(store: Store, users: Users, ref: str, force: bool = False) -> list[str]:
    """One image of ``docker rmi`` (moby's ``daemon/images/image_delete.go`` ``ImageDelete``, with the store locked).

    By name: untag it, and when it was the image's last tag delete the image unless something still needs it
    (children, a container: then only the tag goes, as Docker's). By ID: untag and delete, or refuse. Returns the
    ``Untagged:``/``Deleted:`` lines (deleted images, then the ChainIDs of the layers they freed; untagged, childless
    parents after). Raises :class:`NotFound`, or :class:`StoreError` with Docker's conflict message, before
    changing anything.
    """
    try:
        image = store.resolve(ref)
    except StoreError as exc:
        if str(exc).startswith("no such image"):
            raise NotFound(f"No such image: {ref}") from exc
        raise
    tags = store.refs.tags_of(image.id)
    if not hex_of(image.id).startswith(ref.removeprefix("sha256:")):  # a name
        running, stopped = _users(users, image.id)
        if not force and len(tags) == 1 and (running or stopped):
            raise StoreError(f'conflict: unable to remove repository reference "{ref}" (must force) - container '
                             f"{running or stopped} is using its referenced image {image.short_id}")  # fmt: skip
        out = [f"Untagged: {store.refs.untag(ref)}"]
        name = parse(ref).name  # its repository's digests go with its last tag (moby: same-repository digests)
        if not any(t.rpartition(":")[0] == name for t in store.refs.tags_of(image.id)):
            digests = [d for d in store.refs.digests_of(image.id) if d.partition("@")[0] == name]
            out += [f"Untagged: {store.refs.untag(d)}" for d in digests]
        if (
            store.refs.tags_of(image.id)
            or store.refs.digests_of(image.id)
            or (_conflict(store, users, image, force, references=False))
        ):
            return out  # still referenced, or needed: the untag was all (moby: a quiet conflict)
        return out + _delete(store, users, image)
    conflict = _conflict(store, users, image, force, references=len(tags) > 1)  # one tag goes with the ID
    if conflict:
        raise StoreError(conflict)
    references = store.refs.tags_of(image.id) + store.refs.digests_of(image.id)
    return [f"Untagged: {store.refs.untag(r)}" for r in references] + _delete(store, users, image)


def rmi(store: Store, refs: list[str], force: bool = False) -> tuple[list[str], list[StoreError]]:
    """``docker rmi``: each reference on its own (:func:`rmi_one`); the lines of those that worked, and the errors."""
    out: list[str] = []
    errors: list[StoreError] = []
    users = containers_by_image(store)
    with store.locked():
        for ref in refs:
            try:
                out.extend(rmi_one(store, users, ref, force))
            except StoreError as exc:
                errors.append(exc)
    return out, errors


def _delete(store: Store, users: Users, image: Image) -> list[str]:
    """Delete ``image`` (no tag, no child), the layers it alone used, then its parents that are left dangling and
    unused (moby's prune of parents: quiet, never forced)."""
    out = []
    current: Image | None = image
    while current is not None:
        parent = store.images.parent(current.id)
        layers = store.layers_of(current)
        store.images.delete(current.id)
        out.append(f"Deleted: {current.id}")
        out.extend(f"Deleted: {chain}" for chain in free_layers(store, layers[0].chain_id if layers else None))
        current = store.images.get(parent) if parent else None
        if current is not None and (store.refs.tags_of(current.id) or store.images.children(current.id)
                                    or any(_users(users, current.id))):  # fmt: skip
            break
    return out


def free_layers(store: Store, top: str | None) -> list[str]:
    """Remove the layers of the stack under ``top`` (a ChainID) that no image or container uses any more, top
    down, as moby's layer store releases them (with the store locked); their ChainIDs."""
    used = layers_in_use(store)
    freed = []
    for layer in store.layers.stack(top):
        if layer.chain_id in used:
            break
        store.layers.remove(layer)
        freed.append(layer.chain_id)
    return freed


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
            "RepoDigests": store.refs.digests_of(image.id),
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
            "VirtualSize": store.size(image),
            "GraphDriver": {"Data": {k: graph[k] for k in sorted(graph)} or None, "Name": "overlay2"},
            "RootFS": {"Type": "layers", "Layers": image.diff_ids},
            "Metadata": {"LastTagTime": store.images.last_tagged(image.id)},
        })  # fmt: skip
    text = json.dumps(out, indent=4, ensure_ascii=False)  # Go's MarshalIndent: HTML-safe escapes
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return text


def _commit_base(store: Store, cache_id: str, ref: str, history: list[dict[str, Any]], run: dict[str, Any]) -> Image:
    """Register the layer built in ``cache_id`` and make a one-layer image of it (with the store locked)."""
    layer = store.layers.register(cache_id, None)
    config = cfg.image_config(run, {**run, "Cmd": None}, "", history[-1]["created"], history,
                              [layer.diff_id] if layer else [])  # fmt: skip
    del config["container_config"]
    image = store.images.put(config, None)
    store.refs.tag(ref, image.id)
    return image


def import_rootfs(store: Store, path: str, ref: str) -> Image:
    """``docker import PATH REF``: a root filesystem tarball (plain, gzip, bzip2 or xz) becomes a one-layer image.

    As moby's ``daemon/images/image_import.go``: the layer's DiffID is the sha256 of the uncompressed tar as given
    (its bytes kept, :meth:`LayerStore.register <pylayerfs.image.store.layers.LayerStore.register>`), the config has
    ``comment`` and a history entry ``Imported from -`` (the docker client sends a file as ``-``), an empty
    ``config`` and ``container_config``. Raises StoreError (bad reference, unreadable file) and ArchiveError.
    """
    from pylayerfs.image.store.references import parse_reference

    parse_reference(ref)
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror}") from exc
    with source, store.busy():
        with store.locked():
            cache_id = store.layers.new_dir(None)
        splitter = store.layers.splitter(cache_id)
        try:
            got = archive.extract_keeping(source, path, store.layers.diff_dir(cache_id), splitter, splitter.seen)  # type: ignore[arg-type]
            kept = splitter.close(got)
            now = format_time(datetime.datetime.now(datetime.UTC))
            comment = "Imported from -"
            with store.locked():
                layer = store.layers.register(cache_id, None, kept)
                config = cfg.image_config({}, {}, "", now, [{"created": now, "comment": comment}],
                                          [layer.diff_id] if layer else [])  # fmt: skip
                image = store.images.put({**config, "comment": comment}, None)
                store.refs.tag(ref, image.id)
                return image
        except BaseException:
            store.layers.remove_dir(cache_id)
            raise
        finally:
            splitter.discard()


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


def _print(text: str) -> None:
    """Lines as docker/cli writes them: none at all for a template over no rows."""
    if text:
        print(text)


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
            _print(history(store, args.image, args.no_trunc, args.format, args.human, args.quiet))
        elif args.command == "images":
            _print(images(store, args.all, args.format, args.digests))
        elif args.command == "tag":
            tag(store, args.source, args.target)
        elif args.command == "rmi":
            lines, errors = rmi(store, args.images, args.force)
            if lines:
                print("\n".join(lines))
            if errors:  # docker/cli: all errors at the end; with -f, only "no such image" is not fatal
                print("\n".join(f"pylayerfs rmi: {e}" for e in errors), file=sys.stderr)
                return 1 if not args.force or not all(isinstance(e, NotFound) for e in errors) else 0
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
