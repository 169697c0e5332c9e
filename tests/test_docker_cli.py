"""The CLI against Docker's (issue 14): history/images formats, diff, inspect, commit, system df and rmi.

The same sequence runs on both sides, on the same base (``busybox:base`` imported from one tar) and the same
build; outputs are compared after masking IDs (numbered in order of appearance, per side) and ages. Sizes are
compared as they are: the contents are the same on both sides.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pylayerfs.image.store import Store
from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below
from tests.dockerd import BASE, Docker
from tests.test_build import pylayerfs

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(600)]

MTIME = 1_600_000_000
DOCKERFILE = (
    f"FROM {BASE}\nCOPY a.txt /a.txt\nRUN echo hi > /b && mkdir -p /data/old && echo x > /data/old/f\nENV X=1\n"
)


@dataclass
class Sides:
    """Docker (the private daemon) and a pylayerfs store with the same base and the same ``app`` build."""

    docker: Docker
    store: Path

    def run(self, *args: str) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        """``docker ARGS`` and ``pylayerfs ARGS``, neither checked."""
        return self.docker.run(*args, check=False), pylayerfs(self.store, *args, check=False)

    def same(self, *args: str) -> tuple[str, str]:
        """Run on both; assert the same exit code and the same masked stdout; return both stdouts (unmasked)."""
        d, p = self.run(*args)
        assert (d.returncode, masked(d.stdout)) == (p.returncode, masked(p.stdout)), (args, d.stderr, p.stderr)
        return d.stdout, p.stdout


def masked(text: str) -> str:
    """IDs numbered in order of appearance, ages as ``<ago>``, runs of spaces (table padding) as two spaces."""
    ids: dict[str, str] = {}
    text = re.sub(r"(sha256:)?[0-9a-f]{64}|\b[0-9a-f]{12}\b", lambda m: ids.setdefault(m[0], f"<ID{len(ids)}>"), text)
    text = re.sub(r"(\d+ \w+|About an? \w+|Less than a second) ago", "<ago>", text)
    # COPY's source hash and the import's comment ("Imported from -"): other points of issue 14
    text = re.sub(r"(file|dir):[0-9a-f]+", r"\1:<hash>", text)
    text = re.sub(r"Imported from [^|\n\"]+", "Imported from <tar>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?( ?[+-]\d{4} \w+|Z|[+-]\d\d:\d\d)", "<time>", text)
    return re.sub(r" {2,}", "  ", text)


@pytest.fixture(scope="module")
def sides(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sides]:
    root = tmp_path_factory.mktemp("docker-cli")
    store = root / "store"
    pylayerfs(store, "import", os.path.join(docker.directory, "busybox-rootfs.tar"), BASE)
    ctx = root / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "a.txt").write_text("hello\n")
    for name in ("Dockerfile", "a.txt"):
        os.utime(ctx / name, (MTIME, MTIME))
    docker.build(str(ctx), "-t", "app")
    pylayerfs(store, "build", "-t", "app", str(ctx))
    yield Sides(docker, store)
    pylayerfs(store, "rm", "-f", *pylayerfs(store, "ps", "-aq").stdout.split(), check=False)
    for mountpoint in mounts_below(str(store)):
        realfs.detach(mountpoint)
    docker.clean()


def test_history_in_docker_formats(sides: Sides) -> None:
    d, p = sides.run("history", "--format", "{{json .}}", "app")
    docker_rows, ours = (
        [json.loads(line) for line in d.stdout.splitlines()],
        [json.loads(x) for x in p.stdout.splitlines()],
    )
    assert [list(r) for r in ours] == [list(r) for r in docker_rows]  # the same keys, sorted as Go's map
    for row in (*docker_rows, *ours):
        assert re.fullmatch(r"[0-9a-f]{12}|<missing>", row["ID"]) and row["CreatedAt"].endswith("Z")
        row["CreatedBy"] = re.sub(r"file:[0-9a-f]+…?", "file:…", row["CreatedBy"])
    ignore = {"ID", "CreatedAt", "CreatedSince"}
    # the base's Comment is the import's ("Imported from -"): another point of issue 14
    assert [{k: v for k, v in r.items() if k not in ignore} for r in ours][:-1] == [
        {k: v for k, v in r.items() if k not in ignore} for r in docker_rows
    ][:-1]
    assert ours[-1]["Size"] == docker_rows[-1]["Size"]
    assert r"echo hi \u003e /b \u0026\u0026" in p.stdout  # Go's escapes
    sides.same("history", "--format", "table {{.ID}}\\t{{.Size}}\\t{{json .CreatedBy}}", "app")
    sides.same("history", "-q", "app")
    d_bytes, p_bytes = sides.run("history", "-H=false", "--format", "{{.Size}} {{.CreatedSince}}", "app")
    assert masked(d_bytes.stdout) == masked(p_bytes.stdout) and "<time>" in masked(p_bytes.stdout)
    d, p = sides.run("history", "--format", "{{.Nope}}", "app")
    assert d.returncode == p.returncode != 0 and "can't evaluate field Nope" in p.stderr


def test_images_format_and_inspect_keys(sides: Sides) -> None:
    d, p = sides.run("images", "--format", "{{json .}}")
    assert [json.loads(x) for x in masked(p.stdout).splitlines()] == [
        json.loads(x) for x in masked(d.stdout).splitlines()
    ]
    sides.same("images", "--format", "table {{.Repository}}\\t{{.Tag}}\\t{{.Size}}\\t{{.VirtualSize}}")
    d, p = sides.run("inspect", "app")
    (docker_image,), (ours,) = json.loads(d.stdout), json.loads(p.stdout)
    assert list(ours) == list(docker_image)
    assert ours["VirtualSize"] == ours["Size"] == docker_image["Size"] == docker_image["VirtualSize"]
    assert list(ours["GraphDriver"]["Data"]) == list(docker_image["GraphDriver"]["Data"])
    assert ours["Metadata"]["LastTagTime"] > "2000" and docker_image["Metadata"]["LastTagTime"] > "2000"
    parent = ours["Parent"], docker_image["Parent"]
    d, p = sides.docker.run("inspect", parent[1]), pylayerfs(sides.store, "inspect", parent[0])
    zero = [json.loads(out.stdout)[0]["Metadata"]["LastTagTime"] for out in (d, p)]
    assert zero == ["0001-01-01T00:00:00Z"] * 2  # an intermediate image was never tagged


def _diff_order_ok(lines: list[str]) -> None:
    """Docker's walk: a directory's line before what is inside it; each entry's subtree right after it; inside a
    directory, deletions after everything else."""
    paths = [line[2:] for line in lines]
    for i, path in enumerate(paths):
        parent = os.path.dirname(path)
        if parent != "/":
            assert parent in paths[:i], (path, lines)
            inside = [j for j, q in enumerate(paths) if q.startswith(parent + "/")]
            assert inside == list(range(inside[0], inside[-1] + 1)), (parent, lines)  # contiguous
        if lines[i].startswith("D "):
            later = [q for q, line in zip(paths[i:], lines[i:], strict=True) if os.path.dirname(q) == parent]
            assert all(line.startswith("D ") for q, line in zip(paths, lines, strict=True) if q in later), lines


def test_diff_in_docker_order(sides: Sides) -> None:
    script = (
        "mkdir -p /tmp/z/y && echo 1 > /tmp/z/y/f && echo x > /etc/passwd && rm /bin/ls && mkdir /new "
        "&& touch /new/b /new/a /A && rm -rf /data/old && mkdir /data/old && touch /data/old/g && rm /a.txt "
        "&& chmod 644 /etc/group"
    )  # fmt: skip  (/etc/group copied up, unchanged: not listed)
    d, p = sides.run("run", "--name", "differ", "app", "sh", "-c", script)
    assert d.returncode == p.returncode == 0, (d.stderr, p.stderr)
    d, p = sides.run("diff", "differ")
    assert sorted(p.stdout.splitlines()) == sorted(d.stdout.splitlines())
    assert "C /etc/group" not in p.stdout and "D /data/old/f" in p.stdout
    _diff_order_ok(d.stdout.splitlines())  # the rule holds for Docker's (random sibling) order...
    _diff_order_ok(p.stdout.splitlines())  # ...and for ours
    sides.same("rm", "differ")


def test_commit_config_is_the_containers(sides: Sides) -> None:
    d, p = sides.run("run", "--name", "committed", "app", "sh", "-c", "echo q > /q")
    assert d.returncode == p.returncode == 0
    sides.run("commit", "-m", "msg", "-a", "me", "committed", "snap:1")
    d, p = sides.run("inspect", "snap:1")
    (docker_image,), (ours,) = json.loads(d.stdout), json.loads(p.stdout)
    for image in (docker_image, ours):
        assert image["Config"]["Hostname"] == image["Container"][:12]  # the container's short ID
        for config in (image["Config"], image["ContainerConfig"]):
            config["Hostname"] = "<id>"
    for key in ("Config", "ContainerConfig", "Comment", "Author"):
        assert ours[key] == docker_image[key], key
    assert ours["Config"]["Image"] == "app" and ours["Config"]["Cmd"] == ["sh", "-c", "echo q > /q"]
    assert ours["Metadata"]["LastTagTime"] > "2000"
    sides.same("history", "--format", "{{.CreatedBy}}|{{.Comment}}|{{.Size}}", "snap:1")
    sides.same("rm", "committed")
    sides.same("rmi", "snap:1")


def test_system_df_as_docker_computes_it(sides: Sides) -> None:
    d, p = sides.run("run", "--name", "user", "app", "sh", "-c", "echo 12345 > /f")
    assert d.returncode == p.returncode == 0
    sides.same("tag", BASE, "other:1")
    d, p = sides.run("system", "df")
    assert masked(p.stdout).startswith(masked(d.stdout).rstrip("\n"))  # then pylayerfs's own table
    assert "Storage drivers on disk (pylayerfs's own" in p.stdout
    assert re.search(r"Images +2 +1 ", p.stdout) and re.search(r"Containers +1 +0 +6B +6B \(100%\)", p.stdout)
    d, p = sides.run("system", "df", "-v")
    ours = masked(p.stdout).split("\nStorage drivers")[0]
    assert ours.rstrip("\n") == masked(d.stdout).rstrip("\n")  # images newest first, the same sizes
    sides.same("ps", "-a", "--format", "table {{.Names}}\\t{{.Image}}\\t{{.Command}}\\t{{.State}}\\t{{.Size}}")
    d, p = sides.run("ps", "-a", "--format", "{{json .}}")
    docker_row, ours = json.loads(masked(d.stdout)), json.loads(masked(p.stdout))
    assert docker_row.pop("Networks") == "bridge" and ours.pop("Networks") == "none"  # no network on our side
    assert ours == docker_row
    sides.same("rm", "user")
    sides.same("rmi", "other:1")


def test_rmi_as_docker(sides: Sides) -> None:
    def images() -> None:
        """The same tags and untagged images, with the same sizes (Docker orders images created in the same second
        as its map gives them: compared sorted)."""
        d, p = sides.run("images", "-a", "--format", "{{.Repository}}:{{.Tag}} {{.Size}} {{.ID}}")
        listed = [sorted(line.rsplit(" ", 1)[0] for line in out.stdout.splitlines()) for out in (d, p)]
        assert listed[0] == listed[1] and len(set(d.stdout.split())) == len(set(p.stdout.split()))

    def refused(ids: list[str], *args: str, why: str) -> None:
        """``rmi ARGS IMAGE-ID`` (Docker's ID, ours) fails on both sides with Docker's conflict, changing nothing."""
        outs = (
            sides.docker.run("rmi", *args, ids[0], check=False),
            pylayerfs(sides.store, "rmi", *args, ids[1], check=False),
        )
        for image_id, out in zip(ids, outs, strict=True):
            assert out.returncode == 1 and out.stdout == "" and f"unable to delete {image_id[:12]} {why}" in out.stderr
        images()

    d, p = sides.run("run", "--name", "holder", "app", "true")
    assert d.returncode == p.returncode == 0
    ids, parents = zip(*(out.stdout.split()[:2] for out in sides.run("history", "-q", "app")), strict=True)
    sides.docker.run("tag", parents[0], "mid:1")
    pylayerfs(sides.store, "tag", parents[1], "mid:1")
    sides.same("tag", "app", "app:v2")
    sides.same("rmi", "mid:1")  # it has a child: untagged only, exit 0
    images()
    d, p = sides.run("rmi", "app:v2", "nosuch", "app")  # one works, two fail: the rest is left as it was
    assert (d.returncode, masked(d.stdout)) == (p.returncode, masked(p.stdout)) == (1, "Untagged: app:v2\n")
    assert "No such image: nosuch" in p.stderr and "container" in p.stderr and "must force" in p.stderr
    images()
    refused(list(parents), why="(cannot be forced) - image has dependent child images")
    refused(list(ids), why="(must be forced) - image is being used by stopped container")
    d, p = sides.run("rmi", "-f", "nosuch")
    assert d.returncode == p.returncode == 0 and "No such image: nosuch" in p.stderr
    sides.same("tag", "app", "run:1")
    refused(list(ids), why="(must be forced) - image is referenced in multiple repositories")
    d, p = sides.run("run", "-d", "--name", "runner", "run:1", "sleep", "600")
    assert d.returncode == p.returncode == 0, (d.stderr, p.stderr)
    refused(list(ids), "-f", why="(cannot be forced) - image is being used by running container")
    sides.same("rmi", "-f", "run:1")  # another tag is left: only untagged
    sides.same("rm", "-f", "runner")
    sides.same("rmi", "-f", "app")  # untag, delete the image and its parents, keep the layers the container uses
    images()
    sides.same("rm", "holder")  # frees the layers only the container held, as Docker's layer store
    layerdb = os.path.join(sides.docker.directory, "data", "image", "overlay2", "layerdb", "sha256")
    assert len(Store(str(sides.store)).layers.all()) == len(os.listdir(layerdb)) == 1
