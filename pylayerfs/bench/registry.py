"""A real registry for the tests and the bench: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

    with private_registry(directory) as registry:                     # open to all
        registry.host                                                 # "127.0.0.1:PORT"
    with private_registry(directory, users={"me": "secret"}) as registry:  # basic auth (htpasswd, bcrypt)

Everything it writes (config, htpasswd, blobs, log) is under ``directory``; it listens on a free port and is stopped
(SIGTERM, then SIGKILL) at the end, whatever happened. :class:`RegistryUnavailable` says why it cannot start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import requests

REGISTRY = "/usr/bin/docker-registry"
_START_TIMEOUT = 30.0


class RegistryUnavailable(Exception):
    """The registry cannot start here; the message says why (for a skip)."""


@dataclass(frozen=True)
class Registry:
    """A running registry: ``host`` is ``127.0.0.1:PORT``, ``directory`` holds its config, storage and log."""

    host: str
    directory: str


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to 0 and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _htpasswd(users: dict[str, str]) -> str:
    """htpasswd lines with bcrypt hashes, the only kind distribution's ``htpasswd`` auth accepts."""
    try:
        import bcrypt
    except ImportError as exc:
        raise RegistryUnavailable("bcrypt is not installed (pip install -e '.[test]')") from exc
    return "".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}\n" for user, pw in users.items())


@contextlib.contextmanager
def private_registry(directory: str, users: dict[str, str] | None = None) -> Iterator[Registry]:
    """Start ``docker-registry serve`` with a config written here; yield it once ``/v2/`` answers; stop it."""
    if not os.access(REGISTRY, os.X_OK):
        raise RegistryUnavailable(f"{REGISTRY} is missing (apt-get install docker-registry)")
    os.makedirs(directory, exist_ok=True)
    port = free_port()
    auth = ""
    if users:
        path = os.path.join(directory, "htpasswd")
        with open(path, "w") as f:
            f.write(_htpasswd(users))
        auth = f"auth:\n  htpasswd:\n    realm: pylayerfs-tests\n    path: {path}\n"
    config = os.path.join(directory, "config.yml")
    with open(config, "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {directory}/storage\n  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n{auth}")  # fmt: skip
    with open(os.path.join(directory, "registry.log"), "ab") as log:
        process = subprocess.Popen([REGISTRY, "serve", config], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if process.poll() is not None:
                with open(os.path.join(directory, "registry.log")) as f:
                    raise RegistryUnavailable(f"docker-registry exited {process.returncode}: {f.read()[-500:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=5).status_code in (200, 401):
                    break
            if time.monotonic() > deadline:
                raise RegistryUnavailable(f"docker-registry did not answer on port {port} in {_START_TIMEOUT} s")
            time.sleep(0.05)
        yield Registry(f"127.0.0.1:{port}", directory)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
