"""Out-of-order replies on the native transport: a large copy-up must not stall the rest of the mount.

The mount is served by a thread of this process (:func:`tests.test_native.in_process`), so the data copy of a
copy-up (:meth:`CopyUp.copy_data`, run by a worker thread) can be held at a gate: what must go on while it is in
flight, and what must wait for it, is then checked by order of events, not by timing. The copy itself is real
(a lower file of 4 MiB, over :data:`~pylayerfs.fuse.native.workers.MIN_SIZE`, so it goes to a worker).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pylayerfs.fuse.native import protocol as p
from pylayerfs.fuse.native import session as native
from pylayerfs.fuse.native.workers import MIN_SIZE
from pylayerfs.overlay.copy_up import CopyUp
from tests.mounts import _mounted
from tests.test_native import _wait_for, in_process
from tests.trees import build

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.timeout(60)]
BIG = bytes(range(256)) * (4 * MIN_SIZE // 256)  # 4 MiB of data, no hole


@pytest.fixture
def stack(tmp_path: Path) -> tuple[list[str], str, str, str]:
    lower = build(str(tmp_path / "l"), {"low": BIG, "other/a": "a", "other/b": "b", "f": "low f"})
    upper, work, mnt = (str(tmp_path / n) for n in ("u", "w", "m"))
    for d in (upper, work, mnt):
        os.makedirs(d)
    return [lower], upper, work, mnt


class Gate:
    """Holds every copy-up's data copy made in a worker thread until :meth:`open` (copies made on the loop, inline, go
    on); :attr:`held` is set once one waits."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self._open = threading.Event()

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    copy = CopyUp.copy_data

    def held(self: CopyUp, cancelled: Callable[[], bool] | None = None) -> None:
        if threading.current_thread().name.startswith("copy-up"):  # a worker's (workers.Job)
            gate.held.set()
            assert gate._open.wait(30), "the test never opened the gate"
        copy(self, cancelled)

    monkeypatch.setattr(CopyUp, "copy_data", held)
    yield gate
    gate.open()  # never leave a worker waiting (the session's end joins it)


