"""The native FUSE transport (``-o binding=native``): what it does that the libfuse binding cannot.

The rest of the suite runs on either binding (``PYLAYERFS_BINDING=native``); these tests always use
the native one: the node table's lookup accounting (in-process, so the table can be read), one kernel
inode for every name of a hard link, a killed daemon, and a user who is not root mounting through
``fusermount3``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylayerfs.fuse.native import session as native
from pylayerfs.fuse.native.core import Request
from pylayerfs.fuse.native.protocol import BATCH_FORGET_IN, FORGET_ONE, IN_HEADER, MAX_READ, OUT_HEADER, READ_IN, Op
from pylayerfs.overlay.filesystem import Overlay
from tests.mounts import PYLAYERFS, _mounted, force_unmount, options, pylayerfs_mount, run_pylayerfs
from tests.test_nonroot import AS_NOBODY, _nobody_python, nobody_dirs  # noqa: F401 (a fixture)
from tests.trees import build

pytestmark = pytest.mark.fuse
NATIVE = "binding=native"


@pytest.fixture
def stack(tmp_path: Path) -> tuple[list[str], str, str, str]:
    lower = build(str(tmp_path / "l"), {"d/a": "low a", "f": "low f", "big": "x" * 100000})
    upper, work, mnt = (str(tmp_path / n) for n in ("u", "w", "m"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    return [lower], upper, work, mnt


@contextlib.contextmanager
def in_process(stack: tuple[list[str], str, str, str], timeout: float = 86400.0) -> Iterator[native.Session]:
    """A native mount served by a thread of this process: yields its session (the node table is readable)."""
    lowers, upper, work, mnt = stack
    sessions: list[native.Session] = []
    ready = threading.Event()
    overlay = Overlay(lowers, upper, work)
    thread = threading.Thread(
        target=native.serve,
        args=(overlay, mnt),
        kwargs={"fsname": "pylayerfs-test", "options": [], "allow_other": True, "default_permissions": True,
                "timeout": timeout, "on_ready": ready.set, "on_session": sessions.append},
        daemon=True,
    )  # fmt: skip
    thread.start()
    try:
        assert ready.wait(10), "the in-process mount did not become ready"
        yield sessions[0]
    finally:
        force_unmount(mnt)
        thread.join(10)
        assert not thread.is_alive(), "the session did not end at unmount"


def _drop_kernel_caches() -> None:
    """Make the kernel evict unused dentries and inodes: it sends FORGET for every node it lets go."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def _wait_for(predicate: object, seconds: float = 10.0, *, dropping: bool = False) -> bool:
    """Poll ``predicate()`` until it holds (True) or ``seconds`` pass (False); ``dropping``: drop caches each time
    (a RELEASE or FORGET the kernel sends late may keep an inode from the first drop)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dropping:
            _drop_kernel_caches()
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(predicate())  # type: ignore[operator]


@pytest.mark.root
def test_forget_returns_the_node_table_to_its_size_after_many_lookups_of_changing_names(stack):
    mnt = stack[3]
    with in_process(stack) as session:
        os.stat(f"{mnt}/d/a")
        assert _wait_for(lambda: len(session.nodes) == 1, dropping=True), f"only the root left: {len(session.nodes)}"
        for i in range(2000):
            with open(f"{mnt}/n{i}", "w") as f:
                f.write(str(i))
            os.stat(f"{mnt}/n{i}")
            os.rename(f"{mnt}/n{i}", f"{mnt}/d/m{i}")
            os.stat(f"{mnt}/d/m{i}")
            os.stat(f"{mnt}/f")
            if i % 2:
                os.unlink(f"{mnt}/d/m{i}")
        assert len(os.listdir(f"{mnt}/d")) == 1001
        held = os.open(f"{mnt}/d/m0", os.O_RDONLY)  # an open file keeps its node
        try:
            assert _wait_for(lambda: len(session.nodes) <= 3, dropping=True), f"{len(session.nodes)} nodes left"
            assert session.nodes.at("d/m0") is not None and session.nodes.at("d/m2") is None
        finally:
            os.close(held)
        assert _wait_for(lambda: len(session.nodes) == 1, dropping=True), f"{len(session.nodes)} nodes left"
        assert open(f"{mnt}/d/m1998").read() == "1998"


@pytest.mark.root
def test_a_removed_object_is_held_while_the_kernel_knows_it_and_let_go_when_forgotten(stack):
    """An O_PATH descriptor keeps a removed file's node: the session holds its object until FORGET, then lets go."""
    mnt = stack[3]
    with in_process(stack) as session:
        Path(f"{mnt}/up").write_text("old")
        fds = [os.open(f"{mnt}/{name}", os.O_PATH) for name in ("up", "f", "d/a")]
        Path(f"{mnt}/tmp").write_text("new")
        os.rename(f"{mnt}/tmp", f"{mnt}/up")
        os.unlink(f"{mnt}/f")
        os.unlink(f"{mnt}/d/a")
        try:
            assert len(session._held) == 3
            assert [os.fstat(fd).st_nlink for fd in fds] == [0, 1, 1], "upper unlinked, lower ones as in their layer"
            with open(f"/proc/self/fd/{fds[0]}") as f:
                assert f.read() == "old", "the replaced object, not the name's new one"
            assert _wait_for(lambda: len(session.ov.files._by_fh) == 3), "three holds (the reopened file released)"
        finally:
            for fd in fds:
                os.close(fd)
        assert _wait_for(lambda: not session._held and len(session.nodes) == 1, dropping=True), session._held
        assert not session.ov.files._by_fh, "every hold released"


