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

import codecs
import contextlib
import datetime
import hashlib
import ipaddress
import os
import posixpath
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from pylayerfs.image import sandbox
from pylayerfs.image.builder import imageconfig as cfg
from pylayerfs.image.builder.context import Context, ContextError
from pylayerfs.image.builder.copy import CopyJob, copy_into_root
from pylayerfs.image.builder.dockerfile import (
    SUPPORTED,
    Dockerfile,
    DockerfileError,
    Instruction,
    key_values,
    parse,
    parse_words,
    process_word,
    process_words,
)
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.image.drivers import overlay as rootfs
from pylayerfs.image.drivers import vfs as vfsdriver
from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image, format_time
from pylayerfs.image.store.layers import Layer, random_id
from pylayerfs.image.store.references import parse_reference
from pylayerfs.overlay.params import MountError

OCI_CREATE_FAILED = (
    "failed to create shim task: OCI runtime create failed: runc create failed: unable to start container process: "
)
BUILDKIT_ONLY = "the --{} option requires BuildKit. Refer to https://docs.docker.com/go/buildkit/ to learn how to build images with BuildKit enabled"  # noqa: E501


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
    keep_failed_run: Callable[[FailedRun], object] | None = None  # keeps a failed RUN's container (the CLI's)


@dataclass
class FailedRun:
    """A RUN step whose command failed: what its container (``ps -a``: ``Exited (N)``) is made of.

    ``changes`` is the directory of what the command changed (an overlay upper directory: whiteouts as character
    devices 0/0), to be moved away by :attr:`BuildOptions.keep_failed_run` during the call.
    """

    container_id: str
    image: Image  # the step's parent image
    command: list[str]
    config: dict[str, Any]  # the container config the command ran with
    changes: str
    exit_code: int | None  # None: the command did not start (Docker's container stays Created)
    started: str  # RFC 3339, as records write times
    finished: str


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

    def _red(self, text: str) -> None:
        """Text of the build's stderr stream, as moby's stream formatter sends it on stdout: in red."""
        self.out.write(f"\x1b[91m{text}\x1b[0m")
        self.out.flush()

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
        """Read the Dockerfile and the context, print the ``Sending build context`` line, parse the Dockerfile.

        As the classic builder, errors of the Dockerfile as a whole come after that line and before any step, as
        ``Error response from daemon: ...`` (BuildError); nothing is written then. Errors of one step (a missing
        COPY source, a bad port) come at that step, after the earlier steps ran.
        """
        for tag in self.options.tags:  # the docker client's checks, its words and status (125)
            try:
                parse_reference(tag)
            except StoreError as exc:
                message = f'invalid argument "{tag}" for "-t, --tag" flag: invalid reference format'
                with contextlib.suppress(StoreError):
                    parse_reference(tag.lower())
                    message += ": repository name must be lowercase"
                raise BuildError(f"{message}\nSee 'docker build --help'.", 125) from exc
        if not os.path.exists(self.options.context):
            raise BuildError(f'unable to prepare context: path "{self.options.context}" not found')
        path = self.options.dockerfile or os.path.join(self.options.context, "Dockerfile")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError as exc:
            raise BuildError("unable to prepare context: unable to evaluate symlinks in Dockerfile path: lstat "
                             f"{os.path.abspath(path)}: no such file or directory") from exc  # fmt: skip
        except OSError as exc:
            raise BuildError(f"cannot read the Dockerfile: {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise BuildError(f"{path}: not UTF-8 text") from exc
        real = os.path.realpath(path)
        root = os.path.realpath(self.options.context)
        rel = os.path.relpath(real, root) if real.startswith(root + os.sep) else ""
        try:
            context = Context(self.options.context, rel)
        except ContextError as exc:
            raise BuildError(str(exc)) from exc
        try:
            self._say(f"Sending build context to Docker daemon {human_size(context.transfer_size(), 4):>8}")
            try:
                dockerfile = parse(text.removeprefix("\ufeff"), rel or os.path.basename(path))
            except DockerfileError as exc:
                raise BuildError(f"Error response from daemon: {exc}") from exc
            if dockerfile.warnings:
                self._red("\n".join(dockerfile.warnings) + "\n")
        except BaseException:
            context.close()
            raise
        self.store.collect_garbage()
        return dockerfile, context

    def _run(self, dockerfile: Dockerfile, context: Context) -> Image:
        total = len(dockerfile.instructions)
        stage: Stage | None = None
        for n, ins in enumerate(dockerfile.instructions, start=1):
            words = ins.args.split() if ins.keyword == "FROM" else []
            if len(words) == 3 and any(s.name == words[2].lower() for s in self.stages):
                raise BuildError("a stage name already used")  # before its Step line, as moby's
            self._say(f"Step {n}/{total} : {ins.source}")
            try:
                if ins.keyword not in SUPPORTED:
                    raise DockerfileError(f"{ins.keyword} is not supported by pylayerfs")
                if ins.keyword == "FROM":
                    stage = self._from(ins, dockerfile.escape)
                elif stage is None:  # an ARG before the first FROM
                    self._meta_arg(ins, dockerfile.escape)
                else:
                    self._dispatch(stage, ins, dockerfile.escape, context)
            except (DockerfileError, ValueError, StoreError, ContextError, sandbox.SandboxError, MountError) as exc:
                raise BuildError(str(exc)) from exc
        assert stage is not None
        if stage.image is None:
            raise BuildError("no image was generated: is the Dockerfile empty after FROM scratch?")
        return stage.image

    # -- instructions ---------------------------------------------------------------------

    def _meta_arg(self, ins: Instruction, escape: str) -> None:
        for key, default in _arg_pairs(ins, self.global_args):
            value = self.options.build_args.get(key, default)
            self.consumed.add(key)
            if value is not None:
                self.global_args[key] = value

    def _from(self, ins: Instruction, escape: str) -> Stage:
        words = ins.args.split()  # moby: FROM's words split at whitespace, the base name expanded
        words[0] = process_word(words[0], self.global_args, escape)
        if not words[0]:
            raise DockerfileError(f"base name ({ins.args.split()[0]}) should not be blank")
        stage = Stage(words[2].lower() if len(words) == 3 else None)
        base = next((s for s in self.stages if s.name == words[0].lower()), None) if words[0] != "scratch" else None
        image = base.image if base is not None else None if words[0] == "scratch" else self.store.resolve(words[0])
        if image is not None:
            stage.image = image
            stage.run = image.run_config
            stage.history = image.history
            stage.diff_ids = image.diff_ids
        self._say(f" ---> {image.short_id if image else ''}")  # moby: an empty ID for scratch
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
            path = process_word(ins.args, stage.variables(), escape)
            workdir = posixpath.normpath(posixpath.join(stage.run.get("WorkingDir") or "/", path))
            stage.run["WorkingDir"] = workdir
            cmd = cfg.nop(stage.shell, f"WORKDIR {workdir}", two_words=False)
            self._filesystem_step(stage, cmd, lambda root: sandbox.call(root, lambda: None, cwd=workdir), "create")
        else:
            step = CONFIG_STEPS.get(ins.keyword, self._arg)
            self._metadata_step(stage, step(stage, ins, ins.args))

    def _arg(self, stage: Stage, ins: Instruction, args: str) -> str:
        texts = []
        for key, default in _arg_pairs(ins, stage.variables()):
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
        """RUN: the command in the stage's root; its stdout to ours, its stderr to ours in red (moby's stream
        formatter, ``\\x1b[91m...\\x1b[0m``). A failure exits with the command's status and keeps its container
        (``keep_failed_run``), as the classic builder does."""
        if "mount" in ins.flags:
            raise DockerfileError(BUILDKIT_ONLY.format("mount"))
        command = _command(stage, ins)
        args = {k: v for k, v in stage.args.items() if k not in stage.env}
        cmd = cfg.with_args(command, args)
        env = {**args, **stage.env}
        codes: list[int | None] = []  # the status; None: the command did not start
        errors: list[str] = []

        def run(root: str) -> None:
            process = sandbox.Process(root, command, env, stage.run.get("WorkingDir") or "/",
                                      stage.run.get("User") or "", self.container_id[:12])  # fmt: skip
            try:
                codes.append(self._run_command(process))
            except sandbox.CommandNotFound as exc:  # the words of Docker 20.10's runc
                codes.append(None)
                errors.append(f"{OCI_CREATE_FAILED}{exc}: unknown")
            except sandbox.SandboxError as exc:
                codes.append(None)
                errors.append(str(exc))

        def failed(container: str, changes: str, started: str) -> None:
            if not codes or codes[0] == 0:
                return
            code = codes[0]
            if self.options.keep_failed_run is not None and stage.image is not None:
                config = {**stage.run, "Cmd": command, "Image": stage.image.id}
                finished = format_time(datetime.datetime.now(datetime.UTC))
                kept = FailedRun(container, stage.image, command, config, changes, code, started, finished)
                self.options.keep_failed_run(kept)
            if code is None:
                raise BuildError(errors[0])
            raise BuildError(f"The command '{' '.join(command)}' returned a non-zero code: {code}", code)

        self._filesystem_step(stage, cmd, run, "run", check=failed)

    def _run_command(self, process: sandbox.Process) -> int:
        """Run ``process``; its stderr comes through a pipe, wrapped in red for ``self.out``. Its exit status."""
        read, write = os.pipe()
        saved = os.dup(2)
        try:
            os.dup2(write, 2)  # sandbox.start gives the command our fd 2
            started = sandbox.start(process)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(write)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            with os.fdopen(read, "rb", buffering=0) as stderr:
                while chunk := stderr.read(32768):
                    self._red(decoder.decode(chunk))
            return started.wait()
        except BaseException:  # interrupted: the command dies with its namespace before the error goes up
            started.kill()
            raise

    def _copy_words(self, ins: Instruction, variables: dict[str, str], escape: str) -> tuple[list[str], str]:
        words = ins.exec_form if ins.exec_form is not None else ins.args.split()  # moby: no quotes in the split
        words = [process_word(w, variables, escape) for w in words]
        if len(words) > 2 and not words[-1].endswith("/"):
            raise DockerfileError(f"When using {ins.keyword} with more than one source file, "
                                  "the destination must be a directory and end with a /")  # fmt: skip
        return words[:-1], words[-1]

    def _copy(self, stage: Stage, ins: Instruction, escape: str, context: Context) -> None:
        if "chmod" in ins.flags:
            raise DockerfileError(BUILDKIT_ONLY.format("chmod"))
        patterns, dest = self._copy_words(ins, stage.variables(), escape)
        if ins.keyword == "ADD" and any(p.startswith(("http://", "https://")) for p in patterns):
            raise DockerfileError("ADD from a URL is not supported (pylayerfs has no network)")
        workdir = stage.run.get("WorkingDir") or "/"
        target = posixpath.join(workdir, dest) + ("/" if dest.endswith(("/", "/.")) or dest == "." else "")
        owner = process_word(ins.flags["chown"], stage.variables(), escape) if "chown" in ins.flags else None
        with self._copy_source(ins, patterns, context) as (source, sources, digests):
            if len(sources) > 1 and not target.endswith("/"):
                raise DockerfileError(f"When using {ins.keyword} with more than one source file, "
                                      "the destination must be a directory and end with a /")  # fmt: skip
            digest = digests[0] if len(digests) == 1 else "multi:" + _sha256(",".join(digests))
            # moby 20.10 (dispatchers.go, performCopy): "%s %s%s in %s " with "--chown=U" and the hash: no space
            text = f"{ins.keyword} {f'--chown={owner}' if owner else ''}{digest} in {dest} "
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
        if stage is None and origin.isdigit():  # moby: imagecontext.go, getImageMount
            if int(origin) == len(self.stages) - 1:
                raise DockerfileError(f"invalid from flag value {origin}: refers to current build stage")
            if int(origin) >= len(self.stages):
                raise DockerfileError(f"invalid from flag value {origin}: index out of bounds")
            stage = self.stages[int(origin)]
        try:
            image = stage.image if stage is not None else self.store.resolve(origin)
        except StoreError as exc:
            raise DockerfileError(f"invalid from flag value {origin}: {exc}") from exc
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

    def _filesystem_step(self, stage: Stage, cmd: list[str], work: Any, step: str,
                         check: Callable[[str, str, str], None] | None = None) -> None:  # fmt: skip
        """Mount the stage's layers with a fresh upper, do ``work(root)``, keep the upper as the new layer.

        ``step``: ``"run"``, ``"create"`` (WORKDIR) or ``"copy"``, as :func:`imageconfig.step_configs` takes it.
        ``check(container_id, changes_dir, started)``, after the work and before the layer is made, may raise to
        stop the step (its changes are dropped once it returns or raises).
        """
        container = step != "copy"
        if self._probe(stage, cmd):
            return
        container_id = self.container_id = random_id()
        if container:
            self._say(f" ---> Running in {container_id[:12]}")
        parent = stage.image.top_layer if stage.image else None
        with self.store.locked():
            cache_id = self.store.layers.new_dir(parent)
        started = format_time(datetime.datetime.now(datetime.UTC))
        try:
            with self._mounted(parent, upper=cache_id) as root:
                work(root)
            if check is not None:
                check(container_id, self.store.layers.diff_dir(cache_id), started)
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


# Configuration steps (and `commit -c` changes): each changes stage.run and returns its history text. ``args`` is
# the instruction's text as written; each step expands its words as moby's (process_word: quotes, escapes, $VAR)
# with the stage's variables.


def _word(stage: Stage, ins: Instruction, word: str) -> str:
    return process_word(word, stage.variables(), ins.escape)


def _pairs(stage: Stage, ins: Instruction, args: str) -> list[tuple[str, str]]:
    """ENV/LABEL's pairs, key and value expanded (moby: expandKvpsInPlace, all with the variables before the step)."""
    pairs = key_values(args, ins.keyword, ins.escape)
    return [(_word(stage, ins, k), _word(stage, ins, v)) for k, v in pairs]


def config_env(stage: Stage, ins: Instruction, args: str) -> str:
    pairs = _pairs(stage, ins, args)
    stage.run["Env"] = cfg.set_env(stage.run.get("Env") or [], pairs)
    return "ENV " + " ".join(f"{k}={v}" for k, v in pairs)


def config_label(stage: Stage, ins: Instruction, args: str) -> str:
    pairs = _pairs(stage, ins, args)
    stage.run["Labels"] = {**(stage.run.get("Labels") or {}), **dict(pairs)}
    return "LABEL " + " ".join(f"{k}={v}" for k, v in pairs)


def _command(stage: Stage, ins: Instruction) -> list[str]:
    """CMD/ENTRYPOINT/RUN's command: the exec form's array, or the shell with the text (nothing more if none)."""
    return ins.exec_form if ins.exec_form is not None else [*stage.shell, *([ins.args] if ins.args else [])]


def config_cmd(stage: Stage, ins: Instruction, args: str) -> str:
    stage.run["Cmd"] = command = _command(stage, ins)
    stage.cmd_set = stage.cmd_set or bool(ins.args)  # moby: an empty CMD does not count as set
    return f"CMD {cfg.go_quoted(command)}"


def config_entrypoint(stage: Stage, ins: Instruction, args: str) -> str:
    command = _command(stage, ins) if ins.args else []
    stage.run["Entrypoint"] = command or None  # moby: an empty ENTRYPOINT is none
    if not stage.cmd_set:
        stage.run["Cmd"] = None  # an inherited CMD does not survive a new ENTRYPOINT
    return f"ENTRYPOINT {cfg.go_quoted(command)}"


def config_expose(stage: Stage, ins: Instruction, args: str) -> str:
    """EXPOSE: each port spec checked and expanded as moby's (go-connections nat.ParsePortSpec): ``80``,
    ``80/udp``, ``8000-8002``, ``IP:HOST:PORT``; DockerfileError in its words (``Invalid containerPort: x``)."""
    # moby: the words sorted as written (instructions/parse.go), then each expanded to words (dispatchExpose)
    variables = stage.variables()
    ports = [port for word in sorted(args.split()) for port in process_words(word, variables, ins.escape)]
    exposed: dict[str, dict[str, str]] = dict(stage.run.get("ExposedPorts") or {})
    for spec in ports:
        exposed.update({port: {} for port in _port_spec(spec)})
    stage.run["ExposedPorts"] = exposed  # a Go map: imageconfig.run_config writes its keys sorted
    return "EXPOSE " + " ".join(ports)


def _port_range(text: str) -> tuple[int, int] | None:
    """nat.ParsePortRange: ``N`` or ``N-M`` (16-bit, M >= N), or None."""
    parts = text.split("-") if "-" in text else [text, text]
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and int(p) < 65536 for p in parts):
        return None
    start, end = int(parts[0]), int(parts[1])
    return (start, end) if end >= start else None


