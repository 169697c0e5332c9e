"""Operations through open file descriptors, at any depth, on files of every type: pylayerfs against the kernel.

Each test runs one scenario on ``mount -t overlay`` and on a pylayerfs mount over
identical layers, on the same backing filesystem (tmpfs, and ext4 in a
loop-mounted image: the two decide differently whether a truncate to the same
size changes mtime), and compares what the scenario saw and what the upper
directories hold afterwards (issue 12: failures 1, 2, 4, 5, 6 and 7).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mounts import force_unmount, kernel_mount, pylayerfs_mount
from tests.trees import Spec, build, disk_form, tree_hash

pytestmark = [pytest.mark.root, pytest.mark.fuse]

Y2K = 946684800
LOWER: Spec = {"low": "lower data", "empty": "", "d/deep": "in d", "big": "b" * 70000}

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def attempt(op: Callable[[], object], then: Callable[[], object] | None = None) -> Any:
    """What ``op()`` returned (or, given ``then``, what ``then()`` returns after it), or the name of the errno."""
    try:
        value = op()
        return then() if then is not None else value
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@contextlib.contextmanager
def _backing(tmp_path: Path, kind: str) -> Iterator[Path]:
    """A directory on a fresh filesystem of ``kind`` (tmpfs, or ext4 in a loop-mounted image), unmounted after."""
    root = tmp_path / kind
    root.mkdir()
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(root)], check=True, timeout=30)
    else:
        image = tmp_path / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(root)], check=True, timeout=30)
    try:
        yield root
    finally:
        force_unmount(str(root))


@pytest.fixture(params=["tmpfs", "ext4"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with _backing(tmp_path, request.param) as root:
        yield root


def _layers(root: Path, name: str, spec: Spec, deep: str) -> tuple[list[str], str, str, str]:
    lower = build(str(root / name / "l"), spec)
    for path in spec:
        os.utime(os.path.join(lower, path), (Y2K, Y2K), follow_symlinks=False)
    if deep:
        _in_deep(lower, deep, lambda: Path("lowfile").write_text("deep lower"), create=True)
    upper, work, mnt = (str(root / name / d) for d in ("u", "w", "m"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    return [lower], upper, work, mnt


def _in_deep(top: str, deep: str, action: Callable[[], Any], create: bool = False) -> Any:
    """Run ``action`` with the working directory ``top/deep`` (made when ``create``), reached one step at a time."""
    here = os.open(".", os.O_RDONLY)
    try:
        os.chdir(top)
        for part in deep.split("/"):
            if create:
                os.mkdir(part)
            os.chdir(part)
        return action()
    finally:
        os.fchdir(here)
        os.close(here)


def differential(
    root: Path, scenario: Callable[[str], dict[Any, Any]], spec: Spec = LOWER, deep: str = ""
) -> dict[Any, Any]:
    """Run ``scenario`` on the kernel's overlayfs and on pylayerfs; assert the same results and uppers; the results.

    ``deep``: a directory path (longer than PATH_MAX) made in the lower layer, holding ``lowfile``.
    """
    k_lowers, k_upper, k_work, k_mnt = _layers(root, "kernel", spec, deep)
    p_lowers, p_upper, p_work, p_mnt = _layers(root, "pylayerfs", spec, deep)
    hashes = [_lower_form(d, deep) for d in p_lowers]
    with kernel_mount(k_mnt, k_lowers, k_upper, k_work):
        expected = scenario(k_mnt)
    with pylayerfs_mount(p_mnt, p_lowers, p_upper, p_work):
        actual = scenario(p_mnt)
    differ = {key: (expected[key], actual.get(key)) for key in expected if expected[key] != actual.get(key)}
    assert differ == {}, "what differs from the kernel: {key: (kernel, pylayerfs)}"
    assert _upper_form(p_upper, deep) == _upper_form(k_upper, deep)
    assert [_lower_form(d, deep) for d in p_lowers] == hashes, "a lower layer was modified"
    return actual


def _deep_form(top: str, deep: str) -> dict[str, tuple[int, int, bytes]]:
    """Type, mode and content of what ``top/deep`` holds (the tree helpers take whole paths, too long here)."""

    def form() -> dict[str, tuple[int, int, bytes]]:
        out = {}
        for name in sorted(os.listdir(".")):
            st = os.lstat(name)
            data = Path(name).read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), data)
        return out

    result: dict[str, tuple[int, int, bytes]] = _in_deep(top, deep, form)
    return result


def _upper_form(upper: str, deep: str) -> Any:
    return _deep_form(upper, deep) if deep else disk_form(upper)


def _lower_form(lower: str, deep: str) -> Any:
    return (_deep_form(lower, deep), os.lstat(lower).st_mtime_ns) if deep else tree_hash(lower)


def _mtime_changed(path: str) -> bool:
    return os.stat(path).st_mtime_ns != Y2K * 1_000_000_000


# -- 1. ftruncate, and every request libfuse makes with an open file ---------------------------------


def test_ftruncate_and_truncate_command_reach_the_open_file_not_the_root(backing):
    def scenario(m: str) -> dict[Any, Any]:
        os.utime(m, (Y2K, Y2K))
        r: dict[Any, Any] = {}
        fd = os.open(f"{m}/f", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 100)
        r["new"] = attempt(lambda: os.ftruncate(fd, 10), lambda: os.fstat(fd).st_size)
        os.close(fd)
        fd = os.open(f"{m}/low", os.O_RDWR)
        r["lower"] = attempt(lambda: os.ftruncate(fd, 3), lambda: os.pread(fd, 100, 0))
        os.close(fd)
        fd = os.open(f"{m}/low", os.O_RDONLY)
        r["read-only"] = attempt(lambda: os.ftruncate(fd, 1))
        os.close(fd)
        r["truncate -s"] = subprocess.run(["truncate", "-s", "2", f"{m}/d/deep"], capture_output=True).returncode
        r["sizes"] = [os.stat(f"{m}/{n}").st_size for n in ("f", "low", "d/deep")]
        r["root untouched"] = os.stat(m).st_mtime_ns == Y2K * 1_000_000_000
        return r

    assert differential(backing, scenario)["sizes"] == [10, 3, 2]


# -- 2. open files whose name is gone ---------------------------------------------------------------


def _through_fd(r: dict[Any, Any], what: str, fd: int) -> None:
    """Every request on the open file ``fd``, its answer in ``r[what, request]``."""
    r[what, "fstat"] = attempt(lambda: (os.fstat(fd).st_nlink, os.fstat(fd).st_size))
    r[what, "fchmod"] = attempt(lambda: os.fchmod(fd, 0o600), lambda: oct(os.fstat(fd).st_mode))
    r[what, "fchown"] = attempt(lambda: os.fchown(fd, 5, 6), lambda: (os.fstat(fd).st_uid, os.fstat(fd).st_gid))
    r[what, "futimens"] = attempt(lambda: os.utime(fd, ns=(1, 2)), lambda: os.fstat(fd).st_mtime_ns)
    r[what, "ftruncate"] = attempt(lambda: os.ftruncate(fd, 7), lambda: os.fstat(fd).st_size)
    r[what, "write"] = attempt(lambda: os.pwrite(fd, b"ab", 0))
    r[what, "read"] = attempt(lambda: os.pread(fd, 20, 0))
    r[what, "nlink after all"] = attempt(lambda: os.fstat(fd).st_nlink)


def _unlinked(m: str) -> dict[Any, Any]:
    r: dict[Any, Any] = {}
    for what, path, flags in (
        ("new", f"{m}/t", os.O_RDWR | os.O_CREAT),
        ("copied up", f"{m}/low", os.O_RDWR),
        ("lower read-only", f"{m}/big", os.O_RDONLY),
    ):
        fd = os.open(path, flags, 0o644)
        if flags & os.O_CREAT:
            os.write(fd, b"x" * 100)
        os.unlink(path)
        _through_fd(r, what, fd)
        os.close(fd)
    with tempfile.TemporaryFile(dir=m) as f:
        f.write(b"temporary")
        f.flush()
        r["TemporaryFile"] = (os.fstat(f.fileno()).st_nlink, os.fstat(f.fileno()).st_size)
        f.seek(0)
        r["TemporaryFile read"] = f.read()
    # replaced by a rename while open: the old file lives on, nameless
    with open(f"{m}/new", "w") as f:
        f.write("replacement")
    fd = os.open(f"{m}/d/deep", os.O_RDONLY)
    os.rename(f"{m}/new", f"{m}/d/deep")
    r["replaced", "fstat"] = attempt(lambda: (os.fstat(fd).st_nlink, os.fstat(fd).st_size))
    r["replaced", "read"] = os.pread(fd, 20, 0)
    os.close(fd)
    # a name like libfuse's hidden ones, given by a user to a file no one holds open, is just a name
    with open(f"{m}/plain", "w") as f:
        f.write("plain")
    os.rename(f"{m}/plain", f"{m}/.fuse_hidden0000000200000009")
    r["names"] = sorted(os.listdir(m)), sorted(os.listdir(f"{m}/d"))
    return r


def test_an_unlinked_open_file_answers_fstat_fchmod_fchown_futimens_as_the_kernel(backing):
    r = differential(backing, _unlinked)
    assert r["new", "fstat"] == (0, 100)


def test_an_open_file_renamed_away_then_unlinked_in_a_moved_directory_stays_usable(tmp_path):
    def scenario(m: str) -> dict[Any, Any]:
        os.mkdir(f"{m}/a")
        fd = os.open(f"{m}/a/f", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"abc")
        os.unlink(f"{m}/a/f")
        os.rename(f"{m}/a", f"{m}/b")  # libfuse moves the hidden name with its directory
        r = {"fstat": attempt(lambda: (os.fstat(fd).st_nlink, os.fstat(fd).st_size))}
        r["fchmod"] = attempt(lambda: os.fchmod(fd, 0o640), lambda: oct(os.fstat(fd).st_mode))
        os.close(fd)
        r["listing"] = os.listdir(f"{m}/b")
        return r

    differential(tmp_path, scenario)


# -- 4. hard links of every type ------------------------------------------------------------------


def _make(kind: str, path: str) -> None:
    if kind == "fifo":
        os.mkfifo(path, 0o644)
    elif kind == "chr":
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    elif kind == "sock":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
    elif kind == "symlink":
        os.symlink("target", path)
    else:
        with open(path, "w") as f:
            f.write("data")


@pytest.mark.parametrize("kind", ["fifo", "chr", "sock", "symlink", "file"])
def test_hard_linked_objects_of_every_type_show_changes_through_every_name(tmp_path, kind):
    def scenario(m: str) -> dict[Any, Any]:
        def seen(name: str) -> tuple[Any, ...]:
            st = os.lstat(f"{m}/{name}")
            return oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink

        r: dict[Any, Any] = {}
        _make(kind, f"{m}/n0")
        r["made"] = seen("n0")  # cached by the kernel from here
        os.link(f"{m}/n0", f"{m}/n1", follow_symlinks=False)
        r["linked"] = seen("n0"), seen("n1")
        if kind != "symlink":
            os.chmod(f"{m}/n1", 0o201)
        os.chown(f"{m}/n1", 65534, 65533, follow_symlinks=False)
        r["changed through n1"] = seen("n0")
        ctime = os.lstat(f"{m}/n0").st_ctime_ns
        os.rename(f"{m}/n1", f"{m}/n2")
        r["ctime moves with a rename of the other name"] = os.lstat(f"{m}/n0").st_ctime_ns != ctime
        os.unlink(f"{m}/n2")
        r["unlinked n2"] = seen("n0")
        return r

    r = differential(tmp_path, scenario)
    assert r["changed through n1"][1:3] == (65534, 65533)


def _lower_hard_link_names(m: str) -> dict[Any, Any]:
    """A lower file with two names (a, b): a new name for one of them is that name's copy-up, one object with it (its
    mode, data and number seen through both at once); a write through the other splits it off as an object of its own
    (found by a user's try: a and c were two kernel inodes, and a showed the old mode 644 of root's 0600 file)."""

    def seen(name: str) -> tuple[Any, ...]:
        st = os.stat(f"{m}/{name}")
        return oct(st.st_mode), st.st_nlink, st.st_size

    r: dict[Any, Any] = {"before": (seen("a"), seen("b"))}
    os.link(f"{m}/a", f"{m}/c")
    Path(f"{m}/c").write_text("secret\n")
    os.chmod(f"{m}/c", 0o600)
    r["a and c"] = seen("a"), seen("c"), Path(f"{m}/a").read_text()
    r["a is c"] = os.stat(f"{m}/a").st_ino == os.stat(f"{m}/c").st_ino
    with open(f"{m}/b", "a") as f:
        f.write("more\n")
    r["b after a write"] = seen("b"), Path(f"{m}/b").read_text()
    r["b is a"] = os.stat(f"{m}/b").st_ino == os.stat(f"{m}/a").st_ino
    return r


def test_names_of_a_lower_hard_link_split_and_join_as_on_the_kernel(backing):
    r = differential(backing, _lower_hard_link_names, {"a": "data\n", "b": ("link", "a")})
    assert r["a is c"] and r["a and c"][0][0] == oct(0o100600)


# -- 5. deep paths -----------------------------------------------------------------------------------


def _remove_h_s_sub() -> None:
    os.unlink("h")
    os.unlink("s")
    os.rmdir("sub")


DEEP = "/".join(["d" * 200] * 24)  # 4,824 characters


def test_every_operation_works_more_than_4096_characters_below_the_root(tmp_path):
    def operations() -> dict[Any, Any]:
        r: dict[Any, Any] = {}
        with open("f", "w") as f:
            f.write("x" * 1000)
        r["truncate"] = attempt(lambda: os.truncate("f", 123), lambda: os.stat("f").st_size)
        r["truncate lower"] = attempt(lambda: os.truncate("lowfile", 4), lambda: Path("lowfile").read_text())
        r["chmod"] = attempt(lambda: os.chmod("f", 0o600), lambda: oct(os.stat("f").st_mode))
        r["utime"] = attempt(lambda: os.utime("f", ns=(1, 2)), lambda: os.stat("f").st_mtime_ns)
        with open("f", "a") as f:
            f.write("++")
        r["append"] = os.stat("f").st_size
        fd = os.open("f", os.O_RDWR)
        r["ftruncate"] = attempt(lambda: os.ftruncate(fd, 50), lambda: os.fstat(fd).st_size)
        r["fallocate"] = attempt(lambda: fallocate(fd, 0, 0, 8192), lambda: os.fstat(fd).st_size)
        os.close(fd)
        r["link"] = attempt(lambda: os.link("f", "g"), lambda: os.stat("g").st_nlink)
        r["rename"] = attempt(lambda: os.rename("g", "h"), lambda: sorted(os.listdir(".")))
        r["setxattr"] = attempt(lambda: os.setxattr("h", "user.k", b"v"), lambda: os.getxattr("h", "user.k"))
        r["mkdir"] = attempt(lambda: os.mkdir("sub"), lambda: os.stat("sub").st_nlink)
        r["symlink"] = attempt(lambda: os.symlink("f", "s"), lambda: os.readlink("s"))
        r["unlink"] = attempt(_remove_h_s_sub, lambda: sorted(os.listdir(".")))
        return r

    r = differential(tmp_path, lambda m: _in_deep(m, DEEP, operations), deep=DEEP)
    assert r["truncate"] == 123 and r["truncate lower"] == "deep"


# -- 6. fallocate ---------------------------------------------------------------------------------------


def test_fallocate_modes_as_the_kernel_copying_a_lower_file_up_first(backing):
    def scenario(m: str) -> dict[Any, Any]:
        r: dict[Any, Any] = {}
        for label, mode, offset, length in (
            ("allocate", 0, 65536, 65536),
            ("keep size", KEEP_SIZE, 0, 1 << 20),
            ("punch hole", PUNCH_HOLE | KEEP_SIZE, 4096, 8192),
            ("zero range", ZERO_RANGE, 20000, 100000),
            ("punch without keep size", PUNCH_HOLE, 0, 4096),
        ):
            fd = os.open(f"{m}/big", os.O_RDWR)
            try:
                before = os.fstat(fd).st_blocks
                r[label] = attempt(
                    lambda: fallocate(fd, mode, offset, length)  # noqa: B023 (called at once)
                )
                st = os.fstat(fd)
                data = os.pread(fd, st.st_size, 0)
                r[label, "after"] = st.st_size, data.count(b"b"), data.count(b"\0"), st.st_blocks > before
            finally:
                os.close(fd)
        fd = os.open(f"{m}/low", os.O_RDONLY)
        r["read-only"] = attempt(lambda: fallocate(fd, 0, 0, 10))
        os.close(fd)
        return r

    r = differential(backing, scenario)
    assert r["allocate"] is None and r["allocate", "after"][0] == 131072


# -- 7. truncate to the size a file has -----------------------------------------------------------------


def test_truncating_to_the_same_size_changes_mtime_exactly_when_the_kernel_does(backing):
    def scenario(m: str) -> dict[Any, Any]:
        r: dict[Any, Any] = {}
        with open(f"{m}/full", "w") as f:
            f.write("abc")
        open(f"{m}/void", "w").close()
        for name, size in (("empty", 0), ("low", 10), ("void", 0), ("full", 3)):
            os.utime(f"{m}/{name}", (Y2K, Y2K))
            os.truncate(f"{m}/{name}", size)
            r["truncate", name] = _mtime_changed(f"{m}/{name}")
            os.utime(f"{m}/{name}", (Y2K, Y2K))
            fd = os.open(f"{m}/{name}", os.O_RDWR)
            os.ftruncate(fd, size)
            os.close(fd)
            r["ftruncate", name] = _mtime_changed(f"{m}/{name}")
            os.utime(f"{m}/{name}", (Y2K, Y2K))
            os.close(os.open(f"{m}/{name}", os.O_WRONLY | os.O_TRUNC))
            r["O_TRUNC", name] = _mtime_changed(f"{m}/{name}")
        os.truncate(f"{m}/d/deep", 0)  # a lower file with data, truncated to 0 by path
        r["lower with data to 0"] = _mtime_changed(f"{m}/d/deep")
        return r

    differential(backing, scenario)


# -- what a user trying real programs found ----------------------------------------------------------


def _direct_io(m: str) -> dict[Any, Any]:
    """O_DIRECT reads and writes (dd iflag=direct, fio --direct=1) of a new file and of a lower one."""
    r: dict[Any, Any] = {}
    buf = mmap.mmap(-1, 8192)  # page-aligned, as O_DIRECT wants
    for what, path in (("new", f"{m}/direct"), ("lower", f"{m}/big")):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            if what == "new":
                buf[:] = b"d" * 8192
                r[what, "write"] = attempt(functools.partial(os.pwritev, fd, [buf], 0))
            r[what, "read"] = attempt(functools.partial(os.preadv, fd, [buf], 0), lambda: bytes(buf[:4]))
        finally:
            os.close(fd)
    r["dd"] = subprocess.run(["dd", f"if={m}/big", "of=/dev/null", "bs=4096", "iflag=direct"],
                             capture_output=True, check=False).returncode  # fmt: skip
    return r


def test_direct_io_works_as_on_the_kernel(backing):
    """O_DIRECT stays with the FUSE file: the daemon's own I/O on ext4 answered EINVAL (alignment)."""
    r = differential(backing, _direct_io, {**LOWER, "big": "b" * 65536})
    assert (r["new", "read"], r["lower", "read"], r["dd"]) == (b"dddd", b"bbbb", 0)


