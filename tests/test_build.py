"""Building images for real: RUN and COPY through pylayerfs mounts, the classic builder's output and cache.

Golden files hold the blog's two builds and the history of the first, with
image IDs replaced by names (IMAGE-1...) in order of appearance; the COPY
hash of the test's app.sh is deterministic, so it stays.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylayerfs.cli import images as imagecmds
from pylayerfs.image.sizes import human_size
from pylayerfs.image.store import Store
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below

pytestmark = [pytest.mark.fuse, pytest.mark.root]
GOLDEN = Path(__file__).parent / "golden"
APP = '#!/bin/sh\necho "hello, layers!!"\n'  # 33 bytes, as the blog's app.sh
DOCKERFILE_1 = """# syntax=docker/dockerfile:1
FROM alpine

COPY app.sh ./app.sh

RUN chmod +x app.sh

ENTRYPOINT ["./app.sh"]
"""
DOCKERFILE_2 = "# syntax=docker/dockerfile:1\n\nFROM alpine\n\nCOPY app.sh ./app.sh\n"


def pylayerfs(root: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYLAYERFS_ROOT": str(root)}
    result = subprocess.run([sys.executable, "-m", "pylayerfs", *args], capture_output=True, text=True, env=env,
                            timeout=timeout, check=False)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"pylayerfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "store"
    pylayerfs(root, "base", "alpine")
    yield root
    for mountpoint in mounts_below(str(root)):  # a failed test must not leave a mount behind
        realfs.detach(mountpoint)


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "app.sh").write_text(APP)
    os.chmod(ctx / "app.sh", 0o644)
    (ctx / "Dockerfile.new-1").write_text(DOCKERFILE_1)
    (ctx / "Dockerfile.new-2").write_text(DOCKERFILE_2)
    return ctx


def context_with(ctx: Path, dockerfile: str) -> Path:
    """A build context holding only a Dockerfile."""
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    return ctx


class Ids:
    """Replace 12-hex image IDs by IMAGE-<n> (same width), in order of appearance."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        def name(match: re.Match[str]) -> str:
            return self.names.setdefault(match.group(0), f"IMAGE-{len(self.names) + 1}".ljust(12, "-"))

        text = re.sub(r"(Running in|intermediate container) [0-9a-f]{12}", r"\1 <container>", text)
        text = re.sub(r"(?<![0-9a-f:])[0-9a-f]{12}(?![0-9a-f])", name, text)
        return re.sub(r"(?<=ADD file:)[0-9a-f]+", lambda m: "x" * len(m.group(0)), text)  # busybox differs


def base_size_as_placeholder(history: str, base_layer: int) -> str:
    """``history`` with the size of the base image's layer (the host's busybox) as ``<BASE>`` in its row.

    The size must be the layer's, printed as go-units does: any other value stays and fails the golden file.
    """
    size = human_size(base_layer)
    lines = history.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("<missing>") and "ADD file:" in line:
            lines[i] = re.sub(rf"(?<=   ){re.escape(size)} *$", lambda m: "<BASE>".ljust(len(m.group(0))), line)
    return "\n".join(lines)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PYLAYERFS_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"differs from {path} (PYLAYERFS_UPDATE_GOLDEN=1 rewrites it)"


def test_the_blogs_two_builds_and_history(store, context):
    ids = Ids()
    first = pylayerfs(store, "build", "-f", str(context / "Dockerfile.new-1"), "-t", "bitphile/my-new-image",
                      str(context))  # fmt: skip
    second = pylayerfs(store, "build", "-f", str(context / "Dockerfile.new-2"), "-t", "bitphile/my-new-image-2",
                       str(context))  # fmt: skip
    golden("blog-builds.txt", ids(first.stdout) + "----\n" + ids(second.stdout))
    assert first.stderr == second.stderr == ""
    s = Store(str(store))
    image = s.resolve("bitphile/my-new-image")
    later = image.created + datetime.timedelta(minutes=50)
    history = ids(imagecmds.history(s, "bitphile/my-new-image", now=later))
    golden("blog-history.txt", base_size_as_placeholder(history, s.layers_of(s.resolve("alpine"))[0].size) + "\n")
    # the COPY layer is shared: the second image is the first build's step 2, on disk once
    assert s.resolve("bitphile/my-new-image-2").id == s.images.parent(s.images.parent(image.id) or "")
    assert len(s.layers.all()) == 3  # busybox, COPY app.sh, the chmod (a copy-up of app.sh: 33B)
    assert [layer.size for layer in s.layers_of(image)][:2] == [33, 33]


