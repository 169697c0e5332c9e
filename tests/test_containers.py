"""Containers through real FUSE mounts: sizes to the byte, diff, commit, rm, system df, restarts, the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylayerfs.container.runtime import Runtime, container_size
from pylayerfs.image.store import Store
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below
from tests.test_build import golden, pylayerfs

pytestmark = [pytest.mark.fuse, pytest.mark.root]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    """alpine (busybox) and an image with a file, a directory of files, and a long-running command."""
    root = tmp_path / "store"
    pylayerfs(root, "base", "alpine")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM alpine\nRUN mkdir -p /data/old && echo lower > /data/old/a && echo doomed > /data/gone "
        '&& echo keep > /data/kept\nCMD ["sleep", "600"]\n'
    )
    pylayerfs(root, "build", "-t", "app", str(ctx))
    yield root
    subprocess.run([sys.executable, "-m", "pylayerfs", "--root", str(root), "rm", "-f",
                    *pylayerfs(root, "ps", "-a", "-q").stdout.split()], capture_output=True, check=False)  # fmt: skip
    for mountpoint in mounts_below(str(root)):
        realfs.detach(mountpoint)


def ps_row(root: Path, name: str) -> dict[str, str]:
    rows = [json.loads(line) for line in pylayerfs(root, "ps", "-a", "-s", "--format", "json").stdout.splitlines()]
    return next(r for r in rows if r["Names"] == name)


def test_size_and_virtual_size_exact_to_the_byte(store):
    pylayerfs(store, "run", "-d", "--name", "web", "app")
    runtime = Runtime(Store(str(store)))
    container = runtime.containers.find("web")
    image_size = runtime.store.size(runtime.store.resolve("app"))
    assert container_size(runtime, container) == (0, image_size)
    assert ps_row(store, "web")["Size"] == f"0B (virtual {_human(image_size)})"
    pylayerfs(store, "exec", "web", "sh", "-c", "echo hello world > file.txt")
    assert container_size(runtime, container) == (12, image_size + 12)
    assert ps_row(store, "web")["Size"] == f"12B (virtual {_human(image_size + 12)})"
    table = pylayerfs(store, "ps", "-s").stdout.splitlines()
    assert table[0].split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES", "SIZE"]
    assert '"sleep 600"' in table[1] and "Up " in table[1] and table[1].endswith(")")


def _human(n: int) -> str:
    from pylayerfs.image.sizes import human_size

    return human_size(n)


def test_diff_lists_added_changed_and_deleted(store):
    pylayerfs(store, "run", "-d", "--name", "differ", "app")
    pylayerfs(store, "exec", "differ", "sh", "-c",
              "echo new > /data/new && echo more >> /data/kept && rm /data/gone && rm -rf /data/old && mkdir /data/old "
              "&& echo fresh > /data/old/b && mkdir /added")  # fmt: skip
    assert pylayerfs(store, "diff", "differ").stdout.splitlines() == [  # Docker's walk: deletions last in a directory
        "A /added",
        "C /data",
        "C /data/kept",
        "A /data/new",
        "C /data/old",
        "A /data/old/b",
        "D /data/old/a",
        "D /data/gone",
    ]


def test_commit_then_run_the_committed_image(store):
    pylayerfs(store, "run", "-d", "--name", "committer", "app")
    pylayerfs(store, "exec", "committer", "sh", "-c", "echo hello world > /file.txt && rm /data/gone")
    image_id = pylayerfs(
        store, "commit", "-m", "msg", "-c", "ENV STAGE=committed", "committer", "snap:1"
    ).stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id)
    out = pylayerfs(store, "run", "--rm", "snap:1", "sh", "-c", "cat /file.txt; ls /data; echo $STAGE")
    assert out.stdout == "hello world\nkept\nold\ncommitted\n"
    header, row = pylayerfs(store, "history", "snap:1").stdout.splitlines()[:2]
    starts = [header.index(column) for column in ("IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT")]
    cells = [row[a:b].rstrip() for a, b in zip(starts, [*starts[1:], len(row)], strict=True)]
    # the container's command, the layer's 12 bytes (/file.txt; the whiteout of /data/gone counts 0), -m
    assert [cells[0], *cells[2:]] == [image_id.removeprefix("sha256:")[:12], "sleep 600", "12B", "msg"]
    assert pylayerfs(store, "ps", "-a", "-q").stdout.split() == [
        Runtime(Store(str(store))).containers.find("committer").short_id
    ]


def test_rm_leaves_no_layer_and_no_mount(store):
    s = Store(str(store))
    before = set(os.listdir(s.layout.overlay2))
    pylayerfs(store, "run", "-d", "--name", "gone", "app")
    runtime = Runtime(s)
    container = runtime.containers.find("gone")
    assert mounts_below(s.layout.layer(container.mount_id)), "a running container holds its mount"
    refused = pylayerfs(store, "rm", "gone", check=False)
    assert refused.returncode == 1 and "You cannot remove a running container" in refused.stderr
    pylayerfs(store, "rm", "-f", "gone")
    assert set(os.listdir(s.layout.overlay2)) == before
    assert mounts_below(str(store)) == [] and os.listdir(s.layout.mounts) == []
    assert pylayerfs(store, "ps", "-a", "-q").stdout == ""


def test_system_df_shared_and_unique_sizes(store, tmp_path):
    ctx = tmp_path / "other"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM alpine\nRUN echo 12345678901 > /eleven\n")
    pylayerfs(store, "build", "-t", "other", str(ctx))
    for name in ("one", "two"):
        pylayerfs(store, "run", "-d", "--name", name, "app")
    pylayerfs(store, "exec", "one", "sh", "-c", "echo 123 > /x")
    s = Store(str(store))
    base = s.size(s.resolve("alpine"))
    app_only = s.size(s.resolve("app")) - base
    lines = pylayerfs(store, "system", "df", "-v").stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("app ", "other ", "alpine "))}
    assert rows["app"][-4:] == [_h4(base + app_only), _h4(base), _h4(app_only), "2"]
    assert rows["other"][-4:] == [_h4(base + 12), _h4(base), "12B", "0"]
    assert rows["alpine"][-4:] == [_h4(base), _h4(base), "0B", "0"]
    containers = [line for line in lines if line.endswith((" one", " two"))]
    assert sorted(re.search(r'" +0 +(\S+)', line).group(1) for line in containers) == ["0B", "4B"]  # type: ignore[union-attr]
    summary = pylayerfs(store, "system", "df").stdout.splitlines()
    assert summary[1].split()[:4] == ["Images", "3", "1", _h4(base + app_only + 12)]
    assert summary[2].split()[:4] == ["Containers", "2", "2", "4B"]


def _h4(n: int) -> str:
    from pylayerfs.image.sizes import human_size

    return human_size(n, 4)


def test_stopped_and_killed_containers_keep_their_layer(store):
    pylayerfs(store, "run", "-d", "--name", "stopper", "app")
    pylayerfs(store, "exec", "stopper", "sh", "-c", "echo kept > /state")
    pylayerfs(store, "stop", "-t", "1", "stopper")
    assert ps_row(store, "stopper")["Status"].startswith("Exited (137)"), "sleep as PID 1 ignores SIGTERM (Docker's)"
    assert ps_row(store, "stopper")["Size"].startswith("5B (virtual"), (
        "sizes of a stopped container come from its directory"
    )
    runtime = Runtime(Store(str(store)))
    assert mounts_below(runtime.store.layout.layer(runtime.containers.find("stopper").mount_id)) == []
    pylayerfs(store, "start", "stopper")
    assert pylayerfs(store, "exec", "stopper", "cat", "/state").stdout == "kept\n"
    monitor = runtime.containers.find("stopper").state.monitor_pid
    os.kill(monitor, signal.SIGKILL)  # a reboot, as far as the container is concerned
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{monitor}/cmdline") and open(f"/proc/{monitor}/cmdline").read():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ps_row(store, "stopper")["Status"].startswith("Exited (255)")
    assert mounts_below(runtime.store.layout.layer(runtime.containers.find("stopper").mount_id)) == [], "no stale mount"
    pylayerfs(store, "start", "stopper")
    assert pylayerfs(store, "exec", "stopper", "cat", "/state").stdout == "kept\n"


def test_foreground_run_and_bad_input(store):
    out = pylayerfs(store, "run", "--name", "fg", "app", "sh", "-c", "echo out; exit 7", check=False)
    assert out.returncode == 7 and out.stdout == "out\n"
    assert pylayerfs(store, "logs", "fg").stdout == "out\n"
    missing = pylayerfs(store, "run", "--name", "nf", "app", "no-such-command", check=False)
    assert missing.returncode == 127
    assert missing.stderr == 'pylayerfs: exec: "no-such-command": executable file not found in $PATH\n'
    assert ps_row(store, "nf")["Status"] == "Created"
    for args, message in (
        (("run", "nosuchimage"), "no such image: nosuchimage"),
        (("exec", "nosuch", "true"), "No such container: nosuch"),
        (("exec", "fg", "true"), "is not running"),
        (("run", "--name", "fg", "app"), 'The container name "/fg" is already in use'),
    ):
        result = pylayerfs(store, *args, check=False)
        code = 125 if args[0] == "run" else 1  # as docker's
        assert result.returncode == code and message in result.stderr and result.stderr.count("\n") == 1
    assert mounts_below(str(store)) == []


def test_demo_retells_the_blog(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pylayerfs", "demo", "--dir", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    structure = [line for line in result.stdout.splitlines() if line.startswith(("== ", "$ "))]
    golden("demo-structure.txt", "\n".join(re.sub(r"/tmp/[^\s)]+", "<dir>", line) for line in structure) + "\n")
    out = result.stdout
    assert "Using cache" in out and "<missing>" in out and "0B (virtual " in out and "12B (virtual " in out
    assert "A /file.txt" in out and "file.txt  (12 bytes)" in out
    assert mounts_below(str(tmp_path)) == []
    kept = Store(str(tmp_path / "d" / "store"))  # --dir keeps the store: the sizes printed are its layers'
    image_size = kept.size(kept.resolve("bitphile/my-new-image"))
    assert f"0B (virtual {_human(image_size)})" in out and f"12B (virtual {_human(image_size + 12)})" in out


def test_commands_that_mount_say_they_need_root(monkeypatch, capsys):
    from pylayerfs.cli import main as cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for command in (["run", "alpine"], ["build", "."], ["exec", "c", "true"]):
        assert cli.main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pylayerfs {command[0]}: needs root") and err.count("\n") == 1


def test_explain_an_image_and_a_container_path(store):
    out = pylayerfs(store, "explain", "app:/data/kept").stdout
    assert "made by: /bin/sh -c mkdir -p /data/old" in out and "is a file from layer 2" in out
    assert pylayerfs(store, "explain", "app:latest:/data/kept").stdout == out, "IMAGE:TAG:/PATH"
    pylayerfs(store, "run", "-d", "--name", "ex", "app")
    pylayerfs(store, "exec", "ex", "sh", "-c", "rm /data/kept")
    data = json.loads(pylayerfs(store, "explain", "--format", "json", "ex:/data/kept").stdout)
    assert data["layers"][0]["label"] == "the container layer (upper)" and data["layers"][0]["holds"] == "whiteout"
    assert data["source"] is None
