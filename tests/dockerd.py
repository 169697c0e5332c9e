"""Docker as the oracle for the image side: a private ``dockerd`` and the base both sides build on.

The daemon touches nothing of the host's Docker: its own data root, exec root, pidfile and socket under one
directory, no iptables rules, no bridge (containers get no network, as pylayerfs's). Both sides import the same
bytes as their base (:func:`busybox_rootfs`), since no registry is reachable. Builds use the classic builder
(``DOCKER_BUILDKIT=0``), the one pylayerfs reproduces.

    with private_docker(directory) as docker:
        docker.run("import", tar, "busybox:base")
        docker.build(context, "-t", "app")

Tests take the session's daemon through the ``docker`` fixture (``tests/conftest.py``), marked ``docker``;
they skip with the reason when the daemon cannot start, except in CI.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

DOCKER = "/usr/bin/docker"  # Debian's docker.io client (20.10), not any other docker on PATH
DOCKERD = "/usr/sbin/dockerd"
BASE = "busybox:base"  # the tag of the shared base on both sides
_START_TIMEOUT = 60.0
_BASE_MTIME = 1_600_000_000  # fixed, so that the base tar (and both sides' DiffIDs) are the same every run


class DockerUnavailable(Exception):
    """The private daemon cannot start here; the message says why (for a skip)."""


@dataclass
class Docker:
    """A running private dockerd: ``socket`` is its API, ``directory`` holds everything it writes."""

    directory: str
    socket: str
    pid: int

    def env(self) -> dict[str, str]:
        """The environment for the docker client: this daemon, the classic builder."""
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, cwd: str | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``docker ARGS`` against this daemon (``stdin``: its input); stdout and stderr captured as text. Raises
        CalledProcessError (with ``check``) or TimeoutExpired."""
        return subprocess.run([DOCKER, *args], env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout, cwd=cwd, input=stdin)  # fmt: skip

    def build(self, context: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker build ARGS CONTEXT`` with the classic builder."""
        return self.run("build", *args, context, check=check)

    def clean(self) -> None:
        """Remove every container and image but the base, so that the next test starts from the same store."""
        ids = self.run("ps", "-aq").stdout.split()
        if ids:
            self.run("rm", "-f", *ids, check=False)
        images = [ref for ref in self.run("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
                  if ref != BASE and not ref.startswith("<none>")]  # fmt: skip
        if images:
            self.run("rmi", "-f", *images, check=False)
        self.run("image", "prune", "-f", check=False)


def busybox_rootfs(path: str, busybox: str = "/bin/busybox") -> str:
    """Write a root filesystem tar at ``path``: a static busybox as ``/bin/busybox``, its applets as symlinks to it,
    and the directories a base image has; every entry owned by root with one fixed mtime. Returns ``path``.

    The same bytes every time, so that ``docker import`` and ``pylayerfs import`` of it give the same DiffID.
    Raises OSError when ``busybox`` is missing, CalledProcessError when it cannot list its applets.
    """
    applets = sorted(
        subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    )
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:

        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            info.mtime, info.uid, info.gid, info.uname, info.gname = _BASE_MTIME, 0, 0, "", ""
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        dirs = sorted(
            {os.path.dirname(a).lstrip("/") for a in applets} | {"bin", "etc", "tmp", "root", "proc", "dev", "sys"}
        )
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            add(info)
        with open(busybox, "rb") as f:
            info = tarfile.TarInfo("bin/busybox")
            info.mode = 0o755
            add(info, f.read())
        for applet in applets:
            name = applet.lstrip("/")
            if name == "bin/busybox":
                continue
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.SYMTYPE, 0o777
            info.linkname = "/bin/busybox"
            add(info)
        info = tarfile.TarInfo("etc/passwd")
        info.mode = 0o644
        add(info, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        info = tarfile.TarInfo("etc/group")
        info.mode = 0o644
        add(info, b"root:x:0:\nnobody:x:65534:\n")
    return path


def unavailable() -> str | None:
    """Why a private dockerd cannot start here, or None."""
    for tool, package in ((DOCKER, "docker.io"), (DOCKERD, "docker.io"), ("/bin/busybox", "busybox-static")):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (apt-get install {package})"
    if os.geteuid() != 0:
        return "a private dockerd needs root"
    return None


@contextlib.contextmanager
def private_docker(directory: str) -> Iterator[Docker]:
    """Start a private dockerd under ``directory`` with :data:`BASE` imported from :func:`busybox_rootfs`; stop it
    (its containers killed, its mounts gone) on exit. Raises DockerUnavailable with the reason when it cannot start.
    """
    reason = unavailable()
    if reason:
        raise DockerUnavailable(reason)
    os.makedirs(directory, exist_ok=True)
    socket = os.path.join(directory, "docker.sock")
    log = open(os.path.join(directory, "dockerd.log"), "w")  # closed in the finally below
    process = subprocess.Popen(
        [DOCKERD, "--data-root", os.path.join(directory, "data"), "--exec-root", os.path.join(directory, "exec"),
         "--pidfile", os.path.join(directory, "dockerd.pid"), "--host", f"unix://{socket}",
         "--iptables=false", "--ip-masq=false", "--bridge=none", "--storage-driver=overlay2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    docker = Docker(directory, socket, process.pid)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while docker.run("version", check=False, timeout=30).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log.name) as f:
                    tail = f.read().strip().splitlines()[-3:]
                raise DockerUnavailable(f"dockerd did not start: {' | '.join(tail) or 'no output'}")
            time.sleep(0.2)
        tar = busybox_rootfs(os.path.join(directory, "busybox-rootfs.tar"))
        docker.run("import", tar, BASE)
        yield docker
    finally:
        _stop(process, directory)
        log.close()


def _stop(process: subprocess.Popen[bytes], directory: str) -> None:
    """Stop dockerd (SIGTERM stops its containers; SIGKILL after 20 s) and unmount what it left under ``directory``."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if f" {directory}" in f" {line.split()[1]}"]
    for mountpoint in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)
