"""``pylayerfs explain``: every lookup rule on constructed stacks, the same answers as the engine on
generated stacks, and the CLI on real mounts however they were made."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pylayerfs.fuse.mount import records_dir
from pylayerfs.overlay import readdir
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.markers import TRUSTED_PREFIX, USER_PREFIX, is_whiteout
from pylayerfs.overlay.params import mountinfo
from pylayerfs.teaching.explain import Layer, Stack, explain
from pylayerfs.testing import lowers as gen
from tests.mounts import PYLAYERFS, TIMEOUT, force_unmount, kernel_mount, pylayerfs_mount, run_pylayerfs
from tests.trees import WHITEOUT, build

pytestmark = pytest.mark.root  # whiteouts and trusted.* xattrs


@pytest.fixture
def stack(tmp_path):
    top = build(str(tmp_path / "top"), {"f": "top", "gone": WHITEOUT, "o": ("opaque",), "o/new": "n",
                                        "d/a": "top a", "x": None, "x/inner": "i"})  # fmt: skip
    mid = build(str(tmp_path / "mid"), {"f": "mid", "gone": "hidden", "o/old": "hidden", "d/b": "mid b",
                                        "d/gone2": WHITEOUT, "x": "a file below a directory"})  # fmt: skip
    low = build(str(tmp_path / "low"), {"d/gone2": "hidden", "d/c": "low c", "only": "low", "x/deep": "unreachable"})
    return [Layer("top", top, "RUN top"), Layer("mid", mid), Layer("low", low)]


def test_upper_hides_lower(stack):
    e = explain(stack, "/f")
    assert e.source == "top" and [f.consulted for f in e.layers] == [True, False, False]
    assert "top-most object" in e.layers[0].rule and e.layers[1].holds == "file"


def test_whiteout_hides_everything_below(stack):
    e = explain(stack, "gone")
    assert e.source is None and "a whiteout in top deletes it" in e.result
    assert e.layers[0].holds == "whiteout" and not e.layers[1].consulted


def test_opaque_directory_stops_the_merge(stack):
    e = explain(stack, "/o")
    assert e.layers[0].holds == "opaque directory" and e.entries == {"new": "top"}
    assert not e.layers[1].consulted
    assert not explain(stack, "/o/old").layers[1].consulted


def test_directories_merge_and_entries_name_their_layer(stack):
    e = explain(stack, "/d")
    assert e.entries == {"a": "top", "b": "mid", "c": "low"}, "gone2 is whited out in mid"
    assert [f.holds for f in e.layers] == ["directory", "directory", "directory"]


def test_a_file_below_a_directory_ends_the_merge(stack):
    e = explain(stack, "/x")
    assert "non-directory below a directory" in e.layers[1].rule and not e.layers[2].consulted
    assert e.entries == {"inner": "top"}
    deep = explain(stack, "/x/deep")
    assert deep.layers[2].holds == "file" and not deep.layers[2].consulted
    assert "does not exist" in deep.result


def test_lower_only_and_missing(stack):
    assert explain(stack, "/only").source == "low"
    missing = explain(stack, "/nowhere")
    assert missing.source is None and "no layer holds it" in missing.result


@pytest.mark.fuse
def test_cli_on_a_pylayerfs_mount_and_a_kernel_mount(stack, tmp_path):
    lowers = [layer.root for layer in stack]
    upper, work = str(tmp_path / "u"), str(tmp_path / "w")
    for d in (upper, work):
        os.makedirs(d)
    with pylayerfs_mount(str(tmp_path / "m"), lowers, upper, work) as mnt:
        with open(f"{mnt}/d/new", "w") as f:
            f.write("upper")
        out = run_pylayerfs("explain", f"{mnt}/d").stdout
        assert "new  <- the upper layer" in out and "c  <- lower layer 1" in out
        data = json.loads(run_pylayerfs("explain", "--format", "json", f"{mnt}/f").stdout)
        assert data["source"] == "lower layer 3" and data["layers"][0]["holds"] == "nothing"
    upper2, work2 = str(tmp_path / "u2"), str(tmp_path / "w2")
    for d in (upper2, work2):
        os.makedirs(d)
    with kernel_mount(str(tmp_path / "k"), lowers, upper2, work2) as mnt:
        out = run_pylayerfs("explain", f"{mnt}/gone").stdout
        assert "a whiteout in lower layer 3 deletes it" in out
    bad = run_pylayerfs("explain", str(tmp_path), check=False)
    assert bad.returncode == 1 and "is not inside an overlay mount" in bad.stderr


# -- the engine's answers, on generated stacks ----------------------------------------------------

KINDS = {"file": stat.S_IFREG, "metacopy file": stat.S_IFREG, "directory": stat.S_IFDIR,
         "opaque directory": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO}  # fmt: skip


def _as_xattr_whiteouts(root: str, prefix: str) -> None:
    """Rewrite the whiteouts of a layer in the kernel's other form: a zero-size file marked
    ``<prefix>whiteout`` in a directory marked ``<prefix>opaque="x"`` (unless it is opaque="y")."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if not is_whiteout(os.lstat(full)):
                continue
            try:
                opaque = os.getxattr(dirpath, prefix + "opaque")
            except OSError:
                opaque = None
            if opaque == b"y":
                continue
            os.unlink(full)
            open(full, "wb").close()
            os.setxattr(full, prefix + "whiteout", b"")
            os.setxattr(dirpath, prefix + "opaque", b"x")


