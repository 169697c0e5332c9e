"""Entering a root: from inside a chroot whose ``/`` is not a mount point, and without pinning the host's mounts.

The chroot is made in a private mount namespace (``unshare -m``): a plain directory on a tmpfs that
is made *shared* (as systemd makes every mount), with bind mounts of what python and pylayerfs need.
Inside it, ``mount(MS_PRIVATE)`` on ``/`` fails with EINVAL; the sandbox must still make every mount
private before mounting /proc, or a /proc mounted into a root would propagate to the namespace the
chroot lives in (and stay there): the vfs driver's roots are plain directories in that tmpfs.

A container (or a RUN step) enters its root with ``pivot_root`` and detaches the old one: its mount
namespace keeps no copy of the host's mounts, so a host pylayerfs mount unmounted meanwhile is gone
(its daemon exits, its upper directory can be mounted again) while the container runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pylayerfs
from pylayerfs.image import sandbox
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below
from tests.mounts import processes, pylayerfs_mount, run_pylayerfs, unique_seconds
from tests.test_build import pylayerfs as cli

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


# -- a container holds only its own mounts (pivot_root, the old root detached) --------------------------------------


def _daemon_of(upper: Path) -> int:
    found = subprocess.run(["pgrep", "-f", f"pylayerfs mount .*upperdir={upper},"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, found.stdout
    return pids[0]


def _wait_exited(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def host_mount(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, Path]]:
    """A store with alpine, and the layers of a host pylayerfs mount: (store, lower, upper, work)."""
    store = tmp_path / "store"
    cli(store, "base", "alpine")
    lower, upper, work = tmp_path / "l", tmp_path / "u", tmp_path / "w"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_text("lower\n")
    yield store, lower, upper, work
    ids = cli(store, "ps", "-a", "-q").stdout.split()
    if ids:
        cli(store, "rm", "-f", *ids, check=False)
    for mountpoint in mounts_below(str(tmp_path)):
        realfs.detach(mountpoint)


def _unmount_and_remount(tmp_path: Path, lower: Path, upper: Path, work: Path, running: Callable[[], bool]) -> None:
    """``pylayerfs umount`` of the host mount while ``running()``: its daemon exits, its upper mounts again."""
    mnt = tmp_path / "m"
    daemon = _daemon_of(upper)
    run_pylayerfs("umount", str(mnt))
    exited = _wait_exited(daemon, 5)
    assert running(), "the container (or the RUN step) ended before the check"
    assert exited, "the daemon of the unmounted host mount lives on (a container holds a copy of the mount)"
    with pylayerfs_mount(str(mnt), [str(lower)], str(upper), str(work)):
        assert (mnt / "f").read_text() == "lower\n"


def test_a_container_does_not_pin_the_hosts_mounts(tmp_path: Path, host_mount):
    store, lower, upper, work = host_mount
    with pylayerfs_mount(str(tmp_path / "m"), [str(lower)], str(upper), str(work)):
        nap = ["sleep", unique_seconds()]
        cli(store, "run", "-d", "--name", "pinner", "alpine", *nap)
        _unmount_and_remount(tmp_path, lower, upper, work, lambda: bool(processes(nap)))
    # The container still works, and sees its own root only.
    assert cli(store, "exec", "pinner", "cat", "/etc/hostname").returncode == 0
    mounts = cli(store, "exec", "pinner", "cat", "/proc/self/mountinfo").stdout.splitlines()
    runc = {f"/{p}" for p in (*sandbox.READONLY_PATHS, *sandbox.MASKED_PATHS)}  # where this /proc has them
    seen = [line.split()[4] for line in mounts]
    assert [m for m in seen if m not in runc] == ["/", *(f"/{m[0]}" for m in sandbox.MOUNTS),
                                                  *(f"/etc/{f}" for f in sandbox.ETC_FILES)]  # fmt: skip


def test_a_run_step_does_not_pin_the_hosts_mounts(tmp_path: Path, host_mount):
    store, lower, upper, work = host_mount
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    nap = ["sleep", unique_seconds()]
    (ctx / "Dockerfile").write_text(f"FROM alpine\nRUN {' '.join(nap)} || true; echo slept > /slept\n")
    with pylayerfs_mount(str(tmp_path / "m"), [str(lower)], str(upper), str(work)):
        env = {**os.environ, "PYLAYERFS_ROOT": str(store)}
        build = subprocess.Popen([sys.executable, "-m", "pylayerfs", "build", "-t", "slow", str(ctx)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not processes(nap):
                assert build.poll() is None and time.monotonic() < deadline, "the RUN step did not start"
                time.sleep(0.05)
            _unmount_and_remount(tmp_path, lower, upper, work, lambda: bool(processes(nap)))
        finally:
            for pid in processes(nap):  # the step goes on to its end
                os.kill(pid, signal.SIGTERM)
            output = build.communicate(timeout=60)[0]
    assert build.returncode == 0, output
    assert cli(store, "run", "--rm", "slow", "cat", "/slept").stdout == "slept\n"
