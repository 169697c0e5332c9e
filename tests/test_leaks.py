"""Long runs: the daemon's file descriptors and memory stay bounded, whatever is created and removed.

The engine caches a directory node (with an ``O_PATH`` fd on its upper directory) per directory
looked up. Every such fd must be dropped when the directory is removed, renamed or pushed out of
the bounded cache; a loop of ``mkdir -p t/a/b; rm -rf t`` used to leave two fds per cycle until
the mount answered EMFILE to everything. In-process tests count ``/proc/self/fd``; mount tests
count the daemon's ``/proc/PID/fd`` and its RSS, and check the mount still works afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.lookup import max_cached_dirs
from pylayerfs.overlay.state import Caller
from tests.mounts import PYLAYERFS, TIMEOUT, options, pylayerfs_mount, run_pylayerfs
from tests.trees import build

ME = Caller.me()
SLACK = 4  # fds a run may leave open for good reasons (none expected): a small constant, not one per cycle


def _fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# -- in-process: the engine ------------------------------------------------------------------


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Overlay]:
    """A stack whose root merges a lower layer, as a container's does."""
    lower = build(str(tmp_path / "l"), {"etc/conf": "x", "usr/bin/tool": "y"})
    upper, work = str(tmp_path / "u"), str(tmp_path / "w")
    os.makedirs(upper)
    os.makedirs(work)
    ov = Overlay([lower], upper, work)
    yield ov
    ov.close()


def _rm_rf(ov: Overlay, path: str) -> None:
    """What ``rm -rf`` asks of the filesystem: list, look every entry up, remove bottom-up."""
    for name, _, _ in ov.readdir(path):
        if name in (".", ".."):
            continue
        child = f"{path}/{name}"
        if ov.getattr(child)["st_mode"] & 0o040000:
            _rm_rf(ov, child)
        else:
            ov.unlink(child)
    ov.rmdir(path)


def _mkdir_p(ov: Overlay, path: str) -> None:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        with contextlib.suppress(FileExistsError):
            ov.mkdir(sub, 0o755, ME)
        ov.getattr(sub)


def _cycle_rm(ov: Overlay, i: int) -> None:
    _mkdir_p(ov, "t/a/b")
    _rm_rf(ov, "t")


def _cycle_rename(ov: Overlay, i: int) -> None:
    _mkdir_p(ov, "t/a/b")
    fh = ov.create("t/a/b/f", 0o644, os.O_WRONLY, ME)
    ov.release(fh)
    ov.rename("t/a", "t/moved")
    ov.getattr("t/moved/b")
    ov.rename("t", "u")
    _rm_rf(ov, "u")


def _cycle_deep(ov: Overlay, i: int) -> None:
    _mkdir_p(ov, "/".join(f"d{n}" for n in range(40)))
    _rm_rf(ov, "d0")


def _cycle_unique_names(ov: Overlay, i: int) -> None:
    """mktemp-style: a new name each time, in the merged root."""
    ov.mkdir(f"tmp.{i}", 0o700, ME)
    ov.getattr(f"tmp.{i}")
    fh = ov.create(f"tmp.{i}/f", 0o600, os.O_WRONLY, ME)
    ov.release(fh)
    _rm_rf(ov, f"tmp.{i}")
    with pytest.raises(FileNotFoundError):
        ov.getattr(f"tmp.{i}")


CYCLES: dict[str, tuple[Callable[[Overlay, int], None], int]] = {
    "mkdir-p-rm-rf": (_cycle_rm, 1000),
    "rename-dirs": (_cycle_rename, 500),
    "deep-tree": (_cycle_deep, 50),
    "unique-names": (_cycle_unique_names, 1000),
}


