"""The ``pylayerfs`` command line.

Also the program that ``mount -t fuse.pylayerfs SOURCE MOUNTPOINT -o OPTIONS``
(and an fstab line) runs: mount.fuse calls ``pylayerfs SOURCE MOUNTPOINT -o
OPTIONS``. Every error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pylayerfs import __version__
from pylayerfs.params import MountError, check, parse_options

COMMANDS = ("mount", "umount", "demo", "check")
EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pylayerfs", description="Docker-style layered filesystems, from first principles.")
    parser.add_argument("--version", action="version", version=f"pylayerfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = sub.add_parser(
        "mount",
        help="mount lower layers (and an upper layer) as one merged directory",
        description="Mount with the options of 'mount -t overlay': "
        "-o lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W][,userxattr][,debug][,logfile=F][,ro]...",
    )
    mount.add_argument("mountpoint")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", required=True)
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--source", default="pylayerfs", help=argparse.SUPPRESS)

    umount = sub.add_parser("umount", help="unmount a pylayerfs mount (its daemon exits)")
    umount.add_argument("mountpoint")
    umount.add_argument("-l", "--lazy", action="store_true", help="detach now, clean up when no longer busy")

    demo = sub.add_parser("demo", help="show lookup, whiteouts, opaque directories and copy-up on real layers")
    demo.add_argument("--dir", help="where to build the demo layers (default: a new temporary directory)")

    from pylayerfs.testing.command import add_arguments

    check = sub.add_parser(
        "check",
        help="property-test overlay implementations: random operations, shrunk to a minimal divergence",
        description="Run random operation sequences on random lower layers against each implementation and "
        "compare with the model of overlay semantics (or with another implementation); print each divergence, "
        "shrunk, with a shell script that reproduces it. Exit status 1 when any implementation diverges.",
    )
    add_arguments(check)
    return parser


def _mount_fuse_argv(argv: Sequence[str]) -> list[str]:
    """``SOURCE MOUNTPOINT -o OPTS`` (as mount.fuse runs us) -> ``mount MOUNTPOINT -o OPTS --source SOURCE``."""
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", argv[1], "--source", argv[0], *argv[2:]]
    return list(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(_mount_fuse_argv(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "check":
            from pylayerfs.testing.command import run

            return run(args)
        if args.command == "umount":
            from pylayerfs.mount import umount

            umount(args.mountpoint, lazy=args.lazy)
            return 0
        from pylayerfs.demo import run_demo

        return run_demo(args.dir)
    except MountError as exc:
        print(f"pylayerfs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _mount(args: argparse.Namespace) -> int:
    from pylayerfs import mount

    config = parse_options(args.options)
    mountpoint = check(config, args.mountpoint)
    if mount.is_mountpoint(mountpoint):
        raise MountError(f"'{args.mountpoint}' is already a pylayerfs mountpoint")
    if args.foreground:
        return mount.serve(config, mountpoint, args.source)
    mount.mount_background(config, mountpoint, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
