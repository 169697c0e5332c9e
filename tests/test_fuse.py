"""Through a real FUSE mount: the CLI, the semantics as programs see them, and the safety promises."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from tests.mounts import PYLAYERFS, force_unmount, options, pylayerfs_mount, run_pylayerfs
from tests.trees import WHITEOUT, build, tree_hash, view

pytestmark = pytest.mark.fuse


@pytest.fixture
def stack(tmp_path):
    lowers = [
        build(str(tmp_path / "l1"), {"d/a": "top a", "f": "top f", "gone": WHITEOUT}),
        build(str(tmp_path / "l2"), {"d/a": "low a", "d/b": "low b", "gone": "hidden", "big": "x" * 100000}),
    ]
    upper, work, mnt = (str(tmp_path / n) for n in ("u", "w", "m"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    hashes = [tree_hash(d) for d in lowers]
    yield lowers, upper, work, mnt
    assert [tree_hash(d) for d in lowers] == hashes, "a lower layer was modified"


def test_mount_shows_merged_view_and_umount_stops_daemon(stack):
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work):
        assert sorted(os.listdir(mnt)) == ["big", "d", "f"]
        assert sorted(os.listdir(f"{mnt}/d")) == ["a", "b"]
        assert open(f"{mnt}/d/a").read() == "top a"
        daemons = subprocess.run(["pgrep", "-f", f"pylayerfs mount .*{mnt}"], capture_output=True, text=True)
        pids = [int(pid) for pid in daemons.stdout.split()]
        assert pids, "the daemon runs in the background"
    deadline = time.monotonic() + 10
    while not all(_exited(pid) for pid in pids):
        assert time.monotonic() < deadline, f"daemon {pids} still running 10 s after the unmount"
        time.sleep(0.01)
    assert not subprocess.run(["pgrep", "-f", f"pylayerfs mount .*{mnt}"], capture_output=True).stdout


def _exited(pid: int) -> bool:
    """Whether process ``pid`` is gone or a zombie (it has exited; its new parent may not have reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_writes_copy_up_and_removals_leave_whiteouts(stack):
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work):
        with open(f"{mnt}/d/a", "a") as f:
            f.write("+")
        os.unlink(f"{mnt}/f")
        os.mkdir(f"{mnt}/new")
        with open(f"{mnt}/new/file", "w") as f:
            f.write("hello")
        assert open(f"{mnt}/d/a").read() == "top a+"
        assert sorted(os.listdir(mnt)) == ["big", "d", "new"]
        os.rename(f"{mnt}/d/b", f"{mnt}/d/c")
        with pytest.raises(OSError) as exc:
            os.rename(f"{mnt}/d", f"{mnt}/e")
        assert exc.value.errno == errno.EXDEV
        with pytest.raises(PermissionError):
            os.mknod(f"{mnt}/wh", stat.S_IFCHR, 0)
    st = os.lstat(f"{upper}/f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert open(f"{upper}/d/a").read() == "top a+"


def test_readdir_inodes_match_lstat(stack):
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work):
        open(f"{mnt}/d/up", "w").close()
        for d in (mnt, f"{mnt}/d"):
            for entry in os.scandir(d):
                st = os.lstat(entry.path)
                assert entry.inode() == st.st_ino
        inos = [os.lstat(os.path.join(d, n)).st_ino for d in (mnt, f"{mnt}/d") for n in os.listdir(d)]
        assert len(inos) == len(set(inos)), "st_ino must be unique within the mount"
        assert {".", ".."} <= set(subprocess.run(["ls", "-a", mnt], capture_output=True, text=True).stdout.split())


def test_hard_links_stay_coherent_through_the_kernel_caches(stack):
    """libfuse gives each name its own kernel inode; what one name changes must show through the other."""
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work):
        os.stat(f"{mnt}/f")  # the kernel now caches f's attributes, with one link
        os.link(f"{mnt}/f", f"{mnt}/g")
        assert os.stat(f"{mnt}/f").st_nlink == 2
        with open(f"{mnt}/g", "a") as f:
            f.write(" and more")
        assert os.stat(f"{mnt}/f").st_size == len("top f and more")
        assert open(f"{mnt}/f").read() == "top f and more"
        os.chmod(f"{mnt}/f", 0o600)
        assert stat.S_IMODE(os.stat(f"{mnt}/g").st_mode) == 0o600
        os.unlink(f"{mnt}/g")
        assert os.stat(f"{mnt}/f").st_nlink == 1


