"""pylayerfs's engine in-process, behind the VFS checks a mount would get from the kernel.

Calls on an open file go where a mount sends them: data, size and fsync through its handle; fstat, fchmod,
fchown and futimens by its name while it has the one it was opened by (the kernel asks FUSE about an inode,
which libfuse's path API knows by name), and through the handle once that name is gone.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.state import Caller
from pylayerfs.testing.ops import NULL_DEVICE
from pylayerfs.testing.vfs import EXCHANGE, Vfs, within


@dataclass
class _Handle:
    fh: int
    path: str | None  # the name it was opened by, followed across renames; None once removed

    def target(self) -> tuple[str, int | None]:
        """``(path, None)`` while the name is there, else ``("", fh)``: the engine's arguments for a change."""
        return (self.path, None) if self.path is not None else ("", self.fh)


class EngineFileSystem(Vfs):
    """An :class:`~pylayerfs.overlay.filesystem.Overlay` driven with the calls the FUSE adapter would make."""

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.ov = overlay
        self.caller = Caller.me()
        self._handles: list[_Handle] = []

    def _named(self, fh: int, path: str) -> _Handle:
        handle = _Handle(fh, path)
        self._handles.append(handle)
        return handle

    def unlink(self, path: str) -> None:
        real = self.resolve(path, follow=False)
        super().unlink(path)
        for h in self._handles:
            if h.path == real:
                h.path = None

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        real_old, real_new = self.resolve(old, follow=False), self.resolve(new, follow=False)
        super().rename(old, new, flags)
        moves = [(real_old, real_new)] + ([(real_new, real_old)] if flags & EXCHANGE else [])
        for h in self._handles:
            if h.path is None:
                continue
            if h.path == real_new and not flags & EXCHANGE:  # replaced
                h.path = None
                continue
            for src, dst in moves:
                if within(h.path, src):
                    h.path = dst + h.path[len(src) :]
                    break

    def _mode(self, path: str) -> int | None:
        try:
            return int(self.ov.getattr(path)["st_mode"])
        except FileNotFoundError:
            return None

    def _stat(self, path: str, fh: int | None = None) -> os.stat_result:
        a = self.ov.getattr(path, fh)
        keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size")
        mode, ino, nlink, uid, gid, size = (a[k] for k in keys)
        return os.stat_result((mode, ino, 0, nlink, uid, gid, size, a["st_atime"] / 1e9, a["st_mtime"] / 1e9, 0))

    def _same(self, a: str, b: str) -> bool:
        return bool(self.ov.getattr(a)["st_ino"] == self.ov.getattr(b)["st_ino"])

    def _readlink(self, path: str) -> str:
        return self.ov.readlink(path)

    def _listdir(self, path: str) -> list[str]:
        return [name for name, _, _ in self.ov.readdir(path) if name not in (".", "..")]

    def _create(self, path: str, mode: int, access: int) -> _Handle:
        """``access``: O_RDONLY, O_WRONLY or O_RDWR, as the open asked (O_RDWR|O_CREAT must read back)."""
        return self._named(self.ov.create(path, stat.S_IFREG | mode, access, self.caller), path)

    def _tmpfile(self, directory: str, mode: int) -> _Handle:
        fh = self.ov.tmpfile(directory, stat.S_IFREG | mode, os.O_RDWR | os.O_TMPFILE, self.caller)
        handle = _Handle(fh, None)  # no name: every change goes through the handle (the native transport's TMPFILE)
        self._handles.append(handle)
        return handle

    def _open(self, path: str, flags: int) -> _Handle:
        return self._named(self.ov.open(path, flags & ~os.O_APPEND), path)

    def _pread(self, handle: _Handle, size: int, offset: int) -> bytes:
        return self.ov.read(handle.fh, size, offset)

    def _pwrite(self, handle: _Handle, data: bytes, offset: int) -> None:
        self.ov.write(handle.fh, data, offset)

    def _fstat(self, handle: _Handle) -> os.stat_result:
        return self._stat(handle.path or "", handle.fh)

    def _fchmod(self, handle: _Handle, mode: int) -> None:
        path, fh = handle.target()
        self.ov.chmod(path, mode, fh)

    def _fchown(self, handle: _Handle, uid: int, gid: int) -> None:
        path, fh = handle.target()
        self.ov.chown(path, uid, gid, fh)

    def _futimens(self, handle: _Handle, mtime_ns: int) -> None:
        path, fh = handle.target()
        self.ov.utimens(path, (mtime_ns, mtime_ns), fh)

    def _fallocate(self, handle: _Handle, mode: int, offset: int, length: int) -> None:
        self.ov.fallocate(handle.fh, mode, offset, length)

    def _fsync(self, handle: _Handle) -> None:
        self.ov.fsync(handle.fh, False)

    def _release(self, handle: _Handle) -> None:
        self.ov.release(handle.fh)
        self._handles.remove(handle)

    def _truncate(self, path: str | None, length: int, handle: _Handle | None) -> None:
        self.ov.truncate(path or "", length, None if handle is None else handle.fh)

    def _mkdir(self, path: str, mode: int) -> None:
        self.ov.mkdir(path, mode, self.caller)

    def _mknod(self, path: str, kind: int, mode: int) -> None:
        self.ov.mknod(path, kind | mode, NULL_DEVICE if kind == stat.S_IFCHR else 0, self.caller)

    def _symlink(self, target: str, path: str) -> None:
        self.ov.symlink(path, target, self.caller)

    def _rmdir(self, path: str) -> None:
        self.ov.rmdir(path)

    def _unlink(self, path: str) -> None:
        self.ov.unlink(path)

    def _link(self, old: str, new: str) -> None:
        self.ov.link(old, new)

    def _rename(self, old: str, new: str, flags: int) -> None:
        self.ov.rename(old, new, flags)

    def _chmod(self, path: str, mode: int) -> None:
        self.ov.chmod(path, mode)

    def _chown(self, path: str, uid: int, gid: int) -> None:
        self.ov.chown(path, uid, gid)  # the upper's filesystem clears set-user-ID as chown(2) does

    def _utime(self, path: str, mtime_ns: int) -> None:
        self.ov.utimens(path, (mtime_ns, mtime_ns))

    def _setxattr(self, path: str, name: str, value: bytes) -> None:
        self.ov.setxattr(path, name, value, 0)

    def _removexattr(self, path: str, name: str) -> None:
        self.ov.removexattr(path, name)

    def _listxattr(self, path: str) -> list[str]:
        return self.ov.listxattr(path)

    def _getxattr(self, path: str, name: str) -> bytes:
        return self.ov.getxattr(path, name)
