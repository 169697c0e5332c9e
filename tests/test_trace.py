"""``-o debug``: every call that changes a layer is in the trace, with the real path it acts on."""

from __future__ import annotations

import os
import time

import pytest

from tests.mounts import pylayerfs_mount
from tests.trees import build

pytestmark = pytest.mark.fuse


def test_debug_traces_every_change_on_the_upper_layer(tmp_path):
    lower = build(str(tmp_path / "l"), {"d/a": "a", "f": "f", "g": "g", "x": "x"})
    upper, work, mnt, log = (str(tmp_path / n) for n in ("u", "w", "m", "trace.log"))
    os.makedirs(upper)
    os.makedirs(work)
    with pylayerfs_mount(mnt, [lower], upper, work, extra=f"debug,logfile={log}"):
        os.mkdir(f"{mnt}/new")  # mkdir
        with open(f"{mnt}/new/file", "w") as f:  # create
            f.write("12345")
        os.truncate(f"{mnt}/new/file", 2)  # truncate (truncate(2), as the kernel passes it on)
        os.chmod(f"{mnt}/x", 0o600)  # copy-up, then chmod
        os.chown(f"{mnt}/x", 1, 1)  # chown
        os.utime(f"{mnt}/x", ns=(10**9, 10**9))  # utimensat
        os.setxattr(f"{mnt}/x", "user.k", b"v")  # setxattr
        os.removexattr(f"{mnt}/x", "user.k")  # removexattr
        os.symlink("target", f"{mnt}/sym")  # symlink
        os.link(f"{mnt}/new/file", f"{mnt}/hard")  # link
        os.mkfifo(f"{mnt}/fifo")  # mknod
        os.unlink(f"{mnt}/f")  # a whiteout: mknod 0:0, then renameat2 over nothing
        os.unlink(f"{mnt}/hard")  # unlink
        os.rename(f"{mnt}/g", f"{mnt}/h")  # renameat2 with a whiteout left behind
        os.unlink(f"{mnt}/new/file")
        os.rmdir(f"{mnt}/new")  # rmdir
    deadline = time.monotonic() + 10
    while not os.path.exists(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    text = open(log).read()
    real_upper = os.path.realpath(upper)
    for call, path in [
        ("mkdir", "new"),
        ("create", "new/file"),
        ("truncate", "new/file"),
        ("copy_up", "x"),
        ("chmod", "x"),
        ("chown", "x"),
        ("utimensat", "x"),
        ("setxattr", "x"),
        ("removexattr", "x"),
        ("symlink", "sym"),
        ("link", "hard"),
        ("mknod", "fifo"),
        ("unlink", "hard"),
        ("rmdir", "new"),
    ]:
        lines = [line for line in text.splitlines() if f" {call} " in line]
        assert lines, f"no {call} in the trace:\n{text}"
        if call != "copy_up":
            assert any(f"{real_upper}/{path}" in line for line in lines), f"{call} {path} not traced:\n{text}"
    assert any(" renameat2 " in line for line in text.splitlines()), text
    assert any(" mknod " in line and "rdev=0:0" in line for line in text.splitlines()), "whiteouts are traced"