def test_batch_forget_counts_every_node_of_the_batch():
    """BATCH_FORGET (sent by the kernel when it drops many nodes at once) takes each node's count off."""
    from pylayerfs.fuse.native.nodes import NodeTable

    class Fake:
        nodes = NodeTable(100)

    table = Fake.nodes
    a, b = table.found("a", 5), table.found("b", 6)
    table.found("a", 5)
    payload = BATCH_FORGET_IN.pack(2, 0) + FORGET_ONE.pack(a.nodeid, 2) + FORGET_ONE.pack(b.nodeid, 1)
    session = object.__new__(native.Session)
    session.nodes = table
    request = Request(Op.BATCH_FORGET, 1, 0, 0, 0, 0)
    session._batch_forget(request, memoryview(payload))
    assert len(table) == 1 and table.at("a") is None and table.at("b") is None
    assert IN_HEADER.size == 40


def test_every_name_of_a_hard_link_is_one_kernel_inode(stack):
    """One node per object: a change through one name shows at once through the other, and locks (which the
    kernel keeps per inode) conflict across names. The libfuse binding gives each name an inode of its own."""
    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work, extra=NATIVE):
        os.link(f"{mnt}/f", f"{mnt}/g")
        os.stat(f"{mnt}/g")  # both names cached, attributes for a day
        os.chmod(f"{mnt}/f", 0o604)
        assert stat.S_IMODE(os.lstat(f"{mnt}/g").st_mode) == 0o604
        with open(f"{mnt}/f", "a") as f:
            f.write("+")
        assert os.lstat(f"{mnt}/g").st_size == len("low f+")
        with open(f"{mnt}/f") as one, open(f"{mnt}/g") as other:
            fcntl.flock(one, fcntl.LOCK_EX)
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(f"{mnt}/f", f"{mnt}/d/h")
        os.chmod(f"{mnt}/d/h", 0o640)
        assert stat.S_IMODE(os.lstat(f"{mnt}/g").st_mode) == 0o640
        os.unlink(f"{mnt}/g")
        assert os.lstat(f"{mnt}/d/h").st_nlink == 1
        assert open(f"{mnt}/d/h").read() == "low f+"


def _daemon_pid(mnt: str) -> int:
    """The pid of the daemon serving ``mnt``, from its mount record."""
    from pylayerfs.fuse.mount import records_dir

    real = os.path.realpath(mnt)
    for name in os.listdir(records_dir()):
        with contextlib.suppress(OSError, ValueError), open(os.path.join(records_dir(), name)) as f:
            record = json.load(f)
            if record["mountpoint"] == real:
                return int(record["pid"])
    raise AssertionError(f"no record for {mnt}")


def test_a_killed_daemon_leaves_enotconn_that_umount_clears(stack):
    lowers, upper, work, mnt = stack
    run_pylayerfs("mount", "-o", options(lowers, upper, work, NATIVE), mnt)
    try:
        assert open(f"{mnt}/f").read() == "low f"
        os.kill(_daemon_pid(mnt), signal.SIGKILL)
        assert _wait_for(lambda: not _stat_works(mnt)), "the mount still answers after its daemon died"
        with pytest.raises(OSError) as exc:
            os.stat(f"{mnt}/f")
        assert exc.value.errno == errno.ENOTCONN
        explained = run_pylayerfs("explain", f"{mnt}/f", check=False)  # its record is stale: never believed
        assert explained.returncode != 0 and "left no record" in explained.stderr, explained.stderr
        result = run_pylayerfs("umount", mnt, check=False)
        assert result.returncode == 0, result.stderr
        assert not _mounted(mnt)
        with pylayerfs_mount(mnt, lowers, upper, work, extra=NATIVE):  # the upper and workdir are free again
            assert open(f"{mnt}/f").read() == "low f"
    finally:
        force_unmount(mnt)


