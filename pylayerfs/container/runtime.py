"""Running containers: the thin writable layer, its mount, and the process that lives in it.

A container has two layer directories, as in Docker: ``overlay2/<mount-id>-init``
(the mountpoints a process needs) and ``overlay2/<mount-id>`` (its read-write
layer, whose ``lower`` lists the init layer and the image's layers). While it
runs, a *monitor* process holds the mount (pylayerfs or the kernel's overlay)
on ``overlay2/<mount-id>/merged``, runs the command there, writes its output
to the log and its exit status to the record, then unmounts. ``run`` without
``-d`` is its own monitor, in the foreground, and forwards the signals it gets
(Ctrl-C) to the command, as ``docker run`` does. The command is PID 1 of its
own PID namespace (:mod:`pylayerfs.image.sandbox`), so ``stop`` and ``rm -f``
stop everything it started; ``exec`` joins its namespaces. The container's
directory holds the ``hosts``, ``hostname`` and ``resolv.conf`` mounted on its
``/etc``, as Docker's.

A container whose monitor died (a reboot, ``kill -9``) is found by
:func:`reconcile`: its process is killed, its mount detached, and it is
reported Exited (255), with its layer intact to be started again.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import selectors
import signal
import time
from collections.abc import Callable, Iterator

from pylayerfs.container.records import Container, ContainerStatus, ContainerStore, State
from pylayerfs.image import sandbox
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.image.drivers import overlay as rootfs
from pylayerfs.image.drivers import vfs as vfsdriver
from pylayerfs.image.sizes import layer_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import format_time
from pylayerfs.image.store.layers import random_id
from pylayerfs.image.store.layout import DIFF_DIR, WORK_DIR, write_value
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below

EXIT_DIED = 255  # what a container whose monitor died reports
STOP_TIMEOUT = 10.0
READY = b"ready\n"
LOG_LINE = 16 * 1024  # moby's daemon/logger/copier.go bufSize: a longer line is logged in pieces of this many bytes


class StartError(StoreError):
    """The command could not be started; ``code`` is the exit status to report, as Docker's: 127 (not found),
    126 (not executable; any failure of ``exec``), 125 (pylayerfs's own error)."""

    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.code = code


def now() -> str:
    return format_time(datetime.datetime.now(datetime.UTC))


class Runtime:
    def __init__(self, store: Store, driver: StorageDriver = StorageDriver.FUSE) -> None:
        """The containers of ``store``; ``driver`` is the storage driver of the containers it creates."""
        self.store = store
        self.containers = ContainerStore(store)
        self.driver = driver

    # -- creating and removing -----------------------------------------------------------

    def create(
        self, image_ref: str, command: list[str], name: str | None = None, env: list[str] | None = None,
        workdir: str | None = None, user: str | None = None, container_id: str | None = None,
        auto_remove: bool = False,
    ) -> Container:  # fmt: skip
        """A new container of ``image_ref`` (``container_id``: its ID, default a new one; ``auto_remove``: ``--rm``,
        removed once its command exited)."""
        image = self.store.resolve(image_ref)
        config = image.run_config
        if env:
            keys = {e.partition("=")[0] for e in env}
            config["Env"] = [e for e in config.get("Env") or [] if e.partition("=")[0] not in keys] + env
        if workdir:
            config["WorkingDir"] = workdir
        if user is not None:
            config["User"] = user
        if command:
            config["Cmd"] = command
        argv = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
        if not argv:
            raise StoreError("No command specified")
        if name is not None:
            self.containers.check_name(name)
            name = name.removeprefix("/")  # Docker's names are stored without it
        container_id, mount_id = container_id or random_id(), random_id()
        container = Container(
            id=container_id, created=now(), path=argv[0], args=argv[1:], config=config, image_id=image.id,
            image_name=image_ref, name=name or self.containers.new_name(), mount_id=mount_id, driver=self.driver,
            auto_remove=auto_remove,
        )  # fmt: skip
        top = image.top_layer
        layers = self.store.layers
        init = mount_id + vfsdriver.INIT
        if not self.driver.mounts:
            vfsdriver.create(self.store, top, mount_id)
        with self.store.locked():
            if self.driver.mounts:
                layers.new_dir(top, init)
                sandbox.make_init_layer(layers.diff_dir(init))
                layers.new_dir(top, mount_id, above=init)
            mounts = os.path.join(self.store.layout.mounts, container_id)
            os.makedirs(mounts, 0o700)
            write_value(os.path.join(mounts, "mount-id"), mount_id)
            write_value(os.path.join(mounts, "init-id"), init)
            if top is not None:
                write_value(os.path.join(mounts, "parent"), top)
            self.containers.save(container)
        return container

    def remove(self, container: Container, force: bool = False) -> None:
        container = self.reconcile(container)
        if container.state.running:
            if not force:
                raise StoreError(f"You cannot remove a running container {container.id}. Stop the container before "
                                 "attempting removal or force remove")  # fmt: skip
            self.stop(container, timeout=0)
        for mountpoint in mounts_below(self.store.layout.layer(container.mount_id)):
            realfs.detach(mountpoint)
        with self.store.locked():
            self.store.layers.remove_dir(container.mount_id)
            self.store.layers.remove_dir(f"{container.mount_id}-init")
            self.containers.remove(container)

    # -- the mount -------------------------------------------------------------------------

    def merged(self, container: Container) -> str:
        """Where the container's root is: its mount, or with vfs its own full tree."""
        if not container.driver.mounts:
            return self.store.layout.vfs_dir(container.mount_id)
        return self.store.layout.layer(container.mount_id, "merged")

    def upper(self, container: Container) -> str:
        return self.store.layout.layer(container.mount_id, DIFF_DIR)

    def lowers(self, container: Container) -> list[str]:
        image = self.store.images.get(container.image_id)
        return [
            self.store.layers.diff_dir(f"{container.mount_id}-init"),
            *self.store.layers.lower_dirs(image.top_layer),
        ]

    @contextlib.contextmanager
    def read_write_layer(self, container: Container) -> Iterator[tuple[str, list[str]]]:
        """The container's changes as an overlay upper directory, and the directories below it, top first.

        With vfs: the naive diff of its tree against its init copy (made for the ``with`` block), over that copy.
        """
        if not container.driver.mounts:
            with vfsdriver.changes_dir(self.store, container.mount_id) as upper:
                yield upper, [self.store.layout.vfs_dir(container.mount_id + vfsdriver.INIT)]
        else:
            yield self.upper(container), self.lowers(container)

    @contextlib.contextmanager
    def _mounted(self, container: Container) -> Iterator[str]:
        if not container.driver.mounts:
            yield self.merged(container)
            return
        work = self.store.layout.layer(container.mount_id, WORK_DIR)
        metacopy = self.store.layers.uses_metacopy(self.store.images.get(container.image_id).top_layer)
        with rootfs.mounted(self.lowers(container), self.upper(container), work, self.merged(container),
                            container.driver, metacopy) as root:  # fmt: skip
            yield root

    def _process(self, container: Container, root: str, argv: list[str], env: list[str], user: str | None,
                 workdir: str | None) -> sandbox.Process:  # fmt: skip
        """What to run in the container: its Env then ``env`` (``KEY=VALUE``) over Docker's PATH and HOSTNAME."""
        config = container.config
        variables = dict(e.partition("=")[::2] for e in [*(config.get("Env") or []), *env])
        cwd = workdir or config.get("WorkingDir") or "/"
        return sandbox.Process(root, argv, variables, cwd, user if user is not None else config.get("User") or "",
                               container.short_id, self.containers.dir(container.id))  # fmt: skip

    # -- running -------------------------------------------------------------------------------

    def run_attached(self, container: Container) -> int:
        """Run in the foreground (``run`` without ``-d``): its stdout on our stdout, its stderr on our stderr, both in
        the log; the command's status. When a reader of ours goes away (``run ... | head``), the command is killed
        and StartError (status 1, ``write /dev/stdout: broken pipe``) raised, once its exit is recorded."""
        try:
            return self._monitor(container, echo=True)
        except sandbox.SandboxError as exc:
            raise StartError(str(exc), exc.exit_code) from exc
        except BrokenPipeError as exc:
            raise StartError(str(exc), 1) from exc

    def start_detached(self, container: Container, remove: Callable[[Container], None] | None = None) -> None:
        """Start a monitor in the background; return once the command runs (or failed to start). ``remove``: called
        by the monitor once the command exited and its exit is recorded (``--rm``)."""
        container = self.reconcile(container)
        if container.state.running:
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the monitor: its own session, none of the caller's fds
            os.close(read_fd)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            code = 1
            try:
                code = self._monitor(container, ready_fd=write_fd)
                if remove is not None:
                    remove(self.containers.load(container.id))
            except BaseException as exc:  # reported through the pipe
                failure = exc.exit_code if isinstance(exc, sandbox.SandboxError) else 125
                with contextlib.suppress(OSError):
                    os.write(write_fd, f"error {failure}: {exc}\n".encode())
            os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as f:
            message = f.readline()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if message != READY:
            status, _, text = message.decode(errors="replace").removeprefix("error ").partition(": ")
            if not text:
                raise StartError("the container's monitor exited before the command started")
            raise StartError(text.strip(), int(status) if status.isdigit() else 125)

    def _monitor(self, container: Container, ready_fd: int | None = None, echo: bool = False) -> int:
        """Mount, run the command, log its output, record its exit, unmount. Returns its status. ``ready_fd``: where
        to write :data:`READY` once the command runs (left open: a failure is the caller's to report there).

        ``echo`` (attached): its output goes to our stdout and stderr too, and the signals of
        :data:`sandbox.FORWARDED` we get go to the command (PID 1): it decides, as under ``docker run`` (a shell or
        ``sleep`` as PID 1 ignores SIGINT and SIGTERM). Raises BrokenPipeError, once the command is killed and its
        exit recorded, when our stdout or stderr is a pipe nobody reads any more.
        """
        code = 0
        broken: BrokenPipeError | None = None
        with self._mounted(container) as root:
            process = self._process(container, root, container.command, [], None, None)
            sandbox.write_etc(self.containers.dir(container.id), container.short_id)  # at each start, as Docker
            try:
                started, outputs = _start_piped(process)
            except sandbox.SandboxError as exc:
                self._record(container, State(ContainerStatus.CREATED, exit_code=exc.exit_code))
                raise
            self._record(container, State(ContainerStatus.RUNNING, True, started.pid, os.getpid(), 0, now()))
            if ready_fd is not None:
                os.write(ready_fd, READY)
            with _forwarding(started.pid) if echo else contextlib.nullcontext():
                try:
                    self._pump(container, outputs, echo)
                except BrokenPipeError as exc:  # docker's client exits too (but leaves the command running)
                    broken = exc
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(started.pid, signal.SIGKILL)
                finally:
                    for fd in outputs:
                        os.close(fd)
                code = started.wait()
        latest = self.containers.load(container.id)
        self._record(container, State(ContainerStatus.EXITED, False, 0, 0, code, latest.state.started_at, now()))
        if broken is not None:
            raise broken
        return code

    def _pump(self, container: Container, outputs: dict[int, str], echo: bool) -> None:
        """Copy the container's output (``outputs``: pipe fd to stream name) to its log, in docker's json-file lines
        (``{"log", "stream", "time"}``; a line longer than :data:`LOG_LINE` bytes in pieces, as moby's copier),
        until each pipe is at its end. With ``echo``, to our stdout and stderr too, written before more is read: a
        slow reader slows the command down, as docker's, and memory stays bounded. Raises BrokenPipeError
        (``write /dev/stdout: broken pipe``, docker's words) when nobody reads ours any more."""
        pending = dict.fromkeys(outputs, b"")
        with open(self.containers.log_path(container), "a") as log, selectors.DefaultSelector() as ready:
            for fd in outputs:
                ready.register(fd, selectors.EVENT_READ)
            while ready.get_map():
                for key, _ in ready.select():
                    fd, stream = key.fd, outputs[key.fd]
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        ready.unregister(fd)
                        pieces, pending[fd] = [pending[fd]] if pending[fd] else [], b""
                    else:
                        if echo:
                            _write_all(1 if stream == "stdout" else 2, chunk, stream)
                        pieces, pending[fd] = _log_pieces(pending[fd] + chunk)
                    for piece in pieces:
                        entry = {"log": piece.decode(errors="replace"), "stream": stream, "time": now()}
                        log.write(json.dumps(entry) + "\n")
                    log.flush()

    def _record(self, container: Container, state: State) -> None:
        container.state = state
        with self.store.locked():
            self.containers.save(container)

    def exec(self, container: Container, argv: list[str], env: list[str], user: str | None,
             workdir: str | None) -> int:  # fmt: skip
        container = self.reconcile(container)
        if not container.state.running:
            raise StoreError(f"Container {container.id} is not running")
        try:
            started = sandbox.start(self._process(container, self.merged(container), argv, env, user, workdir),
                                    join=container.state.pid)  # fmt: skip
        except sandbox.SandboxError as exc:
            raise StartError(str(exc), 126) from exc  # docker exec answers 126 for every failure to start
        try:
            return started.wait()
        except BaseException:
            started.kill()
            raise

    def stop(self, container: Container, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (seconds), to the command, PID 1 of its namespace (when it exits,
        the kernel kills the rest); returns once the monitor has recorded the exit (or a foreground ``run --rm``
        removed the container). Raises StoreError when it did not exit."""
        container = self.reconcile(container)
        if not container.state.running:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, STOP_TIMEOUT)):
            if wait <= 0 and sig == signal.SIGTERM:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.state.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not os.path.exists(self.containers.dir(container.id)):
                    return  # its own ``run --rm`` removed it once it exited
                with contextlib.suppress(StoreError):  # half-removed: the next round sees it gone
                    if not self.reconcile(self.containers.load(container.id)).state.running:
                        return
                time.sleep(0.05)
        raise StoreError(f"cannot stop container {container.short_id}")

    def logs(self, container: Container) -> Iterator[tuple[str, bytes]]:
        """The container's output in the order it came: ``(stream, bytes)``, stream ``stdout`` or ``stderr``."""
        try:
            with open(self.containers.log_path(container)) as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        yield entry.get("stream", "stdout"), entry["log"].encode()
        except FileNotFoundError:
            return

    # -- surviving restarts -----------------------------------------------------------------------

    def reconcile(self, container: Container) -> Container:
        """A running container whose monitor is gone is Exited (255): its process killed, its mount detached."""
        state = container.state
        if not state.running or _alive(state.monitor_pid):
            return container
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(state.pid, signal.SIGKILL)
        for mountpoint in mounts_below(self.store.layout.layer(container.mount_id)):
            with contextlib.suppress(OSError):
                realfs.detach(mountpoint)
        self._record(container, State(ContainerStatus.EXITED, False, 0, 0, EXIT_DIED, state.started_at, now()))
        return container


def _start_piped(process: sandbox.Process) -> tuple[sandbox.Started, dict[int, str]]:
    """Start ``process`` with ``/dev/null`` as its stdin (``docker run`` without ``-i``) and its stdout and stderr
    on two pipes; returns it and the pipes' read ends (fd to ``stdout``/``stderr``), for the caller to close.

    :func:`sandbox.start` gives the command our fds 0, 1 and 2: they are those for the call, then ours again.
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    try:
        for fd, target in enumerate((null, out_w, err_w)):
            os.dup2(target, fd)
        started = sandbox.start(process)
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        for fd, copy in enumerate(saved):
            os.dup2(copy, fd)
            os.close(copy)
        for fd in (null, out_w, err_w):
            os.close(fd)
    return started, {out_r: "stdout", err_r: "stderr"}


def _write_all(fd: int, data: bytes, name: str) -> None:
    """Write all of ``data`` to ``fd`` (blocking); BrokenPipeError ``write /dev/NAME: broken pipe`` as Go's."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        raise BrokenPipeError(f"write /dev/{name}: broken pipe") from None


def _log_pieces(data: bytes) -> tuple[list[bytes], bytes]:
    """``data`` cut into log entries: each line with its newline, then pieces of :data:`LOG_LINE` bytes of a longer
    one; and what is left for the next read (shorter than :data:`LOG_LINE`, no newline)."""
    *complete, rest = data.split(b"\n")
    pieces: list[bytes] = []
    for line in complete:  # a complete line longer than LOG_LINE too, however the reads cut it (found flaky in CI)
        full = len(line) // LOG_LINE * LOG_LINE
        pieces += [line[i : i + LOG_LINE] for i in range(0, full, LOG_LINE)]
        pieces.append(line[full:] + b"\n")
    full = len(rest) // LOG_LINE * LOG_LINE
    return pieces + [rest[i : i + LOG_LINE] for i in range(0, full, LOG_LINE)], rest[full:]


@contextlib.contextmanager
def _forwarding(pid: int) -> Iterator[None]:
    """For the ``with`` block, the signals of :data:`sandbox.FORWARDED` that we get go to ``pid`` instead."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in sandbox.FORWARDED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live pylayerfs process (not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"pylayerfs" in f.read()
    except (OSError, IndexError):
        return False


def container_size(runtime: Runtime, container: Container) -> tuple[int, int]:
    """``(size, virtual size)`` in bytes, as ``docker ps -s``: the read-write layer alone, and that plus the image.

    The size is moby's ``directory.Size`` of the upper directory (see :func:`~pylayerfs.image.sizes.layer_size`),
    read from the disk, never through a mount, so a stopped container needs none.
    """
    with runtime.read_write_layer(container) as (upper, _):
        size = layer_size(upper)
    return size, size + runtime.store.size(runtime.store.images.get(container.image_id))
