"""A layer's original tar kept as a split (``tar-split.json.gz``): the exact bytes back, or the whole tar when a split
cannot hold (pylayerfs/image/store/tarsplit.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pylayerfs.cli.images import import_rootfs
from pylayerfs.image import archive
from pylayerfs.image.store import Store, StoreError, tarsplit
from pylayerfs.image.transfer.ingest import Blob, TransferError, store_image
from tests.dockerd import DOCKER, Docker, busybox_rootfs

pytestmark = pytest.mark.root  # extraction keeps owners and makes whiteouts (mknod)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(str(tmp_path_factory.mktemp("tarsplit") / "store"))


def _tar(fmt: int, entries: Sequence[tuple[str, bytes | None, Callable[[tarfile.TarInfo], None] | None]]) -> bytes:
    """A tar made by Python's tarfile in ``fmt``: ``(name, data or None for a directory, edit of the header)``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data, edit in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1_700_000_000, 0o644
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size = len(data)
            if edit is not None:
                edit(info)
            tar.addfile(info, io.BytesIO(data or b"") if info.isreg() else None)
    return out.getvalue()


def _link(target: str, kind: bytes = tarfile.LNKTYPE) -> Callable[[tarfile.TarInfo], None]:
    def edit(info: tarfile.TarInfo) -> None:
        info.type, info.linkname, info.size = kind, target, 0

    return edit


def _sized(edit: Callable[[tarfile.TarInfo], None]) -> Callable[[tarfile.TarInfo], None]:
    """``edit``, then a size field of 2 MiB in a header that carries no data (tarfile writes it as it is)."""

    def sized(info: tarfile.TarInfo) -> None:
        edit(info)
        info.size = 2 << 20

    return sized


def _xattr(info: tarfile.TarInfo) -> None:
    info.pax_headers = {"SCHILY.xattr.user.note": "kept", "SCHILY.xattr.user.other": "\xe9t\xe9"}


def _import(store: Store, tmp_path: Path, data: bytes, tag: str) -> tuple[bytes, list[str]]:
    """``import`` the tar ``data``; what ``write_tar`` gives back and the names in the layer's layerdb entry."""
    path = tmp_path / f"{tag}.tar"
    path.write_bytes(data)
    image = import_rootfs(store, str(path), f"split:{tag}")
    layer = store.layers_of(image)[0]
    out = io.BytesIO()
    store.layers.write_tar(layer, out)
    names = sorted(os.listdir(store.layout.chain(layer.chain_id)))
    assert store.layers.kept_size(layer) == (len(out.getvalue()) if tarsplit.SPLIT in names else None)
    return out.getvalue(), names


LONG = "deep/" + "d" * 120 + "/" + "f" * 110  # over USTAR's 100-byte name: a GNU long name or a PAX path
BIG = os.urandom(300_000)
MIXED: list[tuple[str, bytes | None, Callable[[tarfile.TarInfo], None] | None]] = [
    ("etc", None, None),
    ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", None),
    ("etc/empty", b"", None),
    ("bin/big", BIG, None),
    ("bin/hard", b"", _link("bin/big")),
    ("bin/soft", b"", _link("big", tarfile.SYMTYPE)),
    ("./dot/slash//name", b"cleaned path", None),
    ("gone/.wh.old", b"", None),  # a whiteout
    ("opq/.wh..wh..opq", b"", None),  # an opaque directory
]
SHORT = [(n, d, e) for n, d, e in MIXED if len(n) < 100]
SIZED_LINKS: list[tuple[str, bytes | None, Callable[[tarfile.TarInfo], None] | None]] = [
    ("f", BIG, None),  # link entries whose size field is not 0: tarfile reads no data for them, nor may the split
    ("l", b"", _sized(_link("f"))),
    ("s", b"", _sized(_link("f", tarfile.SYMTYPE))),
    ("after", BIG, None),
]


