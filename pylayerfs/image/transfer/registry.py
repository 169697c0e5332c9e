"""Pull and push: the Docker Registry HTTP API v2 (OCI distribution-spec) on ``requests``, as Docker 20.10 speaks it.

A pull GETs the manifest (Accept: Docker v2 schema 2, OCI manifest, manifest list, OCI index), picks the platform's
manifest out of an index, GETs the config blob (checked against its digest) and streams each layer blob straight
from the HTTP response into :func:`~pylayerfs.image.transfer.ingest.store_image`, which hashes the bytes as they
travel. A push sends each layer gzip-compressed as it is read (POST an upload, one chunked PATCH, PUT
``?digest=`` with the digest computed while streaming), skips blobs the registry has (HEAD by the digests recorded
for the DiffID), mounts blobs from another repository of the same registry, then PUTs the config and a v2 schema 2
manifest (moby's ``distribution/pull_v2.go``, ``push_v2.go``). Both record moby's distribution metadata (DiffID <->
blob digest, ``distribution/metadata/v2_metadata_service.go``) and the manifest digest as a RepoDigest.

Registries on 127.0.0.0/8 or ``localhost``, and any with ``--insecure``, are tried over HTTPS without certificate
checks, then over plain HTTP (moby's ``registry/config.go``: 127.0.0.0/8 is an insecure registry by default).
Authentication follows the ``WWW-Authenticate`` challenge of a 401: ``Basic``, or ``Bearer`` with a token from the
realm (docker/distribution ``registry/client/auth``), with the credentials ``docker login`` keeps in
``$DOCKER_CONFIG/config.json`` (``~/.docker/config.json``): ``auths.<host>.auth``, base64 of ``user:password``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import ipaddress
import json
import os
import platform as host_platform
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urljoin

import requests
import urllib3
from isal import igzip

from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import Image
from pylayerfs.image.store.layers import Layer, chain_id
from pylayerfs.image.store.layout import hex_of, write_value
from pylayerfs.image.store.references import Reference, is_digest, parse
from pylayerfs.image.transfer import media
from pylayerfs.image.transfer.ingest import Blob, TransferError, diff_ids_of, store_image

Output = Callable[[str], None]
MANIFEST_LIMIT = 4 << 20  # bytes: distribution's limit on a manifest (and ours on a config)
CHUNK = 1 << 20
GZIP_LEVEL = 1  # ISA-L's levels are 0-3
TIMEOUT = (30.0, 300.0)  # seconds: to connect, and between two reads
DOCUMENT_DEADLINE = 120.0  # seconds: a manifest, config or token, whole
MAX_METADATA = 50  # moby keeps the last 50 blob digests per DiffID
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\"\])]+)")


class RegistryError(TransferError):
    """A registry that cannot be reached, refuses, or answers something else than asked; one line for the user."""


def short(digest: str) -> str:
    """The 12 hex digits Docker shows for a digest or DiffID (``stringid.TruncateID``)."""
    return hex_of(digest)[:12]


def full_name(ref: Reference) -> str:
    """The repository's fully qualified name, as Docker prints it: ``docker.io/library/busybox``, ``host:5000/app``."""
    return f"{ref.registry}/{ref.repository}"


# -- credentials and transport -------------------------------------------------------------


