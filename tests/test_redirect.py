"""Directory renames (``redirect_dir=on``) and metacopy renames and links, against the kernel's overlayfs (issue 16).

The same operations on ``mount -t overlay`` and on pylayerfs, over the SAME two lower directories (read-only for
both, so that the origins the two write are byte for byte equal): every result, the merged view, inode numbers, the
upper on disk with its redirect, opaque, metacopy, impure and origin xattrs; then each upper remounted by its own
implementation and by the other, the kernel's upper as a lower layer, the kernel's upper under
``redirect_dir=nofollow`` and under the default options, hand-made redirects (invalid, dangling, escaping, in the
upper and in lower layers), the option combinations the kernel refuses, and ``index=on`` where it ignores it.

Sources: Documentation/filesystems/overlayfs.rst ("Renaming directories", "Metadata only copy up"),
fs/overlayfs/namei.c ``ovl_lookup``, dir.c ``ovl_set_redirect``, params.c ``ovl_fs_params_verify``; the kernel
mounted here (6.18) is the oracle.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pylayerfs.overlay import realfs
from tests.mounts import TIMEOUT, backings, force_unmount, kernel_mount, options, pylayerfs_mount, run_pylayerfs
from tests.test_kernel import run
from tests.test_metacopy import all_hole
from tests.trees import Spec, build, disk_form, entry, tree_hash, view

pytestmark = [pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(300)]

OPTIONS = ["redirect_dir=on", "metacopy=on", "redirect_dir=on,metacopy=on"]  # metacopy=on turns redirect_dir=on
XATTRS = ("redirect", "impure", "origin")  # recorded besides opaque and metacopy; deterministic over the same lowers

LOWER: Spec = {
    "merged/m1": "m1",  # becomes a merged directory (a file created in it), then moves to another parent
    "merged/sub/s1": "s1",
    "merged/sub/deeper/s2": "s2",
    "low/l1": "l1",  # stays a lower-only directory until renamed
    "low/deep/d1": "d1",
    "low/ls": ("symlink", "../f1"),
    "empty": None,
    "emptym": None,  # becomes an empty merged directory (chmod), then renamed over
    "mover/q": "q",
    "lx/x/x1": "x1",  # exchanged with a pure-upper directory
    "other/o1": "o1",
    "other/f2": "f2 data",
    "f1": "f1 data " * 1000,
    "hl": "hard",
    "sym": ("symlink", "f1"),
    "xa/a1": "a1",
    "deep/xb/b1": "b1",
    "gone/g1": "g1",
    "gone/sub/g2": "g2",
    "hx1": "two names",
    "hx2": ("link", "hx1"),  # a lower hard link
    "tr": "to be truncated",
    "fdf": "read through a descriptor",
    "od/c1": "in a dir renamed while open",
    "od/sd/c2": "deeper",
}
BOTTOM: Spec = {  # a second lower layer below LOWER: redirects are followed in every lower layer
    "merged/m2": "m2 from the bottom",
    "merged/sub/s3": "s3 from the bottom",
    "low/l2": "l2 from the bottom",
    "lx/x/x2": "x2 from the bottom",
    "bottom/b": "only in the bottom layer",
    "f1": "hidden by the top layer",
    f"{'L' * 200}/{'M' * 100}/z": "a redirect to here takes over 256 bytes",
}


def _create(path: str, data: str = "new") -> None:
    with open(path, "w") as f:
        f.write(data)


def _append(path: str) -> None:
    with open(path, "a") as f:
        f.write("+")


def _rename_and_truncate(old: str, new: str) -> None:
    os.rename(old, new)
    os.truncate(new, 3)


def _rename_and_write_open(old: str, new: str) -> bytes:
    """What a descriptor opened before the rename (and the data copy-up) reads after both."""
    fd = os.open(old, os.O_RDONLY)
    try:
        os.rename(old, new)
        _append(new)
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def _rename_open_dir(old: str, new: str) -> tuple[object, ...]:
    """Through a descriptor of a directory opened before its rename: its listing, a read and a create below it."""
    fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(old, new)
        with open("sd/c2", "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:
            data = f.read()
        os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        return sorted(os.listdir(fd)), data, sorted(os.listdir(new))
    finally:
        os.close(fd)


def _mkdir_and_list(path: str) -> list[str]:
    os.mkdir(path)
    return os.listdir(path)


def _renameat2(flags: int) -> Callable[[str, str], None]:
    return lambda old, new: realfs.renameat2(-100, old, -100, new, flags)


_exchange, _noreplace = _renameat2(realfs.RENAME_EXCHANGE), _renameat2(realfs.RENAME_NOREPLACE)

# (description, operation on the mountpoint)
OPERATIONS: list[tuple[str, Callable[[str], object]]] = [
    ("create in a lower dir: merged", lambda m: _create(f"{m}/merged/new")),
    ("mkdir a pure-upper dir", lambda m: os.mkdir(f"{m}/new")),
    ("create in it", lambda m: _create(f"{m}/new/n1")),
    ("rename a lower-only dir, same parent", lambda m: os.rename(f"{m}/low", f"{m}/low2")),
    ("move a merged dir to another parent", lambda m: os.rename(f"{m}/merged", f"{m}/other/merged")),
    ("move a lower dir into a renamed dir", lambda m: os.rename(f"{m}/other/merged/sub", f"{m}/low2/sub")),
    ("rename a renamed dir again", lambda m: os.rename(f"{m}/low2", f"{m}/low3")),
    ("rename it back to its old name", lambda m: os.rename(f"{m}/low3", f"{m}/low")),
    ("chmod an empty lower dir: merged", lambda m: os.chmod(f"{m}/emptym", 0o700)),
    ("rename a lower dir over an empty merged dir", lambda m: os.rename(f"{m}/mover", f"{m}/emptym")),
    ("exchange a lower dir and a pure-upper dir", lambda m: _exchange(f"{m}/lx", f"{m}/new")),
    ("noreplace onto an existing name", lambda m: _noreplace(f"{m}/empty", f"{m}/f1")),
    ("noreplace a lower dir to a free name", lambda m: _noreplace(f"{m}/empty", f"{m}/empty2")),
    ("move a relatively redirected dir to another parent", lambda m: os.rename(f"{m}/new", f"{m}/other/new2")),
    ("move a dir only in the bottom layer", lambda m: os.rename(f"{m}/bottom", f"{m}/low/sub/bottom2")),
    ("move a dir out of a renamed dir", lambda m: os.rename(f"{m}/low/deep", f"{m}/emptym/deep")),
    ("list a moved merged dir", lambda m: sorted(os.listdir(f"{m}/other/merged"))),
    ("list a dir moved into a renamed dir", lambda m: sorted(os.listdir(f"{m}/low/sub"))),
    ("list an exchanged dir", lambda m: sorted(os.listdir(f"{m}/other/new2"))),
    ("read through a renamed dir", lambda m: Path(f"{m}/low/sub/deeper/s2").read_bytes()),
    ("read a symlink in a renamed dir", lambda m: (os.readlink(f"{m}/low/ls"),)),
    ("move a dir out of a dir moved absolutely", lambda m: os.rename(f"{m}/low/sub/deeper", f"{m}/deeper2")),
    ("exchange two lower dirs in two parents", lambda m: _exchange(f"{m}/xa", f"{m}/deep/xb")),
    ("rename with a 201-byte redirect", lambda m: os.rename(f"{m}/{'L' * 200}", f"{m}/other/{'K' * 200}")),
    ("rename needing a 302-byte redirect", lambda m: os.rename(f"{m}/other/{'K' * 200}/{'M' * 100}", f"{m}/far")),
    ("create in a renamed tree", lambda m: _create(f"{m}/other/merged/created")),
    ("unlink a lower file in a renamed dir", lambda m: os.unlink(f"{m}/other/merged/m1")),
    ("unlink a lower file two renames deep", lambda m: os.unlink(f"{m}/low/sub/s1")),
    ("rmdir a non-empty renamed dir", lambda m: os.rmdir(f"{m}/low/sub")),
    ("rmdir an empty renamed dir", lambda m: os.rmdir(f"{m}/empty2")),
    ("mkdir at a moved dir's old name: empty", lambda m: _mkdir_and_list(f"{m}/merged")),
    ("mkdir at a renamed dir's old name: empty", lambda m: _mkdir_and_list(f"{m}/empty")),
    ("mkdir where a dir moved out of a moved dir", lambda m: _mkdir_and_list(f"{m}/other/merged/sub")),
    ("rename a lower dir to empty it", lambda m: os.rename(f"{m}/gone", f"{m}/other/gone2")),
    ("unlink in it", lambda m: os.unlink(f"{m}/other/gone2/g1")),
    ("unlink in its lower subdir", lambda m: os.unlink(f"{m}/other/gone2/sub/g2")),
    ("rmdir a lower dir in it", lambda m: os.rmdir(f"{m}/other/gone2/sub")),
    ("rmdir the emptied renamed dir", lambda m: os.rmdir(f"{m}/other/gone2")),
    ("rename a lower file, same parent", lambda m: os.rename(f"{m}/f1", f"{m}/f1x")),
    ("move a lower file to a renamed dir", lambda m: os.rename(f"{m}/other/f2", f"{m}/low/f2")),
    ("rename the moved file again", lambda m: os.rename(f"{m}/low/f2", f"{m}/low/f2b")),
    ("hard link a renamed file", lambda m: os.link(f"{m}/low/f2b", f"{m}/f2link")),
    ("rename a lower file over another", lambda m: os.rename(f"{m}/other/o1", f"{m}/low/l1")),
    ("hard link a lower file into another dir", lambda m: os.link(f"{m}/hl", f"{m}/other/hlink")),
    ("read both names", lambda m: (Path(f"{m}/hl").read_bytes(), Path(f"{m}/other/hlink").read_bytes())),
    ("move a lower symlink", lambda m: os.rename(f"{m}/sym", f"{m}/other/sym2")),
    ("read a renamed file", lambda m: Path(f"{m}/f1x").read_bytes()[:16]),
    ("chmod a renamed file", lambda m: os.chmod(f"{m}/f1x", 0o600)),
    ("write to it: data copy-up", lambda m: _append(f"{m}/f1x")),
    ("read it", lambda m: Path(f"{m}/f1x").read_bytes()[-16:]),
    ("read the moved file", lambda m: Path(f"{m}/low/f2b").read_bytes()),
    ("rename one of two lower hard links", lambda m: os.rename(f"{m}/hx1", f"{m}/other/hx1r")),
    ("setxattr on a renamed dir", lambda m: os.setxattr(f"{m}/low", "user.k", b"v")),
    ("utimes on a renamed file", lambda m: os.utime(f"{m}/low/f2b", (1, 2))),
    ("rename a lower file and truncate it", lambda m: _rename_and_truncate(f"{m}/tr", f"{m}/other/trr")),
    ("rename and write a file open before", lambda m: _rename_and_write_open(f"{m}/fdf", f"{m}/low/fdf2")),
    ("rename a dir open as a dirfd", lambda m: _rename_open_dir(f"{m}/od", f"{m}/other/od2")),
    ("write through one link of a metacopy file", lambda m: _append(f"{m}/other/hlink")),
    ("read the other link", lambda m: Path(f"{m}/hl").read_bytes()),
    ("rename a lower dir over a non-empty renamed dir", lambda m: os.rename(f"{m}/deep", f"{m}/low")),
    ("rename a file over a renamed dir", lambda m: os.rename(f"{m}/f1x", f"{m}/low")),
    ("rename a renamed dir over a file", lambda m: os.rename(f"{m}/low", f"{m}/f1x")),
]

# Where the kernel records each rename (redirect_dir=on; dir.c ovl_set_redirect): the bare old name in one parent, the
# path from the layer's root for a move to another parent, built from the ancestors' redirects.
REDIRECTS = {
    "low": b"low",  # renamed twice in the same parent, back to its name: the first redirect stays
    "other/merged": b"/merged",
    "low/sub": b"/merged/sub",
    "other/new2": b"/lx",  # relative "lx" from the exchange, made absolute by the move
    "emptym": b"mover",  # same parent, over an empty merged dir
    "emptym/deep": b"/low/deep",
    "low/sub/bottom2": b"/bottom",
    "deeper2": b"/merged/sub/deeper",  # the path built from its parent's absolute redirect
    "xa": b"/deep/xb",  # RENAME_EXCHANGE: each side redirected to the other's origin
    "deep/xb": b"/xa",
    "other/od2": b"/od",  # renamed while open
    f"other/{'K' * 200}": b"/" + b"L" * 200,  # 201 bytes; a 302-byte one is EXDEV (the kernel's redirect_max 256)
}
METACOPY_REDIRECTS = {  # no data copied for these
    "low/f2b": b"/other/f2",
    "f2link": b"/other/f2",
    "low/l1": b"/other/o1",
    "hl": b"/hl",
    "other/hlink": b"/hl",
}


UNWRITTEN = ("low/f2b", "f2link", "low/l1", "other/hx1r")  # with metacopy=on, metacopy files to the end


@dataclass
class Side:
    """One implementation's run: its upper directory, each operation's result, the view, inode numbers."""

    upper: str
    results: list[object]
    view: dict[str, object]
    inos: dict[str, int]
    before_write: dict[str, Any]  # the upper's disk_form before the renamed file's first write


IMPLEMENTATIONS: dict[str, Callable[..., contextlib.AbstractContextManager[str]]] = {
    "kernel": kernel_mount,
    "pylayerfs": pylayerfs_mount,
}


def _look(mnt: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The view below ``mnt`` (errors included, see ``view``) and the inode number of each path."""
    seen = view(mnt, with_ino=True, errors=True)
    return (
        {path: found[:-1] if isinstance(found, tuple) else found for path, found in seen.items()},
        {path: found[-1] for path, found in seen.items() if isinstance(found, tuple)},
    )


