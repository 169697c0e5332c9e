"""Reports of a check: text for people, JSON for scripts, and a shell script that reproduces a divergence."""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Sequence
from typing import Any

from pylayerfs.overlay.markers import OPAQUE_XATTR
from pylayerfs.testing import ops
from pylayerfs.testing.lowers import DIR_KINDS, XATTR, Layer, describe, layer_time
from pylayerfs.testing.search import Report
from pylayerfs.testing.targets import KERNEL

_INDENT = "    "


def text(report: Report, script: str | None = None) -> str:
    head = f"{report.subject} against {report.reference}"
    ran = f"{report.examples_run} examples in {report.seconds:.1f} s"
    if report.error is not None:
        return f"{head}: ERROR ({ran}): {report.error}"
    d = report.divergence
    unchecked = [f"  not checked: {what}" for what in sorted(report.unchecked)]
    if d is None:
        return "\n".join([f"{head}: pass ({ran})", *unchecked])
    assert report.scenario is not None
    lines = [f"{head}: DIVERGES ({d.check}) ({ran})", f"  {d.message}", *unchecked, "  lower layers (top first):"]
    lines += [_INDENT + line for line in describe(report.scenario.lowers)] or [_INDENT + "(all empty)"]
    lines.append("  steps:")
    for n, step in enumerate(d.steps, start=1):
        outcome = step.actual if step.actual == step.expected else f"{step.actual}, expected {step.expected}"
        lines.append(f"{_INDENT}{n}. {step.op} -> {outcome}")
    lines += [_INDENT + line for line in d.details]
    if script is not None:
        lines.append(f"  reproduction: sh {script}")
    return "\n".join(lines)


def as_dict(report: Report, script: str | None = None) -> dict[str, Any]:
    d = report.divergence
    out: dict[str, Any] = {
        "subject": report.subject,
        "reference": report.reference,
        "passed": report.passed,
        "examples": report.examples_run,
        "seconds": round(report.seconds, 3),
        "seed": report.options.seed,
        "families": list(report.options.families),
        "mount_options": report.options.mount_options,
        "error": report.error,
        "unchecked": sorted(report.unchecked),
        "divergence": None,
    }
    if d is not None:
        assert report.scenario is not None
        out["divergence"] = {
            "check": d.check,
            "message": d.message,
            "lowers": describe(report.scenario.lowers),
            "steps": [{"op": s.op, "expected": s.expected, "actual": s.actual} for s in d.steps],
            "details": d.details,
            "reproduction": script,
        }
    return out


def _shell_layer(layer: Layer, index: int) -> list[str]:
    root = f"l{index}"
    lines = [f"mkdir {root}"]
    for path, node in layer.items():
        p = shlex.quote(f"{root}/{path}")
        if node.kind in DIR_KINDS:
            lines.append(f"mkdir {p}" + (f"; setx {p} {OPAQUE_XATTR} y" if node.kind == "opaque" else ""))
        elif node.kind == "file":
            lines.append(f"printf %s {shlex.quote(node.content.decode())} > {p}")
        elif node.kind == "symlink":
            lines.append(f"ln -s {shlex.quote(node.target)} {p}")
        elif node.kind == "fifo":
            lines.append(f"mkfifo {p}")
        else:
            lines.append(f"mknod {p} c 0 0  # a whiteout")
    when = layer_time(index)
    for path, node in reversed(list(layer.items())):
        p = shlex.quote(f"{root}/{path}")
        if node.kind == "whiteout":
            continue
        meta = [f"chown -h {node.uid}:{node.uid} {p}"]
        if node.kind != "symlink":
            meta.append(f"chmod {node.mode:o} {p}")
        if node.xattr is not None:
            meta.append(f"setx {p} {XATTR} {shlex.quote(node.xattr.decode())}")
        lines.append("; ".join([*meta, f"touch -h -d @{when} {p}"]))
    lines.append(f"touch -d @{when} {root}")
    return lines


def reproduction(report: Report) -> str:
    """A self-contained shell script: build the lowers, mount, run the steps, print the tree, remount."""
    d, scenario = report.divergence, report.scenario
    assert d is not None and scenario is not None
    lowers = ":".join(f"$T/l{i}" for i in range(len(scenario.lowers)))
    extra = f",{report.options.mount_options}" if report.options.mount_options else ""
    dirs = f"lowerdir={lowers},upperdir=$T/upper,workdir=$T/work{extra}"
    header = [
        "#!/bin/sh",
        f"# pylayerfs check: {report.subject} against {report.reference} (seed {report.options.seed}): {d.check}",
        *([f"# mount options: {report.options.mount_options}"] if extra else []),
        f"# {d.message}",
        *(f"# step {n}: {s.op} -> {s.actual} (expected {s.expected})" for n, s in enumerate(d.steps, start=1)),
        *(f"# {line}" for line in d.details),
        "#",
        "# Run as root: sh THIS [MOUNT-COMMAND [REMOUNT-COMMAND]]; the commands take {options} and {mountpoint}:",
        f"#   '{KERNEL}' (the default)",
        "#   'pylayerfs mount -o {options} {mountpoint}'",
        "#   'fuse-overlayfs -o {options} {mountpoint}'",
        "# It prints each step's outcome and the merged tree, then the tree after unmounting and",
        "# mounting again (with REMOUNT-COMMAND if given: interop).",
        "set -eu",
        f"MOUNT=${{1:-'{KERNEL}'}}",
        "REMOUNT=${2:-$MOUNT}",
        'T=$(mktemp -d "${TMPDIR:-/tmp}/pylayerfs-repro.XXXXXX")',
        'cd "$T"',
        "umask 022",
        "setx() { python3 -c 'import os, sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode())' \"$@\"; }",
        f'mnt() {{ eval "$(printf %s "$1" | sed "s|{{options}}|{dirs}|; s|{{mountpoint}}|$T/merged|")"; }}',
    ]
    body = [line for i, layer in enumerate(scenario.lowers) for line in _shell_layer(layer, i)]
    tail = [
        "mkdir upper work merged",
        "cat > ops.py <<'PYLAYERFS_OPS'",
        inspect.getsource(ops).rstrip("\n"),
        "PYLAYERFS_OPS",
        'mnt "$MOUNT"',
        "python3 ops.py merged <<'PYLAYERFS_STEPS'",
        *(s.op for s in d.steps),
        "PYLAYERFS_STEPS",
        "umount merged",
        'echo "after unmount and mount again:"',
        'mnt "$REMOUNT"',
        "python3 ops.py merged </dev/null",
        "umount merged",
        'echo "(the layers are in $T)"',
    ]
    return "\n".join(header + body + tail) + "\n"


def summary(reports: Sequence[Report]) -> str:
    failed = [r for r in reports if not r.passed]
    return f"{len(reports) - len(failed)} of {len(reports)} passed"