def test_changing_a_copied_file_invalidates_from_that_step_on(store, context):
    build = ("build", "-f", str(context / "Dockerfile.new-1"), str(context))
    pylayerfs(store, *build)
    os.utime(context / "app.sh", (1, 1))  # mtime is not in the cache key
    assert pylayerfs(store, *build).stdout.count("Using cache") == 3
    (context / "app.sh").write_text(APP.upper())
    out = pylayerfs(store, *build).stdout
    assert out.count("Using cache") == 0 and "Running in" in out
    assert pylayerfs(store, *build, "--no-cache").stdout.count("Using cache") == 0
    (context / "Dockerfile.new-1").write_text(DOCKERFILE_1.replace("RUN chmod", "ENV A=1\nRUN chmod"))
    steps = pylayerfs(store, *build).stdout.split("Step ")
    assert ["Using cache" in s for s in steps[1:]] == [False, True, False, False, False]


def test_run_sees_the_image_environment_workdir_and_user(store, tmp_path):
    ctx = context_with(
        tmp_path / "c2",
        'FROM alpine\nARG GREETING=hi\nENV WHO=world\nWORKDIR /srv/app\nRUN echo "$GREETING $WHO $(pwd)" > out\n'
        'USER nobody\nRUN id -u > /tmp/uid\nCMD ["cat", "out"]\n',
    )
    out = pylayerfs(store, "build", "--build-arg", "GREETING=hello", "-t", "env-test", str(ctx))
    assert "Step 5/8 : RUN echo" in out.stdout
    s = Store(str(store))
    image = s.resolve("env-test")
    run_layer = s.layers.diff_dir(s.layers_of(image)[1].cache_id)
    assert open(os.path.join(run_layer, "srv/app/out")).read() == "hello world /srv/app\n"
    uid_layer = s.layers.diff_dir(s.layers_of(image)[0].cache_id)
    assert open(os.path.join(uid_layer, "tmp/uid")).read() == "65534\n"
    history = [h["created_by"] for h in image.history]
    assert history[-7:] == [
        "/bin/sh -c #(nop)  ARG GREETING=hi",
        "/bin/sh -c #(nop)  ENV WHO=world",
        "/bin/sh -c #(nop) WORKDIR /srv/app",
        '|1 GREETING=hello /bin/sh -c echo "$GREETING $WHO $(pwd)" > out',
        "/bin/sh -c #(nop)  USER nobody",
        "|1 GREETING=hello /bin/sh -c id -u > /tmp/uid",
        '/bin/sh -c #(nop)  CMD ["cat" "out"]',
    ]
    assert image.run_config["Cmd"] == ["cat", "out"] and image.run_config["WorkingDir"] == "/srv/app"


def test_failing_run_keeps_earlier_layers_and_exits_with_its_code(store, tmp_path):
    ctx = context_with(tmp_path / "c3", "FROM alpine\nRUN echo kept > /kept\nRUN echo partial > /partial; exit 3\n")
    result = pylayerfs(store, "build", str(ctx), check=False)
    assert result.returncode == 3
    assert result.stderr == "The command '/bin/sh -c echo partial > /partial; exit 3' returned a non-zero code: 3\n"
    s = Store(str(store))
    assert len(s.layers.all()) == 2, "the base and the first RUN; nothing of the failed step"
    container = result.stdout.split("Running in ")[-1].split()[0]
    ps = pylayerfs(store, "ps", "-a").stdout.splitlines()
    assert len(ps) == 2 and ps[1].startswith(container) and "Exited (3)" in ps[1], "its container stays, as Docker's"
    assert pylayerfs(store, "diff", container).stdout == "A /partial\n"
    pylayerfs(store, "rm", container)
    assert sorted(os.listdir(s.layout.overlay2)) == sorted(["l", *(la.cache_id for la in s.layers.all())])
    assert os.listdir(s.layout.tmp) == []
    rerun = pylayerfs(store, "build", str(ctx), check=False)
    assert "Using cache" in rerun.stdout and rerun.returncode == 3


