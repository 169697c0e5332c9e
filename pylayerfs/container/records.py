"""Container records: ``containers/<id>/config.v2.json``, and ``layerdb/mounts/<id>`` for its layers.

The record keeps what ``docker ps`` and ``docker inspect`` need (a subset of
moby's ``Container``): ID, Created, Path/Args, Config, Image (ID and the name
it was run as), Name, Driver, the mount-id of its read-write layer, and State
(Running, Pid of the process, MonitorPid of the process that waits for it,
ExitCode, StartedAt, FinishedAt).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.layout import write_value

CONFIG_FILE = "config.v2.json"
_ADJECTIVES = (
    "admiring",
    "bold",
    "brave",
    "clever",
    "eager",
    "focused",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "loving",
    "modest",
    "nifty",
    "quirky",
    "serene",
    "sharp",
    "tender",
    "vibrant",
    "wizardly",
    "zen",
)
_NAMES = ("hopper", "lovelace", "turing", "ritchie", "thompson", "torvalds", "knuth", "liskov", "hamilton",
          "dijkstra", "lamport", "perlman", "goldberg", "kay", "backus", "allen", "cerf", "shannon")  # fmt: skip


@dataclass
class State:
    Status: str = "created"  # created, running, exited
    Running: bool = False
    Pid: int = 0
    MonitorPid: int = 0
    ExitCode: int = 0
    StartedAt: str = "0001-01-01T00:00:00Z"
    FinishedAt: str = "0001-01-01T00:00:00Z"


@dataclass
class Container:
    ID: str
    Created: str
    Path: str
    Args: list[str]
    Config: dict[str, Any]
    Image: str  # sha256:<image id>
    ImageName: str  # as the user named it (docker ps IMAGE column)
    Name: str  # "/name"
    MountID: str
    Driver: str = "fuse"
    State: State = field(default_factory=State)

    @property
    def short_id(self) -> str:
        return self.ID[:12]

    @property
    def name(self) -> str:
        return self.Name.lstrip("/")

    @property
    def command(self) -> list[str]:
        return [self.Path, *self.Args]


class ContainerStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = os.path.join(store.root, "containers")
        os.makedirs(self.root, 0o710, exist_ok=True)

    def dir(self, container_id: str) -> str:
        return os.path.join(self.root, container_id)

    def log_path(self, container: Container) -> str:
        return os.path.join(self.dir(container.ID), f"{container.ID}-json.log")

    def all(self) -> list[Container]:
        out = []
        for name in sorted(os.listdir(self.root)):
            try:
                out.append(self.load(name))
            except StoreError:
                continue  # half-removed: rm finishes it
        return sorted(out, key=lambda c: c.Created, reverse=True)

    def load(self, container_id: str) -> Container:
        try:
            with open(os.path.join(self.dir(container_id), CONFIG_FILE)) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreError(f"no such container: {container_id}") from exc
        data["State"] = State(**data["State"])
        return Container(**data)

    def save(self, container: Container) -> None:
        os.makedirs(self.dir(container.ID), 0o710, exist_ok=True)
        write_value(os.path.join(self.dir(container.ID), CONFIG_FILE), json.dumps(asdict(container)), 0o600)

    def find(self, ref: str) -> Container:
        """By name, full ID or unambiguous ID prefix."""
        containers = self.all()
        for c in containers:
            if ref in (c.name, c.Name, c.ID):
                return c
        matches = [c for c in containers if ref and c.ID.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise StoreError(f"container ID prefix '{ref}' is ambiguous")
        raise StoreError(f"No such container: {ref}")

    def new_name(self) -> str:
        taken = {c.name for c in self.all()}
        while True:
            name = f"{random.choice(_ADJECTIVES)}_{random.choice(_NAMES)}"
            if name not in taken:
                return name

    def check_name(self, name: str) -> None:
        if any(c.name == name for c in self.all()):
            raise StoreError(f'Conflict. The container name "/{name}" is already in use')

    def remove(self, container: Container) -> None:
        shutil.rmtree(os.path.join(self.store.layout.mounts, container.ID), ignore_errors=True)
        shutil.rmtree(self.dir(container.ID), ignore_errors=True)