def _fresh(root: Path, *names: str) -> list[str]:
    """Fresh (emptied) directories ``root/name``."""
    dirs = [str(root / name) for name in names]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    return dirs


def _disk(upper: str) -> dict[str, Any]:
    return disk_form(upper, xattrs=XATTRS, links=True)


def _differences(first: Mapping[str, object], second: Mapping[str, object]) -> dict[str, tuple[object, object]]:
    """``{path: (first's, second's)}`` where the two differ (None: missing)."""
    pairs = {path: (first.get(path), second.get(path)) for path in first.keys() | second.keys()}
    return {path: pair for path, pair in pairs.items() if pair[0] != pair[1]}


def _operate(root: Path, impl: str, lowers: list[str], extra: str) -> Side:
    upper, work, mnt = _fresh(root / impl, "u", "w", "m")
    write = [d for d, _ in OPERATIONS].index("write to it: data copy-up")
    with IMPLEMENTATIONS[impl](mnt, lowers, upper, work, extra):
        results = run(mnt, OPERATIONS[:write])
        before_write = _disk(upper)
        results += run(mnt, OPERATIONS[write:])
        return Side(upper, results, *_look(mnt), before_write)


def _mounted(
    root: Path, impl: str, lowers: list[str], upper: str | None, extra: str
) -> tuple[dict[str, Any], dict[str, int]]:
    """``_look`` at ``lowers`` and ``upper`` mounted by ``impl`` with a fresh workdir; checks that readdir's d_ino is
    st_ino, as the kernel's readdir.c ``ovl_cache_update`` makes it in merged and impure directories."""
    work, mnt = _fresh(root / f"{impl}-again", "w", "m")
    with IMPLEMENTATIONS[impl](mnt, lowers, upper, work if upper else None, extra):
        seen, inos = _look(mnt)
        d_inos: dict[str, int] = {}
        for dirpath, _, _ in os.walk(mnt):
            with os.scandir(dirpath) as listing:
                d_inos |= {os.path.relpath(e.path, mnt): e.inode() for e in listing}
        assert d_inos == inos, f"{impl}: d_ino is not st_ino"
        return seen, inos