def _copies(m: str) -> dict[Any, Any]:
    """cp -a and cp --preserve=mode set permission bits through an access ACL (fsetxattr system.posix_acl_access).

    From a shell, as a user found it (a source made by Python did not show it).
    """
    script = 'cd "$1" && echo hi > src && chmod 664 src && cp -a src a && cp --preserve=mode src p && stat -c %a a p'
    run = subprocess.run(["sh", "-c", script, "sh", m], capture_output=True, text=True, timeout=30, check=True)
    return {"modes": run.stdout.split()}


def test_cp_preserving_modes_shows_them_at_once(backing):
    assert differential(backing, _copies)["modes"] == ["664", "664"]


def _acls(m: str) -> dict[Any, Any]:
    """POSIX ACLs set through the mount, then enforced on another user (nobody); the umask of a new file."""

    top = os.open(m, os.O_PATH | os.O_DIRECTORY)  # nobody reaches the mount through it (tmp_path is root's, 0700)

    def run(*argv: str, user: str | None = None) -> tuple[int, str]:
        command = ["runuser", "-u", user, "--", *argv] if user else list(argv)
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False, pass_fds=[top])
        return result.returncode, result.stdout.strip()

    def as_nobody(*argv: str) -> tuple[int, str]:
        return run(*argv[:-1], f"/proc/self/fd/{top}/{argv[-1]}", user="nobody")

    os.chmod(f"{m}/empty", 0o600)
    os.mkdir(f"{m}/dir", 0o700)
    for argv in (["-m", "u:nobody:---", f"{m}/low"], ["-m", "u:nobody:r", f"{m}/empty"],
                 ["-m", "u:nobody:rwx", f"{m}/dir"]):  # fmt: skip
        run("setfacl", *argv)
    old = os.umask(0o022)
    try:
        Path(f"{m}/plain").touch(0o666)
    finally:
        os.umask(old)
    r = {
        "denied by an ACL": as_nobody("cat", "low")[0],
        "granted by an ACL": as_nobody("cat", "empty"),
        "create granted by an ACL": as_nobody("touch", "dir/by-nobody")[0],
        "acls": [run("getfacl", "-cp", f"{m}/{n}") for n in ("low", "empty", "dir")],
        "umask without a default ACL": oct(os.stat(f"{m}/plain").st_mode),
        "mode shown": [oct(os.stat(f"{m}/{n}").st_mode) for n in ("low", "empty", "dir")],
    }
    os.close(top)
    return r


