"""pull and push against a real registry (Debian's docker-registry), checked by skopeo; bad registries faked.

One module store holds a base and a three-layer image (a COPY, a file changed, a file removed: a whiteout); the
session's registry (``registry`` fixture) is filled by ``pylayerfs push`` and by ``skopeo copy`` of an OCI layout
made here (an index of two platforms, a gzip and a zstd layer). Misbehaving registries (500, a blob that is not
what its digest says, an unknown media type, a slow blob to interrupt) are a small ``http.server`` in a thread.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import zstandard

from pylayerfs.bench.registry import Registry, free_port, private_registry
from pylayerfs.image.store import Store
from pylayerfs.image.transfer import media
from tests.dockerd import BASE, Docker
from tests.mounts import need
from tests.test_build import pylayerfs
from tests.trees import view

pytestmark = [pytest.mark.ecosystem, pytest.mark.root, pytest.mark.timeout(300)]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fails(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a pylayerfs command that must fail with one line and leave the store as it was; the line."""
    before = view(str(root))
    result = subprocess.run([sys.executable, "-m", "pylayerfs", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYLAYERFS_ROOT": str(root), **(env or {})})  # fmt: skip
    assert result.returncode == 1, result
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert view(str(root)) == before
    return result.stderr.strip()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with ``app:v1``: the busybox base and three layers (a COPY, a changed file, a removed file)."""
    root = tmp_path_factory.mktemp("source") / "store"
    ctx = root.parent / "ctx"
    ctx.mkdir()
    (ctx / "app.sh").write_text("#!/bin/sh\necho hello, registry\n")
    (ctx / "Dockerfile").write_text("FROM alpine\nCOPY app.sh /app/app.sh\nRUN echo 2 > /app/two && rm /bin/true\n"
                                    'CMD ["/bin/sh", "/app/app.sh"]\n')  # fmt: skip
    pylayerfs(root, "base", "alpine")
    pylayerfs(root, "build", "-t", "app:v1", "--storage-driver", "vfs", str(ctx))
    return root


def image_of(root: Path, ref: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(pylayerfs(root, "inspect", ref).stdout)
    return data[0]


@pytest.fixture(scope="module")
def pushed(source: Path, registry: Registry) -> dict[str, Any]:
    """``app:v1`` pushed to ``<registry>/app:v1``: the push's output, the manifest digest, the image."""
    ref = f"{registry.host}/app:v1"
    pylayerfs(source, "tag", "app:v1", ref)
    out = pylayerfs(source, "push", ref).stdout
    digest = out.splitlines()[-1].split()[2]
    return {"ref": ref, "out": out, "digest": digest, "image": image_of(source, ref)}


def test_push_is_what_skopeo_reads(pushed: dict[str, Any], source: Path, registry: Registry, tmp_path: Path) -> None:
    need("skopeo")
    image, lines = pushed["image"], pushed["out"].splitlines()
    diff_ids = image["RootFS"]["Layers"]
    assert lines[0] == f"The push refers to repository [{registry.host}/app]"
    assert lines[1 : 1 + len(diff_ids)] == [f"{d[7:19]}: Preparing" for d in reversed(diff_ids)]
    assert sorted(lines[1 + len(diff_ids) : -1]) == sorted(f"{d[7:19]}: Pushed" for d in diff_ids)
    manifest_size = int(lines[-1].split()[-1])
    assert lines[-1] == f"v1: digest: {pushed['digest']} size: {manifest_size}"
    assert image["RepoDigests"] == [f"{registry.host}/app@{pushed['digest']}"]

    inspect = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{pushed['ref']}"],
                                        capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert inspect["Digest"] == pushed["digest"]
    copy = tmp_path / "dir"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{pushed['ref']}", f"dir:{copy}"],
                   capture_output=True, check=True)  # fmt: skip
    manifest_bytes = (copy / "manifest.json").read_bytes()
    assert sha256(manifest_bytes) == pushed["digest"] and len(manifest_bytes) == manifest_size
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == media.DOCKER_MANIFEST
    assert [layer["digest"] for layer in manifest["layers"]] == inspect["Layers"]
    config = (copy / manifest["config"]["digest"][7:]).read_bytes()
    assert sha256(config) == image["Id"]
    for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        blob = (copy / layer["digest"][7:]).read_bytes()
        assert len(blob) == layer["size"] and sha256(blob) == layer["digest"]
        assert sha256(gzip.decompress(blob)) == diff_id  # the gzip stream holds the layer's own tar

    digests = pylayerfs(source, "images", "--digests", "--format", "{{.Repository}} {{.Tag}} {{.Digest}}")
    assert f"{registry.host}/app v1 {pushed['digest']}" in digests.stdout.splitlines()
    assert "app v1 <none>" in digests.stdout.splitlines()


def test_push_again_sends_no_layer_and_mounts_across_repositories(pushed: dict[str, Any], source: Path,
                                                                    registry: Registry) -> None:  # fmt: skip
    diff_ids = pushed["image"]["RootFS"]["Layers"]
    again = pylayerfs(source, "push", pushed["ref"]).stdout.splitlines()
    assert sorted(again[1 + len(diff_ids) : -1]) == sorted(f"{d[7:19]}: Layer already exists" for d in diff_ids)
    assert again[-1].split()[2] == pushed["digest"]
    pylayerfs(source, "tag", "app:v1", f"{registry.host}/other/app:v2")
    other = pylayerfs(source, "push", f"{registry.host}/other/app:v2").stdout.splitlines()
    assert sorted(other[1 + len(diff_ids) : -1]) == sorted(f"{d[7:19]}: Mounted from app" for d in diff_ids)
    assert other[-1] == f"v2: digest: {pushed['digest']} size: {again[-1].split()[-1]}"


def test_pull_into_an_empty_store_runs(pushed: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    root = tmp_path / "store"
    out = pylayerfs(root, "pull", pushed["ref"]).stdout.splitlines()
    store = Store(str(root))
    image = store.resolve(pushed["ref"])
    assert image.id == pushed["image"]["Id"] and image.diff_ids == pushed["image"]["RootFS"]["Layers"]
    assert out[0] == "v1: Pulling from app"
    assert out[-3:] == [f"Digest: {pushed['digest']}", f"Status: Downloaded newer image for {pushed['ref']}",
                        pushed["ref"]]  # fmt: skip
    assert sum(line.endswith(": Pull complete") for line in out) == len(image.diff_ids)
    assert image_of(root, pushed["ref"])["RepoDigests"] == [f"{registry.host}/app@{pushed['digest']}"]
    # moby's distribution metadata: DiffID <-> blob digest, as pushed
    for diff_id in image.diff_ids:
        entries = json.loads(Path(store.layout.v2metadata(diff_id)).read_text())
        assert entries[-1]["SourceRepository"] == f"{registry.host}/app" and entries[-1]["HMAC"] == ""
        assert Path(store.layout.diff_id_by_digest(entries[-1]["Digest"])).read_text() == diff_id
    run = pylayerfs(root, "run", "--rm", "--storage-driver", "vfs", pushed["ref"])
    assert run.stdout == "hello, registry\n"
    assert pylayerfs(root, "run", "--rm", "--storage-driver", "vfs", pushed["ref"], "ls", "/bin/true",
                     check=False).returncode != 0  # fmt: skip
    again = pylayerfs(root, "pull", pushed["ref"]).stdout.splitlines()
    assert sum(line.endswith(": Already exists") for line in again) == len(image.diff_ids)
    assert again[-2] == f"Status: Image is up to date for {pushed['ref']}"
    by_digest = f"{registry.host}/app@{pushed['digest']}"
    assert pylayerfs(root, "pull", "-q", by_digest).stdout == by_digest + "\n"
    assert store.resolve(by_digest).id == image.id
    # push from the pulled store: every blob is known to be there already
    pushed_again = pylayerfs(root, "push", pushed["ref"]).stdout
    assert pushed_again.count("Layer already exists") == len(image.diff_ids)


def _layer_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def oci_layout(directory: Path) -> dict[str, Any]:
    """An OCI layout with an index of two platforms (linux/amd64, linux/arm64), each a manifest of two layers, the
    first gzip, the second zstd. Returns the configs' digests by architecture and the DiffIDs."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes, kind: str) -> dict[str, Any]:
        (blobs / sha256(data)[7:]).write_bytes(data)
        return {"mediaType": kind, "digest": sha256(data), "size": len(data)}

    tars = [_layer_tar({"etc/os-release": b"ID=layers\n"}), _layer_tar({"hello.txt": b"hello from zstd\n"})]
    layers = [blob(gzip.compress(tars[0], mtime=0), media.OCI_LAYER_GZIP),
              blob(zstandard.ZstdCompressor().compress(tars[1]), media.OCI_LAYER_ZSTD)]  # fmt: skip
    diff_ids = [sha256(t) for t in tars]
    manifests, configs = [], {}
    for arch in ("amd64", "arm64"):
        config = json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["/hello.txt"]},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids},
                             "history": [{"created_by": "one"}, {"created_by": "two"}]}).encode()  # fmt: skip
        configs[arch] = sha256(config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                               "config": blob(config, media.OCI_CONFIG), "layers": layers}).encode()  # fmt: skip
        manifests.append({**blob(manifest, media.OCI_MANIFEST), "platform": {"architecture": arch, "os": "linux"}})
    (directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": manifests}
    inner = json.dumps(index).encode()
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {**blob(inner, media.OCI_INDEX), "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))  # fmt: skip
    return {"configs": configs, "diff_ids": diff_ids, "index": sha256(inner)}


def test_pull_of_an_oci_index_picks_the_platform(registry: Registry, tmp_path: Path) -> None:
    need("skopeo")
    layout = oci_layout(tmp_path / "oci")
    ref = f"{registry.host}/multi:v1"
    subprocess.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                    f"oci:{tmp_path / 'oci'}:multi", f"docker://{ref}"], capture_output=True, check=True)  # fmt: skip
    root = tmp_path / "store"
    out = pylayerfs(root, "pull", ref).stdout
    store = Store(str(root))
    image = store.resolve(ref)
    assert image.id == layout["configs"]["amd64"] and image.diff_ids == layout["diff_ids"]
    assert f"Digest: {layout['index']}" in out  # the RepoDigest is the index's, as Docker records it
    assert store.refs.digests_of(image.id) == [f"{registry.host}/multi@{layout['index']}"]
    pylayerfs(root, "pull", "--platform", "linux/arm64", f"{registry.host}/multi@{layout['index']}")
    arm = store.resolve(f"{registry.host}/multi@{layout['index']}")
    assert arm.id == layout["configs"]["arm64"] and arm.config["architecture"] == "arm64"
    message = fails(root, "pull", "--platform", "linux/s390x", ref)
    assert message == "pylayerfs pull: no matching manifest for linux/s390x in the manifest list entries"


def test_basic_auth_with_dockers_credentials(source: Path, tmp_path: Path) -> None:
    with private_registry(str(tmp_path / "registry"), users={"me": "secret"}) as locked:
        ref = f"{locked.host}/app:v1"
        pylayerfs(source, "tag", "app:v1", ref)
        message = fails(source, "push", ref, env={"DOCKER_CONFIG": str(tmp_path / "nobody")})
        assert message.startswith(f"pylayerfs push: unauthorized: {locked.host} asks for a login")
        config = tmp_path / "docker"
        config.mkdir()
        wrong = {"auths": {locked.host: {"auth": base64.b64encode(b"me:wrong").decode()}}}
        (config / "config.json").write_text(json.dumps(wrong))
        assert "401" in fails(source, "push", ref, env={"DOCKER_CONFIG": str(config)})
        right = {"auths": {f"http://{locked.host}": {"auth": base64.b64encode(b"me:secret").decode()}}}
        (config / "config.json").write_text(json.dumps(right))
        env = {**os.environ, "DOCKER_CONFIG": str(config), "PYLAYERFS_ROOT": str(tmp_path / "store")}
        subprocess.run([sys.executable, "-m", "pylayerfs", "--root", str(source), "push", ref], env=env, check=True,
                       capture_output=True)  # fmt: skip
        pulled = subprocess.run([sys.executable, "-m", "pylayerfs", "pull", "-q", ref], env=env,
                                capture_output=True, text=True, check=True)  # fmt: skip
        assert pulled.stdout == ref + "\n"


class Fake(http.server.BaseHTTPRequestHandler):
    """A registry that answers from ``routes``: path -> (status, content type, body, seconds to stall midway).

    A route ``"bearer"`` (its content type the token, its body the ``Authorization`` that ``/token`` wants) makes
    every other path answer 401 with a ``Bearer`` challenge unless the request carries that token, as
    distribution's token auth does.
    """

    routes: ClassVar[dict[str, tuple[int, str, bytes, float]]] = {}

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        bearer = self.routes.get("bearer")
        if bearer and path == "/token" and self.headers.get("Authorization") != bearer[2].decode():
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if bearer and path != "/token" and self.headers.get("Authorization") != f"Bearer {bearer[1]}":
            realm = f"http://{self.headers['Host']}/token"
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="fake"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, kind, body, stall = self.routes.get(path, (404, "application/json", b'{"errors":[]}', 0))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if stall:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(stall)
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[tuple[str, dict[str, tuple[int, str, bytes, float]]]]:
    routes: dict[str, tuple[int, str, bytes, float]] = {"/v2/": (200, "application/json", b"{}", 0)}
    handler = type("Handler", (Fake,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", routes
    server.shutdown()
    server.server_close()


def _serve_image(routes: dict[str, tuple[int, str, bytes, float]], layer: bytes, sent: bytes | None = None,
                 stall: float = 0, below: str | None = None) -> None:  # fmt: skip
    """Routes for ``bad:v1``: a v2 schema 2 manifest, its config, one gzip layer (``sent`` instead of it when given),
    over a layer of DiffID ``below`` (one the store has: never fetched) when given."""
    diff_ids = [*([below] if below else []), sha256(gzip.decompress(layer))]
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}},
    ).encode()
    layers = [{"mediaType": media.DOCKER_LAYER, "digest": sha256(d.encode()), "size": 1} for d in diff_ids[:-1]]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": media.DOCKER_MANIFEST,
                           "config": {"mediaType": media.DOCKER_CONFIG, "digest": sha256(config), "size": len(config)},
                           "layers": [*layers, {"mediaType": media.DOCKER_LAYER, "digest": sha256(layer),
                                                "size": len(layer)}]}).encode()  # fmt: skip
    routes["/v2/bad/manifests/v1"] = (200, media.DOCKER_MANIFEST, manifest, 0)
    routes[f"/v2/bad/blobs/{sha256(config)}"] = (200, "application/octet-stream", config, 0)
    routes[f"/v2/bad/blobs/{sha256(layer)}"] = (200, "application/octet-stream", sent or layer, stall)


def test_bad_registries_leave_the_store_as_it_was(source: Path, fake: Any, tmp_path: Path) -> None:
    host, routes = fake
    layer = gzip.compress(_layer_tar({"a": b"a" * 1000}), compresslevel=0, mtime=0)
    other = gzip.compress(_layer_tar({"a": b"b" * 1000}), compresslevel=0, mtime=0)  # as long, another digest
    fresh = tmp_path / "store"
    pylayerfs(fresh, "base", "alpine")  # a base layer without children: no committed mark yet
    for root, below in ((source, None), (fresh, image_of(fresh, "alpine")["RootFS"]["Layers"][0])):
        _serve_image(routes, layer, sent=other, below=below)
        message = fails(root, "pull", f"{host}/bad:v1")
        assert message.startswith(f"pylayerfs pull: blob {sha256(layer)}: digest sha256:")
    routes["/v2/bad/manifests/v1"] = (500, "application/json", b'{"errors":[{"code":"UNKNOWN","message":"boom"}]}', 0)
    message = fails(source, "pull", f"{host}/bad:v1")
    assert message == f"pylayerfs pull: manifest for {host}/bad:v1: HTTP 500 Internal Server Error: unknown: boom"
    routes["/v2/bad/manifests/v1"] = (200, "application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}", 0)
    assert fails(source, "pull", f"{host}/bad:v1") == (
        "pylayerfs pull: manifest v1: unsupported media type application/vnd.docker.distribution.manifest.v1+prettyjws"
    )
    assert fails(source, "pull", f"{host}/bad:nope").startswith(
        f"pylayerfs pull: manifest for {host}/bad:nope not found"
    )
    routes["/v2/"] = (401, "application/json", b"{}", 0)
    assert "unauthorized" in fails(source, "pull", f"{host}/bad:v1")
    down = f"127.0.0.1:{free_port()}"
    assert fails(source, "pull", f"{down}/x:v1") == f'pylayerfs pull: GET "http://{down}/v2/": connection refused'
    assert fails(source, "push", f"{down}/app:v1").startswith("pylayerfs push: An image does not exist locally")
    pylayerfs(source, "tag", "app:v1", f"{down}/app:v1")
    assert fails(source, "push", f"{down}/app:v1") == f'pylayerfs push: GET "http://{down}/v2/": connection refused'


def test_bearer_token_from_the_realm_with_basic_credentials(fake: Any, tmp_path: Path) -> None:
    host, routes = fake
    layer = gzip.compress(_layer_tar({"token": b"yes"}), mtime=0)
    _serve_image(routes, layer)
    routes["bearer"] = (0, "t0ken", b"Basic " + base64.b64encode(b"me:secret"), 0)
    routes["/token"] = (200, "application/json", b'{"token": "t0ken"}', 0)
    root = tmp_path / "store"
    pylayerfs(root, "images")
    message = fails(root, "pull", f"{host}/bad:v1", env={"DOCKER_CONFIG": str(tmp_path)})
    assert (
        message == f"pylayerfs pull: unauthorized: the token service http://{host}/token answers HTTP 401 Unauthorized"
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(b"me:secret").decode()}}})
    )
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path), "PYLAYERFS_ROOT": str(root)}
    subprocess.run([sys.executable, "-m", "pylayerfs", "pull", f"{host}/bad:v1"], env=env, check=True)
    assert Store(str(root)).resolve(f"{host}/bad:v1").diff_ids == [sha256(gzip.decompress(layer))]


def test_rmi_of_a_pulled_image_untags_its_digests(pushed: dict[str, Any], registry: Registry, tmp_path: Path) -> None:
    root = tmp_path / "store"
    pylayerfs(root, "pull", pushed["ref"])
    out = pylayerfs(root, "rmi", pushed["ref"]).stdout.splitlines()
    assert out[:2] == [f"Untagged: {pushed['ref']}", f"Untagged: {registry.host}/app@{pushed['digest']}"]
    assert out[2] == f"Deleted: {pushed['image']['Id']}"
    assert pylayerfs(root, "images", "--format", "{{.ID}}").stdout == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_pull_leaves_nothing_behind(fake: Any, tmp_path: Path, sig: signal.Signals,
                                                   pushed: dict[str, Any]) -> None:  # fmt: skip
    host, routes = fake
    layer = gzip.compress(_layer_tar({"big": os.urandom(4 << 20)}), compresslevel=1, mtime=0)
    _serve_image(routes, layer, stall=30)
    root = tmp_path / "store"
    pylayerfs(root, "pull", pushed["ref"])
    before = view(str(root))
    env = {**os.environ, "PYLAYERFS_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "pylayerfs", "pull", f"{host}/bad:v1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    while "Pulling fs layer" not in proc.stdout.readline():
        assert proc.poll() is None
    time.sleep(1)  # the layer's first half is being extracted
    proc.send_signal(sig)
    assert proc.wait(30) == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    if sig != signal.SIGKILL:  # SIGTERM (`timeout`, `kill`) is rolled back as Ctrl-C is
        assert view(str(root)) == before
        return

    def paths(tree: dict[str, Any]) -> set[str]:
        return set(tree) - {"lock", "busy"}

    assert paths(view(str(root))) > paths(before), "the killed pull left a half-extracted layer"
    pylayerfs(root, "pull", pushed["ref"])  # the next command collects what the killed one left
    assert paths(view(str(root))) == paths(before)


@pytest.mark.docker
@pytest.mark.timeout(600)
def test_docker_pulls_what_pylayerfs_pushes_and_back(pushed: dict[str, Any], registry: Registry, docker: Docker,
                                                      tmp_path: Path) -> None:  # fmt: skip
    """Docker 20.10 as the oracle: the image IDs and DiffIDs agree both ways, through the registry and through
    ``skopeo copy docker-archive:`` of a ``docker save`` (127.0.0.0/8 is an insecure registry to dockerd too)."""
    pulled = docker.run("pull", pushed["ref"]).stdout
    assert f"Digest: {pushed['digest']}" in pulled
    assert docker.run("inspect", "--format", "{{.Id}}", pushed["ref"]).stdout.strip() == pushed["image"]["Id"]
    assert docker.run("run", "--rm", pushed["ref"]).stdout == "hello, registry\n"
    ours = f"{registry.host}/from-docker:v1"
    docker.run("tag", BASE, ours)
    docker_push = docker.run("push", ours).stdout
    docker_id = docker.run("inspect", "--format", "{{.Id}}", BASE).stdout.strip()
    root = tmp_path / "store"
    pylayerfs(root, "pull", ours)
    image = image_of(root, ours)
    assert image["Id"] == docker_id
    assert image["RootFS"]["Layers"] == json.loads(docker.run("inspect", "--format", "{{json .RootFS.Layers}}",
                                                              BASE).stdout)  # fmt: skip
    assert image["RepoDigests"][0].split("@")[1] in docker_push
    need("skopeo")
    docker.run("save", "-o", str(tmp_path / "saved.tar"), BASE)
    archived = f"{registry.host}/from-archive:v1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"docker-archive:{tmp_path / 'saved.tar'}",
                    f"docker://{archived}"], capture_output=True, check=True)  # fmt: skip
    pylayerfs(root, "pull", archived)
    assert image_of(root, archived)["Id"] == docker_id
    docker.run("rmi", pushed["ref"], ours)


def test_a_manifest_trickling_in_is_given_up_on_at_the_deadline(fake: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """The timeout between two reads never trips on a registry that sends a byte now and then: a small document must
    arrive whole within ``DOCUMENT_DEADLINE``."""
    from pylayerfs.image.transfer import registry

    host, routes = fake
    _serve_image(routes, gzip.compress(_layer_tar({"f": b"x"}), mtime=0))
    status, kind, body, _ = routes["/v2/bad/manifests/v1"]
    routes["/v2/bad/manifests/v1"] = (status, kind, body, 20.0)  # half of it, then nothing for 20 s
    monkeypatch.setattr(registry, "DOCUMENT_DEADLINE", 1.0)
    store = Store(str(tmp_path / "store"))
    started = time.monotonic()
    with pytest.raises(registry.RegistryError, match=r"manifest v1: not received in 1 s"):
        registry.pull(store, f"{host}/bad:v1", out=lambda _: None)
    assert time.monotonic() - started < 10
