"""The ``pylayerfs`` command line.

Also the program that ``mount -t fuse.pylayerfs SOURCE MOUNTPOINT -o OPTIONS``
(and an fstab line) runs: mount.fuse calls ``pylayerfs SOURCE MOUNTPOINT -o
OPTIONS``. Every error is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from pylayerfs import __version__
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.overlay.params import MountError, check, parse_options

IMAGE_COMMANDS = ("build", "history", "images", "tag", "rmi", "inspect", "import", "base")
REGISTRY_COMMANDS = ("pull", "push")
CONTAINER_COMMANDS = ("create", "run", "start", "stop", "rm", "exec", "ps", "logs", "diff", "commit", "system")
TEACHING_COMMANDS = ("explain", "layers", "diagram")
ARCHIVE_COMMANDS = ("save", "load")
COMMANDS = ("mount", "umount", "demo", "check", "bench", *TEACHING_COMMANDS, *IMAGE_COMMANDS, *CONTAINER_COMMANDS,
            *ARCHIVE_COMMANDS, *REGISTRY_COMMANDS)  # fmt: skip
DRIVERS = tuple(d.value for d in StorageDriver)  # plain strings: argparse's messages show them as 'fuse'
DRIVERS_HELP = "fuse: pylayerfs's FUSE mount (default); overlay: the kernel's overlayfs; vfs: a full copy per layer"
EXIT_ERROR = 1
EXIT_USAGE = 2
MOUNT_OPTIONS = """\
options (-o, comma-separated; \\: and \\, escape a colon or comma in a path):
  lowerdir=TOP:...:BOTTOM  the read-only layers, the leftmost on top (required)
  upperdir=U,workdir=W     the writable layer, and an empty directory on its
                           filesystem; without them, writes fail with EROFS
  userxattr                overlay metadata in user.overlay.* instead of
                           trusted.overlay.* (unprivileged use)
  debug                    log every call made on the layer directories, to
                           stderr, or to logfile=PATH
  noallow_other            only the mounting user may use the mount
  nodefault_permissions    the kernel does not check permissions on the view
                           (nobody does: needs noallow_other)
  ro, nodev, nosuid,       generic mount flags, passed to the mount
  noexec, noatime, ...
  timeout=SECONDS          how long the kernel may cache entries and attributes
                           (default a day; 0 for none)
  metacopy=on|off          on: chmod, chown, rename and link copy up metadata
                           only (turns redirect_dir=on)
  redirect_dir=on|follow|nofollow|off
                           on: renaming a lower or merged directory moves it
                           (a redirect xattr); follow (the default): follow
                           redirects, make none (such a rename is EXDEV);
                           nofollow: refuse them (EPERM); off: follow
  redirect_always_follow=on|off
                           off: redirect_dir=off means nofollow (the kernel
                           module parameter's counterpart; default on)
  binding=native|libfuse   the FUSE transport (default native, or
                           $PYLAYERFS_BINDING)
  passthrough=on|off       native: reads and writes of open files go to their
                           real files in the kernel (default on, as root on
                           Linux >= 6.9; -o debug logs whether it is in use)
  index, xino,             accepted with the values pylayerfs implements
  nfs_export, uuid         (index=off, xino=off|auto, nfs_export=off, uuid=...)

examples:
  pylayerfs mount -o lowerdir=L1:L2:L3,upperdir=U,workdir=W MOUNTPOINT
  pylayerfs mount -o lowerdir=L1:L2 MOUNTPOINT      # read-only
  mount -t fuse.pylayerfs overlay MNT -o lowerdir=L1,upperdir=U,workdir=W
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pylayerfs", description="Docker-style layered filesystems, from first principles.")
    parser.add_argument("--version", action="version", version=f"pylayerfs {__version__}")
    parser.add_argument("--root", help="the image store (default: $PYLAYERFS_ROOT, /var/lib/pylayerfs as root, "
                                       "else $XDG_DATA_HOME/pylayerfs)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = sub.add_parser(
        "mount",
        help="mount lower layers (and an upper layer) as one merged directory",
        description="Mount lower layers (and an upper layer with its workdir) as one merged\n"
        "directory, with the options of 'mount -t overlay'. Returns once mounted;\n"
        "'pylayerfs umount MOUNTPOINT' stops the daemon.",
        epilog=MOUNT_OPTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mount.add_argument("mountpoint")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", required=True,
                       help="comma-separated options, below (repeatable)")  # fmt: skip
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--source", default="pylayerfs", help=argparse.SUPPRESS)

    umount = sub.add_parser("umount", help="unmount a pylayerfs mount (its daemon exits)")
    umount.add_argument("mountpoint")
    umount.add_argument("-l", "--lazy", action="store_true", help="detach now, clean up when no longer busy")

    demo = sub.add_parser("demo", help="retell the blog post 'Docker Image Layers' on real layers")
    demo.add_argument("--dir", help="where to put the demo's files (default: a new temporary directory, "
                                    "removed at the end)")  # fmt: skip
    demo.add_argument("--step", action="store_true",
                      help="pause between sections (when stdin is a terminal; Enter or Ctrl-D goes on)")  # fmt: skip
    demo.add_argument("--keep", action="store_true", help="keep the store (or the layers) for exploring afterwards")
    overlay_help = "instead: three layers, one mount: lookup, whiteouts, opaque directories, copy-up"
    demo.add_argument("--overlay", action="store_true", help=overlay_help)

    from pylayerfs.testing.command import add_arguments

    check = sub.add_parser(
        "check",
        help="property-test overlay implementations: random operations, shrunk to a minimal divergence",
        description="Run random operation sequences on random lower layers against each implementation and "
        "compare with the model of overlay semantics (or with another implementation); print each divergence, "
        "shrunk, with a shell script that reproduces it. Exit status 1 when any implementation diverges.",
    )
    add_arguments(check)
    from pylayerfs.bench.command import add_arguments as bench_arguments

    bench_arguments(
        sub.add_parser("bench", help="measure pylayerfs, the kernel's overlayfs and fuse-overlayfs side by side")
    )
    _image_parsers(sub)
    _archive_parsers(sub)
    _registry_parsers(sub)
    _container_parsers(sub)
    explain = sub.add_parser("explain", help="why a path shows what it shows: the lookup walked layer by layer")
    explain.add_argument("target", metavar="PATH|IMAGE:/path|CONTAINER:/path")
    explain.add_argument("--format", choices=("text", "json"), default="text")
    layers = sub.add_parser("layers", help="an image's layers: what each added, modified, removed; the waste (dive)")
    layers.add_argument("image")
    layers.add_argument("-v", "--files", action="store_true", help="list every file each layer changes")
    layers.add_argument("--format", choices=("text", "json", "tree"), default="text")
    layers.add_argument("--ci", action="store_true", help="check dive's rules; exit 1 when one fails")
    layers.add_argument("--lowest-efficiency", type=float, default=0.9)
    layers.add_argument("--highest-wasted-bytes", type=int)
    layers.add_argument("--highest-user-wasted-percent", type=float, default=0.1)
    diagram = sub.add_parser("diagram", help="draw an image's or a container's layer stack (SVG, PNG, or text)")
    diagram.add_argument("target", metavar="IMAGE|CONTAINER")
    diagram.add_argument("-o", "--output", help="FILE.svg or FILE.png (default: text on stdout)")
    return parser


def _container_parsers(sub: Any) -> None:
    for name, text in (("create", "create a container: a thin writable layer over an image"),
                       ("run", "create a container and run its command")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        if name == "run":
            p.add_argument("-d", "--detach", action="store_true", help="run in the background")
            p.add_argument("--rm", action="store_true", help="remove the container when it exits")
        p.add_argument("--name")
        p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("-w", "--workdir")
        p.add_argument("-u", "--user", help="name|uid[:group|gid], looked up in the image")
        p.add_argument("--storage-driver", choices=DRIVERS, default=StorageDriver.FUSE.value, help=DRIVERS_HELP)
        p.add_argument("image")
        p.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND")
    start = sub.add_parser("start", help="start stopped containers (in the background)")
    start.add_argument("containers", nargs="+")
    stop = sub.add_parser("stop", help="stop running containers (SIGTERM, then SIGKILL)")
    stop.add_argument("-t", "--time", type=float, default=10.0, help="seconds before SIGKILL (10)")
    stop.add_argument("containers", nargs="+")
    rm = sub.add_parser("rm", help="remove containers and their writable layers")
    rm.add_argument("-f", "--force", action="store_true", help="stop a running container first")
    rm.add_argument("containers", nargs="+")
    exec_ = sub.add_parser("exec", help="run a command in a running container")
    exec_.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE")
    exec_.add_argument("-u", "--user")
    exec_.add_argument("-w", "--workdir")
    exec_.add_argument("container")
    exec_.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND")
    ps = sub.add_parser("ps", help="list containers, as docker ps")
    ps.add_argument("-a", "--all", action="store_true", help="also stopped containers")
    ps.add_argument("-s", "--size", action="store_true", help="the size and the virtual size")
    ps.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    ps.add_argument("--format", default="table", help="table, json (as {{json .}}), or a Go template")
    logs = sub.add_parser("logs", help="a container's output")
    logs.add_argument("container")
    diff = sub.add_parser("diff", help="what a container added (A), changed (C) and deleted (D)")
    diff.add_argument("container")
    commit = sub.add_parser("commit", help="make an image of a container's writable layer")
    commit.add_argument("-m", "--message", default="")
    commit.add_argument("-a", "--author", default="")
    commit.add_argument("-c", "--change", action="append", default=[], help="a Dockerfile instruction (ENV, CMD...)")
    commit.add_argument("container")
    commit.add_argument("reference", nargs="?", metavar="name[:tag]")
    system = sub.add_parser("system", help="store-wide commands")
    system_sub = system.add_subparsers(dest="system_command", required=True, parser_class=_Parser)
    df = system_sub.add_parser("df", help="disk usage of images and containers, as docker system df")
    df.add_argument("-v", "--verbose", action="store_true")


def _archive_parsers(sub: Any) -> None:
    save = sub.add_parser("save", help="write images to a tar archive (docker-archive and OCI layout), as docker save")
    save.add_argument("-o", "--output", help="write to FILE, not stdout")
    save.add_argument("images", nargs="+", metavar="IMAGE")
    load = sub.add_parser("load", help="load images from a docker-archive or an OCI layout (tar or directory)")
    load.add_argument("-i", "--input", help="read from FILE (a tar, maybe compressed, or an OCI layout directory), "
                                            "not stdin")  # fmt: skip
    load.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _image_parsers(sub: Any) -> None:
    build = sub.add_parser("build", help="build an image from a Dockerfile, step by step, as the classic builder")
    build.add_argument("context")
    build.add_argument("-f", "--file", help="the Dockerfile (default: CONTEXT/Dockerfile)")
    build.add_argument("-t", "--tag", action="append", default=[], help="name:tag (repeatable)")
    build.add_argument("--no-cache", action="store_true", help="do not reuse steps of earlier builds")
    build.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE")
    build.add_argument("--storage-driver", choices=DRIVERS, default=StorageDriver.FUSE.value, help=DRIVERS_HELP)
    build.add_argument("--metacopy", action="store_true",
                       help="mount steps with metacopy=on: chmod and chown copy metadata only")  # fmt: skip

    history = sub.add_parser("history", help="an image's history entries, newest first, as docker history")
    history.add_argument("image")
    history.add_argument("--no-trunc", action="store_true")
    history.add_argument("-q", "--quiet", action="store_true", help="only image IDs")
    history.add_argument(
        "-H",
        "--human",
        type=lambda v: v.lstrip("=").lower() in ("1", "t", "true"),
        default=True,
        metavar="true|false",
        help="sizes and times in human readable form (true)",
    )
    history.add_argument("--format", default="table",
                         help="table, json (as {{json .}}), a Go template ([table] {{.Field}}, {{json .}}), or "
                         "tree: the stack drawn as boxes, as pylayerfs diagram")  # fmt: skip

    images = sub.add_parser("images", help="list images, as docker images")
    images.add_argument("-a", "--all", action="store_true", help="also the intermediate images of builds")
    images.add_argument("--format", default="table", help="table, json (as {{json .}}), or a Go template")
    images.add_argument("--digests", action="store_true", help="show the manifest digests (RepoDigests)")

    tag = sub.add_parser("tag", help="give an image a name:tag")
    tag.add_argument("source")
    tag.add_argument("target")

    rmi = sub.add_parser("rmi", help="untag and remove images (never a layer something still uses)")
    rmi.add_argument("images", nargs="+")
    rmi.add_argument("-f", "--force", action="store_true")

    inspect = sub.add_parser("inspect", help="an image's configuration and layer directories, as JSON")
    inspect.add_argument("images", nargs="+")

    imp = sub.add_parser("import", help="make a one-layer image of a root filesystem tarball (tar or tar.gz)")
    imp.add_argument("archive")
    imp.add_argument("reference", metavar="name[:tag]")

    base = sub.add_parser("base", help="make a small base image with /bin/sh from a static busybox")
    base.add_argument("reference", metavar="name[:tag]")
    base.add_argument("--busybox", default="/bin/busybox", help="a statically linked busybox (apt-get install "
                                                                 "busybox-static)")  # fmt: skip


def _registry_parsers(sub: Any) -> None:
    insecure = "plain HTTP, or HTTPS without certificate checks (always allowed for 127.0.0.0/8 and localhost)"
    pull = sub.add_parser("pull", help="download an image from a registry (Docker Registry HTTP API v2)")
    pull.add_argument("name", metavar="NAME[:TAG|@DIGEST]")
    pull.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="the image to take from an index (default: "
                                                                       "the host's, linux/amd64)")  # fmt: skip
    pull.add_argument("--insecure", action="store_true", help=insecure)
    pull.add_argument("-q", "--quiet", action="store_true", help="print only the image's reference")
    push = sub.add_parser("push", help="upload an image to a registry (layers gzipped, a v2 schema 2 manifest)")
    push.add_argument("name", metavar="NAME[:TAG]")
    push.add_argument("--insecure", action="store_true", help=insecure)


def _mount_fuse_argv(argv: Sequence[str]) -> list[str]:
    """``SOURCE MOUNTPOINT -o OPTS`` (as mount.fuse runs us) -> ``mount MOUNTPOINT -o OPTS --source SOURCE``."""
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", argv[1], "--source", argv[0], *argv[2:]]
    return list(argv)


NEEDS_ROOT = ("build", "run", "create", "start", "exec", "base", "import", "load", "pull")
# Commands that only read and print: when their reader goes away (`| head`), they stop at once and
# quietly, as Unix tools do (SIGPIPE). The others keep Python's EPIPE error, so they can clean up
# (and `diagram -o x.png`, which writes to its converter's pipe, learns of a converter that stopped).
READ_ONLY = ("history", "images", "inspect", "ps", "logs", "diff", "system", *TEACHING_COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(_mount_fuse_argv(sys.argv[1:] if argv is None else argv))
    if (args.command in READ_ONLY and not getattr(args, "output", None)) or (args.command == "bench" and args.explain):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    if args.command in NEEDS_ROOT and os.geteuid() != 0:
        print(f"pylayerfs {args.command}: needs root (it mounts layers, makes device nodes and enters namespaces)",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "check":
            from pylayerfs.testing.command import run

            return run(args)
        if args.command == "bench":
            from pylayerfs.bench.command import run as bench

            signal.signal(signal.SIGTERM, _interrupted)  # killed, it unmounts its data set and tracefs as on Ctrl-C
            return bench(args)
        if args.command == "explain":
            from pylayerfs.teaching import explain

            return explain.run(args)
        if args.command == "layers":
            from pylayerfs.teaching import layers as analysis

            return analysis.run(args)
        if args.command == "diagram":
            from pylayerfs.teaching import diagram

            return diagram.run(args)
        if args.command in IMAGE_COMMANDS:
            from pylayerfs.cli import images as imagecmds

            return imagecmds.run(args)
        if args.command in (*ARCHIVE_COMMANDS, *REGISTRY_COMMANDS, "import"):
            signal.signal(signal.SIGTERM, _interrupted)  # `timeout`, `kill`: rolled back as after Ctrl-C
        if args.command in ARCHIVE_COMMANDS:
            from pylayerfs.cli import archives

            return archives.run(args)
        if args.command in REGISTRY_COMMANDS:
            from pylayerfs.cli import registry

            return registry.run(args)
        if args.command in CONTAINER_COMMANDS:
            from pylayerfs.cli import containers as containercmds

            return containercmds.run(args)
        if args.command == "umount":
            from pylayerfs.fuse.mount import umount

            umount(args.mountpoint, lazy=args.lazy)
            return 0
        signal.signal(signal.SIGTERM, _interrupted)  # a demo stopped by `kill` cleans up as after Ctrl-C
        if args.overlay:
            from pylayerfs.teaching.overlaydemo import run_demo

            return run_demo(args.dir, args.keep)
        from pylayerfs.teaching.demo import run_demo as retell

        return retell(args.dir, args.step, args.keep)
    except MountError as exc:
        sys.stdout.flush()  # what was printed before comes first, also when stdout is a pipe
        print(f"pylayerfs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stdout.flush()
        return 130


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _mount(args: argparse.Namespace) -> int:
    from pylayerfs.fuse import mount

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
