"""The inode index (``index=on``): hard links to a lower file stay one inode after copy-up, in the kernel's format.

Documentation/filesystems/overlayfs.rst, "Inode index"; fs/overlayfs/ namei.c, copy_up.c, util.c, inode.c,
readdir.c and super.c. Without an index, copying up one name of a lower hard link breaks the link: the other names
still show the lower file. With it:

* The index is ``WORKDIR/index`` (kept across mounts, mode 0 as root like ``work/``). An entry is named by the
  lowercase hex of the lower object's overlay file handle (the ``origin`` xattr's bytes, the kernel's
  ``ovl_get_index_name``).
* The first copy-up of any name of a lower non-directory with more than one link goes to the index entry (with its
  ``origin``), then is hard-linked to that name in the upper layer (the kernel's ``ovl_do_copy_up``, ``ovl_link_up``).
  Copying up another name of it only links the index entry there.
* A name that is still lower-only but whose index entry exists is the index entry's inode: its data and metadata are
  the copy's (the kernel's ``ovl_lookup``, ``upperdentry = index``), and copying it up links it (:meth:`Index.alias`).
* The merged link count is kept in the entry's ``<prefix>nlink``: ``"U%+d"`` relative to the upper inode's count, or
  ``"L%+d"`` relative to the lower's (``ovl_set_nlink_upper``/``_lower``, read back by ``ovl_get_nlink``). Before
  a link, unlink or rename over an indexed object, a lower-only name of it is linked up and the count rewritten
  relative to the upper inode (``ovl_nlink_start``); when it reaches 0, the entry is removed (``ovl_nlink_end``,
  ``ovl_cleanup_index``).
* At mount (``ovl_get_indexdir``): the upper root's ``origin`` must be the top lower root's handle (set at the
  first mount; another lower: refused with ESTALE, "failed to verify upper root origin"); the index directory's
  ``<prefix>upper`` must be the upper root's handle (flag ``OVL_FH_FLAG_PATH_UPPER``); leftovers (``#*``), stale
  entries (origin gone or not the entry's name) and orphans (merged link count 0) are removed
  (``ovl_indexdir_cleanup``, ``ovl_verify_index``); an entry that cannot be an index entry refuses the mount (EINVAL).
  ``index=on`` on a stack without upper layer is ignored (an info line), and falls back to off (a warning) where a
  lower or the upper filesystem makes no file handles, as the kernel does.

Not implemented: ``nfs_export`` (it indexes every copy-up, directories included, and whites out the entries of
removed objects) and ``xino``; both stay refused. The kernel builds copies in ``index/`` where pylayerfs builds them
in ``work/``: either way they are renamed into place complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from collections.abc import Callable

from pylayerfs.overlay import realfs
from pylayerfs.overlay.layers import Layer, LowerLayer, entry_of, origin_object, split
from pylayerfs.overlay.lookup import Lookup, LowerHit, LowerStack, Node
from pylayerfs.overlay.markers import (
    OVL_FH_FLAG_PATH_UPPER,
    Markers,
    OriginHandle,
    decode_origin,
    encode_origin,
    get,
    is_whiteout,
)
from pylayerfs.overlay.params import MountError

INDEX_DIR = "index"
log = logging.getLogger("pylayerfs")
_NLINK = re.compile(rb"([LU])([+-][0-9]+)\n?")
_RETRY = "try deleting index dir or mounting with '-o index=off' to disable inodes index"


def index_name(origin: bytes) -> str:
    """The index entry's name for the ``origin`` value: its bytes in lowercase hex (``ovl_get_index_name``)."""
    return origin.hex()


def merged_nlink(value: bytes | None, lower_nlink: int, upper_nlink: int, fallback: int) -> int:
    """The merged link count an ``nlink`` xattr ``value`` gives (the kernel's ``ovl_get_nlink``).

    ``"L<diff>"`` is relative to ``lower_nlink``, ``"U<diff>"`` to ``upper_nlink`` (the index entry's inode). A lower
    object with one link, a missing or malformed value, or a count below 1 gives ``fallback``. Never raises.
    """
    match = _NLINK.fullmatch(value) if value is not None and lower_nlink != 1 else None
    if match is None:
        return fallback
    nlink = (lower_nlink if match[1] == b"L" else upper_nlink) + int(match[2])
    return nlink if nlink > 0 else fallback


