"""COPY and ADD against Docker's classic builder: the same contexts built on both sides give the same files.

Three points of issue 14, each checked against the private dockerd (``tests/dockerd.py``):
- ``.dockerignore`` filters every COPY/ADD source (files, directories, globs, ``COPY . .``, ADD), with ``!``
  exceptions, and the Dockerfile and ``.dockerignore`` themselves when listed;
- the source hash in CREATED BY (``file:``, ``dir:``, ``multi:``) is Docker 20.10's;
- ``COPY --chown`` gives the directories the copy creates to the owner as Docker does.

Each context is built once per side (module scope); every image is listed with one container run per side.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below
from tests.dockerd import BASE, Docker
from tests.test_build import pylayerfs

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(600)]
_MTIME = 1_600_000_000
_HASH = re.compile(r"(?:file|dir|multi):[0-9a-f]{64}")

# The issue's example: a top-level key, a nested key, a whole directory.
ISSUE: dict[str, str | bytes] = {
    ".dockerignore": "*.key\n**/*.key\na\n",
    "Dockerfile": f"FROM {BASE}\nCOPY . /ctx/\nCOPY src /src/\n",
    "secret.key": "s",
    "a/b/f": "f",
    "src/x.txt": "x",
    "src/sub/local.key": "k",
    "src/sub/y.txt": "y",
    "keep.txt": "k",
}

# Exceptions, directories walked into for an exception, patterns at depth, the build files listed, globs.
PATTERNS: dict[str, str | bytes] = {
    ".dockerignore": "# a comment\ndocs\n!docs/keep.md\n!docs/sub/deeper/kept.md\n*.log\n!important.log\n"
    "build/**\n!build/out/app\n**/tmp\nsecret*\n!secret.pub\n/lib/*/skip\nDockerfile\n.dockerignore\n",
    "Dockerfile": f"FROM {BASE}\nCOPY . /ctx/\nCOPY docs /docs/\nCOPY *.log /logs/\nCOPY lib/* /lib2/\n"
    "COPY secret* /s/\nCOPY build /build/\nADD lib /added/\n",
    "docs/a.md": "a",
    "docs/keep.md": "keep",
    "docs/sub/b.md": "b",
    "docs/sub/deeper/kept.md": "kept",
    "x.log": "x",
    "important.log": "i",
    "sub/y.log": "y",
    "build/out/app": "app",
    "build/out/other": "o",
    "build/cache/c": "c",
    "lib/tmp/t": "t",
    "lib/t/ok": "ok",
    "lib/t/skip": "no",
    "lib/u/skip/deep": "no",
    "tmp/z": "z",
    "secret.key": "k",
    "secret.pub": "p",
}

# The hashes: modes, a directory with subdirectories and every kind of symlink, globs, a hard link; --chown.
HASHES: dict[str, str | bytes] = {
    "Dockerfile": f"FROM {BASE}\nCOPY app.sh ./app.sh\nCOPY tree /tree/\nCOPY tree/*.txt /glob/\n"
    "COPY tree/one.txt tree/run.sh /two/\nCOPY tree/link-to-file /followed\nCOPY . /all/\n"
    "COPY --chown=65534:65534 tree/one.txt /test/a/b/c/\nCOPY --chown=65534:65534 tree /newdir\n"
    "COPY --chown=65534:65534 tree /other/x/y\nCOPY --chown=65534:65534 tree/sub /tmp/\n"
    "COPY --chown=nobody tree/one.txt /owned-file\n",
    "app.sh": '#!/bin/sh\necho "hello, layers!!"\n',
    "tree/one.txt": "one",
    "tree/two.txt": "two",
    "tree/run.sh": "#!/bin/sh\n",
    "tree/private": "p",
    "tree/sub/deep/leaf": "leaf",
    "tree/empty/": "",
}
_MODES = {"tree/run.sh": 0o755, "tree/private": 0o600, "tree/sub": 0o750}
_SYMLINKS = {
    "tree/link-to-file": "one.txt",
    "tree/link-to-dir": "sub",
    "tree/dangling": "nowhere",
    "tree/absolute": "/tree/one.txt",
    "tree/to-root": "/",
    "tree/up": "../app.sh",
}
_HARDLINKS = {"tree/hard": "tree/two.txt"}


def make_context(directory: Path, files: dict[str, str | bytes]) -> Path:
    """Write ``files`` (text or bytes; a name ending in ``/`` is an empty directory) with the module's modes,
    symlinks and hard links when they belong to it, every mtime fixed; return ``directory``."""
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            os.chmod(path, 0o644)
    if "tree/one.txt" in files:
        for name, target in _SYMLINKS.items():
            os.symlink(target, directory / name)
        for name, first in _HARDLINKS.items():
            os.link(directory / first, directory / name)
        for name, mode in _MODES.items():
            os.chmod(directory / name, mode)
    for path in [directory, *directory.rglob("*")]:
        os.utime(path, (_MTIME, _MTIME), follow_symlinks=False)
    return directory


LIST = (
    "find {dirs} -exec stat -c '%u:%g %a %F %N' {{}} + ; find {dirs} -type f -exec md5sum {{}} + ; "
    "find {dirs} -type f -links +1 -exec echo hard link: {{}} \\;"
)


def _archive(top: str) -> bytes:
    """A tar for ADD: a directory ``top``, a file owned by 1234:5678 with mode 0640, a symlink; fixed mtimes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, mode, data in ((top, tarfile.DIRTYPE, 0o750, b""), (f"{top}/owned", tarfile.REGTYPE, 0o640,
                                       b"owned"), (f"{top}/link", tarfile.SYMTYPE, 0o777, b"")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.size = kind, mode, _MTIME, len(data)
            info.uid, info.gid = (1234, 5678) if kind == tarfile.REGTYPE else (0, 0)
            info.linkname = "owned" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# COPY sources with wildcards: Go's filepath.Match, never across "/" ("**" is "*"), in the filtered context.
GLOBS: dict[str, str | bytes] = {
    ".dockerignore": "b.key*\n",
    "Dockerfile": f"FROM {BASE}\nCOPY *.key /g0/\nCOPY **/*.key /g1/\nCOPY x/* /g2/\nCOPY */*/* /g3/\n"
    "COPY ./x/*.key /g4/\nCOPY q?.txt [a-c].key /g5/\nCOPY x/y/../b.key /g6/\nADD --chown=1:1 *.tar /g7/\n",
    "pack.tar": _archive("pkg"),
    "b.key.tar": _archive("secret"),  # excluded: not extracted
    "a.key": "a",
    "b.key": "b",
    "x/b.key": "xb",
    "x/y/c.key": "xyc",
    "q.txt": "q",
    "qq.txt": "qq",
    "d/e/f.txt": "f",
}

# COPY --from another stage: its files only (no mountpoints of the step), hashed as the daemon hashes an image's.
STAGES: dict[str, str | bytes] = {
    "Dockerfile": f"FROM {BASE}\nCOPY tree /d/\nFROM {BASE}\nCOPY --from=0 /d /e/\nCOPY --from=0 /d/one.txt /f\n"
    "COPY --from=0 /etc /etc2/\nCOPY --from=0 /d/link-to-dir /g\n",
    **{name: text for name, text in HASHES.items() if name.startswith("tree/")},
}

CONTEXTS: dict[str, dict[str, str | bytes]] = {
    "issue": ISSUE,
    "patterns": PATTERNS,
    "hashes": HASHES,
    "globs": GLOBS,
    "stages": STAGES,
}


class Sides:
    """The contexts built on both sides, each once, when a test first asks for it: ``docker`` and the pylayerfs
    store ``root``; ``base`` holds the contexts."""

    def __init__(self, docker: Docker, root: Path, base: Path) -> None:
        self.docker, self.root, self.base = docker, root, base
        self.built: dict[str, str] = {}  # image -> "" or why pylayerfs could not build it

    def image(self, name: str) -> str:
        """``name`` built from ``CONTEXTS[name]`` on both sides; fails (every time) when pylayerfs cannot."""
        if name not in self.built:
            context = make_context(self.base / name, CONTEXTS[name])
            self.docker.build(str(context), "-t", name)
            result = pylayerfs(self.root, "build", "-t", name, str(context), check=False, timeout=300)
            self.built[name] = result.stderr if result.returncode else ""
        assert not self.built[name], f"pylayerfs build of {name} failed: {self.built[name]}"
        return name

    def listing(self, name: str, *dirs: str) -> tuple[list[str], list[str]]:
        """Every path below ``dirs`` in the image ``name`` with its owner, mode, type (and link target), every
        file's md5 and the hard-linked files, sorted: (Docker's, pylayerfs's)."""
        command = LIST.format(dirs=" ".join(dirs))
        docker = self.docker.run("run", "--rm", self.image(name), "sh", "-c", command).stdout
        ours = pylayerfs(self.root, "run", "--rm", name, "sh", "-c", command, timeout=120).stdout
        return sorted(docker.splitlines()), sorted(ours.splitlines())

    def hashes(self, name: str) -> tuple[list[str], list[str]]:
        """The COPY/ADD source hashes of the image's history, newest first: (Docker's, pylayerfs's)."""
        docker = self.docker.run("history", "--no-trunc", self.image(name)).stdout
        ours = pylayerfs(self.root, "history", "--no-trunc", name).stdout
        return _HASH.findall(docker), _HASH.findall(ours)


@pytest.fixture(scope="module")
def sides(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sides]:
    base = tmp_path_factory.mktemp("copy")
    root = base / "store"
    pylayerfs(root, "import", os.path.join(docker.directory, "busybox-rootfs.tar"), BASE)
    yield Sides(docker, root, base)
    docker.clean()
    for mountpoint in mounts_below(str(root)):
        realfs.detach(mountpoint)


def test_dockerignore_filters_copied_directories_as_in_the_issue(sides: Sides) -> None:
    docker, ours = sides.listing("issue", "/ctx", "/src")
    assert ours == docker
    assert not any(line.endswith((".key", "/ctx/a", "/ctx/a/b/f")) for line in ours)
    assert any(line.endswith("/ctx/keep.txt") for line in ours)


def test_dockerignore_exceptions_nested_patterns_build_files_and_globs(sides: Sides) -> None:
    docker, ours = sides.listing("patterns", "/ctx", "/docs", "/logs", "/lib2", "/s", "/build", "/added")
    assert ours == docker
    names = {line.rsplit(" ", 1)[-1] for line in ours}
    assert {
        "/ctx/docs/keep.md",
        "/docs/sub/deeper/kept.md",
        "/ctx/important.log",
        "/ctx/build/out/app",
        "/s/secret.pub",
    } <= names
    assert not names & {"/ctx/Dockerfile", "/ctx/.dockerignore", "/ctx/docs/a.md", "/ctx/x.log", "/s/secret.key"}


def test_glob_sources_match_as_dockers(sides: Sides) -> None:
    docker, ours = sides.listing("globs", *(f"/g{n}" for n in range(8)))
    assert ours == docker
    assert "1234:5678 640 regular file /g7/pkg/owned" in ours and not any("secret" in line for line in ours)
    assert sides.hashes("globs")[1] == sides.hashes("globs")[0]


def test_copy_from_a_stage_copies_and_hashes_as_docker(sides: Sides) -> None:
    docker, ours = sides.listing("stages", "/e", "/f", "/etc2", "/g")
    assert ours == docker
    assert not any("hosts" in line or "resolv.conf" in line for line in ours), "the step's mountpoints"
    assert sides.hashes("stages")[1] == sides.hashes("stages")[0]


def test_copy_source_hashes_in_history_are_dockers(sides: Sides) -> None:
    docker, ours = sides.hashes("hashes")
    assert len(docker) == 11 and {h.partition(":")[0] for h in docker} == {"file", "dir", "multi"}
    assert ours == docker
    assert sides.hashes("patterns")[1] == sides.hashes("patterns")[0]


def test_copied_files_symlinks_and_hard_links_are_dockers(sides: Sides) -> None:
    docker, ours = sides.listing("hashes", "/app.sh", "/tree", "/glob", "/two", "/followed", "/all")
    assert ours == docker


def test_chown_gives_the_directories_the_copy_creates_to_the_owner(sides: Sides) -> None:
    docker, ours = sides.listing("hashes", "/test", "/newdir", "/other", "/tmp", "/owned-file")
    assert ours == docker
    owners = {line.rsplit(" ", 1)[-1]: line.split(" ", 1)[0] for line in ours if re.match(r"\d+:\d+ ", line)}
    assert owners["/test/a/b/c"] == owners["/newdir"] == owners["/other/x/y"] == "65534:65534"
    assert owners["/other"] == owners["/tmp"] == "0:0"


# .dockerignore variants (Docker 20.10 gives each the listed meaning): what COPY . copies, compared with the tree
# pylayerfs copies from (Context.tree).
VARIANT_FILES = ["a.key", "x/b.key", "x/y/c.key", "foo/f", "a/b/foo/g", "a/b/foo/keep", "src/s", "other/o", "q.txt",
                 "qq.txt", "r+s", "rs", "x/.hidden", "dir/sub/keep", "dir/sub/drop", "dir/z", "dir/t/keep", "#c", " sp",
                 "a$b", "ab.key"]  # fmt: skip
VARIANTS = [
    "**/foo\n!a/b/foo/keep\n",  # an exception walks into the excluded a/b/foo
    "**.key\n",  # "**" not before "/" still means "any directories": x/.key, not x.key
    "*\n!src/s\n",  # everything but one file, its directory re-created
    "x\n!x/y/*.key\n",  # the exception starts with x/: the walk goes in
    "dir\n!dir/*/keep\n",  # ...but "dir/*/keep/" does not start with "dir/sub/": nothing below it is sent
    "dir/**\n!dir/t\n",
    "x/*\n!x/y\n",
    "?.txt\n[a-c].key\nr+s\na$b\n",  # regular-expression characters other than "." and "$" are the pattern's own
    "  #c\n/x/./y/\n./q.txt\n",  # only a line starting with "#" is a comment; patterns are cleaned
    "Dockerfile\n.dockerignore\n*.key\n",  # sent, then deleted by the daemon
]


def test_dockerignore_variants_copy_what_docker_copies(docker: Docker, tmp_path: Path) -> None:
    from pylayerfs.image.builder.context import Context

    for n, text in enumerate(VARIANTS):
        context = make_context(tmp_path / str(n), {name: name for name in VARIANT_FILES})
        (context / ".dockerignore").write_text(text)
        (context / "Dockerfile").write_text(f"FROM {BASE}\nCOPY . /ctx/\n")
        docker.build(str(context), "-t", f"variant{n}")
        listing = docker.run("run", "--rm", f"variant{n}", "find", "/ctx").stdout.splitlines()
        expected = sorted(line.removeprefix("/ctx/") for line in listing if line.startswith("/ctx/"))
        ours = Context(str(context), "Dockerfile")
        try:
            assert sorted(ours.tree) == expected, f".dockerignore {text!r}"
        finally:
            ours.close()
    docker.clean()
