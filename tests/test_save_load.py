"""``pylayerfs save`` and ``load``: the archive's two formats, a round trip, the ecosystem's readers, bad input.

One image is built once for the module (``app:1``, tagged ``app:two`` too, over the shared busybox base): three
layers with a whiteout, an opaque directory, a symlink, a hard link, a setuid file and a ``security.capability``
xattr (added from a tar), then saved with the base. skopeo, umoci, dive and Docker read that archive; pylayerfs loads
it back, and loads what skopeo and Docker write. Bad archives are made by hand, small, and each must leave the store
exactly as it was, with one line on stderr.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from pylayerfs.image.drivers.overlay import mounted
from pylayerfs.image.store import Store
from pylayerfs.image.transfer.archives import machine_platform, v1_configs
from tests.dockerd import BASE, Docker, busybox_rootfs
from tests.mounts import need
from tests.test_build import pylayerfs
from tests.trees import view

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.timeout(600)]
MTIME = 1_600_000_000
CAPABILITY = b"\x01\x00\x00\x02" + b"\x00\x20\x00\x00" + b"\x00" * 12  # VFS_CAP_REVISION_2, cap_net_raw permitted
DOCKERFILE = f"""FROM {BASE}
RUN mkdir -p /d/sub && echo a > /d/sub/f && echo gone > /gone && echo x > /hl1 && ln /hl1 /hl2
RUN rm /gone && rm -rf /d && mkdir -p /d && echo new > /d/n && ln -s /d/n /sym && touch /suid && chmod 4755 /suid
ADD cap.tar /
ENV A=1
"""


@dataclass
class Work:
    directory: Path
    store: Path  # where app:1 was built
    saved: Path  # pylayerfs save -o saved.tar app busybox:base
    context: Path
    base_tar: Path


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes, **fields: Any) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), MTIME
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    directory = tmp_path_factory.mktemp("saveload")
    base_tar = Path(busybox_rootfs(str(directory / "busybox-rootfs.tar")))
    context = directory / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    with tarfile.open(context / "cap.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        pax = {"SCHILY.xattr.security.capability": CAPABILITY.decode("latin-1")}
        _tar_member(tar, "ping", b"#!/bin/sh\n", mode=0o755, pax_headers=pax)
    for path in context.iterdir():
        os.utime(path, (MTIME, MTIME))
    store = directory / "store"
    pylayerfs(store, "import", str(base_tar), BASE)
    pylayerfs(store, "build", "-t", "app:1", str(context))
    pylayerfs(store, "tag", "app:1", "app:two")
    saved = directory / "saved.tar"
    pylayerfs(store, "save", "-o", str(saved), "app", BASE)
    return Work(directory, store, saved, context, base_tar)


def layer_tars(store: Path, ref: str) -> list[bytes]:
    s = Store(str(store))
    tars = []
    for layer in reversed(s.layers_of(s.resolve(ref))):
        out = io.BytesIO()
        s.layers.write_tar(layer, out)
        tars.append(out.getvalue())
    return tars


def layerdb(store: Path) -> list[str]:
    return sorted(os.listdir(Store(str(store)).layout.layerdb))


def in_pty(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``argv`` with its stdout on a pseudo-terminal; its exit status and what it wrote there."""
    master, slave = pty.openpty()
    process = subprocess.Popen(argv, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=120), b"".join(chunks).decode()


def cli(store: Path) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-m", "pylayerfs"], {**os.environ, "PYLAYERFS_ROOT": str(store)}


# -- the archive ---------------------------------------------------------------------------------------------------


