"""Builds and containers from inside a chroot whose ``/`` is not a mount point (debootstrap + chroot).

The chroot is made in a private mount namespace (``unshare -m``): a plain directory on a tmpfs that
is made *shared* (as systemd makes every mount), with bind mounts of what python and pylayerfs need.
Inside it, ``mount(MS_PRIVATE)`` on ``/`` fails with EINVAL; the sandbox must still make every mount
private before mounting /proc, or a /proc mounted into a root would propagate to the namespace the
chroot lives in (and stay there): the vfs driver's roots are plain directories in that tmpfs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import pylayerfs
from pylayerfs.image import sandbox

pytestmark = [pytest.mark.fuse, pytest.mark.root]

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(pylayerfs.__file__)))


def _mountpoints_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(p for line in f if (p := line.split()[4]).startswith(f"{path}/"))


def _binds() -> list[str]:
    """Host directories the chroot needs at the same paths: the system, python, the venv, the source."""
    wanted = ["/usr", "/etc", sys.prefix, sys.base_prefix, os.path.realpath(sys.executable), SOURCE]
    dirs: list[str] = []
    for path in wanted:
        real = os.path.realpath(path)
        real = real if os.path.isdir(real) else os.path.dirname(real)
        if not any(real == d or real.startswith(d + "/") for d in dirs):
            dirs = [d for d in dirs if not d.startswith(real + "/")] + [real]
    return sorted(dirs)


SCRIPT = r"""
set -eu
T=$1 OUT=$2
mount -t tmpfs chroot-test "$T"
mount --make-shared "$T"        # as systemd leaves every mount: mounts below it propagate
R=$T/root                       # the chroot: a plain directory, not a mount point
mkdir -p "$R/tmp" "$R/store" "$R/ctx"
for d in /bin /sbin /lib /lib32 /lib64 /libx32; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$R$d"
  elif [ -d "$d" ]; then mkdir -p "$R$d"; mount --rbind "$d" "$R$d"; fi
done
for d in /dev /proc /sys BINDS; do
  mkdir -p "$R$d"; mount --rbind "$d" "$R$d"; mount --make-rslave "$R$d"
done
printf 'FROM alpine\nRUN echo built > /f\nCMD ["sleep", "600"]\n' > "$R/ctx/Dockerfile"
cut -d' ' -f5 /proc/self/mountinfo | sort > "$OUT/before"
set +e
chroot "$R" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /bin/sh -euxc '
    cd /tmp
    P="PYTHON -m pylayerfs --root /store"
    $P base alpine
    $P build -t app /ctx
    test "$($P run --rm app cat /f)" = built
    $P run --rm app true
    $P run -d --name web app
    $P exec web sh -c "echo hello > /g"
    test "$($P exec web cat /g)" = hello
    $P rm -f web
    test "$($P run --rm --storage-driver vfs app cat /f)" = built
    echo CHROOT-OK'
echo "status $?" > "$OUT/status"
cut -d' ' -f5 /proc/self/mountinfo | sort > "$OUT/after"
"""


def test_build_run_exec_in_a_chroot_whose_root_is_not_a_mount_point(tmp_path: Path):
    target, out = tmp_path / "t", tmp_path / "out"
    target.mkdir()
    out.mkdir()
    script = SCRIPT.replace("BINDS", " ".join(shlex.quote(d) for d in _binds()))
    script = script.replace("PYTHON", shlex.quote(sys.executable))
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script, "-",
                             str(target), str(out)],
                            capture_output=True, text=True, timeout=110, cwd="/", check=False)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert (out / "status").read_text() == "status 0\n", log
    assert "CHROOT-OK" in result.stdout, log
    assert "preexec_fn" not in log
    # Nothing the builds and containers mounted stayed in the chroot's namespace, nor on the host.
    before, after = (out / "before").read_text().split("\n"), (out / "after").read_text().split("\n")
    assert sorted(set(after) - set(before)) == [], log
    assert _mountpoints_below(tmp_path) == []


def test_failing_to_enter_the_root_says_which_step_and_why(tmp_path: Path):
    missing = str(tmp_path / "no-such-root")
    with pytest.raises(sandbox.SandboxError) as failure:
        sandbox.start(sandbox.Process(missing, ["/bin/true"]))
    assert str(failure.value) == f"chroot {missing}: No such file or directory"
    with pytest.raises(sandbox.SandboxError) as failure:
        sandbox.call(missing, lambda: None)
    assert str(failure.value) == f"chroot {missing}: No such file or directory"
    empty = tmp_path / "empty-root"
    empty.mkdir()
    with pytest.raises(sandbox.SandboxError) as failure:
        sandbox.start(sandbox.Process(str(empty), ["/bin/true"], user="ghost"))
    assert str(failure.value) == "unable to find user ghost: no matching entries in passwd file"
