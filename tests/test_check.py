"""The conformance checker (``pylayerfs check``, :mod:`pylayerfs.testing`).

A checker that cannot fail is worthless: deliberately broken variants of the
engine must each be caught and shrunk to a few operations. Then the real
implementations must pass: the engine and the FUSE mount against the model,
and the mount against the kernel's overlayfs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings

from pylayerfs.overlay import copy_up, namespace, readdir
from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.markers import is_whiteout
from pylayerfs.testing import (
    EngineTarget,
    Model,
    ModelTarget,
    Node,
    Options,
    OverlayMachine,
    Report,
    check,
    flatten,
    operations,
    ops,
    report,
    run_scenario,
    snapshot,
    target,
)
from pylayerfs.testing.model import features
from pylayerfs.testing.strategies import Scenario
from pylayerfs.testing.targets import Layout, TargetError
from pylayerfs.testing.vfs import within
from tests.mounts import BACKINGS, pylayerfs_mount, run_pylayerfs

ENGINE, MODEL = EngineTarget(), ModelTarget()


def _chmod_0644(st: os.stat_result, workfd: int, tmp: str) -> None:
    os.chown(tmp, st.st_uid, st.st_gid, dir_fd=workfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(tmp, 0o644, dir_fd=workfd)


def _unlink_without_whiteout(ov: Overlay, path: str) -> None:
    ov.writable(path)
    parent, name = copy_up.upper_parent(ov, path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=parent.upper_fd)


def _upper_entries_only(ov: Overlay, node: object) -> bool:
    fd = getattr(node, "upper_fd", -1)
    if fd < 0:
        return False
    return any(not is_whiteout(os.stat(n, dir_fd=fd, follow_symlinks=False)) for n in os.listdir(fd))


_getattr, _truncate, _fallocate = Overlay.getattr, Overlay.truncate, Overlay.fallocate
# A broken engine: (module, name, replacement, the operation families that must catch it).
MUTATIONS: dict[str, tuple[object, str, Callable[..., object], tuple[str, ...]]] = {
    "copy-up drops the mode": (copy_up, "_copy_owner_and_mode", _chmod_0644, ("write", "meta")),
    "copy-up drops xattrs": (copy_up, "_copy_xattrs", lambda ov, src, dst: None, ("write", "meta", "xattr")),
    "rmdir counts whiteouts": (readdir, "is_whiteout", lambda st: False, ("remove",)),
    "unlink forgets the whiteout": (namespace, "unlink", _unlink_without_whiteout, ("remove",)),
    "rmdir ignores lower entries": (namespace, "has_visible_entries", _upper_entries_only, ("remove",)),
    # Operations on open file descriptors (issue 12): bugs the engine had, or could have.
    "fstat goes by name": (Overlay, "getattr", lambda ov, path, fh=None: _getattr(ov, path), ("fd",)),
    "ftruncate goes by name": (
        Overlay, "truncate", lambda ov, path, length, fh=None: _truncate(ov, path, length), ("fd",)
    ),
    "fallocate drops KEEP_SIZE": (
        Overlay, "fallocate", lambda ov, fh, mode, off, n: _fallocate(ov, fh, mode & ~1, off, n), ("fd",)
    ),
}  # fmt: skip


@pytest.mark.root  # whiteouts in the generated lowers are character devices
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_checker_catches_a_broken_engine(mutation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _found(mutation, monkeypatch)
    assert result.divergence is not None, f"'{mutation}' went unnoticed"
    assert result.scenario is not None
    assert len(result.divergence.steps) <= 3, report.text(result)
    assert sum(len(layer) for layer in result.scenario.lowers) <= 4, report.text(result)


@pytest.mark.root
def test_engine_passes_against_the_model() -> None:
    result = check(ENGINE, MODEL, Options(examples=150, seed=7))
    assert result.passed, report.text(result)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("reference", "families", "backing"),
    [
        pytest.param(reference, families, kind, id=f"{reference}-{'+'.join(families) or 'all'}-{kind}")
        for reference, families in (("model", ()), ("kernel", ()), ("kernel", ("fd",)))
        for kind in BACKINGS
    ],
    indirect=["backing"],
)
def test_pylayerfs_mount_passes(reference: str, families: tuple[str, ...], backing: Path) -> None:
    """Every scenario's layers (both sides') on a fresh tmpfs, then on a loop-mounted ext4.

    Against the kernel, the answer is its overlay over the same filesystem (issue 12 item 7); the open-fd family
    (issue 12) gets a run of its own. What a side does not support (O_TMPFILE through libfuse) is reported, and
    must be nothing else.
    """
    options = Options(examples=40, seed=11, base=str(backing), families=families or Options.families)
    result = check(target("pylayerfs"), target(reference), options)
    assert result.passed, report.text(result)
    assert result.unchecked <= {"O_TMPFILE (pylayerfs: EOPNOTSUPP)"}, report.text(result)


@pytest.mark.root
def test_same_seed_same_scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(namespace, "unlink", _unlink_without_whiteout)
    runs = [check(ENGINE, MODEL, Options(examples=50, seed=3, shrink=False)) for _ in range(2)]
    texts = [re.sub(r"\d+\.\d s", "", report.text(r)) for r in runs]
    assert texts[0] == texts[1]


def _found(mutation: str, monkeypatch: pytest.MonkeyPatch) -> Report:
    module, name, broken, families = MUTATIONS[mutation]
    monkeypatch.setattr(module, name, broken)
    return check(ENGINE, MODEL, Options(examples=1000, seed=1, families=families))


@pytest.mark.root
@pytest.mark.timeout(300)
def test_reproduction_script_runs_on_the_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    """The script of a divergence builds the lowers, mounts, and prints the outcome the model expects."""
    result = _found("unlink forgets the whiteout", monkeypatch)
    assert result.divergence is not None
    script = os.path.join(tmp_path, "repro.sh")
    with open(script, "w") as f:
        f.write(report.reproduction(result))
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where the script keeps its layers for the reader
    run = subprocess.run(["sh", script], capture_output=True, text=True, timeout=120, check=False, env=env)
    assert run.returncode == 0, run.stderr
    printed = re.findall(r"^step \d+: .* -> (.*)$", run.stdout, re.M)
    assert printed == [s.expected for s in result.divergence.steps]
    assert "after unmount and mount again:" in run.stdout


@pytest.mark.root
def test_json_report_and_exit_status() -> None:
    def check_cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pylayerfs", "check", "--format", "json", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)

    ok = check_cli("--impl", "engine", "--examples", "10", "--seed", "5", "--ops", "write,remove")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["seed"] == 5 and data["results"][0]["passed"] and data["results"][0]["families"] == ["write", "remove"]
    bad = check_cli("--impl", "nonsense")
    assert bad.returncode == 1 and bad.stderr.startswith("pylayerfs check: unknown implementation") and not bad.stdout
    assert "Traceback" not in bad.stderr
    for usage in (["--deadline", "0"], ["--deadline", "nan"], ["--ops", "bogus"], ["--examples", "0"],
                  ["-o", "metacopy=on,redirect_dir=off"], ["--options", "upperdir=/u"]):  # fmt: skip
        wrong = check_cli(*usage)
        assert wrong.returncode == 2 and len(wrong.stderr.splitlines()) == 1 and not wrong.stdout, (usage, wrong)


# -- redirect_dir=on (issue 16): the model moves directories with a lower part, and the kernel agrees --------------


def _redirect_model(mount_options: str) -> Model:
    """The model of lower ``a/b/f``, ``a/g``, ``a2/`` and ``c/`` (one layer), as mounted with ``mount_options``."""
    lowers = [{p: Node("dir") for p in ("a", "a/b", "a2", "c")} | {p: Node("file", b"1") for p in ("a/b/f", "a/g")}]
    layout = Layout(("l",), "u", "w", "m", mount_options)
    fs = MODEL.start(layout, lowers).fs
    assert isinstance(fs, Model)
    return fs


def _tree(fs: Model) -> dict[str, str]:
    return {p: e.kind + (f" {e.content!r}" if e.content else "") for p, e in snapshot(fs)[0].items()}


@pytest.mark.parametrize(
    ("mount_options", "moves"),
    [("", False), ("redirect_dir=off", False), ("redirect_dir=follow", False), ("redirect_dir=nofollow", False),
     ("redirect_dir=on", True), ("metacopy=on", True), ("redirect_dir=on,metacopy=on", True),
     ("metacopy=on,metacopy=off", False), ("redirect_dir=on,redirect_dir=off", False), ("index=on,xino=on", False)],
)  # fmt: skip
def test_model_reads_redirect_dir_and_metacopy(mount_options: str, moves: bool) -> None:
    assert features(mount_options).moves_dirs is moves
    fs = _redirect_model(mount_options)
    assert ops.Rename("a", "c/a3").run(fs) == ("ok" if moves else "EXDEV")
    assert ops.Rename("c", "d").run(fs) == ("ok" if moves else "EXDEV")  # a merged directory (empty) too


@pytest.mark.parametrize(
    ("mount_options", "reason"),
    [("metacopy=on,redirect_dir=off", "conflicting options: metacopy=on,redirect_dir=follow"),
     ("redirect_dir=nofollow,metacopy=on", "conflicting options: metacopy=on,redirect_dir=nofollow"),
     ("redirect_dir=bogus", "Bad value for 'redirect_dir'"), ("metacopy=yes", "Bad value for 'metacopy'")],
)  # fmt: skip
def test_model_refuses_what_the_kernel_refuses(mount_options: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        features(mount_options)
    with pytest.raises(TargetError, match=re.escape(reason)):
        _redirect_model(mount_options)
    error = check(MODEL, MODEL, Options(examples=1, mount_options=mount_options)).error
    assert error == f"-o {mount_options}: the kernel refuses to mount with them: {reason}"


def test_model_moves_a_lower_directory_with_its_subtree() -> None:
    """Contents, inode numbers and later operations follow the moved directory; its old name is free and new."""
    fs = _redirect_model("redirect_dir=on")
    inodes = snapshot(fs)[1]
    steps = [
        ops.Rename("a", "c/a3"),  # to another parent
        ops.Open("c/a3/b/f", "a", b"2"),  # inside the moved tree
        ops.Mkdir("a"),  # at the old name: a new, empty directory
        ops.Readdir("a"),
        ops.Rename("c/a3/b", "a/bb"),  # a nested one, out of the moved tree into the new one
        ops.Rename("a2", "a2x", "noreplace"),  # same parent
        ops.Rename("a2x", "c", "exchange"),  # two directories with a lower part swap
    ]
    assert [op.run(fs) for op in steps] == ["ok"] * 3 + ["ok: (empty)"] + ["ok"] * 3
    assert _tree(fs) == {
        "a": "dir", "a/bb": "dir", "a/bb/f": "file b'12'", "a2x": "dir", "a2x/a3": "dir", "a2x/a3/g": "file b'1'",
        "c": "dir",
    }  # fmt: skip
    after = snapshot(fs)[1]
    assert after["a/bb/f"] == inodes["a/b/f"] and after["a2x/a3"] == inodes["a"] and after["c"] == inodes["a2"]
    assert after["a"] not in inodes.values()


def test_model_renames_a_moved_directory_again() -> None:
    """Back to its old name, over an emptied merged directory, into a renamed directory; then removed."""
    fs = _redirect_model("redirect_dir=on")
    steps = [
        (ops.Rename("a", "c/a3"), "ok"),
        (ops.Rename("c/a3", "a"), "ok"),  # back where it was
        (ops.Rename("a", "c"), "ok"),  # over the empty merged c
        (ops.Rename("a2", "c/b/a2"), "ok"),  # into the directory just renamed
        (ops.Rename("c", "c/b/a2/x"), "EINVAL"),  # not into itself
        (ops.Rmdir("c"), "ENOTEMPTY"),
        (ops.Unlink("c/b/f"), "ok"),
        (ops.Unlink("c/g"), "ok"),
        (ops.Rmdir("c/b/a2"), "ok"),
        (ops.Rmdir("c/b"), "ok"),
        (ops.Rmdir("c"), "ok"),
    ]
    assert [(op, op.run(fs)) for op, _ in steps] == steps
    assert _tree(fs) == {}


def test_directory_renames_are_drawn_often_with_redirect_dir_on() -> None:
    """When directories move, many more operations move a directory of the tree elsewhere, with every flag."""
    dirs = ("", "a", "a/b", "c")
    existing = ("a", "a/b", "a/b/f", "c")
    fresh = ("b", "a/a", "a/b/a", "c/a")

    def moves(moves_dirs: bool) -> list[ops.Rename]:
        found = []

        @settings(max_examples=300, database=None, derandomize=True)
        @given(operations(ops.FAMILIES, existing, fresh, dirs, moves_dirs=moves_dirs))
        def draw(op: ops.Op) -> None:
            if isinstance(op, ops.Rename) and op.old in dirs[1:] and op.new in (*fresh, *dirs[1:]):
                found.extend([] if within(op.new, op.old) else [op])

        draw()
        return found

    plain, moved = moves(False), moves(True)
    assert len(moved) > max(30, 10 * len(plain)), (len(moved), len(plain))
    assert {op.old for op in moved} == set(dirs[1:]) and {op.flags for op in moved} == set(ops.RENAME_FLAGS)


# Found by the checker against the kernel (-o metacopy=on --steps 30, seed 6): a metadata change (or link, or rename)
# copies a lower file's metadata only; when its data follow (an open for write), the kernel sets no time: the mtime
# is the system's, if the file has data.
METACOPY_STEPS = {
    "chmod a 600": "a", "utime a 1000000000": "a", "setxattr a user.a 1": "a", "rename a b": "b", "link a b": "a",
}  # fmt: skip


@pytest.mark.parametrize("content", [b"1", b""])
@pytest.mark.parametrize("mount_options", ["metacopy=on", "redirect_dir=on", ""])
@pytest.mark.parametrize("first", METACOPY_STEPS)
def test_model_data_after_metadata_copy_up(first: str, mount_options: str, content: bytes) -> None:
    fs = flatten([{"a": Node("file", content)}])
    fs.features = features(mount_options)
    name = METACOPY_STEPS[first]
    assert ops.parse(first).run(fs) == "ok"
    pinned = snapshot(fs)[0][name].mtime
    assert ops.Open(name, "r+", b"").run(fs) == "ok"  # writes nothing: only the copy-up of the data
    assert snapshot(fs)[0][name].mtime == (None if mount_options == "metacopy=on" and content else pinned)


@pytest.mark.root
@pytest.mark.parametrize("mount_options", ["metacopy=on", ""])
def test_kernel_data_after_metadata_copy_up(mount_options: str) -> None:
    lowers = [{"a": Node("file", b"1"), "c": Node("file", b"2"), "d": Node("file", b"")}]
    steps = ["link a b", "fopen 0 a rw", "chmod c 600", "open c r+ ''", "utime d 1000000000", "open d a ''"]
    run_scenario(Scenario(lowers, [ops.parse(line) for line in steps]), target("kernel"), MODEL, None, mount_options)


FALLOCATE_STEPS = [  # vfs_fallocate: EINVAL for a length of 0 before EBADF for a read-only descriptor
    ("fopen 0 a rw", "ok"), ("fallocate 0 alloc 0 0", "EINVAL"), ("fallocate 0 keep 1 3", "ok"),
    ("fopen 1 a r", "ok"), ("fallocate 1 keep 0 0", "EINVAL"), ("fallocate 1 keep 0 1", "EBADF"),
]  # fmt: skip


def test_model_fallocate_of_nothing_is_einval() -> None:
    """Found by the checker (engine, metacopy=on): the model answered ok where every kernel answers EINVAL."""
    fs = flatten([{"a": Node("file", b"1")}])
    assert [(line, ops.parse(line).run(fs)) for line, _ in FALLOCATE_STEPS] == FALLOCATE_STEPS


@pytest.mark.root
def test_kernel_fallocate_of_nothing_is_einval() -> None:
    lowers = [{"a": Node("file", b"1")}]
    run_scenario(Scenario(lowers, [ops.parse(line) for line, _ in FALLOCATE_STEPS]), target("kernel"), MODEL)


@pytest.mark.root
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mount_options", ["redirect_dir=on", "metacopy=on"])
def test_kernel_passes_against_the_model_with(mount_options: str) -> None:
    result = check(target("kernel"), MODEL, Options(examples=200, seed=16, mount_options=mount_options))
    assert result.passed, report.text(result)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.timeout(180)
@pytest.mark.parametrize("reference", ["model", "kernel"])
def test_pylayerfs_mount_passes_with_redirect_dir_on(reference: str) -> None:
    """Against the model and against the kernel mounted with the same options (interop both ways)."""
    options = Options(examples=30, seed=16, mount_options="redirect_dir=on")
    result = check(target("pylayerfs"), target(reference), options)
    assert result.passed, report.text(result)


@pytest.mark.root
def test_fuse_overlayfs_refusing_redirect_dir_on_is_one_line() -> None:
    if shutil.which("fuse-overlayfs") is None:
        pytest.skip("fuse-overlayfs is not installed")
    result = check(target("fuse-overlayfs"), MODEL, Options(examples=5, mount_options="redirect_dir=on"))
    assert result.error is not None and result.seconds < 10, report.text(result)  # a refusal is not retried
    assert result.error.startswith("fuse-overlayfs cannot mount: ") and "redirect_dir=off" in result.error
    assert len(report.text(result).splitlines()) == 1


class EngineMachine(OverlayMachine):
    """The state machine as a user would use it in a pytest suite."""


EngineMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=10, deadline=None)
TestEngineMachine = pytest.mark.root(EngineMachine.TestCase)


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_a_running_check_does_not_keep_host_mounts_alive(tmp_path: Path) -> None:
    """The check's namespace drops its copies of the host's FUSE mounts (issue 12 item 8's kind), so a
    `pylayerfs umount` elsewhere ends the daemon at once and the upper can be mounted again."""
    layers = [str(tmp_path / d) for d in ("l", "u", "w")]
    for d in layers:
        os.makedirs(d)
    lowers, upper, work = [layers[0]], layers[1], layers[2]
    argv = [sys.executable, "-m", "pylayerfs", "check", "--impl", "engine", "--examples", "100000", "--seed", "1"]
    with pylayerfs_mount(str(tmp_path / "m"), lowers, upper, work) as mnt:
        daemon = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _serves(int(p), mnt))
        checker = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30  # until the check's namespace exists
            while not _in_other_namespace(checker.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            run_pylayerfs("umount", mnt)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{daemon}"), "the daemon lives on while the check runs"
            with pylayerfs_mount(mnt, lowers, upper, work):
                pass
        finally:
            checker.terminate()
            checker.wait(timeout=30)


def _serves(pid: int, mountpoint: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"mount" in argv and os.fsencode(mountpoint) in argv


def _in_other_namespace(pid: int) -> bool:
    """Has a child of ``pid`` (the check's worker) entered a mount namespace of its own?"""
    try:
        children = open(f"/proc/{pid}/task/{pid}/children").read().split()
        return any(os.readlink(f"/proc/{c}/ns/mnt") != os.readlink("/proc/self/ns/mnt") for c in children)
    except OSError:
        return False