def test_save_writes_a_docker_archive_and_an_oci_layout(work: Work) -> None:
    store = Store(str(work.store))
    app, base = store.resolve("app:1"), store.resolve(BASE)
    with tarfile.open(work.saved) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
        assert {m.name for m in tar if m.isdir()} == {"blobs", "blobs/sha256"}
    for name, data in files.items():  # content-addressed, every one
        if name.startswith("blobs/"):
            assert name == "blobs/sha256/" + hashlib.sha256(data).hexdigest()
    manifest = json.loads(files["manifest.json"])
    assert files["manifest.json"].endswith(b"\n") and files["oci-layout"] == b'{"imageLayoutVersion": "1.0.0"}'
    assert [m["Config"] for m in manifest] == ["blobs/sha256/" + app.id[7:], "blobs/sha256/" + base.id[7:]]
    assert [m["RepoTags"] for m in manifest] == [["app:1", "app:two"], [BASE]]
    assert manifest[0]["Layers"] == ["blobs/sha256/" + d[7:] for d in app.diff_ids]
    assert files[manifest[0]["Config"]] == app.raw
    assert [files[path] for path in manifest[0]["Layers"]] == layer_tars(work.store, "app:1")
    assert json.loads(files["repositories"]) == {"app": {"1": app.diff_ids[-1][7:], "two": app.diff_ids[-1][7:]},
                                                  "busybox": {"base": base.diff_ids[0][7:]}}  # fmt: skip
    index = json.loads(files["index.json"])
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    annotations = [d["annotations"] for d in index["manifests"]]
    assert annotations[0] == {"io.containerd.image.name": "docker.io/library/app:1",
                              "org.opencontainers.image.ref.name": "1"}  # fmt: skip
    assert [a["io.containerd.image.name"] for a in annotations[1:]] == ["docker.io/library/app:two",
                                                                         "docker.io/library/busybox:base"]  # fmt: skip
    oci = json.loads(files["blobs/sha256/" + index["manifests"][0]["digest"][7:]])
    assert oci["config"] == {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": app.id,
                             "size": len(app.raw)}  # fmt: skip
    assert [(la["mediaType"], la["digest"]) for la in oci["layers"]] == [
        ("application/vnd.oci.image.layer.v1.tar", d) for d in app.diff_ids
    ]
    for v1_id, data in v1_configs(app):  # the legacy v1 json of each layer is a blob too
        assert json.loads(files["blobs/sha256/" + hashlib.sha256(data).hexdigest()])["id"] == v1_id


def test_round_trip_progress_twice_stdin_gzip_and_oci_directory(work: Work, tmp_path: Path) -> None:
    store = tmp_path / "store"
    argv, env = cli(store)
    code, shown = in_pty([*argv, "load", "-i", str(work.saved)], env)  # a terminal: progress per layer
    assert code == 0, shown
    drawn = [line.rpartition("\r")[2] for line in shown.split("\r\n") if ": Loading layer [" in line]
    assert len(drawn) == 4 and all(f"[{'=' * 50}>]" in line for line in drawn), drawn
    assert shown.endswith("Loaded image: app:1\r\nLoaded image: app:two\r\nLoaded image: busybox:base\r\n")
    code, shown = in_pty([*argv, "save", "app:1"], env)
    assert code == 1 and shown == "pylayerfs save: cowardly refusing to save to a terminal. Use the -o flag or " \
                                  "redirect\r\n"  # fmt: skip
    ours, theirs = Store(str(work.store)), Store(str(store))
    for ref in ("app:1", "app:two", BASE):
        mine, loaded = ours.resolve(ref), theirs.resolve(ref)
        assert (loaded.id, loaded.diff_ids, loaded.history) == (mine.id, mine.diff_ids, mine.history)
    assert layer_tars(store, "app:1") == layer_tars(work.store, "app:1")
    assert theirs.refs.all() == {r: i for r, i in ours.refs.all().items() if r in ("app:1", "app:two", BASE)}
    assert os.listdir(theirs.layout.tmp) == []
    before = layerdb(store)
    assert len(before) == 4
    # again, through a pipe (spooled) and gzip'd: every layer exists, none is stored twice
    piped = subprocess.run(f"gzip -c {work.saved} | {sys.executable} -m pylayerfs load", shell=True, env=env,
                           capture_output=True, text=True, check=True)  # fmt: skip
    assert piped.stdout == "Loaded image: app:1\nLoaded image: app:two\nLoaded image: busybox:base\n"
    assert layerdb(store) == before and os.listdir(theirs.layout.tmp) == []
    # the OCI half alone, as a directory: the names come from io.containerd.image.name
    layout = tmp_path / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-xf", str(work.saved), "-C", str(layout)], check=True)
    (layout / "manifest.json").unlink()
    other = tmp_path / "other"
    out = pylayerfs(other, "load", "-q", "-i", str(layout)).stdout
    assert out == "Loaded image: app:1\nLoaded image: app:two\nLoaded image: busybox:base\n"
    assert Store(str(other)).resolve("app:two").id == ours.resolve("app:1").id