@pytest.mark.parametrize(
    ("fmt", "entries", "tail"),
    [
        (tarfile.GNU_FORMAT, [*MIXED, (LONG, b"long", None), ("l" * 120, b"", _link(LONG))], b""),
        (tarfile.PAX_FORMAT, [*MIXED, (LONG, b"long", None), ("x", b"attrs", _xattr)], b""),
        (tarfile.USTAR_FORMAT, [*SHORT, ("u/" + "n" * 90 + "/" + "m" * 60, b"prefix split", None)], b""),
        (tarfile.PAX_FORMAT, [*MIXED, ("caf\udce9", b"not utf-8", None)], b"trailing garbage after the end" * 99),
        (tarfile.GNU_FORMAT, [], b""),  # nothing but the end blocks
        (tarfile.GNU_FORMAT, SIZED_LINKS, b""),
    ],
    ids=["gnu", "pax-xattrs", "ustar", "garbage-and-latin1-name", "empty", "sized-links"],
)
def test_python_tars_come_back_byte_for_byte_from_a_split(store, tmp_path, fmt, entries, tail):
    data = _tar(fmt, entries) + tail
    back, names = _import(store, tmp_path, data, f"py{fmt}{len(entries)}{len(tail)}")
    assert back == data
    assert tarsplit.SPLIT in names
    assert tarsplit.WHOLE not in names


def test_the_split_holds_headers_not_payloads(store, tmp_path):
    data = _tar(tarfile.GNU_FORMAT, [("big", BIG, None), ("small", b"s", None)])
    _, _ = _import(store, tmp_path, data, "small-split")
    layer = store.layers_of(store.resolve("split:small-split"))[0]
    split = os.path.join(store.layout.chain(layer.chain_id), tarsplit.SPLIT)
    records = [json.loads(line) for line in gzip.open(split)]
    assert [r["position"] for r in records] == list(range(len(records)))
    assert [(r["name"], r["size"]) for r in records if r["type"] == tarsplit.FILE] == [("big", len(BIG)), ("small", 1)]
    assert os.path.getsize(split) < 2000


@pytest.mark.parametrize(
    "entries",
    [
        [("a", b"first", None), ("b", b"x", None), ("a", b"second", None)],  # the same path twice
        [("d/a", b"first", None), ("d/.wh.a", b"", None)],  # whited out
        [("a", b"first", None), ("a", b"", _link("b", tarfile.SYMTYPE))],  # replaced by a symlink
        [("a", b"first", None), ("b", b"", _link("a")), ("b", b"other", None), ("a", b"", _link("b"))],  # relinked
    ],
    ids=["duplicate", "whiteout", "symlink-over", "relinked"],
)
def test_a_tar_that_changes_its_own_files_is_kept_whole(store, tmp_path, entries):
    data = _tar(tarfile.PAX_FORMAT, [*entries, ("after", os.urandom(5000), None)]) + b"tail"
    back, names = _import(store, tmp_path, data, f"whole{zlib.crc32(data)}")
    assert back == data
    assert tarsplit.WHOLE in names
    assert tarsplit.SPLIT not in names


def test_sparse_files_keep_their_payload_raw(store, tmp_path):
    src = tmp_path / "sparse-src"
    src.mkdir()
    with open(src / "holes", "wb") as f:  # more stored data than the splitter holds back (FLUSH)
        f.write(os.urandom(3 << 20))
        f.seek(8 << 20)
        f.write(os.urandom(1 << 20))
    (src / "plain").write_bytes(b"plain")
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(tar), "-C", str(src), "holes", "plain"], check=True)
    data = tar.read_bytes()
    assert any(m.issparse() for m in tarfile.open(tar))
    back, names = _import(store, tmp_path, data, "sparse")
    assert back == data
    assert tarsplit.SPLIT in names


def test_a_loaded_gzip_layer_keeps_its_uncompressed_bytes(store, tmp_path):
    data = _tar(tarfile.PAX_FORMAT, MIXED)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    blob = Blob(open=lambda: io.BytesIO(gzip.compress(data)), name="blob")
    image = store_image(store, config.encode(), [blob], ["split:loaded"])
    out = io.BytesIO()
    store.layers.write_tar(store.layers_of(image)[0], out)
    assert out.getvalue() == data


