"""Copy-ups off the loop: the data copy of a large file runs in a thread while the loop serves other requests.

An OPEN for writing of a lower regular file copies its data up first (W6: 256 MiB, ~0.6 s), and so do a chmod,
chown, utimes, setxattr or removexattr (without ``metacopy=on``), a truncate, a link and a rename of it. With one
loop thread, every request of the mount would wait for it. Instead the engine's copy-up is split
(:class:`~pylayerfs.overlay.copy_up.CopyUp`): the loop begins it (ancestors copied up, the temporary file
created), a :class:`Job` thread copies the data (pure I/O between two fds: no engine state, so the engine stays
single-threaded and needs no lock), and the loop installs it when told (the thread writes to an eventfd the loop
polls together with the FUSE device), then serves the request again, which now finds the upper copy, and answers
it: replies go out of order, as the protocol allows (each is matched to its request by ``unique``).

While a copy-up is in flight, :class:`Jobs` says which requests must wait (:meth:`Jobs.must_wait`): every request
on the node being copied up (it sees the copy-up's result), and every change of a name (:data:`NAMES`) that is the
copied file's path or one of its ancestors (a rename or removal of its directory, a name made or removed in its
place: the install renames the copy into place by that path). They are queued and served after the install, in
order. The others go on: LOOKUP, GETATTR, READDIR, OPEN, READ, WRITE, RELEASE, and every change elsewhere in the
mount (a file created in another directory, or beside the copied one). Only copies of at least :data:`MIN_SIZE`
bytes go to a thread: a small copy costs less than the hand-over.

A caller killed mid-copy (INTERRUPT while a fatal signal is pending for it, as the kernel's ``ovl_copy_up_file``
checks) stops the copy between chunks: the temporary file is removed and the request answered EINTR (the kernel
drops that reply). A failing copy (ENOSPC) is answered with its errno, its temporary file removed. When the
session ends with copies in flight (a signal, an aborted connection), they are cancelled and their temporary
files removed before :meth:`Session.run` returns.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading

from pylayerfs.fuse.native import protocol as p
from pylayerfs.overlay.copy_up import CopyUp

MIN_SIZE = 1 << 20  # bytes: smaller copy-ups are made on the loop thread
# The requests that change names: the offset of the names in their argument, and how many name a path (RENAME:
# two, in two directories; SYMLINK: the first of two). A change to another object's metadata or data (SETATTR,
# SETXATTR, FALLOCATE...) waits only when it is on the node being copied up.
NAMES = {
    p.Op.MKNOD: p.MKNOD_IN.size, p.Op.MKDIR: p.MKDIR_IN.size, p.Op.SYMLINK: 0, p.Op.UNLINK: 0, p.Op.RMDIR: 0,
    p.Op.CREATE: p.CREATE_IN.size, p.Op.LINK: p.LINK_IN.size, p.Op.RENAME: p.RENAME_IN.size,
    p.Op.RENAME2: p.RENAME2_IN.size,
}  # fmt: skip
_SIGKILL_BIT = 1 << (9 - 1)  # SIGKILL in /proc/PID/status's SigPnd mask


class Deferred(Exception):
    """Raised by a handler that handed its request to a :class:`Job`: no reply now (the loop answers it later)."""


class Job:
    """The data copy of ``copy`` in a thread, for the request ``request`` (its bytes, to serve again) of ``pid``.

    ``wake`` is the eventfd the thread writes once done (after setting :attr:`done`; :attr:`error` holds what the
    copy raised). :attr:`cancelled` asks it to stop between chunks.
    """

    def __init__(self, copy: CopyUp, request: bytes, unique: int, pid: int, wake: int) -> None:
        self.copy, self.request, self.unique, self.pid = copy, request, unique, pid
        self.cancelled = False
        self.done = False
        self.error: BaseException | None = None
        self._wake = wake
        self._thread = threading.Thread(target=self._run, name=f"copy-up {unique}", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def _run(self) -> None:
        try:
            self.copy.copy_data(lambda: self.cancelled)
        except BaseException as exc:  # handed to the loop, which answers the request with it
            self.error = exc
        finally:
            self.done = True
            os.eventfd_write(self._wake, 1)

    def cancel(self) -> None:
        """Stop the copy (it ends with EINTR), wait for the thread and remove the temporary file."""
        self.cancelled = True
        self._thread.join()
        self.copy.abort()


class Jobs:
    """The copy-ups in flight, by node ID, the eventfd their threads wake the loop with, and the poll of that eventfd
    and the FUSE device ``fd`` (see the module), which the session keeps non-blocking.
    """

    def __init__(self, fd: int) -> None:
        self.by_node: dict[int, Job] = {}
        self.fd = fd
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.poller.register(self.wake, select.POLLIN)

    def poll(self) -> tuple[bool, bool]:
        """Wait for a request or a finished copy: (the device is readable or failed, a thread is done)."""
        ready = dict(self.poller.poll())
        return self.fd in ready, self.wake in ready

    def start(self, nodeid: int, copy: CopyUp, request: bytes, unique: int, pid: int) -> None:
        """Copy ``copy``'s data in a new thread for the request ``request`` (on ``nodeid``)."""
        job = self.by_node[nodeid] = Job(copy, request, unique, pid, self.wake)
        job.start()

    def must_wait(self, nodeid: int, changed: list[str]) -> bool:
        """Whether a request on ``nodeid`` that changes the names ``changed`` (merged paths) must wait for the
        copy-ups in flight: it is on a node being copied up, or one of those names is the path of a file being
        copied up or one of its directories (see the module docstring)."""
        if nodeid in self.by_node:
            return True
        targets = [job.copy.path for job in self.by_node.values()]
        return any(t == name or t.startswith(name + "/") for name in changed for t in targets)

    def finished(self) -> list[Job]:
        """The jobs whose thread is done, taken out of the table; resets the eventfd."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wake)
        done = [nodeid for nodeid, job in self.by_node.items() if job.done]
        return [self.by_node.pop(nodeid) for nodeid in done]

    def interrupt(self, unique: int) -> None:
        """INTERRUPT of request ``unique``: cancel its copy if its caller is being killed (a fatal signal pending).

        As the kernel's overlayfs, which stops a copy-up only on a fatal signal: any other signal lets it finish.
        """
        for job in self.by_node.values():
            if job.unique == unique and _dying(job.pid):
                job.cancelled = True

    def close(self) -> None:
        """Cancel every copy in flight (their temporary files removed) and close the eventfd."""
        for job in self.by_node.values():
            job.cancel()
        self.by_node.clear()
        os.close(self.wake)


def _dying(pid: int) -> bool:
    """Whether thread ``pid`` has SIGKILL pending (the kernel adds it for every fatal signal) or is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    except OSError:
        return True
    return any(mask & _SIGKILL_BIT for mask in pending)