def test_programs_run_from_a_lower_layer(tmp_path):
    """exec(2) opens with the kernel's own __FMODE_EXEC flag; openat2 must not see it (it refuses unknown bits)."""
    lower = tmp_path / "l"
    lower.mkdir()
    program = lower / "true"
    program.write_bytes(open("/bin/true", "rb").read())
    program.chmod(0o755)
    upper, work, mnt = (str(tmp_path / n) for n in ("u", "w", "m"))
    for d in (upper, work):
        os.makedirs(d)
    with pylayerfs_mount(mnt, [str(lower)], upper, work):
        assert subprocess.run([f"{mnt}/true"], timeout=30).returncode == 0


def test_read_only_mount(stack):
    lowers, _, _, mnt = stack
    with pylayerfs_mount(mnt, lowers):
        assert open(f"{mnt}/f").read() == "top f"
        for call in (lambda: open(f"{mnt}/f", "a"), lambda: os.mkdir(f"{mnt}/x"), lambda: os.unlink(f"{mnt}/f")):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.EROFS


def test_symlink_in_lower_layer_cannot_escape(tmp_path):
    host = build(str(tmp_path / "host"), {"secret": "host data"})
    lowers = [build(str(tmp_path / "l1"), {"a/mine": "x"}), build(str(tmp_path / "l2"), {"a": ("symlink", host)})]
    mnt, upper, work = str(tmp_path / "m"), str(tmp_path / "u"), str(tmp_path / "w")
    os.makedirs(upper)
    os.makedirs(work)
    with pylayerfs_mount(mnt, lowers, upper, work):
        assert os.listdir(f"{mnt}/a") == ["mine"]
        with pytest.raises(FileNotFoundError):
            os.stat(f"{mnt}/a/secret")
        with open(f"{mnt}/a/secret", "w") as f:  # a new file of the merged directory: it goes to upper
            f.write("mine")
    assert open(f"{upper}/a/secret").read() == "mine"
    assert os.listdir(host) == ["secret"] and open(f"{host}/secret").read() == "host data"


def test_remount_keeps_every_change(stack):
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work):
        os.unlink(f"{mnt}/f")
        open(f"{mnt}/f2", "w").close()
        os.rename(f"{mnt}/d/a", f"{mnt}/a2")  # out of d: a copy-up, then a whiteout for d/a
        os.link(f"{mnt}/big", f"{mnt}/big2")
        os.symlink("target", f"{mnt}/gone")  # over a lower whiteout
        os.unlink(f"{mnt}/d/b")
        os.rmdir(f"{mnt}/d")  # a merged directory of both lowers, now empty: a whiteout replaces it
        before = view(mnt, with_ino=True)
        assert sorted(before) == ["a2", "big", "big2", "f2", "gone"]
    st = os.lstat(f"{upper}/d")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "the removed directory is a whiteout in the upper"
    with pylayerfs_mount(mnt, lowers, upper, work):
        assert view(mnt, with_ino=True) == before


