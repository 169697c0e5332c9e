"""Mounting as a user who is not root: when libfuse only says "mounting failed", say why in one line.

The user is ``nobody``, on directories only it may use (in /tmp, mode 0700). The test runs in a private
mount namespace with its own ``/dev/fuse`` node, so that the device's mode is the test's choice (Debian
makes it 0666; some machines 0600) and nothing it mounts can outlive it in the host's namespace.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import mfusepy
import pytest

import pylayerfs
from pylayerfs.fuse.mount import user_allow_other
from tests.mounts import need

pytestmark = [pytest.mark.root, pytest.mark.fuse]  # root to set the stage; the mounts are nobody's
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
TIMEOUT = 60


def _runs_as_nobody(python: str, pythonpath: str) -> str:
    """ "" if nobody can run pylayerfs's daemon code with ``python``; else what went wrong."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath}
    check = [*AS_NOBODY, "env", "-i", *(f"{k}={v}" for k, v in env.items()), python, "-c",
             "import pylayerfs.fuse.adapter"]  # fmt: skip
    result = subprocess.run(check, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return "" if result.returncode == 0 else (result.stderr.strip().splitlines() or ["?"])[-1]


def _nobody_python() -> tuple[str, str]:
    """An interpreter and PYTHONPATH with which nobody runs this checkout (skips, saying why, if none)."""
    source = os.path.dirname(os.path.dirname(pylayerfs.__file__))
    site = os.path.dirname(os.path.dirname(mfusepy.__file__)) if mfusepy.__file__.endswith("__init__.py") else (
        os.path.dirname(mfusepy.__file__))  # fmt: skip
    pythonpath = f"{source}:{site}"
    tried = []
    for python in (sys.executable, "/usr/bin/python3"):
        why = _runs_as_nobody(python, pythonpath)
        if not why:
            return python, pythonpath
        tried.append(f"{python}: {why}")
    pytest.skip("user nobody cannot run pylayerfs from this checkout (" + "; ".join(tried) + "): the interpreter, "
                f"{source} and {site} must be readable and executable by others")  # fmt: skip


@pytest.fixture
def nobody_dirs() -> Iterator[str]:
    top = tempfile.mkdtemp(prefix="pylayerfs-nonroot-", dir="/tmp")
    try:
        for d in ("l", "m", "dev"):
            os.mkdir(os.path.join(top, d))
        with open(os.path.join(top, "l", "f"), "w") as f:
            f.write("hello from nobody's layer\n")
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                os.chown(name, NOBODY, NOBODY)
        os.chmod(top, 0o700)  # only nobody (and root) may use them
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _script(top: str, python: str, pythonpath: str, fuse_mode: str) -> str:
    """Run as root in a private mount namespace: a /dev/fuse of mode ``fuse_mode``, then nobody's attempts."""
    q = shlex.quote
    mnt, lower = q(f"{top}/m"), q(f"{top}/l")
    binding = os.environ.get("PYLAYERFS_BINDING")  # the transport this run tests
    nobody = " ".join([*AS_NOBODY, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={q(pythonpath)}",
                       *([f"PYLAYERFS_BINDING={q(binding)}"] if binding else []), q(python),
                       "-m", "pylayerfs"])  # fmt: skip
    return f"""
set -u
trap 'fusermount3 -uz {mnt} 2>/dev/null' EXIT
mount -t tmpfs -o mode=755 none {q(top)}/dev || exit 90
mknod -m {fuse_mode} {q(top)}/dev/fuse c 10 229 && mount --bind {q(top)}/dev/fuse /dev/fuse || exit 91
echo "== default"
{nobody} mount -o lowerdir={lower} {mnt}; echo "rc=$?"
echo "== noallow_other"
{nobody} mount -o lowerdir={lower},noallow_other {mnt}; echo "rc=$?"
{" ".join(AS_NOBODY)} cat {mnt}/f && {nobody} umount {mnt}
"""


def _run(top: str, fuse_mode: str) -> subprocess.CompletedProcess[str]:
    for tool in ("unshare", "setpriv", "fusermount3"):
        need(tool)
    python, pythonpath = _nobody_python()
    script = _script(top, python, pythonpath, fuse_mode)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert result.returncode not in (90, 91), f"cannot set up a private /dev/fuse: {result.stderr}"
    return result


def test_a_default_mount_by_a_user_says_allow_other_needs_user_allow_other(nobody_dirs):
    if user_allow_other():
        pytest.skip("/etc/fuse.conf has user_allow_other: users may mount with allow_other here")
    result = _run(nobody_dirs, "666")
    default, noallow = result.stdout.split("== noallow_other")
    assert "rc=1" in default, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("pylayerfs:")]
    assert errors == [
        f"pylayerfs: FUSE could not mount '{nobody_dirs}/m': allow_other (a default) needs root or "
        "'user_allow_other' in /etc/fuse.conf; -o noallow_other turns it off (then only you can use the mount)"
    ], result.stderr
    assert "rc=0" in noallow and "hello from nobody's layer" in noallow, (result.stdout, result.stderr)


def test_a_user_who_cannot_open_dev_fuse_is_told_so(nobody_dirs):
    result = _run(nobody_dirs, "600")
    errors = [line for line in result.stderr.splitlines() if line.startswith("pylayerfs:")]
    assert len(errors) == 2 and all("/dev/fuse is not readable and writable for this user" in e for e in errors)
