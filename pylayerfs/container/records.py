"""Container records: ``containers/<id>/config.v2.json``, and ``layerdb/mounts/<id>`` for its layers.

The record keeps what ``docker ps`` and ``docker inspect`` need (a subset of
moby's ``Container``): ID, Created, Path/Args, Config, Image (ID and the name
it was run as), Name, Driver, the mount-id of its read-write layer,
HostConfig.AutoRemove (``--rm``), and State (Running, Pid of the process,
MonitorPid of the process that waits for it, ExitCode, StartedAt, FinishedAt).

In Python the record is :class:`Container` and :class:`State`, with snake_case
attributes and enums; Docker's CamelCase names live only in :func:`to_json` and
:func:`from_json`, which write and read the file with moby's field names, in the
order pylayerfs has always written them. ``Config`` is moby's container config
and stays a dict with Docker's keys: it is passed through, never interpreted here.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from pylayerfs.image.drivers import StorageDriver
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.layout import write_value

CONFIG_FILE = "config.v2.json"
NAME_CHARS = "[a-zA-Z0-9][a-zA-Z0-9_.-]"  # moby: daemon/names, restrictedNameChars
VALID_NAME = re.compile(f"/?{NAME_CHARS}+")
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


NEVER = "0001-01-01T00:00:00Z"  # Go's zero time.Time, as moby writes a time that has not happened


class ContainerStatus(StrEnum):
    """``State.Status``: the states a pylayerfs container goes through (moby also has paused, restarting,
    removing and dead, which pylayerfs never enters)."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


@dataclass
class State:
    """A container's ``State`` (what ps shows); times are Go's RFC 3339 text, as written."""

    status: ContainerStatus = ContainerStatus.CREATED
    running: bool = False
    pid: int = 0  # the container's process
    monitor_pid: int = 0  # the process that holds the mount and waits for it
    exit_code: int = 0
    started_at: str = NEVER
    finished_at: str = NEVER


@dataclass
class Container:
    """A container's record; :func:`to_json` and :func:`from_json` convert it to and from ``config.v2.json``."""

    id: str
    created: str
    path: str
    args: list[str]
    config: dict[str, Any]  # moby's container Config, keys as Docker's
    image_id: str  # sha256:<image id>
    image_name: str  # as the user named it (docker ps IMAGE column)
    name: str  # without the "/" that Docker's Name starts with
    mount_id: str
    driver: StorageDriver = StorageDriver.FUSE
    auto_remove: bool = False  # --rm: removed once its command exited
    state: State = field(default_factory=State)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def command(self) -> list[str]:
        return [self.path, *self.args]


def to_json(container: Container) -> dict[str, Any]:
    """The record as ``config.v2.json`` holds it: moby's field names, in the order pylayerfs writes them;
    ``HostConfig`` only with ``--rm`` (``AutoRemove``)."""
    state = container.state
    return {
        "ID": container.id,
        "Created": container.created,
        "Path": container.path,
        "Args": container.args,
        "Config": container.config,
        "Image": container.image_id,
        "ImageName": container.image_name,
        "Name": "/" + container.name,
        "MountID": container.mount_id,
        "Driver": container.driver.value,
        **({"HostConfig": {"AutoRemove": True}} if container.auto_remove else {}),  # records without --rm as before
        "State": {
            "Status": state.status.value,
            "Running": state.running,
            "Pid": state.pid,
            "MonitorPid": state.monitor_pid,
            "ExitCode": state.exit_code,
            "StartedAt": state.started_at,
            "FinishedAt": state.finished_at,
        },
    }


class RecordError(ValueError):
    """A ``config.v2.json`` that is not a container record: the message names the field."""