# -- the ecosystem's readers ---------------------------------------------------------------------------------------


@pytest.mark.ecosystem
def test_skopeo_reads_both_halves_and_we_load_what_it_writes(work: Work, tmp_path: Path) -> None:
    skopeo = need("skopeo")
    app = Store(str(work.store)).resolve("app:1")

    def run(*args: str) -> str:
        return subprocess.run([skopeo, *args], capture_output=True, text=True, check=True, timeout=120).stdout

    for transport in (f"docker-archive:{work.saved}:app:1", f"oci-archive:{work.saved}:1"):
        assert json.loads(run("inspect", transport))["Layers"] == app.diff_ids, transport
        config = run("inspect", "--config", "--raw", transport).encode()
        assert "sha256:" + hashlib.sha256(config).hexdigest() == app.id, transport
    run("copy", "--quiet", f"docker-archive:{work.saved}:app:1", f"dir:{tmp_path / 'dir'}")
    copied = json.loads((tmp_path / "dir" / "manifest.json").read_text())
    assert copied["config"]["digest"] == app.id
    # skopeo's OCI layouts: gzip'd layers (its default), zstd ones; a ref.name with a name and tag names the image
    for name, extra in (("gz", []), ("zstd", ["--dest-compress-format", "zstd"])):
        run("copy", "--quiet", *extra, f"docker-archive:{work.saved}:app:1", f"oci:{tmp_path / name}:app:{name}")
        index = json.loads((tmp_path / name / "index.json").read_text())
        digest = index["manifests"][0]["digest"][7:]
        layers = json.loads((tmp_path / name / "blobs" / "sha256" / digest).read_text())["layers"]
        suffix = {"gz": "gzip", "zstd": "zstd"}[name]
        assert {la["mediaType"] for la in layers} == {f"application/vnd.oci.image.layer.v1.tar+{suffix}"}
        store = tmp_path / f"store-{name}"
        assert pylayerfs(store, "load", "-i", str(tmp_path / name)).stdout == f"Loaded image: app:{name}\n"
        loaded = Store(str(store)).resolve(f"app:{name}")
        config = json.loads((tmp_path / name / "blobs" / "sha256" / digest).read_text())["config"]["digest"]
        assert (loaded.id, loaded.diff_ids) == (config, app.diff_ids)  # skopeo rewrites the config as OCI's
        assert layer_tars(store, f"app:{name}") == layer_tars(work.store, "app:1")


def _with_capability(root: str) -> dict[str, Any]:
    tree = view(root)
    for rel in tree:
        with contextlib.suppress(OSError):
            tree[rel] += (os.getxattr(os.path.join(root, rel), "security.capability", follow_symlinks=False),)
    return tree