def credentials(host: str) -> tuple[str, str] | None:
    """``(user, password)`` for the registry ``host`` (``host[:port]``) from Docker's ``config.json``, or None.

    The file is ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; its ``auths`` keys may be a bare host
    or a URL (``https://index.docker.io/v1/`` for Docker Hub). A missing or unreadable file gives None; a damaged
    entry raises :class:`RegistryError`.
    """
    path = os.path.join(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker"), "config.json")
    try:
        with open(path) as f:
            auths = json.load(f).get("auths", {})
    except (OSError, ValueError, AttributeError):
        return None
    wanted = {host, "index.docker.io", "registry-1.docker.io"} if host == "docker.io" else {host}
    for key, entry in auths.items():
        if key.removeprefix("https://").removeprefix("http://").split("/")[0] in wanted and entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError as exc:
                raise RegistryError(f"{path}: the auth of {key} is not base64 of user:password") from exc
            if sep:
                return user, password
    return None


def insecure_by_default(host: str) -> bool:
    """Whether Docker takes ``host[:port]`` as an insecure registry without being told: 127.0.0.0/8, ``localhost``."""
    name = host[1 : host.find("]")] if host.startswith("[") else host.split(":", maxsplit=1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate: Bearer realm="...",service="..."`` -> ``("bearer", {"realm": ..., ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def _reason(exc: Exception) -> str:
    """The system's words for a failed connection (``Connection refused``), else the exception's own."""
    found = _ERRNO.search(str(exc))
    return found.group(1).strip().lower() if found else (str(exc) or type(exc).__name__)


class Registry:
    """One repository on one registry, for one command: ``host`` (``host[:port]``), ``repository`` (its path there).

    ``actions`` is the token scope asked for (``pull`` or ``pull,push``); ``insecure`` allows HTTPS without
    certificate checks and plain HTTP (always allowed for 127.0.0.0/8 and ``localhost``). Nothing is sent until the
    first call; :meth:`ping` picks the scheme.
    """

    def __init__(self, host: str, repository: str, actions: str, insecure: bool = False) -> None:
        self.host, self.repository, self.actions = host, repository, actions
        self.insecure = insecure or insecure_by_default(host)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "pylayerfs"
        self.session.verify = not self.insecure
        self.base = ""
        self.credentials = credentials(host)
        if self.insecure:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def ping(self) -> None:
        """``GET /v2/`` over HTTPS, then plain HTTP when insecure; authenticates when it answers 401.

        Raises :class:`RegistryError` when no endpoint answers as a v2 registry (refused, TLS error, not 200/401).
        """
        host = "registry-1.docker.io" if self.host == "docker.io" else self.host
        schemes = ("https", "http") if self.insecure else ("https",)
        error: Exception | None = None
        for scheme in schemes:
            url = f"{scheme}://{host}/v2/"
            try:
                response = self.session.get(url, timeout=TIMEOUT)
            except requests.RequestException as exc:
                error = RegistryError(f'GET "{url}": {_reason(exc)}')
                continue
            if response.status_code in (200, 401):
                self.base = f"{scheme}://{host}"
                if response.status_code == 401:
                    self._authenticate(response)
                return
            error = RegistryError(f'GET "{url}": HTTP {response.status_code} {response.reason}, not a v2 registry')
        assert error is not None
        raise error

    def _authenticate(self, response: requests.Response) -> None:
        """Answer a 401's challenge: basic credentials, or a bearer token for this repository's scope."""
        scheme, params = _challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None:
                raise RegistryError(f"unauthorized: {self.host} asks for a login (no credentials for it in "
                                    "~/.docker/config.json)")  # fmt: skip
            self.session.auth = self.credentials
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"unauthorized: {self.host} asks for an unknown authentication ({scheme or 'none'})")
        query = {"scope": f"repository:{self.repository}:{self.actions}"}
        if "service" in params:
            query["service"] = params["service"]
        try:
            answer = requests.get(params["realm"], params=query, auth=self.credentials, timeout=TIMEOUT,
                                  verify=self.session.verify, stream=True)  # fmt: skip
        except requests.RequestException as exc:
            raise RegistryError(f'GET "{params["realm"]}": {_reason(exc)}') from exc
        if answer.status_code != 200:
            answer.close()
            raise RegistryError(f"unauthorized: the token service {params['realm']} answers HTTP "
                                f"{answer.status_code} {answer.reason}")  # fmt: skip
        body = _read_limited(answer, MANIFEST_LIMIT, f"the token from {params['realm']}")
        try:
            data = json.loads(body)
            token = data.get("token") or data["access_token"]
        except (ValueError, KeyError, AttributeError) as exc:
            raise RegistryError(f"the token service {params['realm']} sent no token") from exc
        self.session.auth = None
        self.session.headers["Authorization"] = f"Bearer {token}"

    def url(self, path: str) -> str:
        """The URL of ``path`` under ``/v2/<repository>/`` (``manifests/latest``), or a Location as sent (absolute or
        relative to the registry)."""
        if path.startswith(("http://", "https://", "/")):
            return urljoin(self.base + "/", path)
        return f"{self.base}/v2/{self.repository}/{path}"

    def request(
        self, method: str, path: str, what: str, ok: tuple[int, ...] = (200,), **kwargs: Any
    ) -> requests.Response:
        """Send one request (pinging first); a 401 is answered once (not with a streamed body); a status outside ``ok``
        raises :class:`RegistryError` naming ``what`` and the registry's errors, as does a failed connection."""
        if not self.base:
            self.ping()
        url = self.url(path)
        for attempt in (1, 2):
            try:
                response = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
            except requests.RequestException as exc:
                raise RegistryError(f'{what}: {method} "{url}": {_reason(exc)}') from exc
            if response.status_code == 401 and attempt == 1 and not isinstance(kwargs.get("data"), Iterator):
                response.close()
                self._authenticate(response)
                continue
            break
        if response.status_code not in ok:
            raise RegistryError(f"{what}: {_errors(response)}")
        return response

    # -- reading ---------------------------------------------------------------------------

    def manifest(self, reference: str) -> tuple[str, bytes, str]:
        """GET ``manifests/<reference>`` (a tag or digest): ``(media type, bytes, digest)``, the digest computed.

        Raises :class:`RegistryError` (404: not found, a digest that differs from the one asked for or from the
        registry's ``Docker-Content-Digest``, more than 4 MiB).
        """
        accept = ", ".join((*media.MANIFESTS, *media.INDEXES))
        what = f"manifest for {self.host}/{self.repository}{'@' if ':' in reference else ':'}{reference}"
        response = self.request("GET", f"manifests/{reference}", what, (200, 404), headers={"Accept": accept},
                                stream=True)  # fmt: skip
        if response.status_code == 404:
            detail = _errors(response)
            raise RegistryError(f"{what} not found: {detail.partition(': ')[2] or detail}")
        body = _read_limited(response, MANIFEST_LIMIT, f"manifest {reference}")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        sent = response.headers.get("Docker-Content-Digest")
        if (reference.startswith("sha256:") and digest != reference) or (sent and sent != digest):
            raise RegistryError(f"manifest {reference}: its bytes hash to {digest}, not {sent or reference}")
        kind = response.headers.get("Content-Type", "").split(";")[0].strip()
        if kind not in (*media.MANIFESTS, *media.INDEXES):
            with contextlib.suppress(ValueError, AttributeError):
                kind = json.loads(body).get("mediaType") or kind
        return kind, body, digest

    def blob_bytes(self, digest: str, limit: int = MANIFEST_LIMIT) -> bytes:
        """A small blob (a config) whole, checked against ``digest``; raises :class:`RegistryError`."""
        response = self.request("GET", f"blobs/{digest}", f"blob {digest}", stream=True)
        body = _read_limited(response, limit, f"blob {digest}")
        got = "sha256:" + hashlib.sha256(body).hexdigest()
        if got != digest:
            raise RegistryError(f"blob {digest}: its bytes hash to {got}")
        return body

    @contextlib.contextmanager
    def blob_stream(self, digest: str) -> Iterator[BinaryIO]:
        """A reader of the blob's bytes as they travel (never decoded by HTTP), for the caller to hash."""
        response = self.request("GET", f"blobs/{digest}", f"blob {digest}", stream=True)
        try:
            yield io.BufferedReader(_Body(response, f"blob {digest}"), CHUNK)
        finally:
            response.close()

    def blob_size(self, digest: str) -> int | None:
        """HEAD ``blobs/<digest>``: its size in bytes when the repository has it, None when it does not (404)."""
        response = self.request("HEAD", f"blobs/{digest}", f"blob {digest}", ok=(200, 404))
        return int(response.headers.get("Content-Length", "0")) if response.status_code == 200 else None

    # -- writing ---------------------------------------------------------------------------

    def start_upload(self, mount: str | None = None, source: str | None = None) -> str | None:
        """POST ``blobs/uploads/``: the upload's Location; with ``mount`` (a digest) from ``source`` (a repository
        of this registry), None when the registry mounted the blob instead (201). Raises :class:`RegistryError`."""
        params = {"mount": mount, "from": source} if mount else None
        response = self.request("POST", "blobs/uploads/", "blob upload", ok=(201, 202), params=params)
        if response.status_code == 201:
            return None
        return response.headers["Location"]

    def upload(self, chunks: Iterable[bytes], location: str | None = None) -> tuple[str, int]:
        """Stream ``chunks`` as one blob: one chunked PATCH, then PUT ``?digest=`` with the digest computed on the way.

        ``location`` is an upload already started (:meth:`start_upload`). Returns ``(digest, size in bytes)``;
        raises :class:`RegistryError`.
        """
        location = location or self.start_upload()
        assert location is not None
        counted = _Counted(chunks)
        response = self.request("PATCH", location, "blob upload", ok=(202,), data=iter(counted),
                                headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        digest = "sha256:" + counted.hash.hexdigest()
        self.request("PUT", response.headers["Location"], f"blob {digest}", ok=(201,), params={"digest": digest})
        return digest, counted.size

    def put_manifest(self, tag: str, kind: str, body: bytes) -> None:
        """PUT ``manifests/<tag>`` with ``body`` of media type ``kind``; raises :class:`RegistryError`."""
        self.request("PUT", f"manifests/{tag}", f"manifest {tag}", ok=(201,), data=body,
                     headers={"Content-Type": kind})  # fmt: skip


def _errors(response: requests.Response) -> str:
    """A registry's answer in one line: the status, and the ``errors`` of its JSON body (distribution-spec)."""
    text = f"HTTP {response.status_code} {response.reason}"
    with contextlib.suppress(ValueError, AttributeError, TypeError, requests.RequestException):
        found = [f"{e.get('code', '').lower().replace('_', ' ')}: {e.get('message', '')}"
                 for e in response.json().get("errors", [])]  # fmt: skip
        if found:
            text += ": " + "; ".join(found)
    if response.status_code == 401:
        text = "unauthorized: " + text
    return text


def _cut(response: requests.Response) -> None:
    """Shut the response's socket down: a read blocked on it in another thread returns at once (close does not)."""
    sock: Any = response.raw  # urllib3's response -> http.client's -> its buffered reader -> SocketIO -> socket
    for attribute in ("_fp", "fp", "raw", "_sock"):
        sock = getattr(sock, attribute, None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    response.close()


def _read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    """A small document's body (a manifest, a config, a token): at most ``limit`` bytes, whole within
    :data:`DOCUMENT_DEADLINE` (a registry trickling a byte now and then never trips the timeout between two reads).
    Raises :class:`RegistryError`."""
    late = threading.Event()

    def cut() -> None:
        late.set()
        _cut(response)

    timer = threading.Timer(DOCUMENT_DEADLINE, cut)
    timer.start()
    try:
        with contextlib.closing(response):
            body = _Body(response, what).read(limit + 1)
    except RegistryError:
        if not late.is_set():
            raise
    finally:
        timer.cancel()
    if late.is_set():
        raise RegistryError(f"{what}: not received in {DOCUMENT_DEADLINE:.0f} s")
    if len(body) > limit:
        raise RegistryError(f"{what}: larger than {limit} bytes")
    return body


class _Body(io.RawIOBase):
    """A response's body as it travels (no content decoding); transport errors become :class:`RegistryError`."""

    def __init__(self, response: requests.Response, what: str) -> None:
        self.response, self.what = response, what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self.response.raw.read(len(buffer), decode_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RegistryError(f"{self.what}: {_reason(exc)}") from exc
        buffer[: len(data)] = data
        return len(data)


class _Counted:
    """An iterable of chunks that hashes (sha256) and counts what goes through it."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks, self.hash, self.size = chunks, hashlib.sha256(), 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            self.hash.update(chunk)
            self.size += len(chunk)
            yield chunk


def gzip_stream(write: Callable[[BinaryIO], None]) -> Iterator[bytes]:
    """The bytes that ``write(out)`` writes, gzip-compressed (mtime 0), in chunks of up to 1 MiB, as they are made:
    ``write`` runs in a thread writing into a pipe, as moby's ``compressStream``. Re-raises what ``write`` raised.

    The compressor is ISA-L's igzip at level 1 (``isal``): about ten times zlib's level 6 (Go's default, Docker's)
    for a few percent more bytes; a push is then as fast as ``skopeo copy`` (docs/images.md).
    """
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as pipe:
                gz = igzip.IGzipFile(fileobj=pipe, mode="wb", compresslevel=GZIP_LEVEL, mtime=0)  # type: ignore[no-untyped-call]
                with gz:
                    write(gz)  # type: ignore[arg-type]
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=produce, name="gzip", daemon=True)
    thread.start()
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(CHUNK):
            yield chunk
    thread.join()
    if failure:
        raise failure[0]


# -- moby's distribution metadata -------------------------------------------------------------


class DistributionMetadata:
    """moby's ``V2MetadataService`` on the store: which blob digests (in which repositories) a DiffID has.

    ``v2metadata-by-diffid/sha256/<diff-id>`` holds the JSON list ``[{"Digest", "SourceRepository", "HMAC"}]``
    (the newest last, 50 at most), ``diffid-by-digest/sha256/<digest>`` the DiffID; ``HMAC`` is always empty here.
    """

    def __init__(self, store: Store) -> None:
        self.layout = store.layout

    def get(self, diff_id: str) -> list[dict[str, str]]:
        """The entries recorded for ``diff_id``, oldest first (``[]`` when none or unreadable)."""
        try:
            with open(self.layout.v2metadata(diff_id)) as f:
                entries = json.load(f)
        except (OSError, ValueError):
            return []
        return [e for e in entries if isinstance(e, dict) and "Digest" in e] if isinstance(entries, list) else []

    def add(self, diff_id: str, digest: str, repository: str) -> None:
        """Record that blob ``digest`` in ``repository`` (fully qualified) is the layer ``diff_id``; raises OSError."""
        entry = {"Digest": digest, "SourceRepository": repository, "HMAC": ""}
        entries = [e for e in self.get(diff_id) if e != entry] + [entry]
        for path, value in ((self.layout.v2metadata(diff_id), json.dumps(entries[-MAX_METADATA:],
                                                                           separators=(",", ":"))),
                            (self.layout.diff_id_by_digest(digest), diff_id)):  # fmt: skip
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
            write_value(path, value)


# -- pull ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]`` as ``--platform`` takes it; the host's is ``linux/amd64`` on x86-64."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> Platform:
        """``linux/arm64/v8`` -> a Platform; None -> the host's. Raises :class:`StoreError` for a malformed one."""
        if text is None:
            machine = host_platform.machine().lower()
            return cls("linux", {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine))
        parts = text.lower().split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise StoreError(f"invalid platform '{text}' (os/arch[/variant] expected, as linux/amd64)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, entry: dict[str, Any]) -> bool:
        """Whether an index entry's ``platform`` is this one (a variant only when asked for)."""
        p = entry.get("platform") or {}
        return (p.get("os"), p.get("architecture")) == (self.os, self.architecture) and (
            self.variant is None or p.get("variant") == self.variant
        )

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.architecture, self.variant)))


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{what} is not a JSON object")
    return data


def _descriptor(data: Any, what: str) -> dict[str, Any]:
    """A descriptor with a ``sha256:<hex>`` digest and an integer size; raises :class:`RegistryError`."""
    if not isinstance(data, dict) or not is_digest(str(data.get("digest"))) or not (isinstance(data.get("size"), int)):
        raise RegistryError(f"{what}: a descriptor without a sha256 digest and a size")
    return data


def _image_manifest(registry: Registry, ref: Reference, wanted: Platform, out: Output) -> tuple[str, dict[str, Any]]:
    """GET the manifest ``ref`` names, through an index to ``wanted``'s: ``(the digest fetched first, the manifest)``.

    Prints ``docker pull``'s first line. Raises :class:`RegistryError` for an unknown media type, no matching
    platform, a bad descriptor.
    """
    reference = ref.digest or ref.tag
    assert reference is not None
    kind, body, digest = registry.manifest(reference)
    out(f"{reference}: Pulling from {ref.repository}")
    if kind in media.INDEXES:
        entries = _json(body, f"index {reference}").get("manifests") or []
        chosen = next((e for e in entries if isinstance(e, dict) and wanted.matches(e)), None)
        if chosen is None:
            raise RegistryError(f"no matching manifest for {wanted} in the manifest list entries")
        kind, body, _ = registry.manifest(_descriptor(chosen, "index entry")["digest"])
    if kind not in media.MANIFESTS:
        raise RegistryError(f"manifest {reference}: unsupported media type {kind or '(none)'}")
    manifest = _json(body, f"manifest {reference}")
    _descriptor(manifest.get("config"), "the manifest's config")
    for d in manifest.get("layers") or []:
        if _descriptor(d, "a manifest layer").get("mediaType") not in media.LAYERS:
            raise RegistryError(f"layer {d['digest']}: unsupported media type {d.get('mediaType')}")
    return digest, manifest


def pull(store: Store, text: str, platform: str | None = None, insecure: bool = False,
         out: Output = print) -> Image:  # fmt: skip
    """``docker pull NAME[:TAG|@DIGEST]``: the image stored, tagged, its manifest digest recorded; returns it.

    Prints ``docker pull``'s lines through ``out``. Raises :class:`StoreError` for a bad reference or platform,
    :class:`RegistryError` for what the registry does or sends wrong (unknown media type, digest mismatch...), and
    what :func:`~pylayerfs.image.transfer.ingest.store_image` raises; the store is then as it was.
    """
    ref = parse(text)
    wanted = Platform.parse(platform)
    registry = Registry(ref.registry, ref.repository, "pull", insecure)
    try:
        digest, manifest = _image_manifest(registry, ref, wanted, out)
        config = registry.blob_bytes(manifest["config"]["digest"])
        layers = manifest.get("layers") or []
        diff_ids = diff_ids_of(config)
        if len(diff_ids) != len(layers):
            raise RegistryError(f"the image config names {len(diff_ids)} layers, the manifest {len(layers)}")
        blob_of = dict(zip(diff_ids, (d["digest"] for d in layers), strict=True))
        parent = None
        for diff_id in diff_ids:
            parent = chain_id(parent, diff_id)
            out(f"{short(blob_of[diff_id])}: {'Already exists' if store.layers.exists(parent) else 'Pulling fs layer'}")

        def progress(diff_id: str, event: str) -> None:
            if event == "stored":
                out(f"{short(blob_of[diff_id])}: Download complete")
                out(f"{short(blob_of[diff_id])}: Pull complete")

        named = f"{ref.name}:{ref.tag}" if ref.digest is None else f"{ref.name}@{ref.digest}"
        before = store.refs.lookup(named)
        blobs = [Blob(_opener(registry, d["digest"]), f"blob {d['digest']}", d["digest"], d["size"]) for d in layers]
        image = store_image(store, config, blobs, [named] if ref.digest is None else [], [f"{ref.name}@{digest}"],
                            progress)  # fmt: skip
        metadata = DistributionMetadata(store)
        with store.locked():
            for diff_id in diff_ids:
                metadata.add(diff_id, blob_of[diff_id], full_name(ref))
        out(f"Digest: {digest}")
        news = "Downloaded newer image" if before != image.id else "Image is up to date"
        out(f"Status: {news} for {named}")
        out(full_name(ref) + named.removeprefix(ref.name))
        return image
    finally:
        registry.close()


def _opener(registry: Registry, digest: str) -> Callable[[], contextlib.AbstractContextManager[BinaryIO]]:
    return lambda: registry.blob_stream(digest)


# -- push ------------------------------------------------------------------------------------


def push(store: Store, text: str, insecure: bool = False, out: Output = print) -> str:
    """``docker push NAME[:TAG]`` (Docker 20.10: the tag ``latest`` when none): layers, config, a v2 schema 2
    manifest; records the manifest digest (RepoDigests) and each layer's blob digest. Returns the manifest digest.

    Prints ``docker push``'s lines through ``out``. Raises :class:`StoreError` for a bad reference or an image that
    is not here, :class:`RegistryError` for what the registry refuses, the OSError of reading a layer.
    """
    ref = parse(text)
    if ref.digest is not None:
        raise StoreError(f"cannot push a digest reference: {text} (push a tag)")
    tag_ref = f"{ref.name}:{ref.tag}"
    if store.refs.lookup(tag_ref) is None:
        raise StoreError(f"An image does not exist locally with the tag: {ref.name}")
    image = store.resolve(tag_ref)
    name = full_name(ref)
    registry = Registry(ref.registry, ref.repository, "pull,push", insecure)
    metadata = DistributionMetadata(store)
    try:
        out(f"The push refers to repository [{name}]")
        layers = store.layers_of(image)  # top first, as docker push lists them
        for layer in layers:
            out(f"{short(layer.diff_id)}: Preparing")
        pushed: dict[str, tuple[str, int]] = {}
        for layer in layers:
            digest, size, how = _push_layer(store, registry, metadata, layer, ref)
            out(f"{short(layer.diff_id)}: {how}")
            pushed[layer.diff_id] = (digest, size)
            with store.locked():
                metadata.add(layer.diff_id, digest, name)
        config_digest = "sha256:" + hex_of(image.id)
        if registry.blob_size(config_digest) is None:
            registry.upload([image.raw])
        manifest = {
            "schemaVersion": 2,
            "mediaType": media.DOCKER_MANIFEST,
            "config": {"mediaType": media.DOCKER_CONFIG, "size": len(image.raw), "digest": config_digest},
            "layers": [{"mediaType": media.DOCKER_LAYER, "size": pushed[d][1], "digest": pushed[d][0]}
                       for d in image.diff_ids],
        }  # fmt: skip
        body = json.dumps(manifest, indent=3).encode()  # distribution's schema2 MarshalIndent(m, "", "   ")
        assert ref.tag is not None
        registry.put_manifest(ref.tag, media.DOCKER_MANIFEST, body)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        with store.locked():
            store.refs.add_digest(ref.name, digest, image.id)
        out(f"{ref.tag}: digest: {digest} size: {len(body)}")
        return digest
    finally:
        registry.close()


def _push_layer(store: Store, registry: Registry, metadata: DistributionMetadata, layer: Layer,
                ref: Reference) -> tuple[str, int, str]:  # fmt: skip
    """One layer of a push (moby's ``pushDescriptor.Upload``): ``(blob digest, size, what docker push says)``.

    A blob recorded for the DiffID is looked for in the repository (HEAD: "Layer already exists"), then mounted from
    the repository it was recorded in on the same registry ("Mounted from"); else the layer's tar is sent gzipped.
    """
    known = [e for e in reversed(metadata.get(layer.diff_id))
             if e.get("SourceRepository", "").startswith(ref.registry + "/")]  # fmt: skip
    for entry in known:
        size = registry.blob_size(entry["Digest"])
        if size is not None:
            return entry["Digest"], size, "Layer already exists"
    location = None
    for entry in known:
        source = entry["SourceRepository"].removeprefix(ref.registry + "/")
        if source == registry.repository:
            continue
        try:
            location = registry.start_upload(entry["Digest"], source)
        except RegistryError:  # no right to read the source (a token scoped to this repository): upload
            break
        if location is None:
            size = registry.blob_size(entry["Digest"])
            if size is not None:
                return entry["Digest"], size, f"Mounted from {source}"
        break  # a refused mount starts an upload: use it
    digest, size = registry.upload(gzip_stream(lambda out: store.layers.write_tar(layer, out)), location)
    return digest, size, "Pushed"