@pytest.mark.parametrize("kind", list(CYCLES))
def test_engine_cycles_leave_no_fd_and_no_memory_behind(overlay, kind):
    cycle, count = CYCLES[kind]
    cycle(overlay, -1)
    start = _fds()
    for i in range(count // 2):
        cycle(overlay, i)
    gc.collect()
    half = sys.getallocatedblocks()
    for i in range(count // 2, count):
        cycle(overlay, i)
    gc.collect()
    grown = sys.getallocatedblocks() - half
    assert _fds() - start <= SLACK, f"{_fds() - start} fds left open by {count} cycles of {kind}"
    print(kind, grown)
    assert grown < 100, f"{grown} more memory blocks after the second half of the cycles than after the first"
    assert sorted(n for n, _, _ in overlay.readdir("")) == [".", "..", "etc", "usr"]


def test_engine_directory_cache_is_bounded(overlay):
    overlay.lookup.max_dirs = 64
    for i in range(300):
        overlay.mkdir(f"d{i}", 0o755, ME)
    start = _fds()
    for i in range(300):
        overlay.getattr(f"d{i}")
    assert overlay.lookup.cached_dirs() <= 64
    assert _fds() - start <= 64 + SLACK


def test_a_listing_longer_than_the_directory_cache_shows_every_directory(overlay, tmp_path):
    """Filling the cache while a listing walks its entries must not close the listed directory's fd."""
    count = max(max_cached_dirs(), overlay.lookup.max_dirs) + 100
    upper = tmp_path / "u" / "big"
    upper.mkdir()
    for i in range(count):
        (upper / f"d{i}").mkdir()
    names = {n for n, _, _ in overlay.readdir("big")} - {".", ".."}
    assert names == {f"d{i}" for i in range(count)}
    assert overlay.getattr("big/d0")["st_nlink"] == 2


def test_a_node_held_across_its_removal_keeps_a_valid_fd(overlay):
    """A caller holding a node whose directory is removed meanwhile sees the removed directory, not another one."""
    _mkdir_p(overlay, "t/a")
    held = overlay.lookup.lookup("t/a")
    _rm_rf(overlay, "t")
    for i in range(50):  # fds are reused lowest-first: a closed fd number would now name one of these
        _mkdir_p(overlay, f"other{i}")
    assert os.stat(held.upper_fd).st_nlink == 0  # still the removed directory
    fds = _fds()
    del held
    assert _fds() == fds - 1, "the fd of a node dropped from the cache closes with its last holder"


def test_close_closes_every_directory_fd(tmp_path):
    lower = build(str(tmp_path / "l"), {"x/y": "z"})
    os.makedirs(tmp_path / "u")
    os.makedirs(tmp_path / "w")
    start = _fds()
    ov = Overlay([lower], str(tmp_path / "u"), str(tmp_path / "w"))
    for i in range(20):
        _mkdir_p(ov, f"x/{i}/a")
    held = ov.lookup.lookup("x/3/a")
    ov.close()
    assert held.upper_fd == -1
    assert _fds() == start


# -- through a mount: the daemon -------------------------------------------------------------


def _daemon_pid(upper: str) -> int:
    found = subprocess.run(["pgrep", "-f", f"pylayerfs mount .*upperdir={upper},"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, f"daemon of {upper}: {found.stdout!r}"
    return pids[0]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    """A mount whose root merges a lower layer; yields (mountpoint, upper, daemon pid)."""
    lower = build(str(tmp_path / "l"), {"etc/conf": "x", "usr/bin/tool": "y"})
    upper, work, mnt = (str(tmp_path / n) for n in ("u", "w", "m"))
    for d in (upper, work):
        os.makedirs(d)
    with pylayerfs_mount(mnt, [lower], upper, work):
        yield mnt, upper, _daemon_pid(upper)


def _mount_works(mnt: str) -> None:
    with open(f"{mnt}/probe", "w") as f:
        f.write("still here")
    with open(f"{mnt}/probe") as f:
        assert f.read() == "still here"
    assert sorted(os.listdir(mnt)) == ["etc", "probe", "usr"]
    os.unlink(f"{mnt}/probe")


def _shell_loop(mnt: str, body: str, count: int) -> None:
    script = f'cd "$1" && for i in $(seq {count}); do {body}; done'
    subprocess.run(["bash", "-ec", script, "-", mnt], check=True, timeout=110)


def _held_dir_loop(mnt: str, count: int) -> None:
    """A directory kept open (and listed) while ``rm -rf`` removes it and its parent, then closed."""
    for _ in range(count):
        os.makedirs(f"{mnt}/t/a/b")
        fd = os.open(f"{mnt}/t/a", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.listdir(fd) == ["b"]
            shutil.rmtree(f"{mnt}/t")
            # The kernel lists it empty; through FUSE the fstat of a removed directory is ESTALE (libfuse's
            # path API has no path for it, and the kernel sends no handle): not what this test is about.
            with contextlib.suppress(OSError):
                assert os.listdir(fd) == []
        finally:
            os.close(fd)


MOUNT_LOOPS: dict[str, Callable[[str], None]] = {
    "mkdir-p-rm-rf": lambda mnt: _shell_loop(mnt, "mkdir -p t/a/b; rm -rf t", 1000),
    "rename-dirs": lambda mnt: _shell_loop(mnt, "mkdir -p t/a/b; mv t/a t/c; mv t u; rm -rf u", 300),
    "opendir-across-rm-rf": lambda mnt: _held_dir_loop(mnt, 300),
    "deep-tree": lambda mnt: _shell_loop(mnt, f"mkdir -p d{'/d' * 40}; ls -R d >/dev/null; rm -rf d", 40),
}


def _deleted_fds(pid: int) -> list[str]:
    """What the daemon's fds open that has no name left."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return [target for target in targets if target.endswith("(deleted)")]


@pytest.mark.fuse
@pytest.mark.root
@pytest.mark.parametrize("kind", list(MOUNT_LOOPS))
def test_the_daemon_holds_no_fd_of_what_was_removed(stack, kind):
    mnt, _, pid = stack
    _mount_works(mnt)
    start, rss_start = _fds(pid), _rss_kib(pid)
    MOUNT_LOOPS[kind](mnt)
    # The native transport holds a removed object until the kernel forgets its node (FORGET comes a moment later).
    deadline = time.monotonic() + 5
    while (deleted := _deleted_fds(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _fds(pid)
    assert after - start <= SLACK, f"daemon fds {start} -> {after}; to deleted objects: {deleted[:5]}"
    assert deleted == []
    _mount_works(mnt)
    growth = _rss_kib(pid) - rss_start
    assert growth < 32 * 1024, f"daemon RSS grew by {growth} KiB over the {kind} cycles"


@pytest.mark.fuse
@pytest.mark.root
def test_a_daemon_with_a_low_fd_limit_serves_more_directories_than_it_may_open(tmp_path):
    """The directory cache fits the daemon's RLIMIT_NOFILE: with a soft limit of 256, 600 directories all answer."""
    upper, work, mnt = (str(tmp_path / n) for n in ("u", "w", "m"))
    lower = build(str(tmp_path / "l"), {"etc/conf": "x"})
    for d in (upper, work, mnt):
        os.makedirs(d)
    for i in range(600):
        os.makedirs(f"{upper}/d{i}/sub")

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    subprocess.run([*PYLAYERFS, "mount", "-o", options([lower], upper, work), mnt], preexec_fn=low_limit,
                   check=True, capture_output=True, timeout=TIMEOUT)  # fmt: skip
    try:
        pid = _daemon_pid(upper)
        errors = []
        for _ in range(2):
            for i in range(600):
                try:
                    assert os.listdir(f"{mnt}/d{i}") == ["sub"]
                    os.stat(f"{mnt}/d{i}/sub")
                except OSError as exc:
                    errors.append(f"d{i}: {errno.errorcode.get(exc.errno or 0)}")
        assert errors == [], f"{len(errors)} failures, first: {errors[:3]}"
        assert _fds(pid) <= 256 // 4 + 32
    finally:
        run_pylayerfs("umount", mnt, check=False)
