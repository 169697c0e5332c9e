"""Hypothesis strategies: operations on the shared names, and whole scenarios (lowers + operations)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from pylayerfs.testing import ops
from pylayerfs.testing.lowers import FILE_MODES, OWNERS, PATHS, SYMLINK_TARGETS, XATTR, Node, layers
from pylayerfs.testing.vfs import within

UTIMES = (1_000_000_000, 1_234_567_890)
XATTR_NAMES = ("user.a", XATTR)


def _fd_family(
    src: st.SearchStrategy[str],
    dst: st.SearchStrategy[str],
    dirs: st.SearchStrategy[str],
    flags: Sequence[str],
    held: Sequence[int],
) -> list[st.SearchStrategy[ops.Op]]:
    """Descriptors kept across steps, and what else happens to their files meanwhile (unlink, rename, link).

    An operation through a descriptor names one of the ``held`` slots (through a free one it would only meet
    the checker's own EBADF, see ``ops._OnSlot``); with none held, only opens are drawn. (The same ``builds``
    in two families would be drawn as one or two branches depending on hypothesis's strategy cache, which
    makes the search flaky: ``operations`` adds the name changes only when their own families are not drawn.)
    """
    any_slot = st.sampled_from(ops.SLOTS)
    slot = st.sampled_from(sorted(held))
    data = st.sampled_from([b"x", b"yy"])
    offset = st.sampled_from([0, 1, 4])
    length = st.sampled_from([0, 1, 3, 6])
    opens: list[st.SearchStrategy[ops.Op]] = [
        st.builds(ops.FdOpen, any_slot, st.one_of(src, dst), st.sampled_from([f for f in flags if f != "tmpfile"])),
        *([st.builds(ops.FdOpen, any_slot, dirs, st.just("tmpfile"))] if "tmpfile" in flags else []),
    ]
    if not held:
        return opens
    return [
        *opens,
        *(st.builds(cls, slot) for cls in (ops.FdClose, ops.FdRead, ops.FdStat, ops.FdSync)),
        st.builds(ops.FdWrite, slot, data),
        st.builds(ops.FdPread, slot, offset),
        st.builds(ops.FdPwrite, slot, offset, data),
        st.builds(ops.FdTruncate, slot, length),
        st.builds(ops.FdAllocate, slot, st.sampled_from(list(ops.FALLOCATE_MODES)), offset, length),
        st.builds(ops.FdChmod, slot, st.sampled_from(FILE_MODES)),
        st.builds(ops.FdChown, slot, st.sampled_from(OWNERS), st.sampled_from(OWNERS)),
        st.builds(ops.FdUtime, slot, st.sampled_from(UTIMES)),
    ]


def _families(
    src: st.SearchStrategy[str],
    dst: st.SearchStrategy[str],
    dirs: st.SearchStrategy[str],
    flags: Sequence[str],
    held: Sequence[int],
) -> dict[str, list[st.SearchStrategy[ops.Op]]]:
    return {
        "write": [
            st.builds(ops.Open, dst, st.sampled_from(list(ops.OPEN_MODES)), st.sampled_from([b"", b"x", b"yy"])),
            st.builds(ops.Truncate, src, st.sampled_from([0, 1, 3])),
        ],
        "remove": [st.builds(ops.Unlink, src), st.builds(ops.Rmdir, src)],
        "mkdir": [st.builds(ops.Mkdir, dst)],
        "rename": [st.builds(ops.Rename, src, dst, st.sampled_from(list(ops.RENAME_FLAGS)))],
        "link": [
            st.builds(ops.Link, src, dst),
            st.builds(ops.Symlink, st.sampled_from(SYMLINK_TARGETS), dst),
            st.builds(ops.Mkfifo, dst),
            st.builds(ops.Mknod, dst, st.sampled_from(list(ops.MKNOD_TYPES))),
        ],
        "meta": [
            st.builds(ops.Chmod, src, st.sampled_from(FILE_MODES)),
            st.builds(ops.Chown, src, st.sampled_from(OWNERS), st.sampled_from(OWNERS)),
            st.builds(ops.Utime, src, st.sampled_from(UTIMES)),
        ],
        "xattr": [
            st.builds(ops.SetXattr, src, st.sampled_from(XATTR_NAMES), st.sampled_from([b"1", b"22"])),
            st.builds(ops.RemoveXattr, src, st.sampled_from(XATTR_NAMES)),
        ],
        "read": [st.builds(cls, src) for cls in (ops.Stat, ops.Readdir, ops.Readlink, ops.Read, ops.ReadAcrossCopyUp)],
        "fd": _fd_family(src, dst, dirs, flags, held),
    }


def operations(
    families: Iterable[str] = ops.FAMILIES,
    existing: Sequence[str] = (),
    fresh: Sequence[str] = (),
    dirs: Sequence[str] = ("",),
    lacking: Iterable[str] = (),
    held: Sequence[int] = ops.SLOTS,
    moves_dirs: bool = False,
) -> st.SearchStrategy[ops.Op]:
    """One operation from the given families (see :data:`pylayerfs.testing.ops.FAMILIES`).

    Paths come from the shared names, from ``existing`` (what the tree has
    now: what an operation works on), from ``fresh`` (free names in an
    existing directory: what it creates, links or renames to) and, for
    ``O_TMPFILE``, from ``dirs`` (the directories). ``lacking`` names the
    open flags (:data:`pylayerfs.testing.ops.FD_FLAGS`) not to use, because an
    implementation does not support them. ``held``: the descriptor slots
    that hold one now (the default: any may). ``moves_dirs`` (``redirect_dir=on``):
    with the ``rename`` family, one operation in three renames a directory of
    ``dirs`` (nested ones too) to a free name of any directory or over another
    directory, with any flag; drawn one after the other, these make chains of
    renames of the same subtree.
    """
    names = st.sampled_from(PATHS)
    src = st.one_of(st.sampled_from(sorted(existing)), names) if existing else names
    dst = st.one_of([st.sampled_from(sorted(p)) for p in (fresh, existing) if p] + [names])
    flags = [f for f in ops.FD_FLAGS if f not in set(lacking)]
    table = _families(src, dst, st.sampled_from(sorted(dirs)), flags, held)
    unknown = set(families) - table.keys()
    if unknown:
        raise ValueError(f"unknown operation families: {', '.join(sorted(unknown))} (known: {', '.join(table)})")
    drawn = [s for name in table if name in families for s in table[name]]
    if "fd" in families:  # the names of open files change meanwhile
        drawn += [s for name in ("remove", "rename", "link") if name not in families for s in table[name][:1]]
    any_op = st.one_of(drawn)
    subdirs = sorted(d for d in dirs if d)
    if not (moves_dirs and "rename" in families and subdirs):
        return any_op

    def move(old: str) -> st.SearchStrategy[ops.Op]:  # anywhere but into itself (EINVAL, drawn often enough above)
        onto = [sorted(p for p in pool if not within(p, old)) for pool in (fresh, subdirs)]
        new = st.one_of([st.sampled_from(p) for p in onto if p] or [names])
        return st.builds(ops.Rename, st.just(old), new, st.sampled_from(list(ops.RENAME_FLAGS)))

    moved = st.sampled_from(subdirs).flatmap(move)
    return st.sampled_from((any_op, any_op, moved)).flatmap(lambda strategy: strategy)


@dataclass(frozen=True)
class Scenario:
    """Starting lower layers (top first) and the operations to run on the merged view."""

    lowers: list[dict[str, Node]]
    ops: list[ops.Op]


def scenarios(
    families: Iterable[str] = ops.FAMILIES, max_layers: int = 3, max_steps: int = 12
) -> st.SearchStrategy[Scenario]:
    """Whole scenarios decided up front (operations on the shared names only).

    The checker itself draws each operation after the previous one, so that
    half of them name paths that exist at that moment.
    """
    return st.builds(Scenario, layers(max_layers), st.lists(operations(families), min_size=1, max_size=max_steps))
