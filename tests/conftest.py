from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylayerfs.bench.registry import Registry, RegistryUnavailable, private_registry
from tests.dockerd import Docker, DockerUnavailable, private_docker
from tests.mounts import scratch_filesystem


def _fuse_missing() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (FUSE kernel module not loaded)"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    if os.geteuid() != 0:
        return "FUSE tests mount with allow_other and need root"
    return None


def _root_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "kernel overlayfs is not available"
    return None


def _stress_tools_missing() -> str | None:
    missing = [tool for tool in ("fio", "stress-ng") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed (apt-get install fio stress-ng)" if missing else None


def pytest_report_header(config: pytest.Config) -> str:
    """Which FUSE transport the mounts of this run use: ``PYLAYERFS_BINDING`` (read by every daemon) or the default."""
    from pylayerfs.fuse.mount import BINDING_VARIABLE, DEFAULT_BINDING

    chosen = os.environ.get(BINDING_VARIABLE)
    return f"pylayerfs FUSE binding: {chosen or DEFAULT_BINDING} ({BINDING_VARIABLE}={chosen or 'unset'})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {"fuse": _fuse_missing(), "root": _root_missing(), "stress": _stress_tools_missing()}
    if os.environ.get("CI") == "true":
        return  # CI must run everything: a missing prerequisite fails there instead of skipping
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI nothing is skipped: a test that skips itself (a missing tool or install) fails there, with its reason."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every prerequisite must be there: {report.longrepr}"


@pytest.fixture
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A scratch directory on a fresh filesystem, for the layers of a kernel-differential test.

    Parametrize it indirectly with the filesystem's name (``tests.mounts.BACKINGS``: ``tmpfs``, or
    ``ext4`` on a loop-mounted image), usually as
    ``@pytest.mark.parametrize("backing", backings(), indirect=True)`` with ``tests.mounts.backings``;
    unparametrized, it is a tmpfs. The filesystem is unmounted (and its loop device detached) after the
    test, whatever happened.
    """
    kind = getattr(request, "param", "tmpfs")
    with scratch_filesystem(kind, str(tmp_path / f"{kind}-backing")) as mnt:
        yield Path(mnt)


@pytest.fixture(scope="session")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    """The session's private dockerd (``tests/dockerd.py``), with ``busybox:base`` imported; skips with the reason
    when it cannot start (fails in CI). Tests using it are marked ``docker``."""
    try:
        with private_docker(str(tmp_path_factory.mktemp("dockerd"))) as daemon:
            yield daemon
    except DockerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The session's real ``docker-registry`` on 127.0.0.1, open to all (:mod:`pylayerfs.bench.registry`); skips with
    the reason when it cannot start (fails in CI). Tests using it are marked ``ecosystem``."""
    try:
        with private_registry(str(tmp_path_factory.mktemp("registry"))) as running:
            yield running
    except RegistryUnavailable as exc:
        pytest.skip(str(exc))
