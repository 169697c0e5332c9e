"""``pylayerfs demo``: the blog post "Docker Image Layers", retold on real layers.

Each section says what the blog says, then runs the pylayerfs commands that
show it and prints their real output: the Step lines and layer IDs of a build,
``Using cache`` on the second build, the cache stopping at a changed
instruction, ``history``, the store on disk, a container's ``0B (virtual ...)``
growing by exactly the bytes an ``exec`` writes, where those bytes landed, and
``commit``. It runs on a throw-away store unless ``--dir`` names one.

Every number it explains is measured on the store it just made. ``--step``
pauses between sections when stdin is a terminal (Enter or end of input goes
on); without a terminal it says so once and runs through. Errors are one line
on stderr, written after stdout is flushed so that they come in order.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap

from pylayerfs.fuse.mount import remove_tree
from pylayerfs.image.sizes import layer_size
from pylayerfs.image.store import Store

APP_SH = "#!/bin/sh\necho hi\nexec sleep 999\n"  # as many bytes as the blog's app.sh (33)
DOCKERFILE_1 = """# syntax=docker/dockerfile:1
FROM bitphile/my-base-image

COPY app.sh ./app.sh

RUN chmod +x app.sh

ENTRYPOINT ["./app.sh"]
"""
DOCKERFILE_2 = """# syntax=docker/dockerfile:1

FROM bitphile/my-base-image

COPY app.sh ./app.sh
"""
BASE_DOCKERFILE = "FROM alpine\nRUN mkdir -p /opt/tools && cp /bin/busybox /opt/tools/bash\n"
CONTAINER = "bitphile-test-container"
HELLO = "hello world"
BLOG_SIZE = len(HELLO)  # the blog's "11B": the characters, without echo's newline
STORE_ENTRIES = {  # what `ls` of the store shows, as the demo explains it
    "busy": "a lock file: each build and container holds it (shared) while its directories are not yet"
    " registered, and the clean-up of what a crash left waits for them",
    "lock": "a lock file: each writer holds it (exclusive) while it registers layers, images or tags",
    "tmp": "staging: a layer or a value is made here, then appears in place by rename(2)",
    "image": "image configs (imagedb), layers by ChainID (layerdb), tags (repositories.json)",
    "overlay2": "the layer directories, named by cache-id, and l/, short names for mount options",
    "containers": "one directory per container: its config and its log",
    "vfs": "the vfs storage driver's full copies",
}


def error(message: str) -> None:
    """One line on stderr, after everything printed so far (stdout may be a pipe, and buffered)."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