def _stat_works(path: str) -> bool:
    try:
        os.stat(os.path.join(path, "f"))
    except OSError:
        return False
    return True


def _nobody_script(top: str, python: str, pythonpath: str, fuse_mode: str) -> str:
    q = shlex.quote
    mnt, lower, upper, work = (q(f"{top}/{d}") for d in ("m", "l", "u", "w"))
    nobody = " ".join([*AS_NOBODY, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={q(pythonpath)}",
                       "PYLAYERFS_BINDING=native", q(python), "-m", "pylayerfs"])  # fmt: skip
    as_nobody = " ".join(AS_NOBODY)
    return f"""
set -u
trap 'fusermount3 -uz {mnt} 2>/dev/null' EXIT
mount -t tmpfs -o mode=755 none {q(top)}/dev || exit 90
mknod -m {fuse_mode} {q(top)}/dev/fuse c 10 229 && mount --bind {q(top)}/dev/fuse /dev/fuse || exit 91
{nobody} mount -o lowerdir={lower},upperdir={upper},workdir={work},noallow_other {mnt}; echo "rc=$?"
grep " {top}/m " /proc/self/mountinfo
{as_nobody} cat {mnt}/f
{as_nobody} sh -c 'echo written > {mnt}/new && cat {mnt}/new'
{nobody} umount {mnt}; echo "umount rc=$?"
grep -c " {top}/m " /proc/self/mountinfo
"""


@pytest.mark.root
@pytest.mark.parametrize("fuse_mode", ["666", "600"])
def test_a_user_mounts_through_fusermount3(nobody_dirs, fuse_mode):  # noqa: F811 (the imported fixture)
    top = nobody_dirs
    for d in ("u", "w"):
        os.mkdir(f"{top}/{d}")
        os.chown(f"{top}/{d}", 65534, 65534)
    python, pythonpath = _nobody_python()
    script = _nobody_script(top, python, pythonpath, fuse_mode)
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode not in (90, 91), result.stderr
    if fuse_mode == "600":
        assert "rc=1" in result.stdout, result.stdout
        errors = [line for line in result.stderr.splitlines() if line.startswith("pylayerfs:")]
        assert errors and "/dev/fuse is not readable and writable for this user" in errors[0], result.stderr
        assert "Traceback" not in result.stderr
        return
    assert "rc=0" in result.stdout, (result.stdout, result.stderr)
    assert "fuse.pylayerfs" in result.stdout and "user_id=65534" in result.stdout, result.stdout
    assert "hello from nobody's layer" in result.stdout and "written" in result.stdout, result.stderr
    assert "umount rc=0" in result.stdout and result.stdout.rstrip().endswith("0"), result.stdout
    assert os.stat(f"{top}/u/new").st_uid == 65534


def _listings(session: native.Session) -> int:
    return session.counts[Op.READDIR] + session.counts[Op.READDIRPLUS]


@pytest.mark.root
def test_the_kernel_keeps_listings_and_every_change_through_the_mount_shows(stack):
    """OPENDIR is answered ENOSYS once, then never sent again (nor RELEASEDIR): the kernel caches every listing
    (FOPEN_CACHE_DIR), so a second listing costs no READDIR; a listing longer than one READDIR reply is read
    whole without a handle; a change made through the mount (create, unlink, rename in and out and within,
    mkdir, rmdir, link) is seen by the very next listing, also through a directory fd opened before it."""
    mnt = stack[3]
    with in_process(stack) as session:
        for i in range(300):
            open(f"{mnt}/d/n{i}", "w").close()
        expected = {"a", *(f"n{i}" for i in range(300))}
        assert set(os.listdir(f"{mnt}/d")) == expected
        served = _listings(session)
        assert served > 1, "300 entries take more than one READDIR reply"
        assert set(os.listdir(f"{mnt}/d")) == expected
        assert _listings(session) == served, "the second listing came from the kernel's cache"
        held = os.open(f"{mnt}/d", os.O_RDONLY | os.O_DIRECTORY)  # a directory fd opened before the changes
        os.unlink(f"{mnt}/d/n7")
        os.rename(f"{mnt}/f", f"{mnt}/d/f")
        os.rename(f"{mnt}/d/a", f"{mnt}/a")
        os.rename(f"{mnt}/d/n8", f"{mnt}/d/m8")
        os.mkdir(f"{mnt}/d/sub")
        os.mkdir(f"{mnt}/d/gone")
        os.rmdir(f"{mnt}/d/gone")
        os.link(f"{mnt}/big", f"{mnt}/d/big2")
        open(f"{mnt}/d/new", "w").close()
        expected = (expected - {"n7", "a", "n8"}) | {"f", "sub", "new", "m8", "big2"}
        assert set(os.listdir(f"{mnt}/d")) == expected
        assert set(os.listdir(held)) == expected  # fdopendir + rewind: the same cache, up to date
        os.close(held)
        assert set(os.listdir(mnt)) == {"a", "d", "big"}
        assert session.counts[Op.OPENDIR] == 1 and session.counts[Op.RELEASEDIR] == 0, session.counts