def test_concurrent_appenders_copy_up_once(stack):
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work):
        fds = [os.open(f"{mnt}/f", os.O_WRONLY | os.O_APPEND) for _ in range(2)]

        def append(fd, tag):
            for i in range(200):
                os.write(fd, f"{tag}{i};".encode())

        threads = [threading.Thread(target=append, args=(fd, tag)) for fd, tag in zip(fds, "AB", strict=False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fd in fds:
            os.close(fd)
        data = open(f"{mnt}/f").read()
    assert data.startswith("top f")
    parts = data[len("top f") :].rstrip(";").split(";")
    assert sorted(parts) == sorted([f"A{i}" for i in range(200)] + [f"B{i}" for i in range(200)])


def test_sigkill_during_copy_up_never_shows_a_partial_file(tmp_path):
    """The daemon dies in the middle of a copy-up: the upper never holds part of the file; the next mount
    empties the workdir and shows the lower's bytes.

    The test proves the kill landed mid-copy: it waits for a partly written temporary file in ``W/work``,
    stops the daemon there (SIGSTOP) and checks the copy is still partial and nothing is in the upper,
    then kills it (SIGKILL) and checks the partial file is still the only trace.
    """
    size = 64 << 20  # real data (no holes): a copy of many splice rounds, each a chance to stop it
    lower = str(tmp_path / "l")
    os.makedirs(lower)
    lower_digest = _random_file(f"{lower}/huge", size)
    lower_hash = tree_hash(lower)
    upper, work, mnt = str(tmp_path / "u"), str(tmp_path / "w"), str(tmp_path / "m")
    for d in (upper, work, mnt):
        os.makedirs(d)
    daemon = subprocess.Popen([*PYLAYERFS, "mount", "-f", "-o", options([lower], upper, work), mnt])
    writer: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline and daemon.poll() is None, "the daemon did not mount"
            time.sleep(0.01)
        writer = subprocess.Popen(["sh", "-c", f"echo x >> {mnt}/huge"], stderr=subprocess.DEVNULL)
        in_progress = _stop_mid_copy(daemon.pid, work, size)
        assert len(in_progress) == 1, f"one copy-up under way in the workdir: {in_progress}"
        [(name, copied)] = in_progress.items()
        assert name.startswith("#") and 0 < copied < size, f"the copy-up had finished when the daemon stopped: {name}"
        assert not os.path.lexists(f"{upper}/huge")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=10)
        assert writer.wait(timeout=10) != 0, "the writer's open never completed"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)
        if writer is not None and writer.poll() is None:
            writer.kill()
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    assert _temp_sizes(work) == in_progress, "the kill left the partial copy where it was, in the workdir"
    assert not os.path.lexists(f"{upper}/huge"), "no partial file in the upper"
    with pylayerfs_mount(mnt, [lower], upper, work):
        assert os.listdir(f"{work}/work") == [], "stale workdir contents are cleaned at mount"
        with open(f"{mnt}/huge", "rb") as f:
            assert hashlib.file_digest(f, "sha256").digest() == lower_digest, "the lower's bytes"
    assert not os.path.lexists(f"{upper}/huge")
    assert tree_hash(lower) == lower_hash


def _random_file(path: str, size: int) -> bytes:
    """Write ``size`` random bytes (real data, no holes: copying them takes a while); return their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    return digest.digest()


def _stop_mid_copy(pid: int, work: str, size: int) -> dict[str, int]:
    """Wait until a copy-up has written part of its ``size`` bytes in the workdir, stop (SIGSTOP) daemon
    ``pid`` there and return the workdir's entries with their sizes, once it is stopped."""
    deadline = time.monotonic() + 20
    while not 0 < max(_temp_sizes(work).values(), default=0) < size:
        assert time.monotonic() < deadline, f"no partly copied file seen in {work}/work"
        time.sleep(0.0005)
    os.kill(pid, signal.SIGSTOP)
    while not _stopped(pid):
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.001)
    return _temp_sizes(work)


def _temp_sizes(work: str) -> dict[str, int]:
    """Each entry of the workdir's ``work/`` (copy-ups build ``#<pid>.<n>`` there) with its size."""
    sizes = {}
    for name in os.listdir(f"{work}/work"):
        with contextlib.suppress(FileNotFoundError):
            sizes[name] = os.lstat(f"{work}/work/{name}").st_size
    return sizes


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ("lowerdir=/nonexistent", "does not exist"),
        ("lowerdir={l},bogus=1", "unknown mount option"),
        ("lowerdir={l},upperdir={u}", "go together"),
        ("lowerdir={l},upperdir={u},workdir={u}/w", "separate subtrees"),
        ("lowerdir={l},upperdir={u},workdir=/dev/shm", "same filesystem"),
        ("lowerdir={l},index=on", "not supported"),
        ("lowerdir={l},redirect_dir=bogus", "redirect_dir needs on, follow, nofollow or off"),
        ("lowerdir={l},metacopy=on,redirect_dir=off", "conflicting options: metacopy=on,redirect_dir=follow"),
        ("lowerdir={l},userxattr,redirect_dir=on", "conflicting options: userxattr,redirect_dir=on"),
        ("lowerdir={l},userxattr,metacopy=on", "conflicting options: userxattr,metacopy=on"),
        # overlapping layers: a write through the mount would change a lower layer (the kernel: ELOOP)
        ("lowerdir={l}:{l}", "are the same directory"),
        ("lowerdir={l}/sub:{l}", "overlap"),
        ("lowerdir={l},upperdir={l},workdir={w}", "are the same directory"),
        ("lowerdir={l}/sub,upperdir={l},workdir={w}", "overlap"),
        ("lowerdir={l},upperdir={l}/sub,workdir={w}", "overlap"),  # the kernel accepts this one
        ("lowerdir={u}/w/x,upperdir={l},workdir={u}", "overlap"),
    ],
)
def test_bad_mount_requests_fail_with_one_line(tmp_path, opts, message):
    lower, upper, work, mnt = str(tmp_path / "l"), str(tmp_path / "u"), str(tmp_path / "w"), str(tmp_path / "m")
    for d in (f"{lower}/sub", f"{upper}/w/x", work, mnt):
        os.makedirs(d)
    before = {d: sorted(os.listdir(d)) for d in (lower, upper, work)}
    result = run_pylayerfs("mount", "-o", opts.format(l=lower, u=upper, w=work), mnt, check=False)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(mnt) and {d: sorted(os.listdir(d)) for d in before} == before