def test_copy_add_dockerignore_chown_and_the_image_root(store, tmp_path):
    ctx = tmp_path / "c4"
    (ctx / "src" / "sub").mkdir(parents=True)
    (ctx / "src" / "a.txt").write_text("a")
    (ctx / "src" / "sub" / "b.txt").write_text("b")
    (ctx / "secret.key").write_text("no")
    (ctx / ".dockerignore").write_text("*.key\n")
    subprocess.run(["tar", "-czf", str(ctx / "files.tar.gz"), "-C", str(ctx / "src"), "."], check=True)
    (ctx / "Dockerfile").write_text(
        "FROM alpine\nRUN ln -s /etc /hostetc\nCOPY src /data/\nCOPY --chown=nobody:nogroup src/*.txt /owned/\n"
        "ADD files.tar.gz /unpacked\nCOPY src/a.txt /hostetc/escaped.txt\n"
    )
    pylayerfs(store, "build", "-t", "copies", str(ctx))
    assert not os.path.exists("/etc/escaped.txt"), "a symlink in the image resolved on the host"
    s = Store(str(store))
    tops = [s.layers.diff_dir(layer.cache_id) for layer in s.layers_of(s.resolve("copies"))]
    assert open(os.path.join(tops[0], "etc/escaped.txt")).read() == "a"
    assert os.stat(os.path.join(tops[2], "owned/a.txt")).st_uid == 65534
    assert sorted(os.listdir(os.path.join(tops[3], "data"))) == ["a.txt", "sub"]
    assert open(os.path.join(tops[1], "unpacked/sub/b.txt")).read() == "b"
    bad = ctx / "Dockerfile.bad"
    bad.write_text("FROM alpine\nCOPY secret.key /\n")
    result = pylayerfs(store, "build", "-f", str(bad), str(ctx), check=False)
    assert result.returncode == 1 and "excluded by .dockerignore" in result.stderr


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        (
            "FROM alpine\nFOO bar\n",
            "Error response from daemon: dockerfile parse error line 2: unknown instruction: FOO",
        ),
        ("FROM nosuchimage\n", "no such image: nosuchimage"),
        ("FROM alpine\nCOPY missing.txt /\n", "COPY failed: file not found in build context or excluded by"),
        ("FROM alpine\nCOPY ../../etc/passwd /\n", "COPY failed: forbidden path outside the build context"),
        (
            'FROM alpine\nCMD ["unclosed"\nSHELL sh\n',
            "Error response from daemon: dockerfile parse error line 3: SHELL",
        ),
    ],
)
def test_bad_dockerfiles_change_nothing(store, tmp_path, dockerfile, message):
    """As the classic builder: the whole file's errors after the Sending line, a step's at its step."""
    from pylayerfs.testing.lowers import digest

    ctx = context_with(tmp_path / "bad", dockerfile)
    before = digest(str(store))
    result = pylayerfs(store, "build", str(ctx), check=False)
    assert result.returncode == 1 and result.stdout.startswith("Sending build context to Docker daemon")
    assert ("Step 1/" in result.stdout) == (not message.startswith("Error response"))
    assert result.stderr.startswith(message)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert digest(str(store)) == before


def test_kernel_overlay_driver_builds_the_same_layers(store, context):
    from pylayerfs.image import archive

    pylayerfs(store, "build", "-f", str(context / "Dockerfile.new-1"), "-t", "on-fuse", str(context))
    pylayerfs(store, "build", "--no-cache", "--storage-driver", "overlay", "-f", str(context / "Dockerfile.new-1"),
              "-t", "on-kernel", str(context))  # fmt: skip
    s = Store(str(store))

    def listing(ref: str) -> list[list[str]]:
        out = []
        for layer in s.layers_of(s.resolve(ref)):
            diff = s.layers.diff_dir(layer.cache_id)
            out.append(sorted(f"{rel}:{oct(st.st_mode)}:{st.st_size}" for rel, st in archive.walk(diff)))
        return out

    assert listing("on-fuse") == listing("on-kernel")