@pytest.mark.root
def test_with_caching_off_every_listing_is_read_from_the_layers(stack):
    """``timeout=0``: directories get a handle without FOPEN_CACHE_DIR, so a name added to the upper layer
    underneath the mount shows in the next listing, even with the directory's mtime put back (the kernel's
    cache of listings, checked against mtime, would not see the change)."""
    _, upper, _, mnt = stack
    os.mkdir(f"{upper}/d")  # d is merged: its attributes are the upper directory's
    with in_process(stack, timeout=0) as session:
        assert set(os.listdir(f"{mnt}/d")) == {"a"}
        before = os.stat(f"{upper}/d")
        open(f"{upper}/d/under", "w").close()  # underneath the mount
        os.utime(f"{upper}/d", ns=(before.st_atime_ns, before.st_mtime_ns))
        session.ov.listings.forget("d/under")  # the engine's cache of listings knows nothing of it either
        assert set(os.listdir(f"{mnt}/d")) == {"a", "under"}
        assert session.counts[Op.OPENDIR] == 2
        assert _wait_for(lambda: session.counts[Op.RELEASEDIR] == 2), "RELEASEDIR follows every close"


def _passthrough_expected() -> bool:
    """Does this kernel pass open files through (Linux 6.9, protocol 7.40, CONFIG_FUSE_PASSTHROUGH)?"""
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    return release >= (6, 9) and os.geteuid() == 0


@pytest.mark.root
@pytest.mark.parametrize("option", ["on", "off"])
def test_passthrough_option_says_whether_writes_reach_the_daemon(stack, tmp_path, option):
    """``-o passthrough=off`` makes the daemon serve every write; ``-o debug`` logs which is in use."""
    if not _passthrough_expected():
        pytest.skip("passthrough needs Linux 6.9 and CAP_SYS_ADMIN")
    lowers, upper, work, mnt = stack
    log = tmp_path / "daemon.log"
    with pylayerfs_mount(mnt, lowers, upper, work, f"{NATIVE},passthrough={option},debug,logfile={log}"):
        Path(f"{mnt}/new").write_bytes(b"x" * 4096)
    text = log.read_text()
    writes = re.search(r"requests served \(.*\bWRITE (\d+)", text)
    if option == "off":
        assert "passthrough is off" in text and writes is not None and int(writes.group(1)) >= 1
    else:
        assert "passthrough is off" not in text and writes is None, "no WRITE served"
    bad = run_pylayerfs("mount", "-o", f"lowerdir={lowers[0]},passthrough=maybe", mnt, check=False)
    assert bad.returncode == 1 and bad.stderr == "pylayerfs: passthrough needs on or off, not 'maybe'\n"
    bad = subprocess.run([*PYLAYERFS, "mount", "-o", f"lowerdir={lowers[0]}", mnt], capture_output=True, text=True,
                         env={**os.environ, "PYLAYERFS_PASSTHROUGH": "maybe"}, timeout=60, check=False)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr == "pylayerfs: PYLAYERFS_PASSTHROUGH=maybe is neither on nor off\n"
    assert not os.path.ismount(mnt)