def test_mountpoint_inside_a_layer_and_upper_in_use_are_refused(stack):
    lowers, upper, work, mnt = stack
    inside = f"{lowers[0]}/d"
    result = run_pylayerfs("mount", "-o", options(lowers, None, None), inside, check=False)
    assert result.returncode != 0 and "inside the layer" in result.stderr
    with pylayerfs_mount(mnt, lowers, upper, work):
        other = mnt + "2"
        os.makedirs(other)
        result = run_pylayerfs("mount", "-o", options(lowers, upper, work), other, check=False)
        assert result.returncode != 0 and "in use" in result.stderr
        assert not os.path.ismount(other)


def test_mount_helper_syntax(stack):
    """``mount -t fuse.pylayerfs`` runs ``pylayerfs SOURCE MOUNTPOINT -o OPTIONS`` with generic options."""
    lowers, upper, work, mnt = stack
    result = subprocess.run(
        ["mount", "-t", "fuse.pylayerfs", "overlay", mnt, "-o", "rw,noatime,nodev," + options(lowers, upper, work)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(mnt)) == ["big", "d", "f"]
    finally:
        run_pylayerfs("umount", mnt, check=False)


def test_adapter_answers_eio_on_a_bug(caplog):
    from pylayerfs.fuse.adapter import FuseOperations

    class Broken:
        def getattr(self, path, fh):
            raise KeyError("bug")

    ops = FuseOperations(Broken())  # type: ignore[arg-type]
    with pytest.raises(OSError) as exc:
        ops.getattr("/x")
    assert exc.value.errno == errno.EIO
    assert "KeyError" in caplog.text


def test_demo_runs_on_real_layers(tmp_path):
    result = run_pylayerfs("demo", "--overlay", "--dir", str(tmp_path / "demo"))
    assert "whiteout (char 0/0)" in result.stdout
    assert "/cache/fresh" in result.stdout and "/cache/a.tmp        file" in result.stdout  # lower shows it
    assert "welcome to the app\\ntuned" in result.stdout
    assert not os.path.ismount(tmp_path / "demo/merged")


def test_mountpoint_with_space_and_non_ascii_name(stack):
    """mountinfo escapes the space as \\040: mount, refuse a second mount, and unmount must all see it."""
    lowers, _, _, mnt = stack
    odd = os.path.join(mnt, "sp ace é")
    os.makedirs(odd)
    with pylayerfs_mount(odd, lowers):
        result = run_pylayerfs("mount", "-o", options(lowers, None, None), odd, check=False)
        assert result.returncode != 0 and "already a pylayerfs mountpoint" in result.stderr
    assert not os.path.ismount(odd)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_foreground_mount_stopped_by_a_signal_unmounts_and_exits_0(stack, sig):
    lowers, upper, work, mnt = stack
    daemon = subprocess.Popen([*PYLAYERFS, "mount", "-f", "-o", options(lowers, upper, work), mnt],
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.ismount(mnt)
        daemon.send_signal(sig)
        _, stderr = daemon.communicate(timeout=10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        if os.path.ismount(mnt):
            force_unmount(mnt)
    assert daemon.returncode == 0, stderr
    assert "could not mount" not in stderr and not os.path.ismount(mnt)