class Index:
    """The mount's inode index, ``WORKDIR/index``, made, verified and cleaned up by :meth:`open`.

    ``ino_of`` maps a lower object's lstat to the inode number the mount reports (``InodeNumbers.of_real``).
    """

    def __init__(
        self,
        layer: LowerLayer,
        lowers: list[LowerLayer],
        markers: Markers,
        ino_of: Callable[[os.stat_result], int],
    ) -> None:
        self.layer, self.fd, self.lowers, self.markers, self.ino_of = layer, layer.fd, lowers, markers, ino_of
        self._nlink_attr = markers.prefix + "nlink"

    @classmethod
    def open(
        cls,
        upper: Layer | None,
        workdir: str | None,
        lowers: list[LowerLayer],
        markers: Markers,
        ino_of: Callable[[os.stat_result], int],
        uuid_off: bool = False,
    ) -> Index | None:
        """The index of a mount with ``index=on`` (the kernel's ``ovl_get_indexdir``), or None where it falls back.

        ``workdir`` is the workdir's path. None (index off) on a stack without ``upper``, or where a lower or the
        upper filesystem makes no file handles, with the kernel's info or warning line in the log. Raises
        :class:`MountError` with the kernel's reason when the upper root's origin is another lower root's (ESTALE:
        "failed to verify upper root origin"), the index directory's ``upper`` xattr another upper root's (ESTALE), or
        an entry cannot be an index entry (EINVAL, ENODATA); OSError for the upper filesystem's errors (EPERM for
        ``trusted.*`` xattrs without CAP_SYS_ADMIN, ENOSPC...).
        """
        if upper is None or workdir is None:
            log.info('option "index=on" is useless in a non-upper mount, ignore')
            return None
        for layer in lowers:
            if realfs.file_handle(layer.fd, None) is None:
                log.warning("fs on '%s' does not support file handles, falling back to index=off,nfs_export=off.",
                            layer.root)  # fmt: skip
                return None
        upper_handle = realfs.file_handle(upper.fd, None)
        if upper_handle is None:
            log.warning("upper fs does not support file handles, falling back to index=off.")
            return None
        root_origin = markers.origin_value(lowers[0].fd, None, lowers[0].uuid)
        _verify_set(upper.fd, markers.origin, root_origin, "failed to verify upper root origin")
        root_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileExistsError):
                realfs.mkdir(root_fd, INDEX_DIR, 0 if os.geteuid() == 0 else 0o700)  # as work/ (workdir.py)
        finally:
            os.close(root_fd)
        layer = LowerLayer(0, os.path.join(workdir, INDEX_DIR), markers)
        try:
            uuid = realfs.NULL_UUID if uuid_off else realfs.fs_uuid(upper.fd)
            value = bytearray(encode_origin(OriginHandle(uuid, *upper_handle)))
            value[3] |= OVL_FH_FLAG_PATH_UPPER
            _verify_set(layer.fd, markers.prefix + "upper", bytes(value), "failed to verify index dir 'upper' xattr")
            index = cls(layer, lowers, markers, ino_of)
            index.cleanup()
        except BaseException:
            layer.close()
            raise
        return index

    def close(self) -> None:
        """Close the index directory's fds."""
        self.layer.close()

    # -- the entries ---------------------------------------------------------------------------------------------

    def _stat(self, entry: str) -> os.stat_result | None:
        try:
            return os.stat(entry, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _nlink_value(self, entry: str) -> bytes | None:
        return get(self.fd, entry, self._nlink_attr)

    def _set_nlink(self, entry: str, relative_to: str, diff: int) -> None:
        """Write the entry's ``nlink`` xattr, ``"U%+i"`` or ``"L%+i"`` as the kernel's ``ovl_set_nlink_common``."""
        realfs.setxattr(self.fd, entry, self._nlink_attr, f"{relative_to}{diff:+d}".encode())

    def _lower_of(self, origin: OriginHandle) -> os.stat_result | None:
        """The lstat of the lower object ``origin`` names (``ovl_check_origin_fh``); None when no layer has it."""
        return origin_object(self.lowers, *origin)

    def name_for(self, node: Node) -> str | None:
        """The index entry a copy-up of the lower-only ``node`` goes to: a non-directory whose lower object has more
        than one link (the kernel's ``ovl_need_index``), and a file handle; None for any other node (and for a name
        that already has an entry: :meth:`alias`). Raises the lstat and name_to_handle_at errors."""
        if node.upper is not None or node.is_dir or node.lower.metacopy or node.lower.hits[0].layer is self.layer:
            return None
        if node.st.st_nlink < 2:
            return None
        top = node.lower.hits[0]
        with top.layer.parent(top.path) as (dirfd, name):
            origin = self.markers.origin_value(dirfd, name, top.layer.uuid)
        return index_name(origin) if origin else None

    def alias(self, node: Node) -> Node:
        """The lower-only ``node`` as the merged view shows it: where it is a name of an indexed hard link, the node of
        its index entry (the kernel's ``ovl_lookup`` with ``upperdentry = index``), else ``node`` itself.

        That node shows the copy's data and metadata (its ``lower`` is the entry, the index directory taken as a
        layer) with the lower object's inode number and the merged link count. Raises EIO for an entry of another
        type, or a whiteout ("bad index found", ``ovl_lookup_index``), and the lstat, getxattr and name_to_handle_at
        errors.
        """
        name = self.name_for(node)
        entry = self._stat(name) if name is not None else None
        if name is None or entry is None:
            return node
        lower_st = node.st
        if is_whiteout(entry) or stat.S_IFMT(entry.st_mode) != stat.S_IFMT(lower_st.st_mode):
            raise OSError(errno.EIO, "bad index found", node.path)
        nlink = merged_nlink(self._nlink_value(name), lower_st.st_nlink, entry.st_nlink, entry.st_nlink)
        hit = LowerHit(self.layer, entry_of(entry, entry.st_dev), name)  # the entry, in the index directory
        return Node(node.path, None, LowerStack((hit,)), origin=self.ino_of(lower_st), nlink=nlink, lower_st=entry)

    def _upper_entry(self, dirfd: int, name: str, upper: os.stat_result) -> tuple[str, os.stat_result, int] | None:
        """For the upper non-directory ``(dirfd, name)`` (``upper`` its lstat) that is indexed (its ``origin`` names
        an entry that is the same inode): the entry's name, lstat and merged link count; else None."""
        if stat.S_ISDIR(upper.st_mode) or upper.st_nlink < 2:
            return None
        value = get(dirfd, name, self.markers.origin)
        entry_name = index_name(value) if value else ""
        entry = self._stat(entry_name) if entry_name else None
        if entry is None or (entry.st_dev, entry.st_ino) != (upper.st_dev, upper.st_ino):
            return None
        origin = decode_origin(value or b"")
        lower = self._lower_of(origin) if origin is not None else None
        lower_nlink = lower.st_nlink if lower is not None else 1
        nlink = merged_nlink(self._nlink_value(entry_name), lower_nlink, entry.st_nlink, entry.st_nlink)
        return entry_name, entry, nlink

    def indexed(self, node: Node, dirfd: int, name: str) -> Node:
        """The upper non-directory ``node`` at ``(dirfd, name)``, given its merged link count where it is indexed.

        Raises the getxattr errors.
        """
        if node.upper is not None and (found := self._upper_entry(dirfd, name, node.upper)) is not None:
            node.nlink = found[2]
        return node

    # -- copy-up (copy_up.py) ------------------------------------------------------------------------------------

    def copied_up(self, entry: str, lower_nlink: int, dirfd: int, name: str) -> None:
        """The copy of a lower hard link (``lower_nlink`` links) was just renamed to the index ``entry``: record the
        merged count and link it at ``(dirfd, name)`` in the upper layer (``ovl_do_copy_up``, then
        ``ovl_link_up``). Raises the setxattr and link errors (ENOSPC, EMLINK...)."""
        self._set_nlink(entry, "U", lower_nlink - 1)
        self._link_up(entry, lower_nlink, lower_nlink, dirfd, name)

    def link_up(self, node: Node, dirfd: int, name: str) -> bool:
        """Copy-up of ``node`` where it is the alias of an index entry (:meth:`alias`): link the entry at
        ``(dirfd, name)``, keeping that directory's times (``ovl_link_up``). False (nothing done) for any other node.
        Raises the setxattr and link errors (ENOSPC, EMLINK...)."""
        if node.upper is not None or node.lower.hits[0].layer is not self.layer:
            return False
        entry = node.lower.hits[0].path
        lower = self._lower_of_entry(entry)
        parent_st = os.stat(dirfd)
        self._link_up(entry, node.nlink or 1, lower.st_nlink if lower is not None else 1, dirfd, name)
        realfs.utime(dirfd, None, (parent_st.st_atime_ns, parent_st.st_mtime_ns))
        return True

    def _lower_of_entry(self, entry: str) -> os.stat_result | None:
        origin = decode_origin(bytes.fromhex(entry))
        return self._lower_of(origin) if origin is not None else None

    def _link_up(self, entry: str, merged: int, lower_nlink: int, dirfd: int, name: str) -> None:
        self._set_nlink(entry, "L", merged - lower_nlink)
        realfs.link(self.fd, entry, dirfd, name)
        st = self._stat(entry)
        self._set_nlink(entry, "U", merged - (st.st_nlink if st is not None else 1))

    # -- link, unlink, rename (namespace.py) ---------------------------------------------------------------------

    def nlink_start(self, path: str, lookup: Lookup, copy_up: Callable[[str], Node]) -> str | None:
        """Before a link, unlink or rename of (or over) the non-directory ``path``: the kernel's ``ovl_nlink_start``.

        A lower-only name of a lower hard link is copied up first (linked up where its index entry exists), and the
        merged link count of an indexed object is recorded relative to its upper inode (``"U%+i"``), so that it stays
        right whatever the operation changes in the upper layer. Returns the index entry's name for
        :meth:`nlink_end` (None: not indexed). ``lookup`` is the mount's, ``copy_up(path)`` its copy-up. Raises what
        the lookup and copy-up of ``path`` raise.
        """
        node = lookup.lookup(path)
        if node.is_dir:
            return None
        if node.upper is None and (node.lower.hits[0].layer is self.layer or self.name_for(node) is not None):
            node = copy_up(path)
        if node.upper is None:
            return None
        parent_path, name = split(path)
        found = self._upper_entry(lookup.lookup(parent_path).upper_fd, name, node.upper)
        if found is None:
            return None
        entry, st, merged = found
        self._set_nlink(entry, "U", merged - st.st_nlink)
        return entry

    def nlink_end(self, entry: str | None) -> None:
        """After the operation :meth:`nlink_start` prepared: an object whose merged link count is 0 now loses its index
        entry (``ovl_nlink_end``, ``ovl_cleanup_index``). An entry still linked elsewhere is kept, its count set to the
        links left but its own (the kernel's "cleanup linked index"). Raises the unlink and setxattr errors."""
        st = self._stat(entry) if entry is not None else None
        if entry is None or st is None:
            return
        match = _NLINK.fullmatch(self._nlink_value(entry) or b"")
        if match is None or match[1] != b"U" or st.st_nlink + int(match[2]) > 0:
            return
        if st.st_nlink != 1:
            log.warning("cleanup linked index (%s/%s, ino=%d, nlink=%d)", INDEX_DIR, entry, st.st_ino, st.st_nlink)
            self._set_nlink(entry, "U", -1)
            return
        realfs.unlink(self.fd, entry)

    # -- at mount ------------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove what the kernel's ``ovl_indexdir_cleanup`` removes: leftovers of a copy (``#*``), stale entries
        (the lower object gone, or an ``origin`` that is not the entry's name) and orphans (a merged link count of 0).

        Raises :class:`MountError` for an entry that cannot be an index entry (a name that is no overlay file handle:
        EINVAL; a non-directory without ``origin``: ENODATA), as the kernel refuses the mount then.
        """
        for name in sorted(os.listdir(realfs.fd_path(self.fd))):
            if name.startswith("#"):
                realfs.rmtree(self.fd, name)
                continue
            code = self._verify(name)
            if code in (errno.ESTALE, errno.ENOENT):
                log.warning("%s index entry (%s/%s)", "stale" if code == errno.ESTALE else "orphan", INDEX_DIR, name)
                realfs.rmtree(self.fd, name)
            elif code:
                raise MountError(f"failed to verify index ({INDEX_DIR}/{name}): {os.strerror(code)}; {_RETRY}")

    def _verify(self, name: str) -> int:
        """The kernel's ``ovl_verify_index`` of the entry ``name``: 0 (keep), ESTALE, ENOENT (orphan) or another
        errno (refuse the mount)."""
        try:
            raw = bytes.fromhex(name)
        except ValueError:
            return errno.EINVAL
        origin = decode_origin(raw)
        if origin is None:
            return errno.EINVAL
        st = self._stat(name)
        if st is None or is_whiteout(st) or stat.S_ISDIR(st.st_mode):
            return 0  # a whiteout blocks an exported handle; directories are verified with nfs_export only
        value = get(self.fd, name, self.markers.origin)
        if value is None or decode_origin(value) is None:  # none, or one that is no file handle: "invalid origin"
            return errno.ENODATA
        if value != raw:
            return errno.ESTALE
        if st.st_nlink == 1:
            lower = self._lower_of(origin)
            if lower is None:
                return errno.ESTALE
            if merged_nlink(self._nlink_value(name), lower.st_nlink, 1, 0) == 0:
                return errno.ENOENT
        return 0


def _verify_set(fd: int, attr: str, value: bytes, reason: str) -> None:
    """``attr`` of the directory ``fd`` must be ``value``; set where absent or empty (``ovl_verify_set_fh``).

    Raises :class:`MountError` with ``reason`` and ESTALE's message for another handle, EINVAL's for a malformed
    one; OSError for the getxattr and setxattr errors.
    """
    existing = get(fd, None, attr)
    if not existing:
        realfs.setxattr(fd, None, attr, value)
        return
    if existing != value:
        code = errno.ESTALE if decode_origin(existing) is not None else errno.EINVAL
        raise MountError(f"{reason}: {os.strerror(code)}; {_RETRY}")
