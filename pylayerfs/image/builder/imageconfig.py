"""Image configs as Docker writes them: the run config's field order, history strings, the cache key.

``created_by`` strings follow moby's classic builder exactly: metadata steps
are ``/bin/sh -c #(nop)  ENV K=v`` (two spaces: "#(nop) " and the text are two
words), WORKDIR/COPY/ADD ``/bin/sh -c #(nop) COPY file:<hash> in /dest ``
(one word, a trailing space), RUN ``/bin/sh -c <command>``, prefixed with
``|N K=v ...`` when build arguments are in scope.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from typing import Any

from pylayerfs import __version__

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# container.Config in Go's field order; the second set is omitted when empty (omitempty).
_FIELDS = [
    "Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "ExposedPorts", "Tty",
    "OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped", "Image", "Volumes", "WorkingDir",
    "Entrypoint", "NetworkDisabled", "MacAddress", "OnBuild", "Labels", "StopSignal", "StopTimeout", "Shell",
]  # fmt: skip
_OMIT_EMPTY = {"ExposedPorts", "Healthcheck", "ArgsEscaped", "NetworkDisabled", "MacAddress", "StopSignal",
               "StopTimeout", "Shell"}  # fmt: skip
_DEFAULTS: dict[str, Any] = {"Hostname": "", "Domainname": "", "User": "", "AttachStdin": False,
                             "AttachStdout": False, "AttachStderr": False, "Tty": False, "OpenStdin": False,
                             "StdinOnce": False, "Env": None, "Cmd": None, "Image": "", "Volumes": None,
                             "WorkingDir": "", "Entrypoint": None, "OnBuild": None, "Labels": None}  # fmt: skip


_MAPS = {"ExposedPorts", "Volumes", "Labels"}  # Go maps: encoding/json writes their keys sorted


def run_config(values: dict[str, Any]) -> dict[str, Any]:
    """A container config with every field in Go's order (empty omitempty fields left out), maps' keys sorted."""
    out = {}
    for key in _FIELDS:
        value = values.get(key, _DEFAULTS.get(key))
        if key in _OMIT_EMPTY and not value:
            continue
        out[key] = dict(sorted(value.items())) if key in _MAPS and value is not None else value
    return out


def set_env(env: Sequence[str], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """``env`` (``K=v`` strings) with ``pairs`` set as the classic builder's ENV does: a variable already there is
    replaced where it stands, a new one appended (``ENV X=1 PATH=/opt/bin:$PATH`` gives ``[PATH=..., X=1]``)."""
    out = list(env)
    for key, value in pairs:
        at = next((i for i, e in enumerate(out) if e.partition("=")[0] == key), None)
        if at is None:
            out.append(f"{key}={value}")
        else:
            out[at] = f"{key}={value}"
    return out


def step_configs(run: dict[str, Any], cmd: list[str], container: str, step: str) -> tuple[str, dict[str, Any]]:
    """The ``container`` and ``container_config`` the classic builder commits for a step: (container ID, config).

    ``step`` is ``"create"`` (a ``#(nop)`` step or WORKDIR: the daemon's container create filled the very config
    committed, so it has ``Hostname`` = the ID's first 12 digits and ``Labels`` ``{}`` when unset), ``"run"`` (RUN:
    the committed config is a copy that never went through create: ``Hostname`` empty) or ``"copy"`` (COPY/ADD: no
    container). Source: moby ``builder/dockerfile/internals.go`` (``commit``, ``commitContainer``, ``performCopy``).
    """
    config = {**run, "Cmd": cmd, "Hostname": ""}
    if step == "copy":
        return "", config
    if step == "create":
        config.update(Hostname=container[:12], Labels=run.get("Labels") or {})
    return container, config


def architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine, machine)


def image_config(
    run: dict[str, Any],
    container_config: dict[str, Any],
    container: str,
    created: str,
    history: list[dict[str, Any]],
    diff_ids: list[str],
) -> dict[str, Any]:
    """An image config as moby's ``image.Image`` (keys sorted when encoded); ``container`` left out when empty
    (``omitempty``: a COPY step or an import has none)."""
    return {
        "architecture": architecture(),
        "config": run_config(run),
        **({"container": container} if container else {}),
        "container_config": run_config(container_config),
        "created": created,
        "docker_version": f"pylayerfs-{__version__}",
        "history": history,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def go_quoted(values: Sequence[str]) -> str:
    """Go's ``%q`` of a []string: ``["nginx" "-g" "daemon off;"]`` (no commas)."""
    return "[" + " ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"


def go_list(values: Sequence[str]) -> str:
    """Go's ``%v`` of a []string: ``[/bin/bash -c]``."""
    return "[" + " ".join(values) + "]"


def nop(shell: Sequence[str], text: str, two_words: bool = True) -> list[str]:
    """The Cmd recorded for a step that runs nothing."""
    return [*shell, "#(nop) ", text] if two_words else [*shell, f"#(nop) {text}"]


def with_args(cmd: list[str], args: dict[str, str]) -> list[str]:
    """RUN's Cmd with the build arguments in scope: ``|2 A=1 B=2 /bin/sh -c ...`` (sorted)."""
    if not args:
        return cmd
    return [f"|{len(args)}", *(f"{k}={v}" for k, v in sorted(args.items())), *cmd]


def cache_key(config: dict[str, Any]) -> dict[str, Any]:
    """What the classic builder compares to reuse a step: the container config but its host name (no labels and
    empty labels are the same: moby's ``image/cache`` ``compare`` counts them)."""
    return {k: v for k, v in config.items() if k not in ("Hostname", "Image") and (k != "Labels" or v)}