def from_json(data: Any) -> Container:
    """A record read from ``config.v2.json``. Fields pylayerfs does not know are ignored (as Go's json does);
    ``Driver``, ``HostConfig`` and the fields of ``State`` may be missing (their defaults). Raises RecordError."""
    record = _object(data, "the record")
    state = _object(record.get("State"), "State")
    host = _object(record.get("HostConfig", {}), "HostConfig")
    defaults = State()
    args = _get(record, "Args", list)
    if not all(isinstance(a, str) for a in args):
        raise RecordError("Args: not a list of strings")
    return Container(
        id=_get(record, "ID", str), created=_get(record, "Created", str), path=_get(record, "Path", str), args=args,
        config=_object(record.get("Config"), "Config"), image_id=_get(record, "Image", str),
        image_name=_get(record, "ImageName", str), name=_get(record, "Name", str).removeprefix("/"),
        mount_id=_get(record, "MountID", str),
        driver=_enum(StorageDriver, "Driver", record.get("Driver", StorageDriver.FUSE.value)),
        auto_remove=_get(host, "AutoRemove", bool, False, "HostConfig."),
        state=State(
            status=_enum(ContainerStatus, "State.Status", state.get("Status", defaults.status.value)),
            running=_get(state, "Running", bool, defaults.running, "State."),
            pid=_get(state, "Pid", int, defaults.pid, "State."),
            monitor_pid=_get(state, "MonitorPid", int, defaults.monitor_pid, "State."),
            exit_code=_get(state, "ExitCode", int, defaults.exit_code, "State."),
            started_at=_get(state, "StartedAt", str, defaults.started_at, "State."),
            finished_at=_get(state, "FinishedAt", str, defaults.finished_at, "State."),
        ),
    )  # fmt: skip


_T = TypeVar("_T")
_E = TypeVar("_E", bound=StrEnum)
_TYPE_NAMES = {str: "a string", int: "an int", bool: "a boolean", list: "a list of strings"}  # list: only Args


def _get(record: dict[str, Any], key: str, kind: type[_T], default: _T | None = None, where: str = "") -> _T:
    """``record[key]``, which must be a ``kind`` (an int is not a bool, nor a bool an int); ``default`` if absent."""
    if key not in record:
        if default is None:
            raise RecordError(f"missing {where}{key}")
        return default
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"{where}{key}: not {_TYPE_NAMES.get(kind, kind.__name__)}")
    return value


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordError(f"{name}: not an object" if value is not None else f"missing {name}")
    return value


def _enum(kind: type[_E], name: str, value: Any) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise RecordError(f"{name}: unknown value {value!r} (known: {', '.join(kind)})") from None


class ContainerStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = os.path.join(store.root, "containers")
        os.makedirs(self.root, 0o710, exist_ok=True)

    def dir(self, container_id: str) -> str:
        return os.path.join(self.root, container_id)

    def log_path(self, container: Container) -> str:
        return os.path.join(self.dir(container.id), f"{container.id}-json.log")

    def all(self) -> list[Container]:
        out = []
        for name in sorted(os.listdir(self.root)):
            try:
                out.append(self.load(name))
            except StoreError:
                continue  # half-removed: rm finishes it
        return sorted(out, key=lambda c: c.created, reverse=True)

    def load(self, container_id: str) -> Container:
        """The record of ``container_id``; StoreError if it cannot be read or is not a container record."""
        try:
            with open(os.path.join(self.dir(container_id), CONFIG_FILE)) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreError(f"no such container: {container_id}") from exc
        try:
            return from_json(data)
        except RecordError as exc:
            raise StoreError(f"container {container_id}: {CONFIG_FILE}: {exc}") from exc

    def save(self, container: Container) -> None:
        os.makedirs(self.dir(container.id), 0o710, exist_ok=True)
        write_value(os.path.join(self.dir(container.id), CONFIG_FILE), json.dumps(to_json(container)), 0o600)

    def find(self, ref: str) -> Container:
        """By name (with or without Docker's leading "/"), full ID or unambiguous ID prefix; else StoreError."""
        containers = self.all()
        for c in containers:
            if ref in (c.name, "/" + c.name, c.id):
                return c
        matches = [c for c in containers if ref and c.id.startswith(ref)]
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
        """Raise StoreError unless ``name`` is valid (moby's ``validContainerNamePattern``) and not in use."""
        if not VALID_NAME.fullmatch(name):
            raise StoreError(f"Invalid container name ({name}), only {NAME_CHARS} are allowed")
        if any(c.name == name for c in self.all()):
            raise StoreError(f'Conflict. The container name "/{name}" is already in use')

    def remove(self, container: Container) -> None:
        shutil.rmtree(os.path.join(self.store.layout.mounts, container.id), ignore_errors=True)
        shutil.rmtree(self.dir(container.id), ignore_errors=True)
