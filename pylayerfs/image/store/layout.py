"""Where everything lives in the store: moby's overlay2 layout, path arithmetic and nothing else.

<root>/
  overlay2/
    l/<LINKID> -> ../<cache-id>/diff       short names for mount options
    <cache-id>/                            one layer (or a container's read-write layer)
      diff/                                its contents: the upper directory while it is built
      link                                 its LINKID (26 characters of base32, no newline)
      lower                                l/<LINKID>:... of the layers below, top first
      work/                                the workdir of a mount that writes into diff/
      committed                            written into a layer when a child is made of it
      metacopy                             written into a layer that holds metacopy files
  image/overlay2/
    imagedb/content/sha256/<image-id>      the image config JSON; its sha256 is the image ID
    imagedb/metadata/sha256/<image-id>/    parent, lastUpdated, builtLocally
    layerdb/sha256/<chain-id>/             diff, size, cache-id, parent (one value each, no newline)
    layerdb/mounts/<container-id>/         mount-id, init-id, parent (containers)
    repositories.json                      {"Repositories":{name:{name:tag: image id}}}
    distribution/v2metadata-by-diffid/sha256/<diff-id>  [{"Digest","SourceRepository","HMAC"}]: its blobs on registries
    distribution/diffid-by-digest/sha256/<blob-digest>  the DiffID of a blob pulled or pushed (moby's v2 metadata)
  vfs/dir/<cache-id>                       the vfs driver: a layer's whole tree (or a container's, <id>-init too)
  tmp/                                     staging: an entry appears in place by rename(2)
  lock                                     flock(2) held by every writer
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

LINK_DIR = "l"
DIFF_DIR = "diff"
WORK_DIR = "work"
LINK_FILE = "link"
LOWER_FILE = "lower"
COMMITTED_FILE = "committed"
METACOPY_FILE = "metacopy"
SHA256 = "sha256"


class StoreError(Exception):
    """A request the store cannot satisfy; the message is one line for the user."""


class Layout:
    """The store's paths under ``root`` (made absolute), as moby's overlay2 driver and layer store lay them out.

    Attributes name the directories of the module docstring: ``overlay2``, ``links`` (``overlay2/l``), ``image``
    (``image/overlay2``), ``content`` and ``metadata`` (imagedb), ``layerdb``, ``mounts``, ``repositories``,
    ``distribution``, ``tmp``, ``vfs``. Building one touches nothing on disk.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.overlay2 = os.path.join(self.root, "overlay2")
        self.links = os.path.join(self.overlay2, LINK_DIR)
        self.image = os.path.join(self.root, "image", "overlay2")
        self.content = os.path.join(self.image, "imagedb", "content", SHA256)
        self.metadata = os.path.join(self.image, "imagedb", "metadata", SHA256)
        self.layerdb = os.path.join(self.image, "layerdb", SHA256)
        self.mounts = os.path.join(self.image, "layerdb", "mounts")
        self.repositories = os.path.join(self.image, "repositories.json")
        self.distribution = os.path.join(self.image, "distribution")
        self.tmp = os.path.join(self.root, "tmp")
        self.vfs = os.path.join(self.root, "vfs", "dir")

    def create(self) -> None:
        """Create the store's directories (idempotent): root 0711, ``overlay2`` 0710, the others 0700.

        Raises the OSError of ``os.makedirs`` (EACCES, EROFS, ENOSPC, ENOTDIR...) when one cannot be made.
        """
        os.makedirs(self.root, 0o711, exist_ok=True)
        for d in (self.links, self.content, self.metadata, self.layerdb, self.mounts, self.tmp):
            os.makedirs(d, 0o700, exist_ok=True)
        os.chmod(self.overlay2, 0o710)

    def layer(self, cache_id: str, *parts: str) -> str:
        """The path of ``overlay2/<cache_id>`` (joined with ``parts``: ``diff``, ``link``, ``lower``...)."""
        return os.path.join(self.overlay2, cache_id, *parts)

    def vfs_dir(self, name: str = "") -> str:
        """The vfs driver's tree of ``name`` (``vfs/dir/<name>``), or ``vfs/dir`` itself without a name."""
        return os.path.join(self.vfs, name) if name else self.vfs

    def chain(self, chain_id: str, *parts: str) -> str:
        """The layerdb directory of a layer, ``layerdb/sha256/<hex>`` by its ChainID (``sha256:<hex>`` or ``<hex>``)."""
        return os.path.join(self.layerdb, hex_of(chain_id), *parts)

    def config(self, image_id: str) -> str:
        """The path of an image's config JSON: ``imagedb/content/sha256/<hex>`` for ``image_id`` ``[sha256:]<hex>``."""
        return os.path.join(self.content, hex_of(image_id))

    def v2metadata(self, diff_id: str) -> str:
        """``distribution/v2metadata-by-diffid/sha256/<hex>``: the registry blobs known for a layer's DiffID (JSON)."""
        return os.path.join(self.distribution, "v2metadata-by-diffid", SHA256, hex_of(diff_id))

    def diff_id_by_digest(self, digest: str) -> str:
        """``distribution/diffid-by-digest/sha256/<hex>``: the DiffID of the blob ``digest`` (``sha256:<hex>``)."""
        return os.path.join(self.distribution, "diffid-by-digest", SHA256, hex_of(digest))

    def image_metadata(self, image_id: str, *parts: str) -> str:
        """An image's metadata directory ``imagedb/metadata/sha256/<hex>`` (joined with ``parts``: ``parent``...)."""
        return os.path.join(self.metadata, hex_of(image_id), *parts)

    @contextlib.contextmanager
    def flock(self, name: str, operation: int) -> Iterator[None]:
        """Hold ``flock(2)`` on the root's file ``name`` (a crashed holder's lock goes with its process).

        ``operation`` is ``fcntl.LOCK_SH`` or ``LOCK_EX``, with ``LOCK_NB``: then BlockingIOError (EWOULDBLOCK) when
        another process holds it. Creates the store first; raises what :meth:`create` raises and EACCES opening the
        file.
        """
        self.create()
        fd = os.open(os.path.join(self.root, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise writers of the store: an exclusive ``flock`` on ``<root>/lock``, waited for."""
        return self.flock("lock", fcntl.LOCK_EX)


def hex_of(digest: str) -> str:
    """The hex digits of a digest: ``sha256:<hex>`` -> ``<hex>`` (a bare hex string is returned as it is)."""
    return digest.removeprefix(SHA256 + ":")


def read_value(path: str) -> str:
    """The whole text of a one-value file (layerdb and imagedb files have no newline); raises ENOENT when absent."""
    with open(path) as f:
        return f.read()


def write_value(path: str, value: str | bytes, mode: int = 0o644) -> None:
    """Write a small file atomically: a temporary name in the same directory, fsync, then rename over ``path``.

    ``value`` as text (UTF-8) or bytes; ``mode`` for a new file. Raises ENOENT when the directory does not exist, and
    ENOSPC/EDQUOT/EIO (a temporary ``<path>.tmp<pid>`` may then stay behind).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(value.encode() if isinstance(value, str) else value)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
