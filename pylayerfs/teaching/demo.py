"""``pylayerfs demo``: the blog post "Docker Image Layers", retold on real layers.

Each section says what the blog says, then runs the pylayerfs commands that
show it and prints their real output: the Step lines and layer IDs of a build,
``Using cache`` on the second build, the cache stopping at a changed
instruction, ``history``, the store on disk, a container's ``0B (virtual ...)``
growing by exactly the bytes an ``exec`` writes, where those bytes landed, and
``commit``. It runs on a throw-away store unless ``--dir`` names one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from pylayerfs.image.sizes import layer_size

APP_SH = "#!/bin/sh\necho hi\nexec sleep 999\n"  # 33 bytes, as the blog's app.sh
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


class Demo:
    def __init__(self, directory: str, step: bool) -> None:
        self.dir = directory
        self.root = os.path.join(directory, "store")
        self.context = os.path.join(directory, "context")
        self.step = step
        self.sections = 0

    def section(self, title: str, *explanation: str) -> None:
        if self.step and self.sections:
            input("\n[Enter for the next section] ")
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


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def run_demo(directory: str | None = None, step: bool = False, keep: bool = False) -> int:
    if os.geteuid() != 0:
        print("pylayerfs demo: needs root (it mounts layers and runs containers)", file=sys.stderr)
        return 1
    if shutil.which("busybox") is None:
        print("pylayerfs demo: needs a static busybox for its base image: apt-get install busybox-static",
              file=sys.stderr)  # fmt: skip
        return 1
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
        print(f"pylayerfs demo: {exc}", file=sys.stderr)
        return 1
    finally:
        subprocess.run([sys.executable, "-m", "pylayerfs", "--root", demo.root, "rm", "-f", CONTAINER],
                       capture_output=True, check=False)  # fmt: skip
        if keep or chosen:
            print(f"\nThe store is kept in {demo.root}: try  pylayerfs --root {demo.root} images")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def _retell(demo: Demo) -> None:
    print("Deep dive into Docker image layers, on real layers (a throw-away store in " + demo.root + ").")
    demo.section(
        "A base image",
        "There is no registry here: `pylayerfs base` makes an alpine-like image from a static busybox,",
        "and a first build makes the blog's bitphile/my-base-image on top of it.",
    )
    demo.run("base", "alpine", quiet=True)
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

    demo.section(
        "Seeing image layers: history",
        "One row per history entry, newest first. SIZE is the layer's: the COPY added 33 bytes, and",
        "RUN chmod +x copied the whole 33-byte file up into its own layer to change its mode.",
        "<missing> rows belong to the base image, whose parents are not in this store.",
    )
    demo.run("history", "bitphile/my-new-image")

    demo.section(
        "Image layers on the machine",
        "The store is laid out as /var/lib/docker's overlay2 store: image configs named by their ID,",
        "layer directories named by a random cache-id, layerdb entries named by ChainID.",
    )
    demo.shell(f"ls {demo.root}", "\n".join(sorted(os.listdir(demo.root))))
    content = os.path.join(demo.root, "image", "overlay2", "imagedb", "content", "sha256")
    sizes = {n: os.path.getsize(os.path.join(content, n)) for n in sorted(os.listdir(content))}
    demo.shell(f"ls -l {content}", "\n".join(f"-rw------- 1 root root {size:>5} {n}" for n, size in sizes.items()))
    overlay2 = os.path.join(demo.root, "overlay2")
    layers = sorted(n for n in os.listdir(overlay2) if n != "l")
    demo.shell(f"ls {overlay2}", "\n".join([*layers, "l"]))

    demo.section(
        "Docker container size",
        "A container is a thin writable layer on top of the image's read-only layers. `size` is what",
        "the container wrote into its own layer; `virtual size` adds the image layers it shares.",
    )
    demo.run("run", "-d", "--name", CONTAINER, "bitphile/my-new-image", quiet=True)
    demo.run("ps", "-s")
    demo.run("exec", CONTAINER, "sh", "-c", "echo hello world > file.txt",
             show=f'pylayerfs exec {CONTAINER} sh -c "echo hello world > file.txt"')  # fmt: skip
    demo.run("ps", "-s")

    demo.section(
        "Where the 12 bytes went",
        "`echo hello world` wrote 12 bytes; the container's upper directory holds them, and no image",
        "layer changed. diff derives the same from the upper directory: A is added.",
    )
    demo.run("diff", CONTAINER)
    container_layers = [n for n in os.listdir(overlay2) if n not in layers and n != "l" and not n.endswith("-init")]
    upper = os.path.join(overlay2, container_layers[0], "diff")
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
    demo.run("system", "df")
    demo.run("rm", "-f", CONTAINER, quiet=True)
    print("\nThat is the whole post, on real directories. Explore with --keep, or read docs/containers.md.")