def test_posix_acls_are_enforced_as_on_the_kernel(backing):
    r = differential(backing, _acls)
    assert r["denied by an ACL"] != 0 and r["granted by an ACL"] == (0, "") and r["create granted by an ACL"] == 0


def _default_acls(m: str) -> dict[Any, Any]:
    """New objects in a directory with a default ACL inherit it, and the umask does not narrow them (the ACL decides,
    as on a local filesystem); over a whiteout too (built in the workdir); without a default ACL the umask applies."""
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx,g::rwx,m::rwx,o::r", f"{m}/shared"], check=True)
    os.unlink(f"{m}/shared/gone")
    os.unlink(f"{m}/shared/gonedir/f")
    os.rmdir(f"{m}/shared/gonedir")
    old = os.umask(0o077)
    try:
        for name in ("new", "gone"):
            os.close(os.open(f"{m}/shared/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        for name in ("newdir", "gonedir"):
            os.mkdir(f"{m}/shared/{name}", 0o777)
        os.mkfifo(f"{m}/shared/fifo", 0o666)
        os.umask(0o027)
        os.close(os.open(f"{m}/plain", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(f"{m}/plaindir", 0o777)
    finally:
        os.umask(old)
    names = ["shared/new", "shared/gone", "shared/newdir", "shared/gonedir", "shared/fifo", "plain", "plaindir"]
    getfacl = ["getfacl", "-cp", *(f"{m}/{n}" for n in names)]
    return {
        "acls": subprocess.run(getfacl, capture_output=True, text=True, check=True).stdout,
        "modes": {n: oct(os.stat(f"{m}/{n}").st_mode) for n in names},
    }


def test_new_objects_inherit_default_acls_and_the_umask_as_on_the_kernel(backing):
    r = differential(backing, _default_acls, {"shared/gone": "x", "shared/gonedir/f": "y", "low": "l"})
    assert r["modes"]["shared/new"] == oct(0o100664) and r["modes"]["plain"] == oct(0o100640), r["modes"]
    assert "user:nobody:rwx" in r["acls"] and "default:user:nobody:rwx" in r["acls"]


def _listing_changed_while_read(m: str) -> dict[Any, Any]:
    """Entries removed or added while a directory is read: every other entry is seen once (``rm -rf`` of a large
    directory, a tool adding files as it walks); found by a user's try: 406 of 1,000 files were left."""
    r: dict[Any, Any] = {}
    os.mkdir(f"{m}/rd")
    for i in range(1000):
        Path(f"{m}/rd/f{i}").touch()
    with os.scandir(f"{m}/rd") as it:
        for entry in it:
            os.unlink(entry.path)
    r["left after scandir + unlink"] = os.listdir(f"{m}/rd")
    os.mkdir(f"{m}/re")
    for i in range(600):
        Path(f"{m}/re/f{i}").touch()
    Path(f"{m}/re/gone").touch()
    seen: list[str] = []
    with os.scandir(f"{m}/re") as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            Path(f"{m}/re/new{n}").touch()
            if n == 10 and os.path.exists(f"{m}/re/gone"):
                os.unlink(f"{m}/re/gone")
    originals = {f"f{i}" for i in range(600)}
    r["originals missed while adding"] = sorted(originals - set(seen))
    r["seen twice"] = sorted(name for name in set(seen) if seen.count(name) > 1)
    r["busybox rm -rf"] = subprocess.run(["busybox", "rm", "-rf", f"{m}/re"], capture_output=True).returncode
    return r


def test_entries_removed_or_added_while_a_directory_is_read_move_no_other(backing):
    r = differential(backing, _listing_changed_while_read)
    assert r["left after scandir + unlink"] == [] and r["originals missed while adding"] == [] and r["seen twice"] == []


# -- O_TMPFILE: an unnamed file, linked into the tree later (issue 13) -------------------------------


AT_FDCWD, AT_SYMLINK_FOLLOW = -100, 0x400


def _linkat(fd: int, path: str) -> Callable[[], None]:
    """``linkat(AT_FDCWD, "/proc/self/fd/FD", AT_FDCWD, path, AT_SYMLINK_FOLLOW)``, as ``open(2)`` shows for O_TMPFILE.

    (Python's ``os.link`` calls ``link(2)`` when given no directory fd, which links the /proc symlink itself: EXDEV.)
    """

    def link() -> None:
        source = os.fsencode(f"/proc/self/fd/{fd}")
        if _libc.linkat(AT_FDCWD, source, AT_FDCWD, os.fsencode(path), AT_SYMLINK_FOLLOW) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)

    return link


def _tmpfiles(m: str) -> dict[Any, Any]:
    r: dict[Any, Any] = {}
    before = os.stat(f"{m}/d").st_mtime_ns
    fd = os.open(f"{m}/d", os.O_TMPFILE | os.O_RDWR, 0o640)
    os.write(fd, b"unnamed data")
    st = os.fstat(fd)
    r["fstat"] = (st.st_nlink, st.st_size, oct(st.st_mode), st.st_uid, st.st_gid)
    r["dir unchanged"] = os.stat(f"{m}/d").st_mtime_ns == before
    r["fchmod"] = attempt(lambda: os.fchmod(fd, 0o604), lambda: oct(os.fstat(fd).st_mode))
    r["fchown"] = attempt(lambda: os.fchown(fd, 5, 6), lambda: (os.fstat(fd).st_uid, os.fstat(fd).st_gid))
    r["ftruncate"] = attempt(lambda: os.ftruncate(fd, 7), lambda: os.fstat(fd).st_size)
    r["fsetxattr"] = attempt(lambda: os.setxattr(fd, "user.unnamed", b"x"), lambda: os.getxattr(fd, "user.unnamed"))
    r["flistxattr"] = attempt(lambda: os.listxattr(fd))
    r["fremovexattr"] = attempt(lambda: os.removexattr(fd, "user.unnamed"), lambda: os.listxattr(fd))
    r["listing before"] = sorted(os.listdir(f"{m}/d"))
    r["linkat"] = attempt(_linkat(fd, f"{m}/d/named"))
    named = os.stat(f"{m}/d/named")
    r["after link"] = (os.fstat(fd).st_nlink, named.st_nlink, named.st_ino == os.fstat(fd).st_ino, oct(named.st_mode))
    os.pwrite(fd, b"!", 7)
    r["read by name"] = Path(f"{m}/d/named").read_bytes()
    r["second name"] = attempt(_linkat(fd, f"{m}/named2"), lambda: os.fstat(fd).st_nlink)
    r["over an existing name"] = attempt(_linkat(fd, f"{m}/low"))
    os.close(fd)
    fd = os.open(m, os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)  # O_EXCL: never to be linked
    r["O_EXCL linkat"] = attempt(_linkat(fd, f"{m}/excl"))
    os.close(fd)
    os.unlink(f"{m}/low")  # a whiteout: the name is linked over it
    fd = os.open(m, os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"over the whiteout")
    r["over a whiteout"] = attempt(_linkat(fd, f"{m}/low"), lambda: Path(f"{m}/low").read_bytes())
    os.close(fd)
    fd = os.open(m, os.O_TMPFILE | os.O_WRONLY, 0o600)  # closed without a name: nothing is left
    os.write(fd, b"gone")
    os.close(fd)
    r["read-only"] = attempt(lambda: os.open(m, os.O_TMPFILE | os.O_RDONLY))
    r["in a file"] = attempt(lambda: os.open(f"{m}/empty", os.O_TMPFILE | os.O_RDWR, 0o600))
    r["in a missing directory"] = attempt(lambda: os.open(f"{m}/nowhere", os.O_TMPFILE | os.O_RDWR, 0o600))
    r["names"] = sorted(os.listdir(m)), sorted(os.listdir(f"{m}/d"))
    return r


def test_o_tmpfile_makes_an_unnamed_file_that_linkat_names_as_on_the_kernel(backing, monkeypatch):
    """On the native transport whatever binding the run tests: with libfuse O_TMPFILE is EOPNOTSUPP, a documented
    difference that tests/test_native.py checks."""
    monkeypatch.setenv("PYLAYERFS_BINDING", "native")
    r = differential(backing, _tmpfiles)
    assert r["fstat"][:3] == (0, 12, "0o100640")
    assert r["after link"][:3] == (1, 1, True)
    assert r["read by name"] == b"unnamed!"
    assert r["O_EXCL linkat"] == "ENOENT"


# -- objects the kernel still reaches once their names are gone (native transport) -------------------


def _xattrs_of(name: str, ref: str) -> dict[Any, Any]:
    """Set, read, list and remove a user xattr of the object ``ref`` reaches."""
    return {
        (name, "setxattr"): attempt(lambda: os.setxattr(ref, "user.k", b"v")),
        (name, "getxattr"): attempt(lambda: os.getxattr(ref, "user.k")),
        (name, "listxattr"): attempt(lambda: os.listxattr(ref)),
        (name, "removexattr"): attempt(lambda: os.removexattr(ref, "user.k")),
    }


def _through_descriptors(m: str) -> dict[Any, Any]:
    """Remove or replace objects of every type while the caller keeps descriptors that do not hold them open."""
    r: dict[Any, Any] = {}

    def fstat(fd: int) -> tuple[int, int, int]:
        st = os.fstat(fd)
        return st.st_mode, st.st_nlink, st.st_size

    def reopen(fd: int, flags: int, then: Callable[[int], Any]) -> Any:
        def go() -> Any:
            new = os.open(f"/proc/self/fd/{fd}", flags)
            try:
                return then(new)
            finally:
                os.close(new)

        return attempt(go)

    Path(f"{m}/up").write_text("old upper")
    fds = {"up": os.open(f"{m}/up", os.O_PATH), "low": os.open(f"{m}/low", os.O_PATH)}
    fds["empty"] = os.open(f"{m}/empty", os.O_PATH)
    os.mkdir(f"{m}/dir")
    fds["dir"] = os.open(f"{m}/dir", os.O_RDONLY | os.O_DIRECTORY)
    fds["lowdir"] = os.open(f"{m}/d", os.O_PATH)
    os.mkfifo(f"{m}/fifo")
    fds["fifo"] = os.open(f"{m}/fifo", os.O_RDWR)
    os.symlink("target", f"{m}/link")
    fds["link"] = os.open(f"{m}/link", os.O_PATH | os.O_NOFOLLOW)
    for name in ("up", "empty"):  # replaced by a rename, as an editor or a package manager saves a file
        Path(f"{m}/tmp").write_text("new")
        os.rename(f"{m}/tmp", f"{m}/{name}")
    os.unlink(f"{m}/low")
    os.unlink(f"{m}/d/deep")
    os.rmdir(f"{m}/d")
    os.rmdir(f"{m}/dir")
    os.unlink(f"{m}/fifo")
    os.unlink(f"{m}/link")
    try:
        for name, fd in fds.items():
            r[name, "fstat"] = attempt(functools.partial(fstat, fd))
        r["up", "read"] = reopen(fds["up"], os.O_RDONLY, lambda fd: os.read(fd, 100))
        r["up", "write"] = reopen(fds["up"], os.O_RDWR, lambda fd: os.pwrite(fd, b"OLD", 0))
        r["up", "chmod"] = attempt(lambda: os.chmod(f"/proc/self/fd/{fds['up']}", 0o600))
        r["up", "truncate"] = attempt(lambda: os.truncate(f"/proc/self/fd/{fds['up']}", 4))
        r["up", "after"] = attempt(lambda: fstat(fds["up"]))
        r["low", "read"] = reopen(fds["low"], os.O_RDONLY, lambda fd: os.read(fd, 100))
        r["low", "write"] = reopen(fds["low"], os.O_RDWR, lambda fd: fd)
        r["low", "chmod"] = attempt(lambda: os.chmod(f"/proc/self/fd/{fds['low']}", 0o600))
        r["empty", "read"] = reopen(fds["empty"], os.O_RDONLY, lambda fd: os.read(fd, 100))
        r["dir", "list"] = attempt(lambda: os.listdir(fds["dir"]))
        r["lowdir", "chmod"] = attempt(lambda: os.chmod(f"/proc/self/fd/{fds['lowdir']}", 0o700))
        r["fifo", "fchmod"] = attempt(lambda: os.fchmod(fds["fifo"], 0o600))
        r["fifo", "after"] = attempt(lambda: fstat(fds["fifo"]))
        r["link", "readlink"] = attempt(lambda: os.readlink("", dir_fd=fds["link"]))
        for name in ("up", "low", "fifo"):
            r.update(_xattrs_of(name, f"/proc/self/fd/{fds[name]}"))
        r["names"] = sorted(os.listdir(m))
    finally:
        for fd in fds.values():
            os.close(fd)
    return r


def test_an_object_removed_or_replaced_answers_through_descriptors_that_do_not_hold_it_open(backing, monkeypatch):
    """O_PATH descriptors, ``/proc/self/fd/N`` reopened, directories and FIFOs the kernel opened itself: a file of
    every type whose last name is removed, or replaced by a rename, is still the object the descriptor names.

    (A lower FIFO removed and then changed through its descriptor is left out: the kernel's copy-up brings its name
    back into the merged view; pylayerfs answers EEXIST, as for a lower file. docs/overlay.md lists it.)
    """
    monkeypatch.setenv("PYLAYERFS_BINDING", "native")  # the libfuse binding finds objects by path only
    differential(backing, _through_descriptors)


def _renames_over_a_name_being_opened(m: str) -> dict[Any, Any]:
    """One process renames new files over ``name`` 1,500 times while another opens, reads and stats it."""
    Path(f"{m}/name").write_text("v")
    script = (
        "import os, sys\n"
        "m, fails, ok = sys.argv[1], {}, 0\n"
        "while not os.path.exists(m + '/stop'):\n"
        "    try:\n"
        "        with open(m + '/name') as f: f.read()\n"
        "        os.stat(m + '/name'); ok += 1\n"
        "        if ok == 1: print('reading', flush=True)\n"
        "    except OSError as e:\n"
        "        fails[e.strerror] = fails.get(e.strerror, 0) + 1\n"
        "print(ok > 0, fails)\n"
    )
    reader = subprocess.Popen(["python3", "-c", script, m], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "reading\n"  # a loaded machine: wait for it
        for i in range(1500):
            Path(f"{m}/tmp").write_text(f"v{i}")
            os.rename(f"{m}/tmp", f"{m}/name")
    finally:
        Path(f"{m}/stop").touch()
        out, _ = reader.communicate(timeout=60)
    os.unlink(f"{m}/stop")
    return {"reader": out.strip(), "last": Path(f"{m}/name").read_text()}


def test_renames_over_a_name_another_process_opens_never_fail_its_open(tmp_path, monkeypatch):
    """The case behind the holds: a program saving a file by rename while another reads it (no ENOENT)."""
    monkeypatch.setenv("PYLAYERFS_BINDING", "native")
    with _backing(tmp_path, "tmpfs") as root:
        result = differential(root, _renames_over_a_name_being_opened)
    assert result == {"reader": "True {}", "last": "v1499"}