@pytest.fixture(params=OPTIONS)
def extra(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def lowers(backing: Path) -> list[str]:
    return [build(str(backing / "l0"), LOWER), build(str(backing / "l1"), BOTTOM)]


@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_renames_give_the_kernels_results_view_inodes_and_upper(backing, lowers, extra):
    lower_hashes = [tree_hash(lower) for lower in lowers]
    kernel, pylayerfs = (_operate(backing, impl, lowers, extra) for impl in IMPLEMENTATIONS)
    lower_inos = {
        os.lstat(os.path.join(d, n)).st_ino for lower in lowers for d, ds, fs in os.walk(lower) for n in ds + fs
    }
    differ = {  # everything that differs, at once: (kernel's, pylayerfs's)
        "results": [
            (d, k, p) for (d, _), k, p in zip(OPERATIONS, kernel.results, pylayerfs.results, strict=True) if k != p
        ],
        "view": _differences(kernel.view, pylayerfs.view),
        "st_ino of lower objects": {
            path: (ino, pylayerfs.inos.get(path))
            for path, ino in kernel.inos.items()
            if (ino in lower_inos or pylayerfs.inos.get(path) in lower_inos) and pylayerfs.inos.get(path) != ino
        },
        "upper before the write": _differences(kernel.before_write, pylayerfs.before_write),
        "upper": _differences(_disk(kernel.upper), _disk(pylayerfs.upper)),
    }
    assert {what: found for what, found in differ.items() if found} == {}
    assert [tree_hash(lower) for lower in lowers] == lower_hashes

    # what the operations were meant to do, as the kernel does it (so a kernel change shows here)
    results = dict(zip((d for d, _ in OPERATIONS), kernel.results, strict=True))
    assert results["noreplace onto an existing name"] == os.strerror(errno.EEXIST)
    assert results["rmdir a non-empty renamed dir"] == os.strerror(errno.ENOTEMPTY)
    for path, was in {"low": "low", "other/merged": "merged", "f1x": "f1", "other/hlink": "hl"}.items():
        assert kernel.inos[path] == os.lstat(os.path.join(lowers[0], was)).st_ino, path  # so st_ino is compared
    if "metacopy" in extra:  # chmod kept the renamed file metadata-only
        assert ("metacopy", b"") in kernel.before_write["f1x"] and ("metacopy", b"") not in _disk(kernel.upper)["f1x"]
    redirects = {**REDIRECTS, **(METACOPY_REDIRECTS if "metacopy" in extra else {})}
    for side in (kernel, pylayerfs):
        found = {path: os.getxattr(os.path.join(side.upper, path), "trusted.overlay.redirect") for path in redirects}
        assert found == redirects, side.upper
        for path in ("merged", "other/merged/sub"):  # a new dir at an old name: opaque, nothing shows through
            assert os.getxattr(os.path.join(side.upper, path), "trusted.overlay.opaque") == b"y"
        for path in UNWRITTEN if "metacopy" in extra else ():
            assert all_hole(os.path.join(side.upper, path)), f"data copied up for {path}"


@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_each_remounts_its_upper_reads_the_others_and_the_kernels_upper_as_a_lower(backing, lowers, extra):
    kernel, pylayerfs = (_operate(backing, impl, lowers, extra) for impl in IMPLEMENTATIONS)
    # each upper remounted by its writer, and by the other: the same view and inode numbers
    for impl, side in (("kernel", kernel), ("pylayerfs", pylayerfs)):
        for reader in IMPLEMENTATIONS:
            seen, inos = _mounted(backing, reader, lowers, side.upper, extra)
            differ = (_differences(side.view, seen), _differences(side.inos, inos))
            assert differ == ({}, {}), f"{reader} on {impl}'s upper: (view, st_ino) as (writer's, reader's)"
    # redirects in a lower layer are followed into the layers below it
    for impl in IMPLEMENTATIONS:
        assert _mounted(backing, impl, [kernel.upper, *lowers], None, extra)[0] == kernel.view, (
            f"{impl}: the kernel's upper as a lower layer"
        )


def _lookups(mnt: str, paths: list[str]) -> dict[str, object]:
    """Each path looked up by name: what ``view`` records for it, or the strerror."""
    found: dict[str, object] = {}
    for path in paths:
        try:
            found[path] = entry(os.path.join(mnt, path))
        except OSError as exc:
            found[path] = os.strerror(exc.errno or 0)
    return found


def _check_listings(mnt: str, found: dict[str, object]) -> None:
    """A directory lists exactly its names that look up, or fails with EPERM.

    The kernel's readdir of a merged or impure directory looks each name up (readdir.c ``ovl_cache_update``): a
    name that fails is marked stale and skipped, but the error ends that getdents(2) call, and reaches the caller
    when nothing was returned yet in it (fs/readdir.c): which of the two depends on the upper's directory order.
    """
    for path, seen in found.items():
        if isinstance(seen, tuple) and stat.S_ISDIR(seen[0]):
            names = {p.rsplit("/", 1)[-1]: s for p, s in found.items() if p and os.path.dirname(p) == path}
            try:
                listed = sorted(os.listdir(os.path.join(mnt, path)))
            except PermissionError:
                continue
            assert listed == sorted(n for n, s in names.items() if isinstance(s, tuple)), path


@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_a_redirected_upper_under_nofollow_and_the_default_options(backing, lowers, extra):
    """``redirect_dir=nofollow`` refuses a redirect that leads to a lower object (EPERM); the default (follow)
    follows it. Without ``metacopy=on`` a metacopy file is refused (EPERM) under both."""
    kernel = _operate(backing, "kernel", lowers, extra)
    paths = ["", *kernel.view]
    for mode in ("redirect_dir=nofollow", ""):
        seen = {}
        for impl, mount in IMPLEMENTATIONS.items():
            work, mnt = _fresh(backing / f"{impl}-{mode}", "w", "m")
            with mount(mnt, lowers, kernel.upper, work, mode):
                seen[impl] = _lookups(mnt, paths)
                _check_listings(mnt, seen[impl])
        assert _differences(seen["kernel"], seen["pylayerfs"]) == {}, mode or "default options (kernel, pylayerfs)"
        refused = {path for path, found in seen["kernel"].items() if found == os.strerror(errno.EPERM)}
        metacopy = UNWRITTEN if "metacopy" in extra else ()
        if mode:  # every redirected dir and what is below it, every metacopy file
            assert refused == {p for p in paths for r in [*REDIRECTS, *metacopy] if (p + "/").startswith(r + "/")}
        else:  # only the metacopy files
            assert refused == set(metacopy)
            if not metacopy:
                assert {path: seen["kernel"][path] for path in kernel.view} == kernel.view


# Redirects written by hand: invalid, dangling, escaping, a directory's to a file and a file's to a directory, each to
# its own target (two overlay objects sharing one lower directory give ESTALE on the kernel). What the kernel shows
# under metacopy=on (a directory listing, a file's content, or the strerror): namei.c ovl_check_redirect (EINVAL),
# lookup_one ("." and ".." are EACCES), a metacopy file whose data is missing is EIO.
EINVAL, EACCES, EIO = (os.strerror(e) for e in (errno.EINVAL, errno.EACCES, errno.EIO))
HAND_MADE: dict[str, tuple[bytes, object]] = {
    "d_empty": (b"", EINVAL),
    "d_slash": (b"/", EINVAL),
    "d_2slash": (b"//", EINVAL),
    "d_relative_with_slash": (b"t1/b", EINVAL),
    "d_trailing_slash": (b"/t2/", EINVAL),
    "d_double_slash": (b"/t3//b", EINVAL),
    "d_nowhere": (b"/nowhere", []),
    "d_relative_nowhere": (b"nowhere", []),
    "d_absolute": (b"/a", ["b", "x"]),
    "d_relative": (b"t4", ["y"]),
    "d_nested": (b"/a2/b", ["c2"]),
    "d_dotdot": (b"..", EACCES),
    "d_dot": (b".", EACCES),
    "d_root_dotdot": (b"/..", EACCES),
    "d_up_and_down": (b"/t5/../t5", EACCES),
    "d_to_a_file": (b"/f", []),
    "d_too_long": (b"/" + b"x" * 300, []),
    "d_nul": (b"t6\x00", ["y"]),  # the value ends at the NUL
    "d_opaque": (b"/t8", []),  # also opaque: nothing below shows
    "f_empty": (b"", EINVAL),
    "f_absolute": (b"/g1", "1"),
    "f_relative": (b"g2", "2"),
    "f_nested": (b"/a3/g3", "3"),
    "f_nowhere": (b"/nowhere", EIO),
    "f_to_a_dir": (b"/t7", EIO),
    "f_relative_with_slash": (b"t1/g", EINVAL),
    "f_dotdot": (b"..", EACCES),
}
HAND_MADE_LOWER: Spec = {
    "a/b/c": "c",
    "a/x": "x",
    "a2/b/c2": "c2",
    "a3/g3": "3",
    "f": "f",
    "g1": "1",
    "g2": "2",
    "t1/g": "g",
    **{f"t{i}/y": "y" for i in range(1, 9)},
}


def _hand_made_upper(upper: Path, prefix: str) -> str:
    """``upper`` with HAND_MADE's directories and metacopy files (1 byte), each with its redirect; xattrs named
    ``prefix`` + "redirect" and so on."""
    for name, (redirect, _) in HAND_MADE.items():
        if name.startswith("d_"):
            (upper / name).mkdir(parents=True)
        else:
            with open(upper / name, "w") as f:
                f.truncate(1)
            os.setxattr(upper / name, prefix + "metacopy", b"")
        os.setxattr(upper / name, prefix + "redirect", redirect)
    os.setxattr(upper / "d_opaque", prefix + "opaque", b"y")
    return str(upper)


# userxattr: user.overlay.* xattrs, only redirect_dir=nofollow allowed (params.c), no metacopy
@pytest.mark.parametrize("mode", ["redirect_dir=on", "metacopy=on", "redirect_dir=nofollow", "", "userxattr"])
@pytest.mark.parametrize("backing", backings(), indirect=True)
def test_invalid_dangling_and_escaping_redirects_as_the_kernel(backing, mode):
    lower = build(str(backing / "l"), HAND_MADE_LOWER)
    upper = _hand_made_upper(backing / "u", "user.overlay." if mode == "userxattr" else "trusted.overlay.")
    seen: dict[str, dict[str, object]] = {}
    for impl, mount in IMPLEMENTATIONS.items():
        work, mnt = _fresh(backing / impl, "w", "m")
        with mount(mnt, [lower], upper, work, mode):
            seen[impl] = {}
            for name in HAND_MADE:
                try:
                    path = os.path.join(mnt, name)
                    seen[impl][name] = sorted(os.listdir(path)) if name.startswith("d_") else Path(path).read_text()
                except OSError as exc:
                    seen[impl][name] = os.strerror(exc.errno or 0)
    assert _differences(seen["kernel"], seen["pylayerfs"]) == {}, "(kernel, pylayerfs)"
    if mode == "metacopy=on":
        assert seen["kernel"] == {name: shown for name, (_, shown) in HAND_MADE.items()}


# Three lower layers, redirects in the upper two: a redirect found in a layer is looked up in the layers below it only,
# and a redirected directory met there is followed further (namei.c ovl_lookup: "d.redirect" carried down the stack).
STACK: list[tuple[Spec, dict[str, bytes]]] = [
    ({"a/y": "top's a", "c/top": "top's c"}, {"c": b"/n"}),  # c: to the middle layer's n, itself redirected
    (
        {"a/mid": "middle's a", "n/own": "n's own", "m": "8 bytes!", "r/rr": "r"},
        {"n": b"/a", "m": b"/data/f", "r": b"b1"},
    ),
    ({"a/x": "bottom's a", "data/f": "the data", "b1/z": "z"}, {}),
]


def _stack(root: Path) -> list[str]:
    lowers = []
    for i, (spec, redirects) in enumerate(STACK):
        lowers.append(build(str(root / f"s{i}"), spec))
        for path, redirect in redirects.items():
            os.setxattr(os.path.join(lowers[-1], path), "trusted.overlay.redirect", redirect)
            if os.path.isfile(os.path.join(lowers[-1], path)):
                os.setxattr(os.path.join(lowers[-1], path), "trusted.overlay.metacopy", b"")
    return lowers


@pytest.mark.parametrize("mode", ["redirect_dir=on", "metacopy=on", "redirect_dir=nofollow", ""])
def test_redirects_in_lower_layers_are_followed_below_them_as_on_the_kernel(backing, mode):
    lowers = _stack(backing)
    seen = {}
    for impl, mount in IMPLEMENTATIONS.items():
        _, mnt = _fresh(backing / impl, "w", "m")
        with mount(mnt, lowers, None, None, mode):
            seen[impl] = view(mnt, errors=True)
            seen[impl] |= _lookups(mnt, ["c", "n", "m", "r", "c/own", "c/x", "n/x"])
    if mode != "metacopy=on":
        # A lower metacopy file without metacopy=on: the kernel refuses it (EPERM), pylayerfs shows it as it is on disk
        # (docs/overlay.md's difference table: the check would cost a getxattr per lower file looked up).
        assert seen["kernel"]["m"] == "Operation not permitted"
        for shown in seen.values():
            shown.pop("m")
    assert _differences(seen["kernel"], seen["pylayerfs"]) == {}, "(kernel, pylayerfs)"
    if mode == "metacopy=on":
        assert {"c/top", "c/own", "c/x", "n/x", "r/z"} <= set(seen["kernel"]) and not {"c/y", "c/mid"} & set(
            seen["kernel"]
        )
        assert seen["kernel"]["m"] == seen["kernel"]["data/f"]  # the metacopy file's data, from the layer below


# Options the kernel refuses together (params.c ovl_fs_params_verify; its reason goes to the kernel log only).
REFUSED = [
    "metacopy=on,redirect_dir=off",
    "redirect_dir=off,metacopy=on",
    "metacopy=on,redirect_dir=follow",
    "metacopy=on,redirect_dir=nofollow",
    "redirect_dir=nofollow,metacopy=on",
    "userxattr,redirect_dir=on",
    "userxattr,redirect_dir=follow",
    "redirect_dir=off,userxattr",
    "userxattr,metacopy=on",
    "nfs_export=on,index=off",
    "metacopy=on,nfs_export=on",
    "redirect_dir=bogus",
]


def _kernel_mount_logged(mnt: str, opts: str) -> tuple[bool, str]:
    """Try ``mount -t overlay -o opts mnt``: whether it mounted (it stays mounted), and the one line overlayfs logged
    meanwhile, without its prefix (a refusal's reason goes only to the kernel log; mount(8) says "bad option").

    Tried again (up to 3 times) when another line interleaves, from another test's overlay mount.
    """
    command = ["mount", "-t", "overlay", "overlay", "-o", opts, mnt]
    said: list[str] = []
    for _ in range(3):
        marker = f"pylayerfs-test {uuid.uuid4()}"
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(marker + "\n")
        mounted = subprocess.run(command, capture_output=True, timeout=TIMEOUT).returncode == 0
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
        after = log[log.rindex(marker) :].splitlines()[1:]
        said = [line.split(": ", 1)[1] for line in after if "overlay" in line.split("]", 1)[-1].split(":")[0]]
        if len(said) == 1:
            return mounted, said[0]
        if mounted:
            force_unmount(mnt)
    raise AssertionError(f"mount -o {opts}: overlayfs logged {said}, not one line")


@pytest.mark.parametrize("combination", REFUSED)
def test_options_the_kernel_refuses_together_are_refused_with_its_reason(backing, combination):
    lower = build(str(backing / "l"), {"f": "f"})
    upper, work, mnt = _fresh(backing, "u", "w", "m")
    opts = options([lower], upper, work, combination)
    try:
        mounted, reason = _kernel_mount_logged(mnt, opts)
        assert not mounted, f"the kernel mounted with {combination}"
        refused = run_pylayerfs("mount", "-o", opts, mnt, check=False)
        assert refused.returncode != 0, f"pylayerfs mounted with {combination}"
        assert len(refused.stderr.strip().splitlines()) == 1 and reason in refused.stderr, (reason, refused.stderr)
    finally:
        force_unmount(mnt)


@pytest.mark.parametrize("upper", [True, False], ids=["lower-without-file-handles", "no-upper"])
def test_index_on_where_the_kernel_ignores_it_mounts(backing, upper):
    """``index=on`` over a lower without file handles (an overlay) falls back to index=off, and without an upper it is
    useless: the kernel mounts, saying so in its log; pylayerfs mounts too and shows the same."""
    lowers = [build(str(backing / "l"), {"d/x": "x"}), build(str(backing / "l2"), {"d/y": "y"})]
    work, mnt, nested = _fresh(backing, "w", "m", "nested")
    seen = {}
    with contextlib.ExitStack() as stack:
        if upper:  # an overlay as the lower: no file handles
            lowers = [stack.enter_context(kernel_mount(nested, lowers))]
            dirs: tuple[str | None, ...] = tuple(_fresh(backing, "u"))
        else:
            dirs = (None,)
        try:
            mounted, said = _kernel_mount_logged(mnt, options(lowers, dirs[0], work if upper else None, "index=on"))
            assert mounted and ("file handles" if upper else "useless") in said, said
            seen["kernel"] = view(mnt)
        finally:
            force_unmount(mnt)
        if upper:
            _fresh(backing, "u", "w")
        if upper and os.environ.get("PYLAYERFS_BINDING") == "libfuse":  # refused there (docs/overlay.md, Inode index)
            refused = run_pylayerfs("mount", "-o", options(lowers, dirs[0], work, "index=on"), mnt, check=False)
            assert refused.returncode != 0 and "index=on needs the native binding" in refused.stderr
            return
        with pylayerfs_mount(mnt, lowers, dirs[0], work if upper else None, "index=on"):
            seen["pylayerfs"] = view(mnt)
    assert seen["pylayerfs"] == seen["kernel"]