@pytest.mark.parametrize("compress", [False, True])
def test_a_blob_named_by_its_diff_id_is_hashed_once_and_must_be_the_tar(store, compress):
    """Its digest is checked by the DiffID the extraction computes; a compressed blob cannot carry that digest."""
    data = _tar(tarfile.PAX_FORMAT, [("once", os.urandom(1000), None)])
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    blob = Blob(open=lambda: io.BytesIO(gzip.compress(data) if compress else data), name="blob", digest=diff_id)
    if compress:
        before = sorted(os.listdir(store.layout.layerdb))
        with pytest.raises(TransferError, match="blob: gzip-compressed, so its digest cannot be"):
            store_image(store, config.encode(), [blob])
        assert sorted(os.listdir(store.layout.layerdb)) == before
    else:
        out = io.BytesIO()
        store.layers.write_tar(store.layers_of(store_image(store, config.encode(), [blob]))[0], out)
        assert out.getvalue() == data


def test_a_split_whose_file_changed_says_so(store, tmp_path):
    _import(store, tmp_path, _tar(tarfile.GNU_FORMAT, [("f", b"content", None)]), "changed")
    layer = store.layers_of(store.resolve("split:changed"))[0]
    (Path(store.layers.diff_dir(layer.cache_id)) / "f").write_bytes(b"longer content")
    with pytest.raises(StoreError, match="'f' is not the regular file of 7 bytes"):
        store.layers.write_tar(layer, io.BytesIO())


def test_memory_stays_bounded_whatever_the_raw_regions(tmp_path):
    """Pending bytes never grow with a payload, a sparse file's raw payload or garbage after the end blocks."""
    data = _tar(tarfile.GNU_FORMAT, [("big", os.urandom(8 << 20), None)]) + os.urandom(8 << 20)
    dest = tmp_path / "diff"
    dest.mkdir()
    splitter = tarsplit.Splitter(str(tmp_path / "split"), str(dest))
    most = 0
    write = splitter.write

    def watched(chunk: bytes) -> int:
        nonlocal most
        n = write(chunk)
        most = max(most, len(splitter.pending))
        return n

    splitter.write = watched  # type: ignore[method-assign,assignment]
    got = archive.extract_keeping(io.BytesIO(data), "t", str(dest), splitter, splitter.seen)  # type: ignore[arg-type]
    kept = splitter.close(got)
    assert most <= tarsplit.FLUSH + (1 << 20)
    assert tarsplit.digest(kept.path, kept.whole, str(dest)) == got


def test_busybox_rootfs_round_trips(store, tmp_path):
    if not os.access("/bin/busybox", os.X_OK):
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    data = Path(busybox_rootfs(str(tmp_path / "busybox.tar"))).read_bytes()
    back, names = _import(store, tmp_path, data, "busybox")
    assert back == data
    assert tarsplit.SPLIT in names


@pytest.mark.docker
def test_docker_saved_layers_round_trip(docker: Docker, store, tmp_path):
    """Layer tars written by Docker (Go's archive/tar, whiteouts of a RUN rm) come back byte for byte."""
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM busybox:base\nRUN mkdir -p /a/b && echo hi > /a/b/f && dd if=/dev/zero of=/a/z bs=1k count=300\n"
        "RUN rm -rf /a/b && echo again > /a/z && ln /a/z /a/hard\n"
    )
    docker.build(str(context), "-t", "tarsplit:docker")
    raw = subprocess.run([DOCKER, "save", "tarsplit:docker"], env=docker.env(), capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as saved:
        manifest = json.load(saved.extractfile("manifest.json"))  # type: ignore[arg-type]
        layers = [saved.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]
    for i, data in enumerate(layers):
        back, names = _import(store, tmp_path, data, f"docker{i}")
        assert back == data
        assert tarsplit.SPLIT in names


@pytest.mark.parametrize(("twice", "kept"), [(False, tarsplit.SPLIT), (True, tarsplit.WHOLE)])
def test_a_tar_given_by_path_after_its_extraction_is_split_or_kept_whole(store, tmp_path, twice, kept):
    data = _tar(tarfile.GNU_FORMAT, [("a", b"first", None), ("b", BIG, None)] + [("a", b"again", None)] * twice)
    path = tmp_path / "given.tar"
    path.write_bytes(data)
    cache = store.layers.new_dir(None)
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        archive.extract(tar, store.layers.diff_dir(cache))
    with store.locked():
        layer = store.layers.register(cache, None, str(path))
    assert layer is not None
    out = io.BytesIO()
    store.layers.write_tar(layer, out)
    assert out.getvalue() == data
    assert kept in os.listdir(store.layout.chain(layer.chain_id))
    assert os.listdir(store.layout.tmp) == []
