"""``pylayerfs check``: the command line of the conformance checker.

The check needs root (its generated layers hold files of other owners,
whiteouts and ``trusted.overlay.*`` xattrs, and it mounts), and it runs in
a mount and PID namespace of its own (:func:`isolated`): every mount it makes
and every daemon it starts, whatever the implementation, dies with it, even
when it is killed with SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import json
import os
import random
import select
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from pylayerfs.fuse.mount import remove_tree
from pylayerfs.image.sandbox import CLONE_NEWNS, SandboxError, make_mounts_private
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mountinfo
from pylayerfs.testing.model import features
from pylayerfs.testing.ops import FAMILIES

if TYPE_CHECKING:
    from pylayerfs.testing.search import Options, Report
    from pylayerfs.testing.targets import Target

DEFAULT_IMPLEMENTATIONS = ("engine", "pylayerfs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--impl",
        action="append",
        metavar="NAME|NAME=COMMAND",
        help="an implementation to check: engine, pylayerfs, kernel, fuse-overlayfs, or "
        "NAME='COMMAND -o {options} {mountpoint}' (repeatable; default: engine and pylayerfs)",
    )
    parser.add_argument(
        "--against",
        default="model",
        metavar="model|NAME|NAME=COMMAND",
        help="the reference: the model of overlay semantics (default), or an implementation (differential mode)",
    )
    parser.add_argument(
        "-o",
        "--options",
        action="append",
        default=[],
        metavar="OPT,...",
        help="mount options every implementation gets besides its directories, as mount -o takes them, e.g. "
        "redirect_dir=on or metacopy=on (the model follows redirect_dir and metacopy; repeatable)",
    )
    parser.add_argument("--examples", type=int, default=100, help="scenarios to try per implementation (100)")
    parser.add_argument("--seed", type=int, help="the same seed gives the same scenarios (default: random, printed)")
    parser.add_argument("--deadline", type=float, metavar="MS", help="fail a scenario that takes longer than MS")
    parser.add_argument(
        "--ops",
        default=",".join(FAMILIES),
        metavar="FAMILY,...",
        help=f"operation families to draw from (default: all of {','.join(FAMILIES)})",
    )
    parser.add_argument("--layers", type=int, default=3, help="at most this many lower layers (3)")
    parser.add_argument("--steps", type=int, default=12, help="at most this many operations per scenario (12)")
    parser.add_argument(
        "--lowers",
        choices=("realistic", "any"),
        default="realistic",
        help="realistic: whiteouts only where they hide something, as runtimes write them; "
        "any: also whiteouts that hide nothing (default: realistic)",
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="CHECK,...",
        help="checks not to make, to look past a known divergence: inode, lowers, persistence, interop",
    )
    parser.add_argument("--no-shrink", action="store_true", help="report the first divergence as found")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--dir", help="where scenarios build their layers (default: the temporary directory)")
    parser.add_argument("--save", metavar="DIR", help="where to write reproduction scripts (default: a new "
                                                      "temporary directory, when there is one to write)")  # fmt: skip


class UsageError(Exception):
    pass


def _options(args: argparse.Namespace) -> Options:
    from pylayerfs.testing.run import OPTIONAL_CHECKS
    from pylayerfs.testing.search import Options

    families = tuple(f for f in args.ops.split(",") if f)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise UsageError(
            f"--ops: unknown families {', '.join(unknown) or '(none given)'} (known: {', '.join(FAMILIES)})"
        )
    skip = tuple(c for c in args.skip.split(",") if c)
    if set(skip) - set(OPTIONAL_CHECKS):
        raise UsageError(f"--skip: unknown checks {', '.join(sorted(set(skip) - set(OPTIONAL_CHECKS)))} "
                         f"(known: {', '.join(OPTIONAL_CHECKS)})")  # fmt: skip
    for name in ("examples", "layers", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.deadline is not None and not 0 < args.deadline < float("inf"):
        raise UsageError(f"--deadline: {args.deadline:g} is not a number of milliseconds above 0")
    if args.dir is not None and not os.path.isdir(args.dir):
        raise UsageError(f"--dir: '{args.dir}' is not a directory")
    mount_options = ",".join(o for text in args.options for o in text.split(",") if o)
    given = {o.partition("=")[0] for o in mount_options.split(",")}
    if given & {"lowerdir", "upperdir", "workdir"}:
        raise UsageError("--options: the checker gives lowerdir, upperdir and workdir itself")
    try:
        features(mount_options)
    except ValueError as exc:
        raise UsageError(f"--options {mount_options}: {exc}") from None
    return Options(
        examples=args.examples,
        seed=args.seed if args.seed is not None else random.randrange(1 << 32),
        deadline_ms=args.deadline,
        families=families,
        max_layers=args.layers,
        max_steps=args.steps,
        realistic=args.lowers == "realistic",
        shrink=not args.no_shrink,
        skip=skip,
        mount_options=mount_options,
        base=args.dir,
    )


def _save(r: Report, directory: str | None) -> str | None:
    from pylayerfs.testing import report

    if r.divergence is None:
        return None
    if directory is None:
        directory = tempfile.mkdtemp(prefix="pylayerfs-check-")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{r.subject}-vs-{r.reference}.sh")
    with open(path, "w") as f:
        f.write(report.reproduction(r))
    return path


CLONE_NEWPID = 0x20000000
EXIT_KILLED = 137  # what a shell reports for a process killed by SIGKILL
NEEDS_ROOT = ("pylayerfs check: needs root (its layers hold files of other owners, whiteouts and "
              "trusted.overlay.* xattrs, and it mounts)")  # fmt: skip


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _wait(pid: int) -> int:
    """Wait for the child ``pid`` (through EINTR) and return its exit code (128+N for a signal N)."""
    while True:
        with contextlib.suppress(InterruptedError):
            return _exit_code(os.waitpid(pid, 0)[1])


def _init(work: Callable[[], int], lifeline: int, scratch: str | None) -> int:
    """PID 1 of the check's namespace: run ``work`` in a child, reap every orphan, exit with ``work``'s code.

    Returns (to be passed to ``os._exit``) as soon as ``lifeline`` reads EOF (the ``pylayerfs check``
    process is gone, however it died), after :func:`_abandon` has cleared ``scratch``; PID 1's exit
    makes the kernel kill every process of the namespace.
    """
    worker = os.fork()
    if worker == 0:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.close(lifeline)
        code = 1
        try:
            code = work()
        except KeyboardInterrupt:
            code = 130
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    while True:
        with contextlib.suppress(InterruptedError):
            readable, _, _ = select.select([lifeline], [], [], 0.2)
            if readable and not os.read(lifeline, 1):
                _abandon(scratch)
                return EXIT_KILLED
        while True:  # reap: the worker, and the daemons that mount commands leave behind
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return 1
            if pid == 0:
                break
            if pid == worker:
                return _exit_code(status)


def _abandon(scratch: str | None) -> None:
    """The check was killed: stop every process of the namespace, detach its mounts, remove ``scratch``."""
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)  # from PID 1: every other process of this PID namespace
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)
    if scratch is not None:
        remove_tree(scratch)


def _drop_fuse_mounts(keep: str) -> None:
    """Detach the FUSE mounts the new namespace copied from the host (not one ``keep`` is on).

    A copy keeps its daemon serving: the host's ``pylayerfs umount`` would leave the daemon alive and
    its upper "in use" for as long as the check runs (the sandbox's pivot_root does this for containers).
    """
    real = os.path.realpath(keep)
    for entry in sorted(mountinfo(), key=lambda e: e.mountpoint, reverse=True):
        inside = real == entry.mountpoint or real.startswith(entry.mountpoint.rstrip("/") + "/")
        if entry.fstype.startswith("fuse") and entry.fstype != "fusectl" and not inside:
            with contextlib.suppress(OSError):
                realfs.detach(entry.mountpoint)


def isolated(work: Callable[[], int], scratch: str | None = None) -> int:
    """Run ``work`` in a new mount and PID namespace; return its exit code (as root only).

    Three processes: this one waits; a child unshares (this process's own namespaces never change, so
    a library caller is not moved) and forks PID 1 of the new PID namespace, which runs ``work`` in a
    child of its own and reaps. Mounts are made private to the new mount namespace, so nothing ``work``
    mounts is seen outside it. If this process dies (even by SIGKILL), PID 1 sees EOF on a pipe it holds
    the write end of and exits; the kernel then kills every process in the namespace (FUSE daemons
    included) and the mount namespace, with every mount in it, goes away. Raises OSError (EPERM without
    root) when the namespaces cannot be made; ``work``'s output goes to the same stdout and stderr.
    ``scratch``: a directory PID 1 removes (mounts below it detached first) when this process dies.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lifeline, keep = os.pipe()
    report_r, report_w = os.pipe()  # the child's error, if it cannot make the namespaces
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(keep)
            os.close(report_r)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker handles Ctrl-C and exits
            try:
                if libc.unshare(CLONE_NEWNS | CLONE_NEWPID) != 0:
                    raise SandboxError(f"unshare: {os.strerror(ctypes.get_errno())}")
                make_mounts_private(scratch or tempfile.gettempdir())  # also in a chroot whose / is no mount
                _drop_fuse_mounts(scratch or tempfile.gettempdir())
            except SandboxError as exc:
                os.write(report_w, f"cannot make a namespace: {exc}".encode())
                os._exit(1)
            os.close(report_w)
            init = os.fork()
            if init == 0:
                code = _init(work, lifeline, scratch)
            else:
                os.close(lifeline)
                code = _wait(init)
        finally:
            os._exit(code)
    os.close(lifeline)
    os.close(report_w)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which cleans up
    try:
        code = _wait(child)
        message = os.read(report_r, 4096).decode()
    finally:
        signal.signal(signal.SIGINT, previous)
        os.close(report_r)
        os.close(keep)
    if message:
        raise OSError(errno.EPERM, message)
    return code


def run(args: argparse.Namespace) -> int:
    """Check every implementation; 0 when all pass, 1 when any diverges or cannot run, 2 for a usage error.

    Needs root (one line on stderr and 1 otherwise); runs the check itself in :func:`isolated`.
    """
    from pylayerfs.testing.targets import TargetError, target

    try:
        options = _options(args)
        reference = target(args.against)
        subjects = [target(spec) for spec in (args.impl or DEFAULT_IMPLEMENTATIONS)]
    except (UsageError, TargetError) as exc:
        print(f"pylayerfs check: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    if os.geteuid() != 0:
        print(NEEDS_ROOT, file=sys.stderr)
        return 1
    scratch = tempfile.mkdtemp(prefix="pylayerfs-check-", dir=args.dir)  # every scenario's layers, in one place
    options = dataclasses.replace(options, base=scratch)
    try:
        return isolated(lambda: _check_all(args, options, reference, subjects), scratch)
    except OSError as exc:
        print(f"pylayerfs check: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        remove_tree(scratch)


def _check_all(args: argparse.Namespace, options: Options, reference: Target, subjects: list[Target]) -> int:
    """The check proper: one line per implementation (or JSON); 0 when all pass."""
    from pylayerfs.testing import report
    from pylayerfs.testing.search import check

    if args.format == "text":
        families = "all" if set(options.families) == set(FAMILIES) else ",".join(options.families)
        mounted = f", mount options {options.mount_options}" if options.mount_options else ""
        print(f"pylayerfs check: {options.examples} scenarios each, seed {options.seed}, operations: {families}, "
              f"up to {options.max_layers} lower layers and {options.max_steps} steps{mounted}",
              flush=True)  # fmt: skip
    results = []
    for subject in subjects:
        r = check(subject, reference, options)
        try:
            script = _save(r, args.save)
        except OSError as exc:
            sys.stdout.flush()
            print(f"pylayerfs check: cannot write the reproduction script: {exc}", file=sys.stderr)
            script = None
        results.append(report.as_dict(r, script))
        if args.format == "text":
            print(report.text(r, script), flush=True)
    if args.format == "json":
        json.dump({"seed": options.seed, "results": results}, sys.stdout, indent=2)
        print()
    return 0 if all(r["passed"] for r in results) else 1