def test_interrupted_build_is_cleaned_up_by_the_next(store, tmp_path):
    ctx = context_with(tmp_path / "c5", "FROM alpine\nRUN echo before > /b\nRUN touch /started; sleep 60\n")
    env = {**os.environ, "PYLAYERFS_ROOT": str(store)}
    proc = subprocess.Popen([sys.executable, "-m", "pylayerfs", "build", str(ctx)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    s = Store(str(store))
    deadline = time.monotonic() + 60
    while not any(os.path.exists(os.path.join(s.layers.diff_dir(n), "started"))
                  for n in os.listdir(s.layout.overlay2) if n != "l"):  # fmt: skip
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registered = {layer.cache_id for layer in s.layers.all()}
    assert len(registered) == 2, "the base and the first RUN are registered, the killed step is not"
    ctx2 = tmp_path / "c6"
    ctx2.mkdir()
    (ctx2 / "Dockerfile").write_text("FROM alpine\n")
    pylayerfs(store, "build", str(ctx2))
    assert sorted(os.listdir(s.layout.overlay2)) == sorted(["l", *registered])
    assert mounts_below(str(store)) == []


def test_concurrent_builds_share_the_store(store, tmp_path):
    results: list[subprocess.CompletedProcess[str]] = []
    contexts = []
    for i in range(3):
        ctx = tmp_path / f"cc{i}"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"FROM alpine\nRUN echo {i} > /n\nRUN echo common > /c\n")
        contexts.append(ctx)
    threads = [threading.Thread(target=lambda c=c: results.append(pylayerfs(store, "build", "-t", c.name, str(c))))
               for c in contexts]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    s = Store(str(store))
    for ctx in contexts:
        assert len(s.layers_of(s.resolve(ctx.name))) == 3
    assert sorted(os.listdir(s.layout.overlay2)) == sorted(["l", *(la.cache_id for la in s.layers.all())])


def test_import_rmi_tag_and_inspect(store, tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("imported\n")
    subprocess.run(["tar", "-cf", str(tmp_path / "rootfs.tar"), "-C", str(rootfs), "."], check=True)
    out = pylayerfs(store, "import", str(tmp_path / "rootfs.tar"), "imported:1")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", out.stdout)
    assert "Imported from" in pylayerfs(store, "history", "--no-trunc", "imported:1").stdout
    evil = tmp_path / "evil.tar"
    subprocess.run(["tar", "-cPf", str(evil), "/etc/hostname"], check=True)
    bad = pylayerfs(store, "import", str(evil), "evil", check=False)
    assert bad.returncode == 1 and "an absolute path" in bad.stderr and bad.stderr.count("\n") == 1
    pylayerfs(store, "tag", "imported:1", "again:latest")
    inspect = pylayerfs(store, "inspect", "again")
    assert '"RepoTags": [' in inspect.stdout and '"Name": "overlay2"' in inspect.stdout
    assert pylayerfs(store, "rmi", "again").stdout == "Untagged: again:latest\n"
    removed = pylayerfs(store, "rmi", "imported:1").stdout.splitlines()
    assert removed[0] == "Untagged: imported:1" and removed[1].startswith("Deleted: sha256:")
    s = Store(str(store))
    assert [la.cache_id for la in s.layers.all()] == [la.cache_id for la in s.layers_of(s.resolve("alpine"))]
    conflict = pylayerfs(store, "rmi", s.resolve("alpine").short_id, check=False)
    assert conflict.returncode == 0  # alpine has no children here: removing by ID untags and deletes
    assert pylayerfs(store, "images").stdout.splitlines()[1:] == []


def test_multi_stage_build_copies_from_an_earlier_stage(store, tmp_path):
    ctx = context_with(
        tmp_path / "ms",
        "ARG BASE=alpine\nFROM ${BASE} AS builder\n"
        "RUN mkdir -p /out && echo built > /out/artifact && ln -s artifact /out/link\n"
        "FROM scratch\nCOPY --from=builder /out /app/\nCOPY --from=0 /out/artifact /single\n",
    )
    out = pylayerfs(store, "build", "-t", "multi", str(ctx)).stdout
    assert "Step 1/6 : ARG BASE=alpine" in out and "Step 2/6 : FROM ${BASE} AS builder" in out
    s = Store(str(store))
    image = s.resolve("multi")
    assert len(image.diff_ids) == 2, "the final stage holds only what it copied"
    app, single = (s.layers.diff_dir(layer.cache_id) for layer in reversed(s.layers_of(image)))
    assert open(os.path.join(app, "app/artifact")).read() == "built\n"
    assert os.readlink(os.path.join(app, "app/link")) == "artifact"
    assert open(os.path.join(single, "single")).read() == "built\n"
