"""pylayerfs's engine in-process, behind the VFS checks a mount would get from the kernel."""

from __future__ import annotations

import os
import stat
from typing import Any

from pylayerfs.overlay.filesystem import Overlay
from pylayerfs.overlay.state import Caller
from pylayerfs.testing.vfs import Vfs


class EngineFileSystem(Vfs):
    """An :class:`~pylayerfs.overlay.filesystem.Overlay` driven with the calls the FUSE adapter would make."""

    def __init__(self, overlay: Overlay) -> None:
        super().__init__()
        self.ov = overlay
        self.caller = Caller.me()

    def _mode(self, path: str) -> int | None:
        try:
            return int(self.ov.getattr(path)["st_mode"])
        except FileNotFoundError:
            return None

    def _stat(self, path: str) -> os.stat_result:
        a = self.ov.getattr(path)
        keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size")
        mode, ino, nlink, uid, gid, size = (a[k] for k in keys)
        return os.stat_result((mode, ino, 0, nlink, uid, gid, size, a["st_atime"] / 1e9, a["st_mtime"] / 1e9, 0))

    def _same(self, a: str, b: str) -> bool:
        return bool(self.ov.getattr(a)["st_ino"] == self.ov.getattr(b)["st_ino"])

    def _readlink(self, path: str) -> str:
        return self.ov.readlink(path)

    def _listdir(self, path: str) -> list[str]:
        return [name for name, _, _ in self.ov.readdir(path) if name not in (".", "..")]

    def _create(self, path: str, mode: int) -> tuple[int, str]:
        return self.ov.create(path, stat.S_IFREG | mode, os.O_WRONLY, self.caller), path

    def _open(self, path: str, flags: int) -> tuple[int, str]:
        return self.ov.open(path, flags & ~os.O_APPEND), path

    def _read(self, handle: tuple[int, str]) -> bytes:
        return self.ov.read(handle[0], 1 << 16, 0)

    def _write(self, handle: tuple[int, str], data: bytes, append: bool) -> None:
        offset = int(self.ov.getattr(handle[1], handle[0])["st_size"]) if append else 0
        self.ov.write(handle[0], data, offset)

    def _release(self, handle: tuple[int, str]) -> None:
        self.ov.release(handle[0])

    def _truncate(self, path: str, length: int, handle: Any) -> None:
        self.ov.truncate(path, length, None if handle is None else handle[0])

    def _mkdir(self, path: str, mode: int) -> None:
        self.ov.mkdir(path, mode, self.caller)

    def _mkfifo(self, path: str, mode: int) -> None:
        self.ov.mknod(path, stat.S_IFIFO | mode, 0, self.caller)

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
