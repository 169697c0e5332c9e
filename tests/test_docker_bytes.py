"""Docker as the oracle for the same bytes (issue 14): layer tars and DiffIDs, ``import``, the image config, ``.wh.``.

Both sides build the same contexts (fixed mtimes) on the same imported base; Docker's layer tars come from
``docker save``, pylayerfs's from :meth:`LayerStore.write_tar`. Layers whose inputs are all fixed are compared byte
for byte (so their DiffIDs are equal); in the others only the mtimes the step itself set (at or after the build's
start: directories a step created, files a RUN wrote, whiteouts) are masked, and both sides must have set them.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pylayerfs.image.store import Store
from tests.dockerd import BASE, DOCKER, Docker
from tests.test_build import pylayerfs

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.timeout(600)]
MTIME = 1_600_000_000
LINK_MTIME = 1_500_000_000
LONG_DIR = "/".join(f"segment{i:02d}" for i in range(16))  # 159 bytes: split into a USTAR prefix by Go
LONG_NAME = "n" * 120  # one 120-byte name: only PAX holds it

IMAGE_A = f"""FROM {BASE}
ENV X=1 PATH=/opt/bin:$PATH
LABEL zeta=1 alpha=2 mid=3
COPY f.txt /f.txt
COPY dir /
RUN chmod 600 /f.txt && mkdir -p /made/deep && echo z > /made/deep/z
RUN rm /bin/ls /bin/cat && rm -rf /usr/sbin && mkdir /usr/sbin && echo n > /usr/sbin/new
RUN mkdir -p /.wh.x /.wh.root /tmp/.wh.bin && touch /.wh.x/f
RUN (busybox ls -a /.wh.x /tmp; busybox ls -d /root || echo no-root) > /listing 2>&1
WORKDIR /w
EXPOSE 80 22
"""
IMAGE_B = f"""FROM {BASE}
COPY --from=bytes-a /made /made2
COPY --from=bytes-a /f.txt /f2.txt
ADD links.tar.gz /x/
"""
# (image, layer index, exact?): which layers are byte-identical with Docker's, which have step-made mtimes
LAYERS = {
    "bytes-a": ["exact", "exact", "exact", "masked", "masked", "masked", "masked", "masked"],
    "bytes-b": ["exact", "masked", "exact", "masked"],
}


def links_tar(path: Path, compressed: bool) -> Path:
    """A small tar of a directory, a file and two symlinks, mtimes fixed (the symlinks' older than the rest)."""
    with tarfile.open(path, "w:gz" if compressed else "w", format=tarfile.GNU_FORMAT) as tar:
        entries = [("d", tarfile.DIRTYPE, ""), ("d/file", tarfile.REGTYPE, ""), ("d/rel", tarfile.SYMTYPE, "file"),
                   ("abs", tarfile.SYMTYPE, "/d/file")]  # fmt: skip
        for name, kind, target in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.uid, info.gid = kind, target, 0, 0
            info.mode = 0o777 if kind == tarfile.SYMTYPE else 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.mtime = LINK_MTIME if kind == tarfile.SYMTYPE else MTIME
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return path


def context(path: Path) -> Path:
    """The build context: files, a symlink, a long path and a long name, everything with mtime :data:`MTIME`."""
    (path / "dir/sub").mkdir(parents=True)
    (path / "f.txt").write_text("hello\n")
    (path / "dir/a").write_text("x\n")
    (path / "dir/sub/b").write_text("y\n")
    (path / "dir/link").symlink_to("a")
    (path / "dir" / LONG_DIR).mkdir(parents=True)
    (path / "dir" / LONG_DIR / "deep.txt").write_text("deep\n")
    (path / "dir" / LONG_NAME).write_text("long\n")
    (path / "dir/héllo").write_text("utf-8\n")
    links_tar(path / "links.tar.gz", compressed=True)
    (path / "Dockerfile.a").write_text(IMAGE_A)
    (path / "Dockerfile.b").write_text(IMAGE_B)
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (MTIME, MTIME), follow_symlinks=False)
    return path