def _as_user_xattrs(root: str) -> None:
    """Move the overlay markers of a layer from trusted.overlay.* to user.overlay.* (userxattr)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for full in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            if os.path.islink(full):
                continue
            for attr in os.listxattr(full):
                if attr.startswith(TRUSTED_PREFIX):
                    value = os.getxattr(full, attr)
                    os.removexattr(full, attr)
                    os.setxattr(full, USER_PREFIX + attr[len(TRUSTED_PREFIX) :], value)


def _layer_paths(root: str) -> set[str]:
    paths = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            paths |= {rel, f"{rel}/a", f"{rel}/zz"}  # and below it, whatever it is
    return paths


def _engine_view(ov: Overlay, path: str) -> tuple[int, int] | None:
    """What the engine's lookup shows at ``path``: (file type, layer position of its object), or None."""
    try:
        node = ov.lookup.lookup(path)
    except OSError as exc:
        assert exc.errno in (2, 20), exc
        return None
    layer = node.data.layer if node.data is not None else ov.top_object(node)[0]
    position = 0 if layer is ov.upper else ov.lowers.index(layer) + (ov.upper is not None)  # type: ignore[arg-type]
    return stat.S_IFMT(node.st.st_mode), position


def _merged_tree(ov: Overlay, path: str = "") -> dict[str, list[str]]:
    """Every merged directory with its entries (the engine's readdir)."""
    names = [name for name, _, _ in readdir.merged_entries(ov, path) if name not in (".", "..")]
    tree = {path: sorted(names)}
    for name in names:
        child = f"{path}/{name}" if path else name
        if stat.S_ISDIR(ov.lookup.lookup(child).st.st_mode):
            tree.update(_merged_tree(ov, child))
    return tree


def compare_with_engine(root: str, layers: list[dict[str, gen.Node]], upper: bool, userxattr: bool, xwhiteouts: bool):
    """Write ``layers`` (top first; the first is the upper layer if ``upper``) and compare explain with
    the engine's ``Overlay`` for every merged path and every path of any layer (and below it)."""
    dirs = [gen.build(os.path.join(root, f"L{i}"), layer, i) for i, layer in enumerate(layers)]
    prefix = USER_PREFIX if userxattr else TRUSTED_PREFIX
    for d in dirs:
        if userxattr:
            _as_user_xattrs(d)
        if xwhiteouts:
            _as_xattr_whiteouts(d, prefix)
    work = os.path.join(root, "work")
    os.mkdir(work)
    stack = Stack([Layer(f"L{i}", d) for i, d in enumerate(dirs)], upper=upper, userxattr=userxattr, metacopy=False)
    ov = Overlay(dirs[1:], dirs[0], work, userxattr=userxattr) if upper else Overlay(dirs, userxattr=userxattr)
    try:
        tree = _merged_tree(ov)
        paths = {p for d in tree for p in ([d] + [f"{d}/{n}" if d else n for n in tree[d]])}
        paths |= {p for d in dirs for p in _layer_paths(d)}
        for path in sorted(paths):
            e = explain(stack, "/" + path)
            expected = _engine_view(ov, path)
            if expected is None:
                assert e.source is None, (path, e.result)
                continue
            kind, position = expected
            assert e.source == f"L{position}", (path, e.result)
            assert KINDS.get(e.layers[position].holds) == kind, (path, e.layers[position])
            if kind == stat.S_IFDIR:
                assert sorted(e.entries) == tree[path], path
                for name, label in e.entries.items():
                    child = _engine_view(ov, f"{path}/{name}" if path else name)
                    assert child is not None and label == f"L{child[1]}", (path, name, label)
    finally:
        ov.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gen.layers(4, only_realistic=False), st.booleans(), st.booleans(), st.booleans())