@pytest.mark.root
def test_files_in_the_upper_layer_are_passed_through_and_stay_coherent_across_copy_up(stack):
    """Reads and writes of an upper file never reach the daemon (passthrough); a lower file is served, so an fd
    opened read-only before its copy-up reads what another fd writes after it; handles of one node share one
    backing file, and a node whose served handles are all closed is passed through again."""
    if not _passthrough_expected():
        pytest.skip("passthrough needs Linux 6.9 and CAP_SYS_ADMIN")
    mnt = stack[3]
    with in_process(stack) as session:
        assert session.negotiated is not None and session.negotiated.passthrough
        data = os.urandom(3 << 20)
        with open(f"{mnt}/new", "wb") as f:
            f.write(data)
        with open(f"{mnt}/new", "rb") as f, open(f"{mnt}/new", "r+b") as g:  # two handles, one backing file
            g.write(b"ABCD")
            g.flush()
            assert f.read() == b"ABCD" + data[4:]
        assert session.counts[Op.READ] == session.counts[Op.WRITE] == 0, "no READ or WRITE reached the daemon"
        reader = os.open(f"{mnt}/big", os.O_RDONLY)  # on the lower file: served
        try:
            assert os.pread(reader, 5, 0) == b"xxxxx"
            writer = os.open(f"{mnt}/big", os.O_WRONLY)  # copies it up; served too, the node has served handles
            os.pwrite(writer, b"12345", 0)
            os.close(writer)
            assert os.pread(reader, 6, 0) == b"12345x", "the fd opened before the copy-up reads the new data"
        finally:
            os.close(reader)
        served = session.counts[Op.READ]
        assert served > 0
        with open(f"{mnt}/big", "rb") as f:  # no served handle left: passed through to the upper copy
            assert f.read(6) == b"12345x"
        assert session.counts[Op.READ] == served
        nodes = list(session.nodes._by_id.values())
        assert _wait_for(lambda: all(node.backing == 0 for node in nodes)), "every backing file closed (RELEASE)"
    with open(f"{stack[1]}/new", "rb") as f:
        assert f.read() == b"ABCD" + data[4:]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.root
def test_a_served_file_is_read_in_reads_of_about_1_mib(stack):
    """Readahead raised after INIT (root writes the mount's read_ahead_kb) makes the kernel READ a served lower
    file in pieces of up to MAX_READ (1020 KiB), not its default 128 KiB: 8 MiB in a dozen READs, not 64; the
    bytes are the lower file's."""
    lowers, mnt = stack[0], stack[3]
    data = os.urandom(8 << 20)
    with open(f"{lowers[0]}/eight", "wb") as f:
        f.write(data)
    with in_process(stack) as session:
        fd = os.open(f"{mnt}/eight", os.O_RDONLY)
        try:
            assert _read_all(fd) == data
        finally:
            os.close(fd)
        reads = session.counts[Op.READ]
        assert len(data) // MAX_READ <= reads <= len(data) // MAX_READ + 4, f"{reads} READs for 8 MiB"


def test_a_reader_opened_before_copy_up_reads_what_is_written_after_it_in_large_reads(stack):
    """A served reader follows its file's copy-up: opened on the lower file, it reads (in spliced READs of about
    1 MiB) what a writer opened after it wrote, in pages it had cached and in pages it had not read yet."""
    lowers, mnt = stack[0], stack[3]
    data = os.urandom(6 << 20)
    with open(f"{lowers[0]}/six", "wb") as f:
        f.write(data)
    new = os.urandom(1 << 20)
    with in_process(stack) as session:
        reader = os.open(f"{mnt}/six", os.O_RDONLY)
        try:
            assert os.pread(reader, 1 << 20, 0) == data[: 1 << 20]
            writer = os.open(f"{mnt}/six", os.O_WRONLY)  # copies it up
            try:
                os.pwrite(writer, new, 5 << 20)
                os.pwrite(writer, b"head", 0)
            finally:
                os.close(writer)
            os.lseek(reader, 0, os.SEEK_SET)
            assert _read_all(reader) == b"head" + data[4 : 5 << 20] + new
        finally:
            os.close(reader)
        assert session.counts[Op.READ] >= 4, "the reader's data came from the daemon"
    with open(f"{stack[1]}/six", "rb") as f:
        assert f.read() == b"head" + data[4 : 5 << 20] + new