class Opener(threading.Thread):
    """Open ``path`` for append and write one byte (the W6 copy-up) in a thread; :attr:`error` holds its failure."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"!")
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc


def _in_flight(session: native.Session, gate: Gate, path: str) -> Opener:
    opener = Opener(path)
    opener.start()
    assert gate.held.wait(10), "the copy-up did not reach its worker"
    assert session._jobs is not None and len(session._jobs.by_node) == 1
    return opener


def _work_entries(work: str) -> list[str]:
    return os.listdir(os.path.join(work, "work"))


def test_other_requests_are_served_while_a_large_copy_up_is_in_flight(stack, gate):
    """A walk, a stat, a read and a listing of other files finish while the OPEN that copies up is unanswered."""
    _, upper, work, mnt = stack
    with in_process(stack) as session:
        before = os.open(f"{mnt}/low", os.O_RDONLY)  # opened before the copy-up: must see the new data after it
        try:
            opener = _in_flight(session, gate, f"{mnt}/low")
            assert sorted(os.listdir(f"{mnt}/other")) == ["a", "b"]
            assert os.stat(f"{mnt}/f").st_size == len("low f")
            with open(f"{mnt}/other/a") as f:
                assert f.read() == "a"
            assert opener.is_alive() and not os.path.exists(f"{upper}/low"), "the copy-up is still in flight"
            assert len(_work_entries(work)) == 1, "the copy is built in the workdir"
            gate.open()
            opener.join(30)
            assert not opener.is_alive() and opener.error is None
            with open(f"{mnt}/low", "rb") as f:
                assert f.read() == BIG + b"!"
            assert os.pread(before, 4, 0) == BIG[:4]
            assert os.pread(before, 1, len(BIG)) == b"!", "an fd opened before the copy-up reads the upper copy"
        finally:
            os.close(before)
        assert _wait_for(lambda: session._jobs is None)
        assert _work_entries(work) == []


@pytest.mark.parametrize("change", ["chmod", "rename over", "link"])
def test_a_change_of_the_copied_file_or_its_name_waits_and_changes_elsewhere_go_on(stack, gate, change):
    """A chmod of the file being copied up, a rename over its name, or a new name for it waits for the install and
    then applies; a
    rename elsewhere (with a copy-up of its own, inline) is done at once. (One change at a time: the kernel holds the
    locks of a request it has sent, the file's for a chmod, both directories' for a rename, until answered.)"""
    _, _, work, mnt = stack
    with in_process(stack) as session:
        opener = _in_flight(session, gate, f"{mnt}/low")
        os.rename(f"{mnt}/other/a", f"{mnt}/other/c")  # elsewhere: goes on
        assert opener.is_alive() and not session._waiting
        done: list[str] = []

        def make_change() -> None:
            if change == "chmod":
                os.chmod(f"{mnt}/low", 0o600)
            elif change == "link":
                os.link(f"{mnt}/low", f"{mnt}/other/hl")
            else:
                os.rename(f"{mnt}/other/b", f"{mnt}/low")
            done.append(change)

        changer = threading.Thread(target=make_change, daemon=True)
        changer.start()
        assert _wait_for(lambda: len(session._waiting) == 1), f"the {change} waits"
        assert done == [] and opener.is_alive() and len(session._waiting) == 1
        gate.open()
        for thread in (opener, changer):
            thread.join(30)
            assert not thread.is_alive()
        assert opener.error is None and done == [change]
        if change == "chmod":
            assert os.stat(f"{mnt}/low").st_mode & 0o777 == 0o600
            assert Path(f"{mnt}/low").read_bytes() == BIG + b"!", "the chmod found the copied-up file, all its data"
            assert sorted(os.listdir(f"{mnt}/other")) == ["b", "c"]
        elif change == "link":  # found by a user's try: the writer's open failed with EEXIST and its data were lost
            assert Path(f"{mnt}/other/hl").read_bytes() == BIG + b"!"
            assert os.stat(f"{mnt}/other/hl").st_ino == os.stat(f"{mnt}/low").st_ino
            assert os.stat(f"{mnt}/low").st_nlink == 2
        else:
            assert Path(f"{mnt}/low").read_text() == "b"
            assert sorted(os.listdir(f"{mnt}/other")) == ["c"]
        assert _work_entries(work) == []


# Every change that copies up a regular file's data, besides OPEN for writing, and how to see it was made.
COPYING_CHANGES: dict[str, tuple[Callable[[str], None], Callable[[str], bool]]] = {
    "chmod": (lambda m: os.chmod(f"{m}/low", 0o600), lambda m: os.stat(f"{m}/low").st_mode & 0o777 == 0o600),
    "chown": (lambda m: os.chown(f"{m}/low", 1234, 5678), lambda m: os.stat(f"{m}/low").st_uid == 1234),
    "utime": (lambda m: os.utime(f"{m}/low", (1, 2)), lambda m: os.stat(f"{m}/low").st_mtime == 2),
    "truncate": (lambda m: os.truncate(f"{m}/low", 10), lambda m: os.stat(f"{m}/low").st_size == 10),
    "setxattr": (lambda m: os.setxattr(f"{m}/low", "user.k", b"v"),
                 lambda m: os.getxattr(f"{m}/low", "user.k") == b"v"),
    "removexattr": (lambda m: os.removexattr(f"{m}/low", "user.lower"),
                    lambda m: "user.lower" not in os.listxattr(f"{m}/low")),
    "link": (lambda m: os.link(f"{m}/low", f"{m}/other/hl"), lambda m: os.stat(f"{m}/low").st_nlink == 2),
    "rename": (lambda m: os.rename(f"{m}/low", f"{m}/other/moved"), lambda m: os.path.exists(f"{m}/other/moved")),
}  # fmt: skip


@pytest.mark.parametrize("change", sorted(COPYING_CHANGES))
def test_every_change_that_copies_up_a_large_file_does_it_off_the_loop(stack, gate, change):
    """A chmod, chown, utime, truncate, setxattr, removexattr, link or rename of a large lower file copies it up in a
    worker (the copy held at the gate) while a listing, a stat and a read of other files are served (in a directory
    whose lock the kernel does not hold for the change); then the change applies to the upper copy, which has all the
    data, and the workdir is empty."""
    lowers, upper, work, mnt = stack
    os.setxattr(f"{lowers[0]}/low", "user.lower", b"1")
    build(f"{lowers[0]}/elsewhere", {"x": "x", "y": "yy"})  # the change holds the locks of its directories: not these
    make, made = COPYING_CHANGES[change]
    with in_process(stack) as session:
        errors: list[OSError] = []

        def run() -> None:
            try:
                make(mnt)
            except OSError as exc:
                errors.append(exc)

        os.stat(f"{mnt}/elsewhere")  # looked up now: a rename holds the lock of the root, where a lookup would wait
        changer = threading.Thread(target=run, daemon=True)
        changer.start()
        assert gate.held.wait(10), f"the {change}'s copy-up did not reach a worker"
        assert sorted(os.listdir(f"{mnt}/elsewhere")) == ["x", "y"]
        assert os.stat(f"{mnt}/elsewhere/y").st_size == 2
        assert Path(f"{mnt}/elsewhere/x").read_text() == "x"
        assert changer.is_alive() and not os.path.exists(f"{upper}/low"), ("the change waits for its copy-up", errors)
        gate.open()
        changer.join(30)
        assert not changer.is_alive() and errors == []
        assert made(mnt), f"the {change} was made"
        name = "other/moved" if change == "rename" else "low"
        assert Path(f"{upper}/{name}").read_bytes() == (BIG[:10] if change == "truncate" else BIG)
        assert _wait_for(lambda: session._jobs is None)
        assert _work_entries(work) == []
        assert session.counts[{"link": p.Op.LINK, "rename": p.Op.RENAME}.get(change, p.Op.SETATTR)] <= 2


def test_a_failing_copy_up_answers_its_errno_and_leaves_nothing_behind(stack, monkeypatch):
    _, upper, work, mnt = stack

    def full(self: CopyUp, cancelled: Callable[[], bool] | None = None) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(CopyUp, "copy_data", full)
    with in_process(stack) as session:
        with pytest.raises(OSError) as caught:
            os.open(f"{mnt}/low", os.O_WRONLY | os.O_APPEND)
        assert caught.value.errno == errno.ENOSPC
        assert _wait_for(lambda: session._jobs is None)
        assert _work_entries(work) == [] and not os.path.exists(f"{upper}/low")
        assert os.stat(f"{mnt}/f").st_size == len("low f"), "the mount goes on"


def test_a_caller_killed_mid_copy_stops_the_copy_up_and_leaves_nothing_behind(stack, gate):
    """SIGKILL of the process whose open copies up: the kernel sends INTERRUPT, the copy stops (EINTR, as the
    kernel's overlayfs stops a copy-up on a fatal signal), its temporary file is removed, the mount goes on."""
    _, upper, work, mnt = stack
    with in_process(stack) as session:
        script = f"import os; os.open({f'{mnt}/low'!r}, os.O_WRONLY | os.O_APPEND)"
        child = subprocess.Popen([sys.executable, "-c", script])
        try:
            assert gate.held.wait(10), "the copy-up did not reach its worker"
            assert session._jobs is not None
            (job,) = session._jobs.by_node.values()
            child.send_signal(signal.SIGKILL)
            assert _wait_for(lambda: job.cancelled), "the INTERRUPT of a killed caller cancels the copy"
            gate.open()
            assert child.wait(30) == -signal.SIGKILL
        finally:
            child.kill()
            child.wait()
        assert _wait_for(lambda: session._jobs is None)
        assert _work_entries(work) == [] and not os.path.exists(f"{upper}/low")
        fd = os.open(f"{mnt}/low", os.O_WRONLY | os.O_APPEND)  # a later copy-up works
        os.close(fd)
        assert os.path.getsize(f"{upper}/low") == len(BIG)


def test_a_session_stopped_mid_copy_leaves_the_workdir_empty(stack, gate):
    """The session stopped (a signal: :meth:`Session.stop` marks it and wakes the loop) while a copy-up is in flight:
    it unmounts, the copy is cancelled and its temporary file removed; the waiting open fails; nothing is in the
    upper layer."""
    _, upper, work, mnt = stack
    with in_process(stack) as session:
        opener = _in_flight(session, gate, f"{mnt}/low")
        assert session._jobs is not None
        session._stopping = True  # what stop() does; the signal's Stop exception wakes the loop, here the eventfd
        os.eventfd_write(session._jobs.wake, 1)
        assert _wait_for(lambda: not _mounted(mnt)), "the session unmounts (lazily), then cancels the copy"
        gate.open()  # only now: the open must not be answered (nor the daemon fork while the opener has an fd)
        opener.join(30)
        assert not opener.is_alive() and opener.error is not None
        assert _wait_for(lambda: session._jobs is None)
    assert _work_entries(work) == [] and not os.path.exists(f"{upper}/low")


def test_a_lazy_unmount_mid_copy_lets_the_copy_up_finish_and_leaves_the_workdir_empty(stack, gate):
    _, upper, work, mnt = stack
    with in_process(stack) as session:
        opener = _in_flight(session, gate, f"{mnt}/low")
        subprocess.run(["umount", "-l", mnt], check=True, timeout=30)
        gate.open()
        opener.join(30)
        assert not opener.is_alive() and opener.error is None, "the open in flight is answered"
        assert _wait_for(lambda: session._jobs is None)
    assert _work_entries(work) == []
    with open(f"{upper}/low", "rb") as f:
        assert f.read() == BIG + b"!"