def _port_spec(spec: str) -> list[str]:
    """The ``port/proto`` keys one EXPOSE word gives (nat.ParsePortSpec, its checks in its order)."""
    parts = spec.split(":")
    ip = ":".join(parts[:-2]) if len(parts) > 2 else ""
    host = parts[-2] if len(parts) > 1 else ""
    port, _, proto = parts[-1].partition("/")
    proto = proto or "tcp"
    if ip and not _is_ip(ip.removeprefix("[").removesuffix("]")):
        raise DockerfileError(f"Invalid ip address: {ip}")
    if not port:
        raise DockerfileError(f"No port specified: {spec}<empty>")
    ports = _port_range(port)
    if ports is None:
        raise DockerfileError(f"Invalid containerPort: {port}")
    hosts = _port_range(host) if host else (0, 0)
    if hosts is None:
        raise DockerfileError(f"Invalid hostPort: {host}")
    if host and ports[1] - ports[0] != hosts[1] - hosts[0] and ports[1] != ports[0]:
        raise DockerfileError(f"Invalid ranges specified for container and host Ports: {port} and {host}")
    if proto.lower() not in ("tcp", "udp", "sctp"):
        raise DockerfileError(f"Invalid proto: {proto}")
    return [f"{n}/{proto.lower()}" for n in range(ports[0], ports[1] + 1)]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def config_stopsignal(stage: Stage, ins: Instruction, args: str) -> str:
    """STOPSIGNAL: a signal name (``SIGTERM``, ``TERM``) or a number, checked as moby's ``signal.ParseSignal``."""
    name = _word(stage, ins, args.strip())
    known = {s.name.removeprefix("SIG") for s in signal.Signals} | {"CLD", "POLL", "IOT", "UNUSED"}
    number = int(name) if name.isascii() and name.isdigit() else None
    if number == 0 or (number is None and name.upper().removeprefix("SIG") not in known):
        raise DockerfileError(f"Invalid signal: {name}")
    stage.run["StopSignal"] = name
    return f"STOPSIGNAL {name}"


def config_user(stage: Stage, ins: Instruction, args: str) -> str:
    stage.run["User"] = _word(stage, ins, args.strip())
    return f"USER {stage.run['User']}"


def config_volume(stage: Stage, ins: Instruction, args: str) -> str:
    paths = [_word(stage, ins, p) for p in ins.exec_form or args.split()]
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
    "STOPSIGNAL": config_stopsignal,
}


def _arg_pairs(ins: Instruction, variables: dict[str, str]) -> list[tuple[str, str | None]]:
    """ARG's names and defaults, each expanded with ``variables`` (moby: parseWords, then ArgCommand.Expand)."""
    pairs: list[tuple[str, str | None]] = []
    for word in parse_words(ins.args, ins.escape):
        key, eq, value = word.partition("=")
        key = process_word(key, variables, ins.escape)
        if not key.replace("_", "a").isalnum():
            raise DockerfileError(f"ARG names a variable: '{word}'")
        pairs.append((key, process_word(value, variables, ins.escape) if eq else None))
    return pairs


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