def test_served_reads_answer_with_the_real_file_bytes_at_any_offset_and_size(stack, monkeypatch):
    """READ replies, spliced (64 KiB and more, when the pipe holds them) or copied, at odd offsets and sizes,
    across page ends, at and past the end of the file, are the lower file's bytes; so is one whose splice comes
    short (the file shrank meanwhile: the reply is copied instead); a handle open only for writing answers
    EBADF. A pipe stands for the device."""
    lowers, upper, work, _ = stack
    data = os.urandom((3 << 20) + 123)
    with open(f"{lowers[0]}/odd", "wb") as f:
        f.write(data)
    device_r, device_w = os.pipe()
    fcntl.fcntl(device_w, fcntl.F_SETPIPE_SZ, 1 << 20)  # a whole reply fits: read after each request
    spliced: list[int] = []  # the replies spliced to the device, by length
    short = [False]
    splice = os.splice

    def counted(src: int, dst: int, count: int, *args: int) -> int:
        if short[0] and dst != device_w:
            return 0
        n = splice(src, dst, count, *args)
        if dst == device_w:
            spliced.append(n)
        return n

    monkeypatch.setattr(os, "splice", counted)
    overlay = Overlay(lowers, upper, work)
    session = native.Session(overlay, device_w, mountpoint="/nonexistent", timeout=1.0)

    def read(unique: int, fh: int, offset: int, size: int) -> bytes:
        arg = READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
        session._serve(memoryview(IN_HEADER.pack(IN_HEADER.size + len(arg), Op.READ, unique, 2, 0, 0, 1, 0, 0) + arg))
        reply = os.read(device_r, 2 << 20)
        length, error, answered = OUT_HEADER.unpack_from(reply)
        assert (length, answered) == (len(reply), unique), (offset, size)
        return reply[OUT_HEADER.size :] if not error else os.strerror(-error).encode()

    try:
        fh = overlay.open("odd", os.O_RDONLY)
        end = len(data)
        for offset, size in [(0, 4096), (1, 1), (4095, 2), (12345, 65536), (4096, 3 * 65536 + 7),
                             ((1 << 20) - 3, MAX_READ), (1 << 20, MAX_READ), (end - 100, 1 << 17),
                             (end - 70000, 1 << 17), (end, 4096), (end + 5000, 1 << 17)]:  # fmt: skip
            assert read(len(spliced), fh, offset, size) == data[offset : offset + size], (offset, size)
        assert MAX_READ + OUT_HEADER.size in spliced, "the page-aligned 1020 KiB READ was spliced"
        assert 70000 + OUT_HEADER.size in spliced, "the READ at the end of the file was spliced up to the end"
        short[0] = True
        assert read(1, fh, 8192, 1 << 18) == data[8192 : 8192 + (1 << 18)]
        short[0] = False
        assert read(2, fh, 0, 1 << 18) == data[: 1 << 18]
        assert spliced[-1] == OUT_HEADER.size + (1 << 18), "a new pipe after the short splice"
        assert read(3, overlay.open("f", os.O_WRONLY), 0, 1 << 17) == os.strerror(errno.EBADF).encode()
    finally:
        session._close_pipe()
        overlay.close()
        os.close(device_r)
        os.close(device_w)


def test_a_reply_whose_request_is_gone_takes_back_its_lookup_and_its_open_file(stack, monkeypatch):
    """Writing a reply fails with ENOENT when its request was interrupted meanwhile: the kernel took nothing from
    it, so neither the lookup counted for a CREATE's entry nor the file it opened may stay behind."""
    lowers, upper, work, _ = stack
    overlay = Overlay(lowers, upper, work)
    try:
        session = native.Session(overlay, -1, mountpoint="/nonexistent", timeout=1.0)

        def gone(fd: int, buffers: list[bytes]) -> int:
            raise FileNotFoundError(errno.ENOENT, "request gone")

        monkeypatch.setattr(os, "writev", gone)
        from pylayerfs.fuse.native.protocol import CREATE_IN

        arg = CREATE_IN.pack(os.O_WRONLY | os.O_CREAT, 0o100644, 0, 0) + b"created\0"
        header = IN_HEADER.pack(IN_HEADER.size + len(arg), Op.CREATE, 9, 1, 0, 0, 1, 0, 0)
        session._serve(memoryview(header + arg))
        assert len(session.nodes) == 1, "the entry's lookup was taken back"
        assert overlay.files._by_fh == {}, "the open file was released"
        assert os.path.exists(f"{upper}/created"), "the file itself was created, as the kernel's own create would"
    finally:
        overlay.close()


def _init_in(minor: int, flags: int, flags2: int = 0) -> bytes:
    return struct.pack("=IIIII44x", 7, minor, 131072, flags, flags2)


