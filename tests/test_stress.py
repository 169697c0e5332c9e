"""Standard exercisers on a pylayerfs mount, as a user would run them: fio and stress-ng.

fio writes blocks with a crc32c header and reads every one of them back (``--verify=crc32c``):
over lower files that each job must copy up, random and sequential, several jobs at once, then the
kernel's overlayfs reads back what pylayerfs wrote (``--verify_only``). stress-ng's file-system
stressors (dir, rename, link, symlink, chmod, xattr, dentry) run for a bounded time; then the daemon
must be alive with its open fds back where they started, the lowers unchanged, and the kernel's
overlayfs must show the upper as pylayerfs did. Every run is bounded (fio sizes, stress-ng's
``--timeout``): the whole file takes about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from pylayerfs.fuse.mount import records_dir
from pylayerfs.fuse.native.device import FSTYPE
from pylayerfs.overlay.params import mountinfo
from tests.mounts import kernel_mount, pylayerfs_mount
from tests.trees import build, tree_hash, view

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.stress]

# -- fio ----------------------------------------------------------------------------------------

FIO_SIZE = 8 << 20  # per job (one file each): 8 jobs, 64 MiB in all
FIO_TIMEOUT = 120
FIO_OPTIONS = [
    f"--size={FIO_SIZE}",
    "--bs=4k",
    "--ioengine=psync",
    "--verify=crc32c",
    "--verify_fatal=1",  # stop at the first bad block, and say which
    "--verify_state_save=0",  # no state files in the working directory
    "--randrepeat=1",  # the same offsets and data every run: what --verify_only relies on
    "--output-format=json",
]
# written with headers in the plain directory; on the mount only read back and checked
WRITTEN = ["--name=seq", "--rw=write", "--numjobs=2", "--name=rand", "--rw=randwrite", "--numjobs=2"]
# laid out by fio in the plain directory; on the mount random and sequential reads and writes,
# every block written checked when the job ends
MIXED = ["--name=mixseq", "--rw=rw", "--numjobs=2", "--name=mixrand", "--rw=randrw", "--numjobs=2"]


def _files(jobs: list[str]) -> list[str]:
    """The files fio uses for ``jobs``: ``<name>.<job number>.0``, one a job."""
    names = [arg.split("=", 1)[1] for arg in jobs if arg.startswith("--name=")]
    counts = [int(arg.split("=", 1)[1]) for arg in jobs if arg.startswith("--numjobs=")]
    return sorted(f"{name}.{i}.0" for name, n in zip(names, counts, strict=True) for i in range(n))


def fio(directory: str | Path, jobs: list[str], *extra: str, cwd: Path) -> list[dict[str, object]]:
    """Run fio's ``jobs`` on files in ``directory``; return its per-job JSON results.

    fio seeds each job by its place in the list, so ``--verify_only`` must get the same ``jobs``
    list as the run that wrote them.

    Fails the test when fio exits non-zero or any job reports an error (a verify failure is EILSEQ,
    84), with fio's own messages.
    """
    argv = ["fio", f"--directory={directory}", *FIO_OPTIONS, *extra, *jobs]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=FIO_TIMEOUT, cwd=cwd, check=False)
    out = result.stdout
    start = out.find("{")  # fio's messages, then the JSON
    assert result.returncode == 0, f"{' '.join(argv)}: exit {result.returncode}\n{result.stderr}{out[: max(start, 0)]}"
    results: list[dict[str, object]] = json.loads(out[start:])["jobs"]
    errors = [(j["jobname"], j["error"]) for j in results if j["error"]]
    assert errors == [], f"fio jobs with errors (84 is a verify failure): {errors}\n{result.stderr}"
    assert len(results) == len(_files(jobs))
    return results


def _read_bytes(results: list[dict[str, object]]) -> list[int]:
    return [int(j["read"]["io_bytes"]) for j in results]  # type: ignore[index]


def test_fio_verifies_lower_files_it_copies_up_and_the_kernel_reads_them_back(tmp_path: Path) -> None:
    lower, upper, work, mnt = (tmp_path / d for d in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    # the lower layer, made by fio in a plain directory: its own layout of the MIXED jobs' files,
    # and the WRITTEN jobs' files written with a checksum in every block
    fio(lower, MIXED, "--create_only=1", cwd=tmp_path)
    fio(lower, WRITTEN, cwd=tmp_path)
    assert sorted(os.listdir(lower)) == sorted(_files(WRITTEN) + _files(MIXED))
    lower_hash = tree_hash(str(lower))

    with pylayerfs_mount(str(mnt), [str(lower)], str(upper), str(work)):
        # every block of the lower files read back through the mount and checked
        results = fio(mnt, WRITTEN, "--verify_only=1", cwd=tmp_path)
        assert _read_bytes(results) == [FIO_SIZE] * len(results)
        # random and sequential reads and writes on lower files, copied up as each job opens its file
        results = fio(mnt, MIXED, cwd=tmp_path)
        assert all(int(j["write"]["io_bytes"]) > 0 for j in results)  # type: ignore[index]
        assert set(_files(MIXED)) <= set(os.listdir(upper))
        assert all(os.stat(mnt / f).st_size == FIO_SIZE for f in _files(MIXED))
    assert tree_hash(str(lower)) == lower_hash, "fio through the mount changed the lower layer"

    # the kernel's overlayfs over the same layers reads back every block pylayerfs wrote
    work.rename(tmp_path / "work.pylayerfs")
    work.mkdir()
    with kernel_mount(str(tmp_path / "kmnt"), [str(lower)], str(upper), str(work)) as kmnt:
        for jobs in (WRITTEN, MIXED):
            results = fio(kmnt, jobs, "--verify_only=1", cwd=tmp_path)
            assert all(n > 0 for n in _read_bytes(results))


def test_fio_lays_out_new_files_on_the_mount_and_verifies_them(tmp_path: Path) -> None:
    """fio's own layout on the mount: it sizes each new file with ftruncate(fd) (issue 12 item 1)."""
    lower = build(str(tmp_path / "lower"), {"data/keep": "kept"})
    upper, work, mnt = (tmp_path / d for d in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        d.mkdir()
    with pylayerfs_mount(str(mnt), [lower], str(upper), str(work)):
        results = fio(mnt / "data", MIXED, cwd=tmp_path)
        assert all(int(j["write"]["io_bytes"]) > 0 for j in results)  # type: ignore[index]
        assert sorted(os.listdir(mnt / "data")) == sorted(["keep", *_files(MIXED)])
    work.rename(tmp_path / "work.pylayerfs")
    work.mkdir()
    with kernel_mount(str(tmp_path / "kmnt"), [lower], str(upper), str(work)) as kmnt:
        fio(f"{kmnt}/data", MIXED, "--verify_only=1", cwd=tmp_path)


# -- stress-ng ----------------------------------------------------------------------------------

STRESSORS = ("dir", "rename", "link", "symlink", "chmod", "xattr", "dentry")
STRESS_SECONDS = 20  # all of them at once; a link or symlink round (8,192 names) may run past it
FD_SLACK = 8  # open fds the daemon may keep above its start (caches of directories that still exist)


def daemon_pid(mnt: str | Path) -> int:
    """The pid of the daemon serving the pylayerfs mount on ``mnt``, from its mount record."""
    real = os.path.realpath(mnt)
    entry = [e for e in mountinfo() if e.mountpoint == real and e.fstype == FSTYPE][-1]
    with open(os.path.join(records_dir(), f"{entry.mount_id}.json"), encoding="utf-8") as f:
        return int(json.load(f)["pid"])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (exists and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(240)
def test_stress_ng_file_system_stressors(tmp_path: Path) -> None:
    # the stressors work in new directories below t/, a directory of the lower layer
    lower = build(str(tmp_path / "lower"), {"t/keep/f": "kept", "t/x": "x", "other/y": "y"})
    upper, work, mnt = (tmp_path / d for d in ("upper", "work", "mnt"))
    for d in (upper, work, mnt):
        d.mkdir()
    lower_hash = tree_hash(lower)
    with pylayerfs_mount(str(mnt), [lower], str(upper), str(work)):
        pid = daemon_pid(mnt)
        view(str(mnt))  # the ordinary working set: every directory looked up once
        fds_before = open_fds(pid)
        argv = ["stress-ng", "--temp-path", str(mnt / "t"), "--timeout", f"{STRESS_SECONDS}s", "--verify"]
        for stressor in STRESSORS:
            argv += [f"--{stressor}", "1"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=STRESS_SECONDS * 6, check=False)
        output = result.stdout + result.stderr
        failures = [line for line in output.splitlines() if " fail: " in line or " error: " in line]
        assert (result.returncode, failures) == (0, []), output[-4000:]
        assert "successful run completed" in output
        assert alive(pid), "the daemon died under stress-ng"
        merged = view(str(mnt))
        fds_after = open_fds(pid)
        assert fds_after <= fds_before + FD_SLACK, f"the daemon's open fds: {fds_before} before, {fds_after} after"
        assert sorted(os.listdir(mnt)) == ["other", "t"] and open(mnt / "t/keep/f").read() == "kept"
    assert tree_hash(lower) == lower_hash, "stress-ng through the mount changed the lower layer"
    work.rename(tmp_path / "work.pylayerfs")
    work.mkdir()
    with kernel_mount(str(tmp_path / "kmnt"), [lower], str(upper), str(work)) as kmnt:
        assert view(kmnt) == merged, "the kernel's overlayfs shows pylayerfs's upper differently"