def test_explain_says_what_the_engine_does_on_generated_stacks(layers, upper, userxattr, xwhiteouts):
    with tempfile.TemporaryDirectory() as root:
        compare_with_engine(root, layers, upper and len(layers) > 1, userxattr, xwhiteouts)


def test_xattr_whiteout_in_an_opaque_x_directory_hides_the_name(tmp_path):
    """The kernel's other whiteout form: explain used to show it as "a file from top"."""
    top = build(str(tmp_path / "top"), {"d/z": "", "d/keep": "k"})
    os.setxattr(top + "/d", TRUSTED_PREFIX + "opaque", b"x")  # "x": holds xattr whiteouts, still merges
    os.setxattr(top + "/d/z", TRUSTED_PREFIX + "whiteout", b"")
    low = build(str(tmp_path / "low"), {"d/z": "hidden", "d/low": "l"})
    stack = [Layer("top", top), Layer("low", low)]
    e = explain(stack, "/d/z")
    assert e.source is None and e.layers[0].holds == "whiteout" and "a whiteout in top deletes it" in e.result
    assert not e.layers[1].consulted
    d = explain(stack, "/d")
    assert d.entries == {"keep": "top", "low": "low"} and d.layers[0].holds == "directory"
    compare_with_engine(str(tmp_path / "gen"), [{"d": gen.Node("dir"), "d/z": gen.Node("whiteout")},
                                                {"d": gen.Node("dir"), "d/z": gen.Node("file")}],
                        upper=False, userxattr=False, xwhiteouts=True)  # fmt: skip


def test_a_userxattr_stack_reads_user_overlay_markers(tmp_path):
    top = build(str(tmp_path / "top"), {"o": ("opaque",), "o/new": "n"}, prefix=USER_PREFIX)
    low = build(str(tmp_path / "low"), {"o/old": "hidden", "t": "trusted opaque is no marker here"})
    os.setxattr(top, TRUSTED_PREFIX + "opaque", b"y")  # ignored under userxattr: the root still merges
    stack = Stack([Layer("top", top), Layer("low", low)], userxattr=True)
    e = explain(stack, "/o")
    assert e.layers[0].holds == "opaque directory" and e.entries == {"new": "top"} and not e.layers[1].consulted
    assert explain(stack, "/").entries == {"o": "top", "t": "low"}
    trusted = Stack(stack.layers)  # the other way round: o is a plain directory, and a marker on a root is none
    root = explain(trusted, "/")
    assert root.entries == {"o": "top", "t": "low"} and root.layers[0].holds == "directory"
    assert explain(trusted, "/o").layers[0].holds == "directory"


# -- mounts, however they were made ---------------------------------------------------------------


def _explain(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYLAYERFS, "explain", *args], capture_output=True, text=True, timeout=TIMEOUT,
                          check=False, cwd=cwd)  # fmt: skip