def test_init_takes_the_older_minor_and_only_the_flags_both_sides_have():
    from pylayerfs.fuse.native.protocol import INIT_OUT, Init, ProtocolError, negotiate

    everything = 0xFFFFFFFF
    agreed, reply = negotiate(_init_in(45, everything, 0xFFFFFFFF), passthrough=True)
    fields = INIT_OUT.unpack(reply)
    assert (agreed.minor, fields[1]) == (40, 40), "a newer kernel is answered with the newest minor we speak"
    assert agreed.passthrough and fields[10] == Init.PASSTHROUGH >> 32 and fields[11] == 1, "max_stack_depth 1"
    assert agreed.flags & Init.ASYNC_READ, "readahead does not wait for each READ"
    assert not agreed.flags & (Init.POSIX_LOCKS | Init.WRITEBACK_CACHE)
    assert agreed.flags & Init.DONT_MASK, "the umask is the daemon's to apply: a default ACL may decide instead"
    assert fields[6] == 1 << 20 and fields[8] == 256, "1 MiB writes in 256 pages"
    agreed, reply = negotiate(_init_in(38, everything, 0xFFFFFFFF), passthrough=True)
    assert agreed.minor == 38 and not agreed.passthrough and INIT_OUT.unpack(reply)[11] == 0, "7.38 has none"
    agreed, _ = negotiate(_init_in(45, Init.BIG_WRITES), passthrough=True)
    assert agreed.flags == Init.BIG_WRITES, "only what the kernel offers (no INIT_EXT: no flags2)"
    with pytest.raises(ProtocolError):
        negotiate(_init_in(30, everything))


# -- O_TMPFILE (FUSE_TMPFILE) --------------------------------------------------------------------------


def _tmpfile_link(fd: int, path: str) -> None:
    """``linkat(AT_FDCWD, "/proc/self/fd/FD", AT_FDCWD, path, AT_SYMLINK_FOLLOW)`` (os.link would call link(2))."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(-100, os.fsencode(f"/proc/self/fd/{fd}"), -100, os.fsencode(path), 0x400) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


@pytest.mark.root
def test_an_o_tmpfile_named_by_linkat_persists_across_a_remount_and_under_the_kernel(stack, tmp_path):
    """TMPFILE makes the file in the upper directory; LINK of its nameless node names it there, so a remount and
    the kernel's overlayfs over the same layers see it. The libfuse binding has no tmpfile: EOPNOTSUPP."""
    from tests.mounts import kernel_mount

    lowers, upper, work, mnt = stack
    with pylayerfs_mount(mnt, lowers, upper, work, extra=NATIVE):
        fd = os.open(f"{mnt}/d", os.O_TMPFILE | os.O_RDWR, 0o640)
        try:
            os.write(fd, b"made unnamed")
            assert os.fstat(fd).st_nlink == 0 and os.listdir(f"{mnt}/d") == ["a"]
            _tmpfile_link(fd, f"{mnt}/d/kept")
            os.pwrite(fd, b"M", 0)  # the same file: the name shows the write at once
            assert Path(f"{mnt}/d/kept").read_bytes() == b"Made unnamed"
            assert os.fstat(fd).st_nlink == 1 and os.stat(f"{mnt}/d/kept").st_ino == os.fstat(fd).st_ino
        finally:
            os.close(fd)
        dropped = os.open(mnt, os.O_TMPFILE | os.O_WRONLY, 0o600)  # closed with no name: nothing stays
        os.write(dropped, b"gone")
        os.close(dropped)
    assert sorted(os.listdir(upper)) == ["d"] and os.listdir(f"{upper}/d") == ["kept"]
    with pylayerfs_mount(mnt, lowers, upper, work, extra=NATIVE):
        assert Path(f"{mnt}/d/kept").read_bytes() == b"Made unnamed"
        assert stat.S_IMODE(os.stat(f"{mnt}/d/kept").st_mode) == 0o640
    with kernel_mount(str(tmp_path / "k"), lowers, upper, work):
        assert sorted(os.listdir(tmp_path / "k" / "d")) == ["a", "kept"]
        assert (tmp_path / "k" / "d" / "kept").read_bytes() == b"Made unnamed"
    with pylayerfs_mount(mnt, lowers, upper, work, extra="binding=libfuse"):
        with pytest.raises(OSError) as raised:
            os.open(f"{mnt}/d", os.O_TMPFILE | os.O_RDWR, 0o600)
        assert raised.value.errno == errno.EOPNOTSUPP


