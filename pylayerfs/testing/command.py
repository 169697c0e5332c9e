"""``pylayerfs check``: the command line of the conformance checker."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from typing import TYPE_CHECKING

from pylayerfs.testing.ops import FAMILIES

if TYPE_CHECKING:
    from pylayerfs.testing.search import Options, Report

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
    if args.dir is not None and not os.path.isdir(args.dir):
        raise UsageError(f"--dir: '{args.dir}' is not a directory")
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


def run(args: argparse.Namespace) -> int:
    """Check every implementation; 0 when all pass, 1 when any diverges or cannot run."""
    from pylayerfs.testing import report
    from pylayerfs.testing.search import check
    from pylayerfs.testing.targets import TargetError, target

    try:
        options = _options(args)
        reference = target(args.against)
        subjects = [target(spec) for spec in (args.impl or DEFAULT_IMPLEMENTATIONS)]
    except (UsageError, TargetError) as exc:
        print(f"pylayerfs check: {exc}", file=sys.stderr)
        return 1
    if args.format == "text":
        families = "all" if set(options.families) == set(FAMILIES) else ",".join(options.families)
        print(f"pylayerfs check: {options.examples} scenarios each, seed {options.seed}, operations: {families}, "
              f"up to {options.max_layers} lower layers and {options.max_steps} steps", flush=True)  # fmt: skip
    results = []
    for subject in subjects:
        r = check(subject, reference, options)
        script = _save(r, args.save)
        results.append(report.as_dict(r, script))
        if args.format == "text":
            print(report.text(r, script), flush=True)
    if args.format == "json":
        json.dump({"seed": options.seed, "results": results}, sys.stdout, indent=2)
        print()
    return 0 if all(r["passed"] for r in results) else 1
