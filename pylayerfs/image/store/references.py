"""Names, tags and digests: the reference grammar of distribution/reference, and ``repositories.json`` as moby keeps it.

A reference is ``[domain/]path[:tag][@digest]`` (distribution's ``reference/regexp.go``). The first component is a
domain when it holds a ``.`` or a ``:`` or is ``localhost`` (``normalize.go`` ``splitDockerDomain``); without one the
image lives on Docker Hub (``docker.io``, ``library/`` for a one-component path), and the store names it as Docker
does, by its familiar name (``busybox``, ``me/app``, ``127.0.0.1:5000/app``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pylayerfs.image.store.layout import Layout, StoreError, write_value

DEFAULT_TAG = "latest"
DEFAULT_DOMAIN = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])"
    r"(?::[0-9]+)?$"
)
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_digest(text: str) -> bool:
    """Is ``text`` a digest as the store and the image spec write one, ``sha256:`` and 64 lowercase hex digits?"""
    return _DIGEST.match(text) is not None


@dataclass(frozen=True)
class Reference:
    """A parsed reference: ``domain`` (None for Docker Hub's familiar names), ``path``, ``tag``, ``digest``.

    ``tag`` is None only when a digest is given without one (``name@sha256:<hex>``).
    """

    domain: str | None
    path: str
    tag: str | None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The repository's familiar name: ``busybox``, ``me/app``, ``127.0.0.1:5000/app``."""
        return f"{self.domain}/{self.path}" if self.domain else self.path

    @property
    def registry(self) -> str:
        """The registry's host[:port]: the domain, ``docker.io`` for a familiar name."""
        return self.domain or DEFAULT_DOMAIN

    @property
    def repository(self) -> str:
        """The repository's path on its registry: ``library/busybox`` for Docker Hub's one-component names."""
        return f"library/{self.path}" if self.domain is None and "/" not in self.path else self.path

    def __str__(self) -> str:
        """``name:tag``, ``name@digest`` or ``name:tag@digest``."""
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse(text: str) -> Reference:
    """``[domain/]path[:tag][@sha256:<hex>]`` -> a :class:`Reference`, the tag ``latest`` when neither tag nor digest.

    ``docker.io/`` and ``docker.io/library/`` are dropped from Hub names (their familiar form). Raises
    :class:`StoreError` with Docker's ``invalid reference format`` for a reference Docker would refuse.
    """
    rest, _, digest = text.partition("@")
    if digest and not is_digest(digest):
        raise StoreError(f"invalid reference format: '{text}' (a digest is sha256: and 64 lowercase hex digits)")
    name, tag = rest, None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise StoreError(f"invalid reference format: '{text}' (a tag is up to 128 letters, digits, _ . -)")
    first, _, remainder = name.partition("/")
    domain = None
    if remainder and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, name = first, remainder
        if not _DOMAIN.match(domain):
            raise StoreError(f"invalid reference format: '{text}' ('{domain}' is not a registry host[:port])")
    if domain in (DEFAULT_DOMAIN, "index.docker.io"):
        domain = None
        name = name.removeprefix("library/") if name.count("/") == 1 else name
    if len(f"{domain}/{name}" if domain else name) > 255:  # distribution's NameTotalLengthMax
        raise StoreError(f"invalid reference format: the repository name '{text[:40]}...' is longer than 255 "
                         "characters")  # fmt: skip
    if not _PATH.match(name):
        raise StoreError(f"invalid reference format: '{text}' (repository names are lowercase letters, digits, "
                         "and separators . _ - /)")  # fmt: skip
    return Reference(domain, name, tag or (None if digest else DEFAULT_TAG), digest or None)


def parse_reference(text: str) -> tuple[str, str]:
    """``name[:tag]`` -> ``(name, tag)``, the tag ``latest`` when absent (names as :func:`parse` reads them).

    Raises :class:`StoreError` for a reference Docker would refuse, or one with a digest (a tag is asked for).
    """
    ref = parse(text)
    if ref.digest is not None:
        raise StoreError(f"invalid reference format: '{text}' (a tag is asked for here, not a digest)")
    assert ref.tag is not None
    return ref.name, ref.tag


class References:
    """Names in ``repositories.json`` (moby's ``reference/store.go``): ``name:tag`` and ``name@digest`` -> image ID.

    A tag is given by ``tag``; a digest (the manifest's, ``RepoDigests``) is recorded by a pull or push. Writers hold
    the store lock; each change rewrites the file atomically.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def _load(self) -> dict[str, dict[str, str]]:
        try:
            with open(self.layout.repositories) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.layout.repositories} is damaged: {exc}") from exc
        repositories = data.get("Repositories", {})
        assert isinstance(repositories, dict)
        return repositories

    def _save(self, repositories: dict[str, dict[str, str]]) -> None:
        data = {"Repositories": {name: refs for name, refs in sorted(repositories.items()) if refs}}
        write_value(self.layout.repositories, json.dumps(data, separators=(",", ":")), 0o600)

    def _every(self) -> dict[str, str]:
        return {ref: image for refs in self._load().values() for ref, image in refs.items()}

    def all(self) -> dict[str, str]:
        """``name:tag -> image id`` for every tag (no digests); raises :class:`StoreError` when the file is damaged."""
        return {ref: image for ref, image in self._every().items() if "@" not in ref}

    def lookup(self, ref: str) -> str | None:
        """The image ID ``ref`` (``name[:tag]`` or ``name@digest``) names, None when it names none here.

        Raises :class:`StoreError` for a reference Docker would refuse, or a damaged file.
        """
        parsed = parse(ref)
        key = f"{parsed.name}@{parsed.digest}" if parsed.digest else f"{parsed.name}:{parsed.tag}"
        return self._load().get(parsed.name, {}).get(key)

    def tags_of(self, image_id: str) -> list[str]:
        """The ``name:tag`` references of ``image_id``, sorted; raises :class:`StoreError` for a damaged file."""
        return sorted(ref for ref, image in self.all().items() if image == image_id)

    def digests_of(self, image_id: str) -> list[str]:
        """The ``name@sha256:<hex>`` references of ``image_id`` (``RepoDigests``), sorted; raises as :meth:`tags_of`."""
        return sorted(ref for ref, image in self._every().items() if image == image_id and "@" in ref)

    def tag(self, ref: str, image_id: str) -> str:
        """Point ``ref`` (``name[:tag]``) at ``image_id``, replacing its previous image; return the full ``name:tag``.

        Raises :class:`StoreError` for a reference Docker would refuse or a damaged file, OSError when it cannot be
        written.
        """
        name, tag = parse_reference(ref)
        return self._set(name, f"{name}:{tag}", image_id)

    def add_digest(self, name: str, digest: str, image_id: str) -> str:
        """Record that ``name@digest`` (a manifest's digest, ``sha256:<hex>``) is ``image_id``; the full reference.

        Raises as :meth:`tag`.
        """
        ref = parse(f"{name}@{digest}")
        return self._set(ref.name, f"{ref.name}@{digest}", image_id)

    def _set(self, name: str, key: str, image_id: str) -> str:
        repositories = self._load()
        repositories.setdefault(name, {})[key] = image_id
        self._save(repositories)
        return key

    def untag(self, ref: str) -> str:
        """Remove the tag or digest reference ``ref``; return the full reference removed.

        Raises :class:`StoreError` when ``ref`` is not a reference here (or not a valid one, or the file is damaged).
        """
        parsed = parse(ref)
        key = f"{parsed.name}@{parsed.digest}" if parsed.digest else f"{parsed.name}:{parsed.tag}"
        repositories = self._load()
        if key not in repositories.get(parsed.name, {}):
            raise StoreError(f"no such image: {ref}")
        del repositories[parsed.name][key]
        self._save(repositories)
        return key
