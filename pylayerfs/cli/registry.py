"""The registry commands: ``pull`` and ``push`` (:mod:`pylayerfs.image.transfer.registry`), printing as Docker does."""

from __future__ import annotations

import argparse
import sys

from pylayerfs.image import archive
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.references import parse


def _line(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> int:
    """The command line's handler (cli/main.py parses the arguments): 0, or 1 after one line on stderr."""
    from pylayerfs.image.transfer import registry

    try:
        store = Store(args.root)
        if args.command == "pull":
            quiet = args.quiet
            registry.pull(store, args.name, args.platform, args.insecure, (lambda _: None) if quiet else _line)
            if quiet:
                ref = parse(args.name)
                print(registry.full_name(ref) + (f"@{ref.digest}" if ref.digest else f":{ref.tag}"))
        else:
            registry.push(store, args.name, args.insecure, _line)
    except (StoreError, archive.ArchiveError, OSError) as exc:
        sys.stdout.flush()
        print(f"pylayerfs {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0