class Demo:
    def __init__(self, directory: str, step: bool) -> None:
        self.dir = directory
        self.root = os.path.join(directory, "store")
        self.context = os.path.join(directory, "context")
        self.step = step
        self.sections = 0

    def section(self, title: str, *explanation: str) -> None:
        if self.step and self.sections:
            try:
                input("\n[Enter for the next section] ")
            except EOFError:  # Ctrl-D, or the end of piped input: go on, without pausing again
                print()
                self.step = False
        self.sections += 1
        print(f"\n== {self.sections}. {title} ==")
        for line in explanation:
            print(f"   {line}")

    def run(self, *args: str, show: str | None = None, quiet: bool = False) -> str:
        """Run ``pylayerfs ARGS`` on the demo store, print the command and its output, return the output."""
        shown = show or "pylayerfs " + shlex.join(args)
        print(f"\n$ {shown}")
        result = subprocess.run([sys.executable, "-m", "pylayerfs", "--root", self.root, *args],
                                capture_output=True, text=True, check=False, cwd=self.context)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{shown} failed: {result.stderr.strip()}")
        if not quiet and result.stdout.strip():
            print(result.stdout.rstrip("\n"))
        return result.stdout

    def shell(self, command: str, text: str) -> None:
        print(f"\n$ {command}")
        print(text.rstrip("\n"))

    def say(self, *lines: str) -> None:
        """Explain what was just shown (indented, as section texts are)."""
        print()
        for line in lines:
            print(f"   {line}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def run_demo(directory: str | None = None, step: bool = False, keep: bool = False) -> int:
    """Retell the blog; 0 when it ran through, 1 (one line on stderr) when something failed.

    ``step`` pauses between sections if stdin is a terminal; ``keep`` (or a ``directory`` given) keeps the store.
    """
    if os.geteuid() != 0:
        error("pylayerfs demo: needs root (it mounts layers and runs containers)")
        return 1
    if shutil.which("busybox") is None:
        error("pylayerfs demo: needs a static busybox for its base image: apt-get install busybox-static")
        return 1
    if step and not _interactive():
        error("pylayerfs demo: --step: stdin is not a terminal, so the demo runs without pausing")
        step = False
    chosen = directory is not None
    directory = directory or tempfile.mkdtemp(prefix="pylayerfs-demo-")
    demo = Demo(directory, step)
    os.makedirs(demo.context, exist_ok=True)
    _write(os.path.join(demo.context, "app.sh"), APP_SH)
    _write(os.path.join(demo.context, "Dockerfile.new-1"), DOCKERFILE_1)
    _write(os.path.join(demo.context, "Dockerfile.new-2"), DOCKERFILE_2)
    _write(os.path.join(demo.context, "Dockerfile.base"), BASE_DOCKERFILE)
    try:
        _retell(demo)
    except (RuntimeError, OSError) as exc:
        error(f"pylayerfs demo: {exc}")
        return 1
    finally:
        subprocess.run([sys.executable, "-m", "pylayerfs", "--root", demo.root, "rm", "-f", CONTAINER],
                       capture_output=True, check=False)  # fmt: skip
        if keep or chosen:
            print(f"\nThe store is kept in {demo.root}: try  pylayerfs --root {demo.root} images")
        else:
            remove_tree(directory)  # also after a step interrupted mid-way, still mounted
    return 0


def _interactive() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except ValueError:  # closed
        return False


def _step_of(image_history: list[dict[str, object]]) -> str:
    """The instruction of an image's last history entry, as written in a Dockerfile."""
    created_by = str(image_history[-1].get("created_by", "")) if image_history else ""
    shell = created_by.removeprefix("/bin/sh -c ")
    step = shell.removeprefix("#(nop) ") if shell.startswith("#(nop)") else f"RUN {shell}"
    return " ".join(step.split())


def layer_sharing(root: str) -> list[str]:
    """Why ``overlay2`` holds fewer layer directories than the store has images, measured on the store.

    A layer is stored once per ChainID (its DiffID and those of every layer below): an image whose step
    changed no file (CMD, ENTRYPOINT...) uses its parent's top layer, and two steps that produce the same
    files on the same parent make one layer. Returns the lines to print.
    """
    store = Store(root)
    images = [store.images.get(i) for i in store.images.ids()]
    by_id = {image.id: image for image in images}
    empty: list[str] = []  # steps that made no layer
    made: dict[str | None, list[str]] = {}  # ChainID -> the steps that made it
    for image in sorted(images, key=lambda i: i.created):
        parent = store.images.parent(image.id)
        parent_top = by_id[parent].top_layer if parent in by_id else None
        if parent is not None and image.top_layer == parent_top:
            empty.append(_step_of(image.history))
        else:
            made.setdefault(image.top_layer, []).append(_step_of(image.history))
    directories = [n for n in os.listdir(store.layout.overlay2) if n != "l"]
    lines = [f"{len(images)} images but {len(directories)} layer directories: a layer is stored once, under its",
             "ChainID (a hash of its content and of every layer below it), however many images use it."]  # fmt: skip
    if empty:
        kinds = sorted(set(empty))
        lines.append(f"{len(empty)} of the images come from steps that changed no file ({'; '.join(kinds)}):")
        lines.append("they use their parent's top layer, as history's 0B rows show.")
    for chain, steps in made.items():
        if len(steps) > 1 and chain is not None:
            cache_id = store.layers.get(chain).cache_id
            lines.append(f"{' and '.join(steps)} made the same files on the same parent, so the same")
            lines.append(f"ChainID: the {len(steps)} images share one directory, {cache_id[:12]}...")
    return lines


def _retell(demo: Demo) -> None:
    print("Deep dive into Docker image layers, on real layers (a throw-away store in " + demo.root + ").")
    demo.section(
        "A base image",
        "Docker Hub is out of reach here: `pylayerfs base` makes an alpine-like image from a static busybox,",
        "and a first build makes the blog's bitphile/my-base-image on top of it.",
    )
    demo.run("base", "alpine", quiet=True)
    demo.shell("cat Dockerfile.base", BASE_DOCKERFILE)
    demo.say(
        "The blog's base ran `apk add --no-cache bash`; with no network here, the RUN step copies busybox",
        "in instead, so the base image has a layer of its own, made by a RUN step, as the blog's has.",
    )
    demo.run("build", "-f", "Dockerfile.base", "-t", "bitphile/my-base-image", ".", quiet=True)
    demo.run("images")

    demo.section(
        "What are docker image layers?",
        "Each instruction of the Dockerfile stacks a new image on the previous one; the IDs after ' ---> '",
        "are those intermediate images. RUN ran in a pylayerfs mount of the layers below, with a fresh",
        "upper directory that became the step's layer.",
    )
    demo.shell("cat Dockerfile.new-1", DOCKERFILE_1)
    demo.run("build", "-f", "Dockerfile.new-1", "-t", "bitphile/my-new-image", ".")

    demo.section(
        "Layers are cached",
        "The second Dockerfile starts with the same steps: each is found among the children of the",
        "previous image, built from the same instruction and the same file contents, and reused.",
    )
    demo.shell("cat Dockerfile.new-2", DOCKERFILE_2)
    demo.run("build", "-f", "Dockerfile.new-2", "-t", "bitphile/my-new-image-2", ".")

    demo.section(
        "If any instruction changes, the cache stops there",
        "Change RUN chmod +x into chmod 755: FROM and COPY still come from the cache, the changed step",
        "and every step after it are built anew.",
    )
    changed = os.path.join(demo.context, "Dockerfile.new-3")
    _write(changed, DOCKERFILE_1.replace("chmod +x app.sh", "chmod 755 app.sh"))
    demo.run("build", "-f", "Dockerfile.new-3", "-t", "bitphile/my-new-image-3", ".")

    app_size = len(APP_SH.encode())
    demo.section(
        "Seeing image layers: history",
        f"One row per history entry, newest first. SIZE is the layer's: the COPY added {app_size} bytes, and",
        f"RUN chmod +x copied the whole {app_size}-byte file up into its own layer to change its mode.",
        "<missing> rows belong to the base image, whose parents are not in this store.",
    )
    demo.run("history", "bitphile/my-new-image")

    _on_the_machine(demo)


def _on_the_machine(demo: Demo) -> None:
    """Sections 6 to 9: the store on disk, a container's size, where its bytes went, commit."""
    demo.section(
        "Image layers on the machine",
        "The store is laid out as /var/lib/docker's overlay2 store: image configs named by their ID,",
        "layer directories named by a random cache-id, layerdb entries named by ChainID.",
    )
    entries = sorted(os.listdir(demo.root))
    demo.shell(f"ls {demo.root}", "\n".join(entries))
    width = max(len(n) for n in entries)
    explained = [n for n in entries if n in STORE_ENTRIES]
    demo.say(*(line for n in explained for line in textwrap.wrap(f"{n + ':':<{width + 1}} {STORE_ENTRIES[n]}", 96,
                                                                  subsequent_indent=" " * (width + 2))))  # fmt: skip
    content = os.path.join(demo.root, "image", "overlay2", "imagedb", "content", "sha256")
    sizes = {n: os.path.getsize(os.path.join(content, n)) for n in sorted(os.listdir(content))}
    demo.shell(f"ls -l {content}", "\n".join(f"-rw------- 1 root root {size:>5} {n}" for n, size in sizes.items()))
    overlay2 = os.path.join(demo.root, "overlay2")
    layers = sorted(n for n in os.listdir(overlay2) if n != "l")
    demo.shell(f"ls {overlay2}", "\n".join([*layers, "l"]))
    demo.say(*layer_sharing(demo.root))

    demo.section(
        "Docker container size",
        "A container is a thin writable layer on top of the image's read-only layers. `size` is what",
        "the container wrote into its own layer; `virtual size` adds the image layers it shares.",
    )
    demo.run("run", "-d", "--name", CONTAINER, "bitphile/my-new-image", quiet=True)
    demo.run("ps", "-s")
    demo.run("exec", CONTAINER, "sh", "-c", f"echo {HELLO} > file.txt",
             show=f'pylayerfs exec {CONTAINER} sh -c "echo {HELLO} > file.txt"')  # fmt: skip
    demo.run("ps", "-s")
    container_layers = [n for n in os.listdir(overlay2) if n not in layers and n != "l" and not n.endswith("-init")]
    upper = os.path.join(overlay2, container_layers[0], "diff")
    written = layer_size(upper)
    demo.say(
        f"The blog shows {BLOG_SIZE}B here: '{HELLO}' is {len(HELLO)} characters, and echo ends its line with a",
        f"newline, so the file holds {written} bytes (`printf '{HELLO}'` would write {len(HELLO)}).",
    )

    demo.section(
        f"Where the {written} bytes went",
        f"`echo {HELLO}` wrote {written} bytes; the container's upper directory holds them, and no image",
        "layer changed. diff derives the same from the upper directory: A is added.",
    )
    demo.run("diff", CONTAINER)
    listing = "\n".join(f"{n}  ({os.path.getsize(os.path.join(upper, n))} bytes)" for n in sorted(os.listdir(upper)))
    demo.shell(f"ls {upper}", listing)
    found = [n for n in layers if os.path.exists(os.path.join(overlay2, n, "diff", "file.txt"))]
    demo.shell("ls overlay2/*/diff/file.txt  # in the image layers", "(none)" if not found else "\n".join(found))
    print(f"\n   The container's size is its upper directory's: {layer_size(upper)}B.")

    demo.section(
        "Commit: the container layer becomes an image layer",
        "The upper directory is archived (whiteouts as .wh. files) and applied as a new layer.",
    )
    demo.run("commit", "-m", "hello world", CONTAINER, "bitphile/with-file", quiet=True)
    demo.run("history", "bitphile/with-file")
    df = demo.run("system", "df")
    if "~" in df:
        demo.say("A ~ in front of a size marks an estimate: nothing used the vfs driver in this store, so vfs/dir's",
                 "size is what it would hold (every layer a full copy of the layers below it, two copies per",
                 "container), computed from the layers' sizes rather than measured on disk.")  # fmt: skip
    demo.run("rm", "-f", CONTAINER, quiet=True)
    print("\nThat is the whole post, on real directories. Explore with --keep, or read docs/containers.md.")