class Built:
    """The images built on both sides: Docker's saved tars and configs, pylayerfs's store."""

    def __init__(self, docker: Docker, root: Path, start: int) -> None:
        self.docker, self.root, self.start = docker, root, start
        self.store = Store(str(root))

    def docker_layers(self, ref: str) -> list[bytes]:
        """The layer tars of ``ref`` from ``docker save``, bottom first."""
        raw = subprocess.run([DOCKER, "save", ref], env=self.docker.env(), capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))[0]  # type: ignore[arg-type]
            return [tar.extractfile(name).read() for name in manifest["Layers"]]  # type: ignore[union-attr]

    def pylayerfs_layers(self, ref: str) -> list[bytes]:
        """The layer tars of ``ref`` from pylayerfs's store, bottom first."""
        image = self.store.resolve(ref)
        out = []
        for layer in reversed(self.store.layers.stack(image.top_layer)):
            buffer = io.BytesIO()
            self.store.layers.write_tar(layer, buffer)
            out.append(buffer.getvalue())
        return out

    def docker_inspect(self, ref: str) -> dict[str, Any]:
        return json.loads(self.docker.run("inspect", ref).stdout)[0]  # type: ignore[no-any-return]

    def pylayerfs_inspect(self, ref: str) -> dict[str, Any]:
        return json.loads(pylayerfs(self.root, "inspect", ref).stdout)[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def built(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    ctx = context(tmp_path_factory.mktemp("bytes-context"))
    root = tmp_path_factory.mktemp("bytes-store") / "store"
    pylayerfs(root, "import", os.path.join(docker.directory, "busybox-rootfs.tar"), BASE)
    start = int(time.time())
    for name, dockerfile in (("bytes-a", "Dockerfile.a"), ("bytes-b", "Dockerfile.b")):
        docker.run("build", "-f", str(ctx / dockerfile), "-t", name, str(ctx))
        pylayerfs(root, "build", "-f", str(ctx / dockerfile), "-t", name, str(ctx))
    try:
        yield Built(docker, root, start)
    finally:
        docker.clean()


def headers(data: bytes, start: int, masked: bool) -> list[tuple[bytes, bytes]]:
    """The archive's entries as (header block, data): with ``masked``, an mtime at or after ``start`` (and the
    checksum) is blanked; the trailer must be Go's 1024 zero bytes."""
    out, offset = [], 0
    while data[offset : offset + 512] != b"\0" * 512:
        block = bytearray(data[offset : offset + 512])
        size = int(block[124:136].rstrip(b"\0") or b"0", 8) if bytes(block[156:157]) not in (b"1", b"2", b"5") else 0
        if masked and int(block[136:148].rstrip(b"\0"), 8) >= start:
            block[136:156] = b"m" * 20
        out.append((bytes(block), data[offset + 512 : offset + 512 + size]))
        offset += 512 + -(-size // 512) * 512
    assert data[offset:] == b"\0" * 1024, "not ended as Go's tar.Writer ends an archive"
    return out


@pytest.mark.parametrize("ref", sorted(LAYERS))
def test_layer_tars_are_dockers_bytes(built: Built, ref: str) -> None:
    """COPY, COPY --from and the imported base byte-identical (same DiffIDs); RUN chmod/rm (whiteouts, opaque
    directory), directories a step made, ADD of a tar with symlinks: the same but for the step's own mtimes."""
    theirs, ours = built.docker_layers(ref), built.pylayerfs_layers(ref)
    assert len(theirs) == len(ours) == len(LAYERS[ref])
    diff_ids = built.docker_inspect(ref)["RootFS"]["Layers"]
    for index, (kind, a, b) in enumerate(zip(LAYERS[ref], theirs, ours, strict=True)):
        if kind == "exact":
            assert a == b, f"{ref} layer {index}: {headers(a, 0, False)} != {headers(b, 0, False)}"
            assert built.pylayerfs_inspect(ref)["RootFS"]["Layers"][index] == diff_ids[index]
        else:
            # (equal unmasked too when both sides ran the step in the same second)
            assert headers(a, built.start, True) == headers(b, built.start, True), f"{ref} layer {index}"


def test_header_fields_are_go_archive_tars(built: Built) -> None:
    """What the exact layers hold: the file-type bits in the mode, uname 'root', zero-filled devmajor, a USTAR
    prefix for the long path, a PAX header named as Go names it for the long name, and whiteouts as Docker's."""
    copied = built.pylayerfs_layers("bytes-a")[2]
    with tarfile.open(fileobj=io.BytesIO(copied)) as tar:
        members = {m.name: m for m in tar}
    assert members["a"].mode == 0o100644 and members["sub"].mode == 0o40755 and members["link"].mode == 0o120777
    assert members["a"].uname == members["a"].gname == "root"
    assert f"{LONG_DIR}/deep.txt" in members and LONG_NAME in members and "héllo" in members
    assert f"PaxHeaders.0/{LONG_NAME}".encode()[:100] in copied and b"0000000\x000000000\x00" in copied
    removed = built.pylayerfs_layers("bytes-a")[4]
    with tarfile.open(fileobj=io.BytesIO(removed)) as tar:
        entries = {m.name: m for m in tar}
    assert entries["bin/.wh.cat"].mode == entries["bin/.wh.ls"].mode == 0o600
    assert entries["bin/.wh.ls"].linkname == "bin/cat"  # the kernel's shared whiteout inode, as moby saw it
    assert entries["usr/sbin/.wh..wh..opq"].mode == 0o755 and entries["usr/sbin/.wh..wh..opq"].mtime == 0


def test_a_run_step_that_makes_wh_names_is_handled_as_dockers_overlay2(built: Built) -> None:
    """RUN mkdir /.wh.x /.wh.root: the tar (DiffID) holds the directories as made, the layer on disk is that tar
    applied, as moby's commit applies it: whiteouts of x, root and tmp/bin, the .wh. directories with files kept.
    The next step sees what Docker's sees (its listing is compared with the layers)."""
    layers = built.store.layers.stack(built.store.resolve("bytes-a").top_layer)
    wh_layer = layers[2]  # below WORKDIR's and the listing RUN's (EXPOSE makes none)
    diff = Path(built.store.layers.diff_dir(wh_layer.cache_id))
    for name in ("x", "root", "tmp/bin"):
        st = os.lstat(diff / name)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev), st.st_mode & 0o170000) == (0, 0, 0o020000), name
    assert (diff / ".wh.x/f").is_file() and not (diff / "tmp/.wh.bin").exists()
    buffer = io.BytesIO()
    built.store.layers.write_tar(wh_layer, buffer)
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        assert [m.name for m in tar] == [".wh.root", ".wh.x", ".wh.x/f", "tmp", "tmp/.wh.bin"]
    listing = Path(built.store.layers.diff_dir(layers[1].cache_id), "listing").read_text()
    assert "no-root" in listing and ".wh.bin" not in listing


def mask(value: Any) -> Any:
    """IDs (64 and 12 hex digits) and times replaced by placeholders."""
    text = re.sub(r"[0-9a-f]{64}", "<id>", json.dumps(value))
    text = re.sub(r'"[0-9a-f]{12}"', '"<short-id>"', text)
    return json.loads(re.sub(r'"\d{4}-\d\d-\d\dT[^"]*"', '"<time>"', text))


def history_ids(built: Built, ref: str, side: str) -> list[str]:
    """The image IDs of ``ref``'s steps, newest first (``docker history -q``)."""
    if side == "docker":
        return built.docker.run("history", "-q", ref).stdout.split()
    table = pylayerfs(built.root, "history", ref).stdout.splitlines()[1:]
    return [line.split()[0] for line in table]


@pytest.mark.parametrize("ref", sorted(LAYERS))
def test_image_configs_are_dockers(built: Built, ref: str) -> None:
    """Every step's config as ``docker inspect`` shows it: Env order (ENV over PATH), sorted Labels and ports,
    ContainerConfig (Hostname, Labels {}) and Container per step kind, after masking IDs and times."""
    fields = ("Comment", "Container", "ContainerConfig", "Config", "Author", "Architecture", "Os", "RootFS")
    theirs = [mask({k: built.docker_inspect(i)[k] for k in fields}) for i in history_ids(built, ref, "docker")]
    ours = [mask({k: built.pylayerfs_inspect(i)[k] for k in fields}) for i in history_ids(built, ref, "pylayerfs")]
    for step, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        if any(kind == "masked" for kind in LAYERS[ref]):  # DiffIDs of layers with step-made mtimes differ
            a["RootFS"], b["RootFS"] = len(a["RootFS"]["Layers"]), len(b["RootFS"]["Layers"])
        assert a == b, f"{ref}, step {step} from the top"


@pytest.mark.parametrize("name", ["base", "links", "links-gz"])
def test_import_is_dockers(built: Built, tmp_path: Path, name: str) -> None:
    """``import``: the DiffID is the sha256 of the tar as given (uncompressed), the config's comment, history and
    container_config as Docker's, the tar's bytes given back, symlink mtimes kept."""
    tar = (Path(built.docker.directory, "busybox-rootfs.tar") if name == "base"
           else links_tar(tmp_path / f"{name}.tar", compressed=name.endswith("gz")))  # fmt: skip
    ref = f"imported-{name}"
    built.docker.run("import", str(tar), ref)
    pylayerfs(built.root, "import", str(tar), ref)
    fields = ("Comment", "Container", "ContainerConfig", "Config", "RootFS")
    assert mask({k: built.pylayerfs_inspect(ref)[k] for k in fields}) == mask(
        {k: built.docker_inspect(ref)[k] for k in fields}
    )
    assert built.pylayerfs_layers(ref) == built.docker_layers(ref)
    their_history = json.loads(built.docker.run("history", "--format", "{{json .}}", ref).stdout)
    ours = built.store.resolve(ref).history
    assert ours == [{"created": ours[0]["created"], "comment": their_history["Comment"]}] and "-" in ours[0]["comment"]
    if name != "base":
        diff = Path(
            built.store.layers.diff_dir(built.store.layers.stack(built.store.resolve(ref).top_layer)[0].cache_id)
        )
        assert os.lstat(diff / "d/rel").st_mtime == os.lstat(diff / "abs").st_mtime == LINK_MTIME
