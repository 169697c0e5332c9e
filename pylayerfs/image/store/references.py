"""Names and tags: ``repositories.json``, as moby's reference store keeps it."""

from __future__ import annotations

import json
import re

from pylayerfs.image.store.layout import Layout, StoreError, write_value

DEFAULT_TAG = "latest"
_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


def parse_reference(text: str) -> tuple[str, str]:
    """``name[:tag]`` -> ``(name, tag)``, the tag ``latest`` when absent; StoreError for a name Docker would refuse."""
    name, tag = text, DEFAULT_TAG
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        name, tag = text[:colon], text[colon + 1 :]
    if not _NAME.match(name) or len(name) > 255:
        raise StoreError(f"invalid reference format: '{text}' (repository names are lowercase letters, digits, "
                         "and separators . _ - /)")  # fmt: skip
    if not _TAG.match(tag):
        raise StoreError(f"invalid reference format: '{text}' (a tag is up to 128 letters, digits, _ . -)")
    return name, tag


class References:
    """Names and tags in ``repositories.json`` (moby's ``reference/store.go``): ``name:tag`` -> image ID.

    Writers hold the store lock; each change rewrites the file atomically.
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

    def all(self) -> dict[str, str]:
        """``name:tag -> image id`` for every tag; raises :class:`StoreError` when the file is damaged."""
        return {ref: image for refs in self._load().values() for ref, image in refs.items()}

    def lookup(self, ref: str) -> str | None:
        """The image ID ``ref`` (``name[:tag]``) names, None when it is not tagged.

        Raises :class:`StoreError` for a reference Docker would refuse, or a damaged file.
        """
        name, tag = parse_reference(ref)
        return self._load().get(name, {}).get(f"{name}:{tag}")

    def tags_of(self, image_id: str) -> list[str]:
        """The ``name:tag`` references of ``image_id``, sorted; raises :class:`StoreError` for a damaged file."""
        return sorted(ref for ref, image in self.all().items() if image == image_id)

    def tag(self, ref: str, image_id: str) -> str:
        """Point ``ref`` (``name[:tag]``) at ``image_id``, replacing its previous image; return the full ``name:tag``.

        Raises :class:`StoreError` for a reference Docker would refuse or a damaged file, OSError when it cannot be
        written.
        """
        name, tag = parse_reference(ref)
        repositories = self._load()
        repositories.setdefault(name, {})[f"{name}:{tag}"] = image_id
        self._save(repositories)
        return f"{name}:{tag}"

    def untag(self, ref: str) -> str:
        """Remove the tag ``ref``; return the full ``name:tag`` removed.

        Raises :class:`StoreError` when ``ref`` is not a tag here (or not a valid reference, or the file is damaged).
        """
        name, tag = parse_reference(ref)
        repositories = self._load()
        full = f"{name}:{tag}"
        if full not in repositories.get(name, {}):
            raise StoreError(f"no such image: {ref}")
        del repositories[name][full]
        self._save(repositories)
        return full
