"""``pylayerfs build``: run a Dockerfile step by step, as Docker's classic builder does.

Every step makes one image whose ``parent`` is the previous step's image, with
one more history entry. A step that changes files (RUN, COPY, ADD, a WORKDIR
that creates its directory) runs in a root filesystem mounted from the parent
image's layers, under an init layer, with a fresh upper directory: that upper
directory becomes the step's layer. Steps that only change the configuration
record an empty layer (``#(nop)``).

The cache is the classic builder's: a step is reused when a child of the
current image was built locally from the same container configuration (the
command, with a content hash for COPY/ADD sources, and the environment,
user, working directory...). After the first miss nothing is reused.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import posixpath
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from pylayerfs.image import sandbox
from pylayerfs.image.builder import imageconfig as cfg
from pylayerfs.image.builder.context import Context, ContextError
from pylayerfs.image.builder.copy import CopyJob, copy_into_root
from pylayerfs.image.builder.dockerfile import Dockerfile, DockerfileError, Instruction, key_values, parse, split_words
from pylayerfs.image.builder.dockerfile import substitute as expand
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.image.drivers import overlay as rootfs
from pylayerfs.image.drivers import vfs as vfsdriver
from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image, format_time
from pylayerfs.image.store.layers import Layer, random_id
from pylayerfs.image.store.references import parse_reference
from pylayerfs.overlay.params import MountError


class BuildError(Exception):
    """The build stopped; ``code`` is the exit status (a failed RUN's own)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BuildOptions:
    context: str
    dockerfile: str | None = None  # default: CONTEXT/Dockerfile
    tags: Sequence[str] = ()
    no_cache: bool = False
    build_args: dict[str, str] = field(default_factory=dict)
    driver: StorageDriver = StorageDriver.FUSE
    metacopy: bool = False  # mount steps with metacopy=on: a chmod copies metadata only


@dataclass
class Stage:
    name: str | None
    image: Image | None = None
    run: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    diff_ids: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    cmd_set: bool = False

    @property
    def shell(self) -> list[str]:
        return list(self.run.get("Shell") or cfg.DEFAULT_SHELL)

    @property
    def env(self) -> dict[str, str]:
        return dict(e.partition("=")[::2] for e in self.run.get("Env") or [])

    def variables(self) -> dict[str, str]:
        """What ``$VAR`` expands to in this stage: build arguments, overridden by the environment."""
        return {**self.args, **self.env}


class Builder:
    def __init__(self, store: Store, options: BuildOptions, out: TextIO = sys.stdout) -> None:
        self.store = store
        self.options = options
        self.out = out
        self.busted = options.no_cache
        self.stages: list[Stage] = []
        self.global_args: dict[str, str] = {}
        self.consumed: set[str] = set()
        self.container_id = ""  # the step's intermediate container: a RUN step's hostname, as Docker's

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    # -- the whole build ----------------------------------------------------------------

    def build(self) -> Image:
        dockerfile, context = self._prepare()
        try:
            with self.store.busy():
                image = self._run(dockerfile, context)
        finally:
            context.close()
        unused = sorted(set(self.options.build_args) - self.consumed)
        if unused:
            self._say(f"[Warning] One or more build-args [{' '.join(unused)}] were not consumed")
        self._say(f"Successfully built {image.short_id}")
        with self.store.locked():
            for tag in self.options.tags:
                self._say(f"Successfully tagged {self.store.refs.tag(tag, image.id)}")
                self.store.images.touch(image.id, datetime.datetime.now(datetime.UTC))
        return image

    def _prepare(self) -> tuple[Dockerfile, Context]:
        """Read and check everything before anything is written: a bad Dockerfile leaves the store as it was."""
        path = self.options.dockerfile or os.path.join(self.options.context, "Dockerfile")
        try:
            with open(path, encoding="utf-8") as f:
                dockerfile = parse(f.read(), path)
        except OSError as exc:
            raise BuildError(f"cannot read the Dockerfile: {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise BuildError(f"{path}: not UTF-8 text") from exc
        except DockerfileError as exc:
            raise BuildError(str(exc)) from exc
        for tag in self.options.tags:
            try:
                parse_reference(tag)
            except StoreError as exc:
                raise BuildError(str(exc)) from exc
        real = os.path.realpath(path)
        root = os.path.realpath(self.options.context)
        rel = os.path.relpath(real, root) if real.startswith(root + os.sep) else ""
        try:
            context = Context(self.options.context, rel)
        except ContextError as exc:
            raise BuildError(str(exc)) from exc
        try:
            self._check(dockerfile, context)
        except BaseException:
            context.close()
            raise
        self.store.collect_garbage()
        return dockerfile, context

    def _check(self, dockerfile: Dockerfile, context: Context) -> None:
        """Base images and COPY/ADD sources exist (with the variables a dry run can know)."""
        names: set[str] = set()
        variables: dict[str, str] = dict(self.options.build_args)
        for ins in dockerfile.instructions:
            try:
                if ins.keyword == "FROM":
                    words = split_words(expand(ins.args, variables, dockerfile.escape))
                    if len(words) not in (1, 3) or (len(words) == 3 and words[1].lower() != "as"):
                        raise DockerfileError("FROM takes an image and optionally AS name")
                    if words[0] != "scratch" and words[0] not in names:
                        image = self.store.resolve(words[0])
                        variables.update(dict(e.partition("=")[::2] for e in image.run_config.get("Env") or []))
                    if len(words) == 3:
                        names.add(words[2].lower())
                elif ins.keyword == "ENV":
                    variables.update(key_values(expand(ins.args, variables, dockerfile.escape), "ENV"))
                elif ins.keyword == "ARG":
                    for key, default in _arg_pairs(ins.args):
                        variables.setdefault(key, default or "")
                elif ins.keyword in ("COPY", "ADD"):
                    sources, _ = self._copy_words(ins, variables, dockerfile.escape)
                    if "from" not in ins.flags:
                        for source in sources:
                            if ins.keyword == "ADD" and source.startswith(("http://", "https://")):
                                raise DockerfileError("ADD from a URL is not supported (pylayerfs has no network)")
                            context.sources(source, ins.keyword)
                    elif ins.flags["from"].lower() not in names and not ins.flags["from"].isdigit():
                        self.store.resolve(ins.flags["from"])
            except (DockerfileError, ContextError, StoreError, ValueError) as exc:
                raise BuildError(f"{dockerfile.path}:{ins.line}: {exc}") from exc

    def _run(self, dockerfile: Dockerfile, context: Context) -> Image:
        self._say(f"Sending build context to Docker daemon {human_size(context.transfer_size(), 4):>8}")
        total = len(dockerfile.instructions)
        stage: Stage | None = None
        for n, ins in enumerate(dockerfile.instructions, start=1):
            self._say(f"Step {n}/{total} : {ins.source}")
            try:
                if ins.keyword == "FROM":
                    stage = self._from(ins, dockerfile.escape)
                elif stage is None:  # an ARG before the first FROM
                    self._meta_arg(ins, dockerfile.escape)
                else:
                    self._dispatch(stage, ins, dockerfile.escape, context)
            except (DockerfileError, ValueError, StoreError, ContextError, sandbox.SandboxError, MountError) as exc:
                raise BuildError(f"{dockerfile.path}:{ins.line}: {exc}") from exc
        assert stage is not None
        if stage.image is None:
            raise BuildError("no image was generated: is the Dockerfile empty after FROM scratch?")
        return stage.image

    # -- instructions ---------------------------------------------------------------------

    def _meta_arg(self, ins: Instruction, escape: str) -> None:
        for key, default in _arg_pairs(expand(ins.args, self.global_args, escape)):
            value = self.options.build_args.get(key, default)
            self.consumed.add(key)
            if value is not None:
                self.global_args[key] = value

    def _from(self, ins: Instruction, escape: str) -> Stage:
        words = split_words(expand(ins.args, self.global_args, escape))
        stage = Stage(words[2].lower() if len(words) == 3 else None)
        base = next((s for s in self.stages if s.name == words[0].lower()), None) if words[0] != "scratch" else None
        image = base.image if base is not None else None if words[0] == "scratch" else self.store.resolve(words[0])
        if image is not None:
            stage.image = image
            stage.run = image.run_config
            stage.history = image.history
            stage.diff_ids = image.diff_ids
            self._say(f" ---> {image.short_id}")
        if "PATH" not in stage.env:
            stage.run["Env"] = [*(stage.run.get("Env") or []), cfg.DEFAULT_PATH]
        self.stages.append(stage)
        return stage

    def _dispatch(self, stage: Stage, ins: Instruction, escape: str, context: Context) -> None:
        if ins.keyword == "RUN":
            self._run_step(stage, ins)
        elif ins.keyword in ("COPY", "ADD"):
            self._copy(stage, ins, escape, context)
        elif ins.keyword == "WORKDIR":
            path = expand(ins.args, stage.variables(), escape)
            workdir = posixpath.normpath(posixpath.join(stage.run.get("WorkingDir") or "/", path))
            stage.run["WorkingDir"] = workdir
            cmd = cfg.nop(stage.shell, f"WORKDIR {workdir}", two_words=False)
            self._filesystem_step(stage, cmd, lambda root: sandbox.call(root, lambda: None, cwd=workdir), "create")
        else:
            step = CONFIG_STEPS.get(ins.keyword, self._arg)
            self._metadata_step(stage, step(stage, ins, expand(ins.args, stage.variables(), escape)))

    def _arg(self, stage: Stage, ins: Instruction, args: str) -> str:
        texts = []
        for key, default in _arg_pairs(ins.args):
            self.consumed.add(key)
            value = self.options.build_args.get(key, default if default is not None else self.global_args.get(key))
            if value is not None:
                stage.args[key] = value
            texts.append(key if default is None else f"{key}={default}")
        return "ARG " + " ".join(texts)

    def _metadata_step(self, stage: Stage, text: str) -> None:
        """A step that only changes the configuration: an empty layer and a ``#(nop)`` history entry."""
        cmd = cfg.nop(stage.shell, text)
        if self._probe(stage, cmd):
            return
        container = random_id()
        self._say(f" ---> Running in {container[:12]}")
        self._say(f"Removing intermediate container {container[:12]}")
        self._commit(stage, cmd, None, container, "create")

    def _run_step(self, stage: Stage, ins: Instruction) -> None:
        command = ins.exec_form if ins.exec_form is not None else [*stage.shell, ins.args]
        args = {k: v for k, v in stage.args.items() if k not in stage.env}
        cmd = cfg.with_args(command, args)
        env = {**args, **stage.env}

        def run(root: str) -> None:
            process = sandbox.Process(root, command, env, stage.run.get("WorkingDir") or "/",
                                      stage.run.get("User") or "", self.container_id[:12])  # fmt: skip
            code = sandbox.run(process)
            if code != 0:
                raise BuildError(f"The command '{' '.join(command)}' returned a non-zero code: {code}", code)

        self._filesystem_step(stage, cmd, run, "run")

    def _copy_words(self, ins: Instruction, variables: dict[str, str], escape: str) -> tuple[list[str], str]:
        words = ins.exec_form if ins.exec_form is not None else split_words(ins.args)
        words = [expand(w, variables, escape) for w in words]
        if len(words) > 2 and not words[-1].endswith("/"):
            raise DockerfileError(f"When using {ins.keyword} with more than one source file, "
                                  "the destination must be a directory and end with a /")  # fmt: skip
        return words[:-1], words[-1]

    def _copy(self, stage: Stage, ins: Instruction, escape: str, context: Context) -> None:
        patterns, dest = self._copy_words(ins, stage.variables(), escape)
        workdir = stage.run.get("WorkingDir") or "/"
        target = posixpath.join(workdir, dest) + ("/" if dest.endswith(("/", "/.")) or dest == "." else "")
        owner = ins.flags.get("chown")
        with self._copy_source(ins, patterns, context) as (source, sources, digests):
            if len(sources) > 1 and not target.endswith("/"):
                raise DockerfileError(f"When using {ins.keyword} with more than one source file, "
                                      "the destination must be a directory and end with a /")  # fmt: skip
            digest = digests[0] if len(digests) == 1 else "multi:" + _sha256(",".join(digests))
            text = f"{ins.keyword}{f' --chown={owner}' if owner else ''} {digest} in {dest} "
            job = CopyJob(sources, target, owner, extract=ins.keyword == "ADD")
            cmd = cfg.nop(stage.shell, text, two_words=False)
            copy = lambda root: sandbox.call(root, lambda: copy_into_root(source, job))  # noqa: E731
            self._filesystem_step(stage, cmd, copy, "copy")

    @contextlib.contextmanager
    def _copy_source(
        self, ins: Instruction, patterns: list[str], context: Context
    ) -> Iterator[tuple[Context, list[str], list[str]]]:
        """The source tree, the sources in it and their digests (the context, or another stage)."""
        origin = ins.flags.get("from")
        if origin is None:
            sources = [s for p in patterns for s in context.sources(p, ins.keyword)]
            yield context, sources, [context.digest(s) for s in sources]
            return
        stage = next((s for s in self.stages[:-1] if s.name == origin.lower()), None)
        if stage is None and origin.isdigit() and int(origin) < len(self.stages) - 1:
            stage = self.stages[int(origin)]
        image = stage.image if stage is not None else self.store.resolve(origin)
        if image is None:
            raise DockerfileError(f"--from={origin}: that stage has no files")
        with self._mounted(image.top_layer) as root:
            other = Context(root, "", image=True)
            try:
                sources = [s for p in patterns for s in other.sources(p.lstrip("/") or ".", ins.keyword)]
                yield other, sources, [other.digest(s) for s in sources]
            finally:
                other.close()

    # -- steps that change files ------------------------------------------------------------

    def _filesystem_step(self, stage: Stage, cmd: list[str], work: Any, step: str) -> None:
        """Mount the stage's layers with a fresh upper, do ``work(root)``, keep the upper as the new layer.

        ``step``: ``"run"``, ``"create"`` (WORKDIR) or ``"copy"``, as :func:`imageconfig.step_configs` takes it."""
        container = step != "copy"
        if self._probe(stage, cmd):
            return
        container_id = self.container_id = random_id()
        if container:
            self._say(f" ---> Running in {container_id[:12]}")
        parent = stage.image.top_layer if stage.image else None
        with self.store.locked():
            cache_id = self.store.layers.new_dir(parent)
        try:
            with self._mounted(parent, upper=cache_id) as root:
                work(root)
            if container:
                self._say(f"Removing intermediate container {container_id[:12]}")
            with self.store.locked():
                layer = self.store.layers.register(cache_id, parent)
            if layer is not None and not self.options.driver.mounts:
                vfsdriver.layer_tree(self.store, layer.chain_id)  # vfs keeps every layer as a full tree
        except BaseException:
            self.store.layers.remove_dir(cache_id)
            raise
        self._commit(stage, cmd, layer, container_id, step)

    @contextlib.contextmanager
    def _mounted(self, parent: str | None, upper: str | None = None) -> Iterator[str]:
        """The root filesystem: an init layer (mountpoints) over ``parent``'s layers, writing into ``upper``.

        Without ``upper`` the mount is read-only (a source for ``COPY --from``).
        """
        if not self.options.driver.mounts:
            with vfsdriver.step_root(self.store, parent, upper) as root:
                yield root
            return
        layers = self.store.layers
        name = upper or random_id()
        init = f"{name}-init"
        init_dir = self.store.layout.layer(init, "diff")
        os.makedirs(init_dir)
        try:
            if upper:  # a source for COPY --from has the image's files only, as Docker's
                sandbox.make_init_layer(init_dir)
            lowers = [init_dir, *layers.lower_dirs(parent)]
            diff = layers.diff_dir(upper) if upper else None
            work = self.store.layout.layer(upper, "work") if upper else None
            merged = self.store.layout.layer(init, "merged")
            metacopy = self.options.metacopy or layers.uses_metacopy(parent)
            with rootfs.mounted(lowers, diff, work, merged, self.options.driver, metacopy) as root:
                yield root
        finally:
            layers.remove_dir(init)

    def _probe(self, stage: Stage, cmd: list[str]) -> bool:
        """Reuse a locally built child of the current image made by the same step, if the cache allows."""
        if self.busted:
            return False
        key = cfg.cache_key(cfg.run_config({**stage.run, "Cmd": cmd}))
        parent = stage.image.id if stage.image else None
        candidates = []
        for image_id in self.store.images.ids():
            if self.store.images.parent(image_id) != parent or not self.store.images.built_locally(image_id):
                continue
            image = self.store.images.get(image_id)
            if cfg.cache_key(cfg.run_config(image.config.get("container_config") or {})) == key:
                candidates.append(image)
        if not candidates:
            self.busted = True
            return False
        best = max(candidates, key=lambda i: i.created)
        self._say(" ---> Using cache")
        self._adopt(stage, best)
        return True

    def _commit(self, stage: Stage, cmd: list[str], layer: Layer | None, container: str, step: str) -> None:
        created = format_time(datetime.datetime.now(datetime.UTC))
        entry: dict[str, Any] = {"created": created, "created_by": " ".join(cmd)}
        if layer is None:
            entry["empty_layer"] = True
        parent = stage.image.id if stage.image else ""
        run = {**stage.run, "Image": parent}
        diff_ids = [*stage.diff_ids, *([layer.diff_id] if layer else [])]
        container, container_config = cfg.step_configs(run, cmd, container, step)
        config = cfg.image_config(run, container_config, container, created, [*stage.history, entry], diff_ids)
        with self.store.locked():
            image = self.store.images.put(config, stage.image.id if stage.image else None)
        self._adopt(stage, image)

    def _adopt(self, stage: Stage, image: Image) -> None:
        stage.image = image
        stage.run = image.run_config
        stage.history = image.history
        stage.diff_ids = image.diff_ids
        self._say(f" ---> {image.short_id}")


# Configuration steps (and `commit -c` changes): each changes stage.run and returns its history text.
# The arguments come with variables expanded.


def config_env(stage: Stage, ins: Instruction, args: str) -> str:
    pairs = key_values(args, "ENV")
    stage.run["Env"] = cfg.set_env(stage.run.get("Env") or [], pairs)
    return "ENV " + " ".join(f"{k}={v}" for k, v in pairs)


def config_label(stage: Stage, ins: Instruction, args: str) -> str:
    pairs = key_values(args, "LABEL")
    stage.run["Labels"] = {**(stage.run.get("Labels") or {}), **dict(pairs)}
    return "LABEL " + " ".join(f"{k}={v}" for k, v in pairs)


def config_cmd(stage: Stage, ins: Instruction, args: str) -> str:
    stage.run["Cmd"] = command = ins.exec_form if ins.exec_form is not None else [*stage.shell, ins.args]
    stage.cmd_set = True
    return f"CMD {cfg.go_quoted(command)}"


def config_entrypoint(stage: Stage, ins: Instruction, args: str) -> str:
    stage.run["Entrypoint"] = command = ins.exec_form if ins.exec_form is not None else [*stage.shell, ins.args]
    if not stage.cmd_set:
        stage.run["Cmd"] = None  # an inherited CMD does not survive a new ENTRYPOINT
    return f"ENTRYPOINT {cfg.go_quoted(command)}"


def config_expose(stage: Stage, ins: Instruction, args: str) -> str:
    ports = sorted(split_words(args))  # the parser sorts them as strings (moby instructions.parseExpose)
    exposed: dict[str, dict[str, str]] = {p if "/" in p else f"{p}/tcp": {} for p in ports}
    stage.run["ExposedPorts"] = {**(stage.run.get("ExposedPorts") or {}), **exposed}
    return "EXPOSE " + " ".join(ports)


def config_user(stage: Stage, ins: Instruction, args: str) -> str:
    stage.run["User"] = args.strip()
    return f"USER {stage.run['User']}"


def config_volume(stage: Stage, ins: Instruction, args: str) -> str:
    paths = ins.exec_form or split_words(args)
    stage.run["Volumes"] = {**(stage.run.get("Volumes") or {}), **{p: {} for p in paths}}
    return f"VOLUME {cfg.go_list(paths)}"


def config_shell(stage: Stage, ins: Instruction, args: str) -> str:
    assert ins.exec_form is not None
    stage.run["Shell"] = ins.exec_form
    return f"SHELL {cfg.go_list(ins.exec_form)}"


CONFIG_STEPS: dict[str, Callable[[Stage, Instruction, str], str]] = {
    "ENV": config_env,
    "LABEL": config_label,
    "CMD": config_cmd,
    "ENTRYPOINT": config_entrypoint,
    "EXPOSE": config_expose,
    "USER": config_user,
    "VOLUME": config_volume,
    "SHELL": config_shell,
}


def _arg_pairs(text: str) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = []
    for word in split_words(text):
        key, eq, value = word.partition("=")
        if not key.replace("_", "a").isalnum():
            raise DockerfileError(f"ARG names a variable: '{word}'")
        pairs.append((key, value if eq else None))
    return pairs


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