@pytest.mark.ecosystem
def test_umoci_unpacks_the_tree_a_mount_shows(work: Work, tmp_path: Path) -> None:
    umoci = need("umoci")
    layout = tmp_path / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-xf", str(work.saved), "-C", str(layout)], check=True)
    subprocess.run([umoci, "unpack", "--image", f"{layout}:1", str(tmp_path / "bundle")], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    unpacked = _with_capability(str(tmp_path / "bundle" / "rootfs"))
    store = Store(str(work.store))
    lowers = [store.layers.diff_dir(layer.cache_id) for layer in store.layers_of(store.resolve("app:1"))]
    with mounted(lowers, None, None, str(tmp_path / "merged")) as merged:
        shown = _with_capability(merged)
    assert unpacked == shown
    assert "gone" not in shown and "d/sub" not in shown and shown["d/n"][0] == stat.S_IFREG  # whiteout, opaque dir
    assert shown["sym"][-2] == "/d/n" and shown["suid"][1] == 0o4755 and shown["ping"][-1] == CAPABILITY
    assert (
        os.stat(tmp_path / "bundle" / "rootfs" / "hl1").st_ino == os.stat(tmp_path / "bundle" / "rootfs" / "hl2").st_ino
    )


@pytest.mark.ecosystem
def test_dive_reports_what_pylayerfs_layers_reports(work: Work, tmp_path: Path) -> None:
    dive = need("dive")
    only_app = tmp_path / "app.tar"
    pylayerfs(work.store, "save", "-o", str(only_app), "app:1")
    env = {**os.environ, "NO_COLOR": "1"}
    subprocess.run([dive, "--source", "docker-archive", str(only_app), "-j", str(tmp_path / "d.json")], env=env,
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    result = subprocess.run([dive, "--ci", "--source", "docker-archive", str(only_app)], capture_output=True, text=True,
                            env=env, timeout=120, check=False)  # fmt: skip
    theirs = json.loads((tmp_path / "d.json").read_text())
    ours = json.loads(pylayerfs(work.store, "layers", "--format", "json", "app:1").stdout)
    assert [la["sizeBytes"] for la in ours["layer"]] == [la["sizeBytes"] for la in theirs["layer"]]
    for key in ("sizeBytes", "inefficientBytes", "efficiencyScore", "fileReference"):
        assert ours["image"][key] == theirs["image"][key], key
    ci = pylayerfs(work.store, "layers", "--ci", "app:1", check=False).stdout
    for line in ci.splitlines()[:3]:  # efficiency, wastedBytes, userWastedPercent
        assert line.split("(")[0].strip() in result.stdout, (line, result.stdout)


# -- bad input -----------------------------------------------------------------------------------------------------


def _layer(entries: list[tuple[str, bytes | None, dict[str, Any]]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, fields in entries:
            _tar_member(tar, name, data or b"", **fields)
    return out.getvalue()


GOOD_LAYER = _layer([("etc/", None, {"type": tarfile.DIRTYPE, "mode": 0o755}), ("etc/motd", b"hello\n", {})])
OTHER_LAYER = _layer([("etc/", None, {"type": tarfile.DIRTYPE, "mode": 0o755}), ("etc/motd", b"other\n", {})])


def _config(layers: list[bytes]) -> bytes:
    diff_ids = ["sha256:" + hashlib.sha256(la).hexdigest() for la in layers]
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {}, "created": "2026-01-01T00:00:00Z",
                       "rootfs": {"type": "layers", "diff_ids": diff_ids},
                       "history": [{"created_by": "hand"} for _ in layers]}).encode()  # fmt: skip


def docker_archive(path: Path, layers: list[bytes], config: bytes | None = None,
                   edit: Callable[[list[dict[str, Any]]], None] | None = None,
                   extra: Callable[[tarfile.TarFile], None] | None = None,
                   compress: Callable[[bytes], bytes] = bytes) -> Path:  # fmt: skip
    """A Docker 20.10-style archive: ``<n>/layer.tar`` (``compress``'d), ``<config hex>.json``, ``manifest.json``."""
    config = _config(layers) if config is None else config
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["hand:made"], "Layers": [f"{i}/layer.tar" for i in
                                                                                range(len(layers))]}]  # fmt: skip
    if edit is not None:
        edit(manifest)
    with tarfile.open(path, "w") as tar:
        if extra is not None:
            extra(tar)
        for i, data in enumerate(layers):
            _tar_member(tar, f"{i}/layer.tar", compress(data))
        _tar_member(tar, config_name, config)
        _tar_member(tar, "manifest.json", json.dumps(manifest).encode())
    return path


def _descriptor(media_type: str, data: bytes, **more: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data), **more}


