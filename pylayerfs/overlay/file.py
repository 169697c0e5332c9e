"""Open files: real file descriptors behind the merged view's file handles (the kernel's ``file.c``).

A file opened for writing (or with ``O_TRUNC``) is copied up first; its handle
then holds an fd on the upper file. A file opened read-only on a lower layer
holds an fd on the lower file, and is registered under its path: when the file
is later copied up, every such handle is switched to the upper copy, so an fd
opened before a copy-up reads the new data after it, as with the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class OpenFile:
    """One open file of the merged view: the real fd behind it (its number is the file handle), path, ``st_ino``.

    ``on_lower``: a read-only handle on a lower object, switched to the upper copy on copy-up (while its name is that
    object's: see :meth:`OpenFiles.forget`); ``metacopy``: its metadata are an upper metacopy file's, its data still the
    lower file's; ``held``: an ``O_PATH`` fd that only keeps the object reachable once its names are gone.
    """

    fd: int
    path: str
    ino: int
    on_lower: bool  # its fd is on a lower file (read-only; switched to upper on copy-up)
    metacopy: bool = False  # its metadata are an upper metacopy file's, not the lower file's
    held: bool = False  # an O_PATH fd that keeps the object (see ``Overlay.hold``): no I/O through it
    merged_dir: bool = False  # held on a merged directory, which reports st_nlink 1 (as the kernel does)


class OpenFiles:
    """The open files of one mount, by file handle (= the real fd number), with the lower handles by path."""

    def __init__(self) -> None:
        self._by_fh: dict[int, OpenFile] = {}
        self._lower_by_path: dict[str, list[OpenFile]] = {}

    def add(self, of: OpenFile, *, named: bool = True) -> int:
        """Register ``of``; return its file handle (its fd number).

        ``named``: ``of.path`` still names its object, so a lower one is switched to the upper copy when that path is
        copied up; False for one reached through a held object (:meth:`Overlay.hold`) whose names are gone.
        """
        self._by_fh[of.fd] = of
        if of.on_lower and named:
            self._lower_by_path.setdefault(of.path, []).append(of)
        return of.fd

    def get(self, fh: int) -> OpenFile:
        """The open file of handle ``fh``; raises KeyError for a handle that is not open (a caller's bug)."""
        return self._by_fh[fh]

    def matching(self, holds: Callable[[int], bool]) -> list[int]:
        """The handles whose real fd satisfies ``holds(fd)``; raises what ``holds`` raises."""
        return [fh for fh, of in self._by_fh.items() if holds(of.fd)]

    def release(self, fh: int) -> None:
        """Forget handle ``fh`` and close its fd; raises KeyError for a handle that is not open."""
        of = self._by_fh.pop(fh)
        if of.on_lower:
            self._unregister(of)
        os.close(of.fd)

    def copied_up(self, path: str, reopen: Callable[[], int], ino: int | None = None) -> None:
        """``path`` now has an upper copy: point every lower handle on it to that copy.

        ``reopen()`` opens the upper copy (read-only) and returns an fd, once per handle; each handle keeps its number
        (the new fd is ``dup2``'d onto it). With ``ino`` (a metacopy file that got its data in place), the handles
        opened through its other names (its hard links in the upper layer) are switched too. Raises what ``reopen``
        raises (then the remaining handles still read the lower file).
        """
        handles = self._lower_by_path.pop(path, [])
        for other, ofs in list(self._lower_by_path.items()) if ino is not None else []:
            same = [of for of in ofs if of.metacopy and of.ino == ino]
            if same:
                handles += same
                self._lower_by_path[other] = [of for of in ofs if of not in same]
                if not self._lower_by_path[other]:
                    del self._lower_by_path[other]
        for of in handles:
            new_fd = reopen()
            os.dup2(new_fd, of.fd, inheritable=False)  # the handle (the fd number) stays the same
            os.close(new_fd)
            of.on_lower = of.metacopy = False

    def metadata_copied_up(self, path: str) -> None:
        """``path`` has an upper metacopy file: handles still read the lower data but show its metadata."""
        for of in self._lower_by_path.get(path, []):
            of.metacopy = True

    def forget(self, path: str) -> None:
        """The name ``path`` now refers to another object (or none): stop switching handles opened on it at copy-up.

        They stay ``on_lower``: their fd is still on the lower file, which nothing may change through them.
        """
        self._lower_by_path.pop(path, None)

    def moved(self, old: str, new: str, exchange: bool = False) -> None:
        """A rename moved ``old`` (and what is below it) to ``new`` (with ``exchange``, ``new`` to ``old`` too): lower
        handles opened there follow their objects, still switched when they are copied up (a file of a directory
        renamed with ``redirect_dir=on`` stays in its lower layer until then)."""
        moving = [(old, new), (new, old)] if exchange else [(old, new)]
        taken = [(src, dst, self._take(src)) for src, dst in moving]
        for src, dst, handles in taken:
            for path, ofs in handles:
                dest = dst + path[len(src) :]
                for of in ofs:
                    of.path = dest
                self._lower_by_path.setdefault(dest, []).extend(ofs)

    def _take(self, path: str) -> list[tuple[str, list[OpenFile]]]:
        """Remove and return the lower handles registered at ``path`` and below it, with their paths."""
        prefix = path + "/"
        keys = [k for k in self._lower_by_path if k == path or k.startswith(prefix)]
        return [(k, self._lower_by_path.pop(k)) for k in keys]

    def _unregister(self, of: OpenFile) -> None:
        handles = [h for h in self._lower_by_path.pop(of.path, []) if h is not of]
        if handles:
            self._lower_by_path[of.path] = handles

    def close_all(self) -> None:
        """Release every handle (at unmount)."""
        for fh in list(self._by_fh):
            self.release(fh)
