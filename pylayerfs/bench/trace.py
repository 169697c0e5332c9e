"""Counting the FUSE requests a workload costs, as the kernel sends them (its ``fuse_request_send`` tracepoint),
and how long the kernel waited for their replies (``fuse_request_end``).

Every FUSE request the kernel sends to a daemon passes the tracepoint ``fuse:fuse_request_send`` (kernel
6.15 and later), which names the connection (the mount's anonymous device) and the opcode. The bench
enables it in a private trace instance (``instances/pylayerfs-bench-PID``, its own ring buffer, so that
other tracing on the machine is untouched), filtered to the one mount being measured, and reads the
buffer after each workload. The count is the kernel's, so it is the same measure for every FUSE
implementation (pylayerfs on either binding, fuse-overlayfs) and costs the daemons nothing; the event
itself costs the kernel well under a microsecond per request, against tens of microseconds for the
round trip. The tracepoint ``fuse:fuse_request_end`` marks each reply (or abort) with the same request
number: the time between the two is the request's wait, whatever the daemon did meanwhile (its own work,
being woken, the reply's way back); their sum over a workload, against the workload's time, says how much
of it the client spent waiting for the daemon. Requests the kernel sends without waiting (FORGET, async
READs) end too, so their waits overlap the workload's other time.

The native transport counts the requests it serves too (``-o debug`` logs them by opcode when the
session ends); ``tests/test_bench.py`` checks that both counts agree.

Needs root and tracefs (mounted privately below the bench's workspace: another bench's mount may vanish).
Where either is missing, :func:`open_tracer` returns None and the report says the counts are not
available.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator

EVENT = "events/fuse/fuse_request_send"
END_EVENT = "events/fuse/fuse_request_end"
_LINE = re.compile(r" (\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+)(?: opcode \d+ \(FUSE_(\w+)\))?")
_ENTRIES = re.compile(r"entries-in-buffer/entries-written: (\d+)/(\d+)")
BUFFER_KIB = 8192  # per CPU: the largest full-run workload (W5, ~35,000 requests) needs ~1.5 MiB


class Counts(collections.Counter[str]):
    """Requests by opcode name (``LOOKUP``, ``READDIRPLUS``...); ``lost`` is True when the buffer overflowed;
    ``waited_s`` the sum of the requests' waits (send to end, seconds), over the requests whose end was seen."""

    lost: bool = False
    waited_s: float = 0.0

    def summary(self, top: int = 4) -> str:
        """``1,234 waited 56.7 ms: LOOKUP 1,000, GETATTR 200, ...`` (the ``top`` most frequent opcodes)."""
        parts = [f"{name} {n:,}" for name, n in self.most_common(top)]
        if len(self) > top:
            parts.append(f"{len(self) - top} more kinds")
        total = f"{'≥' if self.lost else ''}{self.total():,} waited {self.waited_s * 1000:.1f} ms"
        return f"{total}: {', '.join(parts)}" if parts else total


def _tracefs() -> str | None:
    """Where tracefs is mounted (None when it is not)."""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "tracefs":
                return fields[1].replace("\\040", " ")
    return None


def connection(mountpoint: str) -> int:
    """The kernel's ``dev_t`` of the FUSE mount on ``mountpoint`` (the tracepoint's ``connection``).

    The kernel encodes it as ``major << 20 | minor``, not as userspace's ``st_dev``. Raises OSError
    (ENOENT...) from stat(2).
    """
    dev = os.stat(mountpoint).st_dev
    return os.major(dev) << 20 | os.minor(dev)


class Tracer:
    """A private trace instance counting one FUSE connection's requests at a time (see :meth:`watch`)."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.event = os.path.join(instance, EVENT)

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.instance, name), "w") as f:
            f.write(value)

    def watch(self, mountpoint: str) -> None:
        """Count only the requests of the FUSE mount on ``mountpoint`` from now on (the buffer is emptied).

        Raises OSError when the mount cannot be stat'ed or the filter is refused.
        """
        for event in (EVENT, END_EVENT):
            self._write(f"{event}/enable", "0")
            self._write(f"{event}/filter", f"connection == {connection(mountpoint)}")
        self._write("trace", "")
        for event in (EVENT, END_EVENT):
            self._write(f"{event}/enable", "1")

    def take(self) -> Counts:
        """The requests counted since :meth:`watch` or the last :meth:`take`, by opcode; the buffer is emptied.

        Requests the kernel sends on its own after a call returns (RELEASE after close, FORGET) may arrive
        a moment later: it waits until the buffer has been still for 10 ms (at most a second). Writes the
        kernel keeps in its page cache (fuse-overlayfs negotiates the writeback cache) are sent when it writes
        them back, seconds later, and are counted then.
        """
        last = self._written()
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:
            time.sleep(0.01)
            written = self._written()
            if written == last:
                break
            last = written
        counts = Counts()
        sent: dict[str, float] = {}
        with open(os.path.join(self.instance, "trace")) as f:
            for line in f:
                if line.startswith("#"):
                    if (m := _ENTRIES.search(line)) and m.group(1) != m.group(2):
                        counts.lost = True
                    continue
                if m := _LINE.search(line):
                    when, kind, unique, opcode = m.groups()
                    if kind == "send":
                        counts[opcode] += 1
                        sent[unique] = float(when)
                    elif unique in sent:
                        counts.waited_s += float(when) - sent.pop(unique)
        self._write("trace", "")
        return counts

    def _written(self) -> int:
        total = 0
        for cpu in os.listdir(os.path.join(self.instance, "per_cpu")):
            with open(os.path.join(self.instance, "per_cpu", cpu, "stats")) as f:
                for line in f:
                    if line.startswith("entries:"):
                        total += int(line.split()[1])
        return total

    def stop(self) -> None:
        """Stop counting (until the next :meth:`watch`)."""
        for event in (EVENT, END_EVENT):
            with contextlib.suppress(OSError):
                self._write(f"{event}/enable", "0")


@contextlib.contextmanager
def open_tracer(scratch: str) -> Iterator[Tracer | None]:
    """A :class:`Tracer` for the life of the block, or None where the kernel cannot count FUSE requests.

    ``scratch`` is a directory of the caller's where tracefs is mounted privately (unmounted on the way out): a
    tracefs mounted elsewhere may be another bench's, below its own scratch directory, which vanishes when that bench
    ends. Only when the private mount fails is an existing one used. The trace instance is removed on the way out,
    even on failure.
    """
    if os.geteuid() != 0:
        yield None
        return
    private = os.path.join(scratch, "tracefs")
    os.makedirs(private, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tracefs", "nodev", private], capture_output=True, check=False)
    root = private if mounted.returncode == 0 else _tracefs()
    if root is None:
        yield None
        return
    instance = os.path.join(root, "instances", f"pylayerfs-bench-{os.getpid()}")
    try:
        if not os.path.isdir(os.path.join(root, EVENT)):
            yield None
            return
        try:
            os.mkdir(instance)
            tracer = Tracer(instance)
            tracer._write("buffer_size_kb", str(BUFFER_KIB))
        except OSError:
            yield None
            return
        yield tracer
    finally:
        if os.path.isdir(instance):
            with contextlib.suppress(OSError):
                Tracer(instance).stop()
            with contextlib.suppress(OSError):
                os.rmdir(instance)
        if root == private:
            subprocess.run(["umount", private], capture_output=True, check=False)