def oci_archive(path: Path, layers: list[bytes], media_type: str, compress: Callable[[bytes], bytes] = bytes,
                nested: bool = False) -> Path:  # fmt: skip
    """An OCI layout in a tar, its layers ``compress``'d; ``nested``: index.json names an index of two platforms."""
    config, stored = _config(layers), [compress(la) for la in layers]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
                           "layers": [_descriptor(media_type, la) for la in stored]}).encode()  # fmt: skip
    top = _descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    blobs = [config, *stored, manifest]
    if nested:  # the other platform's manifest is not in the archive: it must not be read
        other = {**top, "digest": "sha256:" + "0" * 64, "platform": {"os": "linux", "architecture": "s390x"}}
        inner = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
            other, {**top, "platform": {"os": "linux", "architecture": machine_platform()[1]}}]}).encode()  # fmt: skip
        blobs.append(inner)
        top = _descriptor("application/vnd.oci.image.index.v1+json", inner)
    top["annotations"] = {"org.opencontainers.image.ref.name": "hand:oci"}
    with tarfile.open(path, "w") as tar:
        _tar_member(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _tar_member(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode())
        for data in blobs:
            _tar_member(tar, f"blobs/sha256/{hashlib.sha256(data).hexdigest()}", data)
    return path


def _truncated(path: Path) -> Path:
    docker_archive(path, [GOOD_LAYER])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupted(path: Path) -> Path:
    docker_archive(path, [OTHER_LAYER])  # a layer the store does not hold: it is read
    data = bytearray(path.read_bytes())
    data[data.index(b"other\n")] ^= 1  # the layer's file content, inside the archive
    path.write_bytes(bytes(data))
    return path


def _missing(path: Path) -> Path:
    def edit(manifest: list[dict[str, Any]]) -> None:
        manifest[0]["Layers"] = ["7/layer.tar"]

    return docker_archive(path, [GOOD_LAYER], edit=edit)


def _entry(name: str, **fields: Any) -> Callable[[tarfile.TarFile], None]:
    return lambda tar: _tar_member(tar, name, b"x", **fields)


def _through_symlink_out(path: Path) -> Path:
    def edit(manifest: list[dict[str, Any]]) -> None:
        manifest[0]["Layers"] = ["out/layer.tar"]

    return docker_archive(path, [GOOD_LAYER], edit=edit,
                          extra=_entry("out", type=tarfile.SYMTYPE, linkname="../../tmp"))  # fmt: skip


BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated archive": (_truncated, "is truncated or not a tar archive"),
    "corrupted layer byte": (_corrupted, "the image config says"),
    "manifest naming a missing blob": (_missing, "names 7/layer.tar, which the archive does not hold"),
    "layer entry with ..": (lambda p: docker_archive(p, [_layer([("../evil", b"x", {})])]),
                            "refusing '../evil': '..' would leave the layer"),
    "layer entry absolute": (lambda p: docker_archive(p, [_layer([("/abs", b"x", {})])]),
                             "refusing '/abs': an absolute path"),
    "layer entry through a symlink": (lambda p: docker_archive(p, [_layer([
        ("etc", None, {"type": tarfile.SYMTYPE, "linkname": "/etc"}), ("etc/passwd", b"x", {})])]),
        "refusing 'etc/passwd'"),
    "layer hard link out": (lambda p: docker_archive(p, [_layer([
        ("h", None, {"type": tarfile.LNKTYPE, "linkname": "../../etc/passwd"})])]), "refusing '../../etc/passwd'"),
    "archive entry with ..": (lambda p: docker_archive(p, [GOOD_LAYER], extra=_entry("../evil")),
                              "refusing '../evil': '..' would leave the archive"),
    "archive entry absolute": (lambda p: docker_archive(p, [GOOD_LAYER], extra=_entry("/abs")),
                               "refusing '/abs': an absolute path in the archive"),
    "archive symlink out": (_through_symlink_out, "refusing 'out': a symlink to '../../tmp', out of the archive"),
    "archive hard link out": (lambda p: docker_archive(p, [GOOD_LAYER], extra=_entry(
        "h", type=tarfile.LNKTYPE, linkname="../x")), "refusing 'h': a hard link to '../x', out of the archive"),
    "unknown media type": (lambda p: oci_archive(p, [GOOD_LAYER], "application/vnd.example.layer"),
                           "unknown media type 'application/vnd.example.layer' for a layer"),
    "config not JSON": (lambda p: docker_archive(p, [GOOD_LAYER], config=b"not json"), "the image config is not valid"),
    "config without rootfs": (lambda p: docker_archive(p, [GOOD_LAYER], config=b'{"os": "linux"}'),
                              "the image config is not valid"),
}  # fmt: skip


