"""The one way an image from outside enters the store (``load``, ``pull``): references, checks, rollback, cleanup."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

import pytest
import zstandard

from pylayerfs.image import archive
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.layers import chain_id
from pylayerfs.image.store.references import parse
from pylayerfs.image.transfer.ingest import Blob, TransferError, store_image
from tests.trees import view

pytestmark = pytest.mark.root  # extraction keeps owners and makes whiteouts (mknod)


@pytest.mark.parametrize(
    ("text", "name", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "busybox", "docker.io", "library/busybox", "latest", None),
        ("docker.io/library/busybox:1.36", "busybox", "docker.io", "library/busybox", "1.36", None),
        ("index.docker.io/me/app", "me/app", "docker.io", "me/app", "latest", None),
        ("127.0.0.1:5000/app:v1", "127.0.0.1:5000/app", "127.0.0.1:5000", "app", "v1", None),
        ("localhost/a/b", "localhost/a/b", "localhost", "a/b", "latest", None),
        (f"Registry.Example/x@sha256:{'a' * 64}", "Registry.Example/x", "Registry.Example", "x", None, "a" * 64),
        (f"x:t@sha256:{'b' * 64}", "x", "docker.io", "library/x", "t", "b" * 64),
    ],
)
def test_references_name_registry_repository_tag_and_digest(text, name, registry, repository, tag, digest):
    ref = parse(text)
    assert (ref.name, ref.registry, ref.repository, ref.tag) == (name, registry, repository, tag)
    assert ref.digest == (f"sha256:{digest}" if digest else None)


@pytest.mark.parametrize(
    "bad", ["x/UPPER", "a" * 256, "a:b:c", "x@sha256:abc", "x@md5:" + "a" * 32, "host:port/x", "-a"]
)
def test_references_docker_refuses_are_refused(bad):
    with pytest.raises(StoreError, match="invalid reference format"):
        parse(bad)


def _layer(files: dict[str, bytes], whiteouts: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for name in whiteouts:
            head, _, base = name.rpartition("/")
            info = tarfile.TarInfo(f"{head}/.wh.{base}".lstrip("/"))
            tar.addfile(info)
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _config(*layers: bytes) -> bytes:
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in layers]},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}  # fmt: skip
    return json.dumps(config).encode()


def _blob(data: bytes, name: str = "layer", **check: object) -> Blob:
    @contextlib.contextmanager
    def opened() -> Iterator[BinaryIO]:
        yield io.BytesIO(data)

    return Blob(opened, name, **check)  # type: ignore[arg-type]


BOTTOM = _layer({"etc/os-release": b"ID=test\n", "bin/tool": b"x" * 70_000})
TOP = _layer({"etc/motd": b"hello\n"}, whiteouts=("bin/tool",))


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(str(tmp_path / "store"))
    store.collect_garbage()  # its lock files exist from here on: a snapshot before a command is what stays after
    return store


def test_layers_compressed_any_way_give_the_config_s_image_with_the_original_bytes(store):
    config = _config(BOTTOM, TOP)
    gz, zst = gzip.compress(BOTTOM), zstandard.ZstdCompressor().compress(TOP)
    events: list[tuple[str, str]] = []
    blobs = [_blob(gz, digest=_sha(gz), size=len(gz)), _blob(zst, digest=_sha(zst))]
    image = store_image(store, config, blobs, ["me/app:v1"], [f"127.0.0.1:5000/me/app@{_sha(gz)}"],
                        lambda d, e: events.append((d, e)))  # fmt: skip
    assert image.id == _sha(config), "the config's bytes as given: their sha256 is the image ID"
    assert events == [(_sha(BOTTOM), "stored"), (_sha(TOP), "stored")]
    assert store.resolve("me/app:v1") == image == store.resolve(f"127.0.0.1:5000/me/app@{_sha(gz)}")
    assert store.refs.tags_of(image.id) == ["me/app:v1"] and store.refs.all() == {"me/app:v1": image.id}
    assert store.refs.digests_of(image.id) == [f"127.0.0.1:5000/me/app@{_sha(gz)}"]
    top, bottom = store.layers_of(image)
    assert top.chain_id == chain_id(_sha(BOTTOM), _sha(TOP))
    for layer, tar in ((bottom, BOTTOM), (top, TOP)):
        out = io.BytesIO()
        store.layers.write_tar(layer, out)
        assert out.getvalue() == tar, "a loaded layer gives its own bytes back"
        assert not store.layers.is_incomplete(layer.chain_id)
    assert os.stat(os.path.join(store.layers.diff_dir(top.cache_id), "bin/tool")).st_rdev == 0, "a whiteout"

    events.clear()
    again = store_image(
        store, config, [_blob(b"never read")] * 2, ["me/app:v2"], (), lambda d, e: events.append((d, e))
    )
    assert again == image and [e for _, e in events] == ["exists", "exists"], "stored once, not read again"
    assert len(store.layers.all()) == 2


def test_an_empty_layer_is_kept_as_a_layer(store):
    empty = bytes(1024)  # the end-of-archive blocks alone, as moby writes an empty layer
    image = store_image(store, _config(BOTTOM, empty), [_blob(BOTTOM), _blob(empty)])
    assert [layer.diff_id for layer in store.layers_of(image)] == [archive.EMPTY_LAYER_DIFF_ID, _sha(BOTTOM)]


def _bad(name: str) -> tuple[bytes, list[Blob], str]:
    config = _config(BOTTOM, TOP)
    if name == "digest":
        return config, [_blob(BOTTOM), _blob(TOP, "top", digest=_sha(b"other"))], "top: digest sha256:"
    if name == "size":
        return config, [_blob(BOTTOM), _blob(TOP, "top", size=3)], "top: 10240 bytes, the manifest says 3"
    if name == "diffid":
        corrupt = TOP.replace(b"hello", b"jello")
        return config, [_blob(BOTTOM), _blob(corrupt, "top")], "top: its tar has DiffID .* the image config says"
    if name == "count":
        return config, [_blob(BOTTOM)], "the image config names 2 layers, the manifest 1"
    if name == "config":
        return b'{"rootfs": {"type": "layers", "diff_ids": ["md5:1"]}}', [_blob(BOTTOM)], "config is not valid"
    if name == "escape":
        evil = _layer({"../outside": b"x"})
        return _config(BOTTOM, evil), [_blob(BOTTOM), _blob(evil)], "'..' would leave the layer"
    if name == "tampered":  # a byte changed inside the gzip stream: it fails to inflate before its digest is known
        gz = gzip.compress(TOP)
        bad = gz[:40] + bytes([gz[40] ^ 0xFF]) + gz[41:]
        return config, [_blob(BOTTOM), _blob(bad, "top", digest=_sha(gz), size=len(gz))], "top: digest sha256:"
    assert name == "truncated"
    return config, [_blob(BOTTOM), _blob(gzip.compress(TOP)[:-30], "top")], "cannot read 'top' as a tar archive"


def _with(**fields: object) -> bytes:
    return json.dumps({**json.loads(_config(BOTTOM)), **fields}).encode()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_with(created=12345), "created is not a time"),
        (_with(created="garbage"), "created is not an RFC 3339 time: 'garbage'"),
        (_with(history="x"), "history is not a list of objects"),
        (_with(history=[{"created": "yesterday"}]), r"history\[0\].created is not an RFC 3339 time"),
        (_with(config="notadict"), "config is not an object"),
        (_with(config={"Env": "PATH=/bin", "Cmd": [1]}), "config.Cmd is not a list of strings"),
        (_with(os=["linux"]), "os is not a str"),
        (b"[]", "not a JSON object"),
    ],
)
def test_a_config_docker_could_not_read_is_refused_before_any_layer(store, config, message):
    before = view(store.root)
    with pytest.raises(TransferError, match=f"the image config is not valid: {message}"):
        store_image(store, config, [_blob(BOTTOM)], ["bad"])
    assert view(store.root) == before


def test_a_config_without_created_is_go_s_zero_time_and_every_listing_shows_it(store):
    from pylayerfs.cli.images import history, images

    image = store_image(store, _with(created=None, history=[{"created_by": "x"}]), [_blob(BOTTOM)], ["timeless"])
    assert image.created.year == 1
    assert images(store).splitlines()[1].split()[3] == "N/A", "docker images' CREATED of the zero time"
    assert history(store, "timeless").splitlines()[1].split()[1] == "N/A"


@pytest.mark.parametrize("case", ["digest", "size", "diffid", "count", "config", "escape", "truncated", "tampered"])
def test_bad_input_is_one_line_and_leaves_the_store_as_it_was(store, case):
    store_image(store, _config(BOTTOM), [_blob(BOTTOM)], ["base"])  # a layer the bad image shares: it must stay
    before = view(store.root)
    config, blobs, message = _bad(case)
    with pytest.raises((TransferError, archive.ArchiveError), match=message) as caught:
        store_image(store, config, blobs, ["bad:one"])
    assert "\n" not in str(caught.value)
    assert view(store.root) == before
    assert not os.path.exists(os.path.join(os.path.dirname(store.root), "outside"))


def test_an_interrupted_load_is_rolled_back_and_a_killed_one_collected(store):
    before = view(store.root)

    @contextlib.contextmanager
    def interrupted() -> Iterator[BinaryIO]:
        raise KeyboardInterrupt
        yield io.BytesIO()

    with pytest.raises(KeyboardInterrupt):
        store_image(store, _config(BOTTOM, TOP), [_blob(BOTTOM), Blob(interrupted, "top")])
    assert view(store.root) == before, "SIGINT: the bottom layer it had stored is gone again"

    cache = store.layers.new_dir(None)  # what a SIGKILL after registering the bottom layer leaves behind
    with open(os.path.join(store.layout.tmp, "load-x.tar"), "wb") as kept:
        kept.write(BOTTOM)
    with open(kept.name, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        archive.extract(tar, store.layers.diff_dir(cache))
    store.layers.register(cache, None, kept.name, incomplete=True)
    assert store.layers.is_incomplete(_sha(BOTTOM))
    store.collect_garbage()
    assert view(store.root) == before, "the next command's garbage collection removes it"


def test_a_layer_removed_under_a_concurrent_load_fails_that_load_cleanly(store, monkeypatch):
    from pylayerfs.image.store.layers import LayerStore

    real = LayerStore.complete

    def another_load_rolled_back_first(self: LayerStore, chain: str | None) -> None:
        self.remove(self.get(_sha(BOTTOM)))
        real(self, chain)

    monkeypatch.setattr(LayerStore, "complete", another_load_rolled_back_first)
    with pytest.raises(StoreError, match="missing or damaged"):
        store_image(store, _config(BOTTOM), [_blob(BOTTOM)], ["x"])
    assert store.images.ids() == [] and store.refs.all() == {}


def test_a_device_node_in_a_rootless_context_is_one_line(tmp_path):
    """Root in a user namespace (a rootless engine, a container) has no CAP_MKNOD over the host's devices."""
    info = tarfile.TarInfo("dev/null")
    info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, 1, 3, 0o666
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    (tmp_path / "layer.tar").write_bytes(buf.getvalue())
    (tmp_path / "config.json").write_bytes(_config(buf.getvalue()))
    code = f"""
import contextlib, sys
from pylayerfs.image.store import Store
from pylayerfs.image.transfer.ingest import Blob, store_image
from pylayerfs.image import archive
store = Store({str(tmp_path / "store")!r})
config = open({str(tmp_path / "config.json")!r}, "rb").read()
blob = Blob(lambda: open({str(tmp_path / "layer.tar")!r}, "rb"), "layer.tar")
try:
    store_image(store, config, [blob])
except archive.ArchiveError as exc:
    print(exc)
    sys.exit(1)
"""
    import subprocess
    import sys

    done = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stdout == ("layer.tar: refusing 'dev/null': a device node needs CAP_MKNOD, which this process lacks"
                           " (a rootless context)\n")  # fmt: skip
    store = Store(str(tmp_path / "store"))
    assert (
        store.layers.all() == [] and os.listdir(store.layout.tmp) == [] and os.listdir(store.layout.overlay2) == ["l"]
    )