@contextlib.contextmanager
def _mounted(mnt: str, argv: list[str], cwd: str) -> Iterator[str]:
    """Run a mount command (``argv`` after ``python -m pylayerfs``) in ``cwd``; always unmount ``mnt``."""
    os.makedirs(mnt, exist_ok=True)
    try:
        result = subprocess.run([*PYLAYERFS, *argv], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd,
                                check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
        yield mnt
    finally:
        force_unmount(mnt)


def _record_of(mnt: str) -> str:
    entry = [e for e in mountinfo() if e.mountpoint == os.path.realpath(mnt)][-1]
    return os.path.join(records_dir(), f"{entry.mount_id}.json")


@pytest.mark.fuse
def test_relative_mountpoint_and_lowerdirs_explained_from_another_directory(tmp_path):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    build(str(here / "l1"), {"f": "top", "d/a": "a"})
    build(str(here / "l2"), {"f": "low", "d/b": "b"})
    elsewhere.mkdir()
    with _mounted(str(here / "m"), ["mount", "-o", "lowerdir=l1:l2", "m"], cwd=str(here)):
        out = _explain("../here/m/f", cwd=str(elsewhere))
        assert out.returncode == 0, out.stderr
        assert f"/f is a file from lower layer 2 ({here}/l1/f)" in out.stdout
        data = json.loads(_explain("--format", "json", "../here/m/d", cwd=str(elsewhere)).stdout)
        assert data["entries"] == {"a": "lower layer 2", "b": "lower layer 1"}
        with open(_record_of(str(here / "m"))) as f:
            assert json.load(f)["lowerdirs"] == [f"{here}/l1", f"{here}/l2"]
        record = _record_of(str(here / "m"))
    gone = _explain(str(here / "m" / "f"))
    assert gone.returncode == 1 and "is not inside an overlay mount" in gone.stderr
    assert gone.stderr.count("\n") == 1 and not os.path.exists(record), "the daemon removes its record"


@pytest.mark.fuse
def test_a_mount_made_as_mount_fuse_runs_the_helper(tmp_path):
    """``mount -t fuse.pylayerfs overlay MNT -o ...`` runs ``pylayerfs overlay MNT -o ...``."""
    build(str(tmp_path / "l"), {"gone": "x", "f": "l"})
    build(str(tmp_path / "u"), {"gone": WHITEOUT})
    os.mkdir(tmp_path / "w")
    opts = f"lowerdir={tmp_path}/l,upperdir={tmp_path}/u,workdir={tmp_path}/w,userxattr"
    with _mounted(str(tmp_path / "m"), ["overlay", str(tmp_path / "m"), "-o", opts], cwd="/"):
        out = _explain(f"{tmp_path}/m/gone")
        assert out.returncode == 0, out.stderr
        assert "a whiteout in the upper layer deletes it" in out.stdout


@pytest.mark.fuse
def test_userxattr_mounts_pylayerfs_and_kernel(tmp_path):
    top = build(str(tmp_path / "top"), {"o": ("opaque",), "o/new": "n"}, prefix=USER_PREFIX)
    low = build(str(tmp_path / "low"), {"o/old": "hidden"})
    with pylayerfs_mount(str(tmp_path / "m"), [top, low], extra="userxattr") as mnt:
        assert os.listdir(f"{mnt}/o") == ["new"]
        data = json.loads(run_pylayerfs("explain", "--format", "json", f"{mnt}/o").stdout)
        assert data["entries"] == {"new": "lower layer 2"} and data["layers"][0]["holds"] == "opaque directory"
    with kernel_mount(str(tmp_path / "k"), [top, low], extra="userxattr") as mnt:
        assert os.listdir(f"{mnt}/o") == ["new"]
        data = json.loads(run_pylayerfs("explain", "--format", "json", f"{mnt}/o").stdout)
        assert data["entries"] == {"new": "lower layer 2"}


def test_a_kernel_mount_with_relative_layers_is_refused_with_a_reason(tmp_path):
    build(str(tmp_path / "l"), {"f": "x"})
    build(str(tmp_path / "l2"), {"g": "x"})
    (tmp_path / "m").mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=l:l2", "m"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=TIMEOUT)  # fmt: skip
    try:
        out = _explain(f"{tmp_path}/m/f")
        assert out.returncode == 1 and "relative layer path 'l'" in out.stderr and out.stderr.count("\n") == 1
    finally:
        force_unmount(str(tmp_path / "m"))


@pytest.mark.fuse
def test_a_record_whose_daemon_is_gone_is_ignored(tmp_path):
    build(str(tmp_path / "l"), {"f": "x"})
    with pylayerfs_mount(str(tmp_path / "m"), [str(tmp_path / "l")]) as mnt:
        record = _record_of(mnt)
        with open(record) as f:
            pid = json.load(f)["pid"]
        os.kill(pid, signal.SIGKILL)  # the mount stays (dead: ENOTCONN), and so does the record
        deadline = time.monotonic() + TIMEOUT
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(record)
        out = _explain(f"{mnt}/f")
        assert out.returncode == 1 and "left no record of its layers" in out.stderr
        os.unlink(record)


@pytest.mark.fuse
def test_a_symlink_at_the_end_of_a_mount_path_is_explained_not_followed(tmp_path):
    build(str(tmp_path / "l"), {"d/n": "n", "sl": ("symlink", "d/n"), "out": ("symlink", "/etc/passwd")})
    with _mounted(str(tmp_path / "m"), ["mount", "-o", f"lowerdir={tmp_path}/l", str(tmp_path / "m")], cwd="/"):
        for name in ("sl", "out"):
            out = _explain(f"{tmp_path}/m/{name}")
            assert out.returncode == 0, out.stderr
            assert f"/{name} is a symlink from lower layer 1" in out.stdout, out.stdout
        followed = _explain(f"{tmp_path}/m/sl/")  # a trailing slash follows it, as a path walk does
        assert "/d/n is a file" in followed.stdout, followed.stdout
