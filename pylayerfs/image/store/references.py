"""Names and tags: ``repositories.json``, as moby's reference store keeps it."""

from __future__ import annotations

import json
import re

from pylayerfs.image.store.layout import Layout, StoreError, write_value

DEFAULT_TAG = "latest"
_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")


def parse_reference(text: str) -> tuple[str, str]:
    """``name[:tag]`` -> (name, tag); StoreError for a name Docker would refuse."""
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
        """``name:tag -> image id``."""
        return {ref: image for refs in self._load().values() for ref, image in refs.items()}

    def lookup(self, ref: str) -> str | None:
        name, tag = parse_reference(ref)
        return self._load().get(name, {}).get(f"{name}:{tag}")

    def tags_of(self, image_id: str) -> list[str]:
        return sorted(ref for ref, image in self.all().items() if image == image_id)

    def tag(self, ref: str, image_id: str) -> str:
        name, tag = parse_reference(ref)
        repositories = self._load()
        repositories.setdefault(name, {})[f"{name}:{tag}"] = image_id
        self._save(repositories)
        return f"{name}:{tag}"

    def untag(self, ref: str) -> str:
        name, tag = parse_reference(ref)
        repositories = self._load()
        full = f"{name}:{tag}"
        if full not in repositories.get(name, {}):
            raise StoreError(f"no such image: {ref}")
        del repositories[name][full]
        self._save(repositories)
        return full
