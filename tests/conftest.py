from __future__ import annotations

import os
import shutil

import pytest


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {"fuse": _fuse_missing(), "root": _root_missing()}
    if os.environ.get("CI") == "true":
        return  # CI must run everything: a missing prerequisite fails there instead of skipping
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