@pytest.mark.root
def test_a_linked_o_tmpfile_is_one_kernel_inode_and_a_dropped_one_is_forgotten(stack):
    """The LINK reply names the TMPFILE's own node (no second kernel inode for the new name), and a nameless
    file closed without a name leaves the table when the kernel forgets it."""
    mnt = stack[3]
    with in_process(stack) as session:
        os.stat(f"{mnt}/d")
        fd = os.open(f"{mnt}/d", os.O_TMPFILE | os.O_RDWR, 0o600)
        try:
            held = len(session.nodes)  # the root, d and the nameless file
            assert session.counts[Op.TMPFILE] == 1 and held == 3
            _tmpfile_link(fd, f"{mnt}/d/named")
            os.stat(f"{mnt}/d/named")
            assert len(session.nodes) == held, "the new name is the same node"
            node = session.nodes.at("d/named")
            assert node is not None and node.handles
            with open(f"{mnt}/d/named", "rb+") as other:  # flock()s are per kernel inode: they conflict across fds
                fcntl.flock(fd, fcntl.LOCK_EX)
                with pytest.raises(BlockingIOError):
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        dropped = os.open(f"{mnt}/d", os.O_TMPFILE | os.O_RDWR, 0o600)
        assert len(session.nodes) == 4
        os.close(dropped)
        assert _wait_for(lambda: session.nodes.at("d/named") is None and len(session.nodes) == 1, dropping=True), (
            f"{len(session.nodes)} nodes left"
        )


def test_a_nameless_node_is_found_by_its_st_ino_only_once_it_has_a_name():
    """A TMPFILE's st_ino is its real file's, which the filesystem reuses once it is closed: while it has no name, a
    LOOKUP of another object with that number must not land on it; after its LINK, the new name must."""
    from pylayerfs.fuse.native.nodes import NodeTable

    table = NodeTable(100)
    unnamed = table.unnamed(7)
    assert table.found("x", 7) is not unnamed  # a later file that got the number
    table.forget(table.at("x").nodeid, 1)  # type: ignore[union-attr]
    table.named(unnamed)
    assert table.found("kept", 7) is unnamed and unnamed.nlookup == 2
    other = table.unnamed(8)
    table.closed_nameless(other)  # closed without a name: the number is free
    assert table.found("y", 8) is not other


def _split_links(mnt: str) -> dict[str, tuple[str, str]]:
    """A hard link only the lower layer holds: write and chmod through one name, each after a lookup of the other."""
    with open(f"{mnt}/a") as f:
        f.read()
    with open(f"{mnt}/b", "w") as f:
        f.write("new")
    os.stat(f"{mnt}/c")
    os.chmod(f"{mnt}/d", 0o600)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    names = ("a", "b", "c", "d")
    return {n: (Path(f"{mnt}/{n}").read_text(), oct(os.stat(f"{mnt}/{n}").st_mode)) for n in names}


@pytest.mark.timeout(60)
def test_a_write_through_one_name_of_a_lower_hard_link_copies_up_that_name_only(tmp_path: Path) -> None:
    """Found by a user: the names were one node, so the copy-up followed the name looked up first and the data
    went into the other file. The kernel's overlayfs (index=off) splits the link: only the name written changes."""
    results = []
    for name in ("kernel", "pylayerfs"):
        lower, upper, work, mnt = (tmp_path / name / d for d in ("l", "u", "w", "m"))
        for d in (lower, upper, work, mnt):
            d.mkdir(parents=True)
        (lower / "a").write_text("old")
        os.link(lower / "a", lower / "b")
        (lower / "c").write_text("old")
        os.link(lower / "c", lower / "d")
        if name == "kernel":
            opts = options([str(lower)], str(upper), str(work))
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], check=True, timeout=30)
            try:
                results.append((_split_links(str(mnt)), sorted(os.listdir(upper))))
            finally:
                force_unmount(str(mnt))
        else:
            with pylayerfs_mount(str(mnt), [str(lower)], str(upper), str(work)):
                results.append((_split_links(str(mnt)), sorted(os.listdir(upper))))
    assert results[0] == results[1]
    assert results[1][0]["a"] == ("old", "0o100644") and results[1][0]["b"][0] == "new"


@pytest.mark.root
def test_a_log_file_that_cannot_be_written_is_named_in_one_line(stack, tmp_path):
    lowers, upper, work, mnt = stack
    result = run_pylayerfs("mount", "-o", options(lowers, upper, work, f"logfile={tmp_path}/missing/x.log"), mnt,
                           check=False)  # fmt: skip
    assert result.returncode == 1 and not _mounted(mnt)
    assert (
        result.stderr == f"pylayerfs: cannot write the log file '{tmp_path}/missing/x.log': No such file or directory\n"
    )