def _symlinked_layer(path: Path) -> Path:
    """Docker 20.10 writes a layer saved twice once, and a ``layer.tar`` symlink to it."""

    def edit(manifest: list[dict[str, Any]]) -> None:
        manifest[0]["Layers"] = ["0/layer.tar", "1/layer.tar"]

    link = _entry("1/layer.tar", type=tarfile.SYMTYPE, linkname="../0/layer.tar")
    return docker_archive(path, [OTHER_LAYER], config=_config([OTHER_LAYER, OTHER_LAYER]), edit=edit, extra=link)


GOOD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "legacy, gzip'd layer": (lambda p: docker_archive(p, [OTHER_LAYER], compress=gzip.compress), "hand:made"),
    "legacy, layer.tar symlink": (_symlinked_layer, "hand:made"),
    "OCI, zstd layer": (lambda p: oci_archive(p, [OTHER_LAYER], "application/vnd.oci.image.layer.v1.tar+zstd",
                                              compress=zstandard.ZstdCompressor().compress), "hand:oci"),
    "OCI, nested index": (lambda p: oci_archive(p, [OTHER_LAYER], "application/vnd.oci.image.layer.v1.tar",
                                                nested=True), "hand:oci"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(GOOD))
def test_hand_made_archives_load(case: str, tmp_path: Path) -> None:
    make, name = GOOD[case]
    store = tmp_path / "store"
    assert pylayerfs(store, "load", "-i", str(make(tmp_path / "a.tar"))).stdout == f"Loaded image: {name}\n"
    image = Store(str(store)).resolve(name)
    assert layer_tars(store, name)[0] == OTHER_LAYER and len(image.diff_ids) == len(layerdb(store))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one hand-made image, for the bad archives to leave as it is."""
    directory = tmp_path_factory.mktemp("small")
    store = directory / "store"
    pylayerfs(store, "load", "-i", str(docker_archive(directory / "good.tar", [GOOD_LAYER])))
    return store


@pytest.mark.parametrize("case", list(BAD))
def test_bad_archive_is_one_line_and_changes_nothing(case: str, small_store: Path, tmp_path: Path) -> None:
    make, message = BAD[case]
    before = view(str(small_store))
    result = pylayerfs(small_store, "load", "-i", str(make(tmp_path / "bad.tar")), check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("pylayerfs load: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert view(str(small_store)) == before


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("/dev/zero", "holds neither manifest.json nor index.json"),
        ("/dev/urandom", "cannot read stdin as a tar archive"),
    ],
)
def test_an_endless_stream_on_stdin_is_not_spooled_past_its_first_block(device: str, message: str,
                                                                         small_store: Path) -> None:  # fmt: skip
    before = view(str(small_store))
    argv, env = cli(small_store)
    with open(device, "rb") as endless:
        result = subprocess.run([*argv, "load"], stdin=endless, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert view(str(small_store)) == before


def _big_archive(path: Path) -> Path:
    """An archive whose one layer holds 192 MiB: long enough to interrupt while it is stored."""
    size = 192 << 20
    header = tarfile.TarInfo("big")
    header.size, header.mtime = size, MTIME
    diff = hashlib.sha256()
    layer = path.with_suffix(".layer")
    with open(layer, "wb") as out:
        for block in (header.tobuf(tarfile.PAX_FORMAT), b"\1" * size, b"\0" * 1024):
            out.write(block)
            diff.update(block)
    rootfs = {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]}
    config = json.dumps({"os": "linux", "architecture": "amd64", "config": {}, "rootfs": rootfs}).encode()
    with tarfile.open(path, "w") as tar:
        tar.add(layer, "0/layer.tar")
        _tar_member(tar, "config.json", config)
        _tar_member(tar, "manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["big:1"],
                                                        "Layers": ["0/layer.tar"]}]).encode())  # fmt: skip
    layer.unlink()
    return path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_load_leaves_nothing_the_next_command_keeps(sig: signal.Signals, small_store: Path,
                                                                tmp_path: Path) -> None:  # fmt: skip
    big = _big_archive(tmp_path / "big.tar")
    before, images = view(str(small_store)), pylayerfs(small_store, "images").stdout
    argv, env = cli(small_store)
    process = subprocess.Popen([*argv, "load", "-i", str(big)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    overlay2 = small_store / "overlay2"
    layers_before = set(os.listdir(overlay2))
    deadline = time.monotonic() + 60
    while not set(os.listdir(overlay2)) - layers_before and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # inside the layer's extraction
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    assert pylayerfs(small_store, "images").stdout == images
    if sig == signal.SIGKILL:  # the next load collects what the killed one left
        pylayerfs(small_store, "load", "-i", str(docker_archive(tmp_path / "good.tar", [GOOD_LAYER])))
    assert view(str(small_store)) == before


# -- Docker --------------------------------------------------------------------------------------------------------


HISTORY = "{{.CreatedBy}}|{{.CreatedAt}}|{{.Size}}|{{.Comment}}"


def _history(store: Path, ref: str) -> list[str]:
    return pylayerfs(store, "history", "--no-trunc", "-H=false", "--format", HISTORY, ref).stdout.splitlines()


@pytest.mark.docker
def test_docker_loads_our_save_with_the_same_id_and_history(docker: Docker, work: Work, tmp_path: Path) -> None:
    app = Store(str(work.store)).resolve("app:1")
    out = docker.run("load", "-i", str(work.saved)).stdout
    assert "Loaded image: app:1\n" in out and "Loaded image: app:two\n" in out
    try:
        assert docker.run("inspect", "-f", "{{.Id}}", "app:1").stdout.strip() == app.id
        history = docker.run("history", "--no-trunc", "--human=false", "--format", HISTORY, "app:1").stdout
        assert history.splitlines() == _history(work.store, "app:1")
        # Docker 20.10 saves the legacy layout: its per-layer directories are named by the v1 IDs we compute
        docker.run("save", "-o", str(tmp_path / "again.tar"), "app:1")
        with tarfile.open(tmp_path / "again.tar") as tar:
            directories = {m.name for m in tar if m.isdir()}
        assert directories == {v1_id for v1_id, _ in v1_configs(app)}
    finally:
        docker.run("rmi", "app:1", "app:two", check=False)


@pytest.mark.docker
def test_we_load_dockers_save_and_skopeos_oci_archive_of_it(docker: Docker, work: Work, tmp_path: Path) -> None:
    docker.build(str(work.context), "-t", "dapp")
    try:
        docker.run("save", "-o", str(tmp_path / "d.tar"), "dapp")
        inspect = json.loads(docker.run("inspect", "dapp").stdout)[0]
        history = docker.run("history", "--no-trunc", "--human=false", "--format", HISTORY, "dapp").stdout
    finally:
        docker.clean()
    store = tmp_path / "store"
    assert pylayerfs(store, "load", "-i", str(tmp_path / "d.tar")).stdout == "Loaded image: dapp:latest\n"
    loaded = Store(str(store)).resolve("dapp")
    assert (loaded.id, loaded.diff_ids) == (inspect["Id"], inspect["RootFS"]["Layers"])
    assert _history(store, "dapp") == history.splitlines()
    assert pylayerfs(store, "run", "--rm", "dapp", "cat", "/d/n", "/hl2").stdout == "new\nx\n"
    skopeo = need("skopeo")
    subprocess.run([skopeo, "copy", "--quiet", f"docker-archive:{tmp_path / 'd.tar'}",
                    f"oci-archive:{tmp_path / 'x.tar'}:dapp:oci"], check=True, timeout=120)  # fmt: skip
    other = tmp_path / "other"
    assert pylayerfs(other, "load", "-i", str(tmp_path / "x.tar")).stdout == "Loaded image: dapp:oci\n"
    with tarfile.open(tmp_path / "x.tar") as tar:
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        manifest = json.load(tar.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))  # type: ignore[arg-type]
    oci = Store(str(other)).resolve("dapp:oci")  # skopeo rewrites the config as OCI's: Docker's fields go
    assert (oci.id, oci.diff_ids) == (manifest["config"]["digest"], inspect["RootFS"]["Layers"])
    assert layer_tars(other, "dapp:oci") == layer_tars(store, "dapp")
