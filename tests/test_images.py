"""The image side without mounts: Dockerfile parsing, .dockerignore, layer tars and IDs, the store, formats."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import subprocess
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pylayerfs.dockercli import render
from pylayerfs.image import archive
from pylayerfs.image.builder.context import Context, ContextError, Ignore
from pylayerfs.image.builder.dockerfile import DockerfileError, key_values, parse, parse_words, process_word
from pylayerfs.image.builder.imageconfig import go_quoted, run_config
from pylayerfs.image.sizes import human_duration, human_size, layer_size
from pylayerfs.image.store import Store, StoreError
from pylayerfs.image.store.images import encode, format_time, parse_time
from pylayerfs.image.store.layers import chain_id
from pylayerfs.image.store.references import parse_reference
from tests.trees import WHITEOUT, build

# -- the Dockerfile parser ------------------------------------------------------------------


def test_parser_keeps_what_the_classic_builder_prints():
    text = """# syntax=docker/dockerfile:1
# escape=\\
FROM alpine AS base

COPY --chown=1000:1000 app.sh ./app.sh
RUN apk add \\
    # comments inside a continuation are dropped
    bash
ENTRYPOINT ["./app.sh"]
cmd echo hi
"""
    d = parse(text, "Dockerfile.new")
    assert [i.keyword for i in d.instructions] == ["FROM", "COPY", "RUN", "ENTRYPOINT", "CMD"]
    assert [i.line for i in d.instructions] == [3, 5, 6, 9, 10]
    assert d.instructions[1].flags == {"chown": "1000:1000"} and d.instructions[1].args == "app.sh ./app.sh"
    assert d.instructions[2].source == "RUN apk add     bash"
    assert d.instructions[3].exec_form == ["./app.sh"]
    assert d.instructions[4].source == "cmd echo hi" and d.instructions[4].exec_form is None


def test_escape_directive_changes_the_continuation_character():
    d = parse("# escape=`\nFROM scratch\nRUN dir c:\\ `\n  /w\n")
    assert d.escape == "`" and d.instructions[1].args == "dir c:\\   /w"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("FROM a\nfoo bar\n", "dockerfile parse error line 2: unknown instruction: FOO"),
        ("FROM a\nCOPY onlyone\n", "dockerfile parse error line 2: COPY requires at least two arguments, but only"),
        ("FROM a\nSHELL /bin/sh -c\n", "dockerfile parse error line 2: SHELL requires the arguments to be in JSON"),
        ('FROM a\nCOPY ["a", 1]\n', "failed to parse Dockerfile: when using JSON array syntax, arrays must be"),
        ("FROM a\nUSER\n", "dockerfile parse error line 2: USER requires exactly one argument"),
        ("RUN true\n", "no build stage in current context"),
        ("FROM a\nCOPY --mode=1 a b\n", "dockerfile parse error line 2: Unknown flag: mode"),
        ("FROM a\nCOPY --from a b\n", "dockerfile parse error line 2: Missing a value on flag: from"),
        ("FROM a\nENV A\n", "failed to parse Dockerfile: ENV must have two arguments"),
        ("# only a comment\n", "failed to parse Dockerfile: file with no instructions"),
        ("", "the Dockerfile (Dockerfile) cannot be empty"),
    ],
)
def test_parser_errors_are_the_classic_builders(text, message):
    with pytest.raises(DockerfileError) as exc:
        parse(text)
    assert str(exc.value).startswith(message)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('FROMRUNCOPYENV ["]=\\`#\n\t$ {}:-ax./')), max_size=200))
def test_parser_never_crashes(text):
    try:
        parse(text)
    except DockerfileError as exc:
        assert str(exc) and "\n" not in str(exc)


def test_words_pairs_and_substitution():
    assert parse_words("a \"b c\" 'd e' f\\ g") == ["a", '"b c"', "'d e'", "f\\ g"]
    assert key_values('A=1 B="two words"', "ENV") == [("A", "1"), ("B", '"two words"')]
    assert key_values("A legacy value", "ENV") == [("A", "legacy value")]
    variables = {"A": "x", "EMPTY": ""}
    assert process_word("$A ${A} ${B:-d} ${A:+alt} ${EMPTY:-e} \\$A", variables) == "x x d alt e $A"
    assert process_word("'$A' \"$A`$A\\$A\" `$A", variables, "`") == "$A x$A\\x $A"


# -- context and .dockerignore ---------------------------------------------------------------


def test_dockerignore_last_match_wins_and_directories_exclude_their_contents(tmp_path):
    ignore = Ignore("# comment\n*.log\n!keep.log\nbuild\n/docs/**/*.md\n")
    assert ignore.excludes("a.log") and not ignore.excludes("keep.log")
    assert ignore.excludes("build/out/x") and not ignore.excludes("src/build.c")
    assert ignore.excludes("docs/a/b/c.md") and ignore.excludes("docs/c.md") and not ignore.excludes("docs/c.txt")


def test_dockerignore_matches_as_moby_20_10():
    """Checked against the private dockerd in tests/test_docker_copy.py; these hold without it."""
    ignore = Ignore("*.key\n**/*.key\na\n  # not a comment\n")
    assert ignore.excludes("x.key") and ignore.excludes("src/sub/local.key") and ignore.excludes("a/b/f")
    assert ignore.excludes("  # not a comment") is False and ignore.excludes("# not a comment")
    assert not Ignore("*.key\n").excludes("src/x.key"), "a one-component pattern matches at the top only"
    walks = Ignore("dir\n!dir/sub/keep\n!other/*/keep\nother\n")
    assert walks.walks_into("dir") and walks.walks_into("dir/sub") and not walks.walks_into("dir/t")
    assert walks.walks_into("other") and not walks.walks_into("other/sub"), "a glob exception walks one level"
    with pytest.raises(ContextError, match="syntax error"):
        Ignore("[unclosed\n")


def test_context_tree_is_what_the_daemon_unpacks(tmp_path):
    build(str(tmp_path), {"Dockerfile": "FROM a\n", "d/sub/keep": "k", "d/sub/drop": "x", "d/z": "z", "src/a": "a",
                          ".dockerignore": "d\n!d/sub/keep\nDockerfile\n"})  # fmt: skip
    os.symlink("src", tmp_path / "lnk")
    context = Context(str(tmp_path), "Dockerfile")
    try:
        assert list(context.tree) == [".dockerignore", "d", "d/sub", "d/sub/keep", "lnk", "src", "src/a"]
        assert context.tree["d"].st is None and context.tree["d/sub"].st is None, "made by the daemon, not sent"
        assert context.resolve("lnk/a") == "src/a" and context.resolve("lnk/b") is None
        assert context.sources("lnk", "COPY") == ["lnk"] and context.digest("lnk") == context.digest("src")
        with pytest.raises(ContextError, match=r"excluded by \.dockerignore"):
            context.sources("Dockerfile", "COPY")
        with pytest.raises(ContextError, match="no source files were specified"):
            context.sources("d/*.txt", "COPY")
    finally:
        context.close()


def test_context_sources_and_digests(tmp_path):
    build(str(tmp_path), {"app.sh": "echo\n", "Dockerfile": "FROM a\n", "src/a.txt": "a", "src/b.txt": "b",
                          "secret.key": "k", ".dockerignore": "*.key\n"})  # fmt: skip
    context = Context(str(tmp_path), "Dockerfile")
    try:
        assert context.sources("src/*.txt", "COPY") == ["src/a.txt", "src/b.txt"]
        with pytest.raises(ContextError, match=r"excluded by \.dockerignore"):
            context.sources("secret.key", "COPY")
        with pytest.raises(ContextError, match="outside the build context"):
            context.sources("../etc/passwd", "COPY")
        before = context.digest("app.sh")
        os.utime(tmp_path / "app.sh", (1, 1))
        assert context.digest("app.sh") == before, "mtime is not part of the cache key"
        os.chmod(tmp_path / "app.sh", 0o755)
        assert context.digest("app.sh") != before, "the mode is"
        assert context.digest("src").startswith("dir:")
        # 6 sent entries (Dockerfile, .dockerignore, app.sh, src/, src/a.txt, src/b.txt): headers, data, trailer
        assert context.transfer_size() == 6 * 512 + 5 * 512 + 1024
    finally:
        context.close()


# -- layer tars and IDs ----------------------------------------------------------------------


def test_empty_layer_has_dockers_digest(tmp_path):
    assert archive.diff_id(str(tmp_path)) == archive.EMPTY_LAYER_DIFF_ID


@pytest.mark.root
def test_layer_tar_converts_whiteouts_and_opaque_directories(tmp_path):
    diff = build(str(tmp_path / "diff"), {"a/file": "x", "gone": WHITEOUT, "o": ("opaque",), "o/kept": "k",
                                          "ln": ("symlink", "a/file")})  # fmt: skip
    os.link(tmp_path / "diff/a/file", tmp_path / "diff/a/hard")
    out = io.BytesIO()
    archive.write_layer(diff, out)
    data = out.getvalue()
    assert data.endswith(b"\0" * 1024) and len(data) % 512 == 0
    assert "sha256:" + hashlib.sha256(data).hexdigest() == archive.diff_id(diff)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["a", "a/file", "a/hard", ".wh.gone", "ln", "o", "o/.wh..wh..opq", "o/kept"]
    assert members["a/hard"].islnk() and members["a/hard"].linkname == "a/file"
    assert members[".wh.gone"].isreg() and members[".wh.gone"].mode == 0o600
    assert members["ln"].issym() and members["a/file"].uname == "root"  # the host's name for uid 0, as moby
    assert members["a/file"].mode == 0o100644 and members["a"].mode == 0o40755  # the file-type bits kept
    listing = subprocess.run(["tar", "-tf", "-"], input=data, capture_output=True, check=True).stdout.decode()
    assert listing.split() == ["a/", "a/file", "a/hard", ".wh.gone", "ln", "o/", "o/.wh..wh..opq", "o/kept"]


def test_chain_id_follows_the_oci_recursion():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    expected = subprocess.run(["sha256sum"], input=f"{a} {b}".encode(), capture_output=True, check=True)
    assert chain_id(None, a) == a
    assert chain_id(a, b) == "sha256:" + expected.stdout.split()[0].decode()


def test_config_encoding_matches_go():
    raw = encode({"os": "linux", "config": {"Cmd": ["a<b>&c", "é"]}, "architecture": "amd64"})
    assert raw == '{"architecture":"amd64","config":{"Cmd":["a\\u003cb\\u003e\\u0026c","é"]},"os":"linux"}'.encode()
    assert list(run_config({"Cmd": ["sh"]}))[:3] == ["Hostname", "Domainname", "User"]
    assert go_quoted(["nginx", "-g", "daemon off;"]) == '["nginx" "-g" "daemon off;"]'


def test_times_round_trip_as_go_writes_them():
    when = datetime.datetime(2026, 11, 29, 4, 13, 0, 123456, tzinfo=datetime.UTC)
    assert format_time(when) == "2026-11-29T04:13:00.123456Z"
    assert parse_time("2026-11-29T04:13:00.123456789Z") == when


# -- extraction refuses to escape ---------------------------------------------------------------


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info in entries:
            payload = (data or {}).get(info.name, b"")
            info.size = len(payload) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(payload))
    buf.seek(0)
    return buf


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_entry("/etc/passwd")], "an absolute path"),
        ([_entry("../outside")], "'..' would leave the layer"),
        ([_entry("a/../../outside")], "'..' would leave the layer"),
        pytest.param(  # root: extraction gives the symlink its owner (uid 0) before refusing the path below it
            [_entry("ln", tarfile.SYMTYPE, "/etc"), _entry("ln/passwd")],
            "'ln' is not a directory of the layer",
            marks=pytest.mark.root,
        ),
        ([_entry("hard", tarfile.LNKTYPE, "../../etc/passwd")], "'..' would leave the layer"),
    ],
)
def test_extract_refuses_entries_that_would_escape(tmp_path, entries, message):
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(fileobj=_tar(entries), mode="r|") as tar, pytest.raises(archive.ArchiveError, match=message):
        archive.extract(tar, str(dest))
    assert not (tmp_path / "outside").exists()


@pytest.mark.root
@pytest.mark.parametrize(
    "replacement", [tarfile.SYMTYPE, tarfile.REGTYPE, "whiteout"], ids=["symlink", "file", "whiteout"]
)
def test_a_directory_replaced_after_its_files_sets_no_time_outside_the_layer(tmp_path, replacement):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "f").write_bytes(b"host")
    os.utime(victim / "f", (1_600_000_000, 1_600_000_000))
    entries = [_entry("d/", tarfile.DIRTYPE), _entry("d/f"), _entry("g")]
    entries += [_entry(".wh.d")] if replacement == "whiteout" else [_entry("d", replacement, str(victim))]
    for info in entries:
        info.mtime = 1_000
    dest = tmp_path / "dest"
    dest.mkdir()
    with tarfile.open(fileobj=_tar(entries), mode="r|") as tar:
        archive.extract(tar, str(dest))
    assert os.stat(victim / "f").st_mtime == 1_600_000_000, "the host's file kept its time"
    assert os.lstat(dest / "g").st_mtime == 1_000 and os.lstat(dest / "d").st_mtime == 1_000


@pytest.mark.root
def test_extract_turns_wh_entries_into_whiteouts(tmp_path):
    entries = [_entry("d/", tarfile.DIRTYPE), _entry("d/.wh.gone"), _entry("d/.wh..wh..opq"), _entry("d/f")]
    entries[0].mode = 0o755
    with tarfile.open(fileobj=_tar(entries, {"d/f": b"x"}), mode="r|") as tar:
        result = archive.extract(tar, str(tmp_path))
    assert result.whiteouts == 1
    assert os.stat(tmp_path / "d/gone", follow_symlinks=False).st_rdev == 0
    assert os.getxattr(tmp_path / "d", "trusted.overlay.opaque") == b"y"
    assert (tmp_path / "d/f").read_bytes() == b"x"


# -- the store ---------------------------------------------------------------------------------


def test_references_follow_docker_rules():
    assert parse_reference("bitphile/test-image") == ("bitphile/test-image", "latest")
    assert parse_reference("a:v1.2") == ("a", "v1.2")
    for bad in ("UPPER", "a:b:c", "-a", "a b"):
        with pytest.raises(StoreError, match="invalid reference format"):
            parse_reference(bad)


def test_store_root_choice(monkeypatch, tmp_path):
    from pylayerfs.image.store import default_root

    monkeypatch.setenv("PYLAYERFS_ROOT", str(tmp_path / "r"))
    for euid in (0, 1000):
        monkeypatch.setattr(os, "geteuid", lambda euid=euid: euid)
        assert default_root() == str(tmp_path / "r"), "the environment wins for anyone"
    monkeypatch.setenv("PYLAYERFS_ROOT", "")  # set but empty: as if unset
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_root() == "/var/lib/pylayerfs"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_root() == str(tmp_path / "xdg" / "pylayerfs")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_root() == str(tmp_path / "home" / ".local" / "share" / "pylayerfs")


def test_layers_are_registered_once_and_sizes_are_dockers(tmp_path):
    store = Store(str(tmp_path / "store"))
    ids = []
    for _ in range(2):
        cache = store.layers.new_dir(None)
        build(store.layers.diff_dir(cache), {"f": "12345", "ln": ("symlink", "f"), "d/g": "xy"})
        os.link(os.path.join(store.layers.diff_dir(cache), "f"), os.path.join(store.layers.diff_dir(cache), "h"))
        layer = store.layers.register(cache, None)
        assert layer is not None
        ids.append(layer)
    assert ids[0] == ids[1], "the same content is the same layer"
    assert len([n for n in os.listdir(store.layout.overlay2) if n != "l"]) == 1, "stored once"
    assert ids[0].size == 5 + 1 + 2  # f once (h is a hard link), the symlink's target, g
    assert layer_size(store.layers.diff_dir(ids[0].cache_id)) == ids[0].size
    d = store.layout.chain(ids[0].chain_id)
    assert sorted(os.listdir(d)) == ["cache-id", "diff", "size"]
    assert open(os.path.join(d, "diff")).read() == ids[0].diff_id, "one value, no newline"
    link = open(store.layout.layer(ids[0].cache_id, "link")).read()
    assert len(link) == 26 and os.readlink(os.path.join(store.layout.links, link)) == f"../{ids[0].cache_id}/diff"


def test_interrupted_writes_leave_nothing_registered(tmp_path):
    store = Store(str(tmp_path / "store"))
    cache = store.layers.new_dir(None)  # a build that dies here
    build(store.layers.diff_dir(cache), {"f": "x"})
    open(os.path.join(store.layout.tmp, "layer-half"), "w").close()
    assert store.layers.all() == []
    assert store.collect_garbage() == [cache]
    assert os.listdir(store.layout.tmp) == [] and os.listdir(store.layout.links) == []


def test_image_ids_are_the_sha256_of_the_stored_config(tmp_path):
    store = Store(str(tmp_path / "store"))
    image = store.images.put({"os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}, None)
    digest = subprocess.run(["sha256sum", store.layout.config(image.id)], capture_output=True, check=True, text=True)
    assert image.id == "sha256:" + digest.stdout.split()[0]
    assert open(store.layout.image_metadata(image.id, "builtLocally"), "rb").read() == b"\x01"
    with open(store.layout.config(image.id), "ab") as f:
        f.write(b" ")
    with pytest.raises(StoreError, match="damaged"):
        store.images.get(image.id)
    assert json.loads(open(store.layout.config(image.id)).read())["os"] == "linux"


# -- formats -----------------------------------------------------------------------------------


def test_sizes_and_ages_as_go_units_prints_them():
    assert [human_size(n) for n in (0, 33, 2048, 2_240_000, 9_290_000, 7_800_000, 999_999)] == [
        "0B", "33B", "2.05kB", "2.24MB", "9.29MB", "7.8MB", "1e+03kB"]  # fmt: skip
    assert human_size(7168, 4) == "7.168kB"
    assert [human_duration(s) for s in (0.5, 1, 30, 90, 3000, 3600, 7200, 3 * 86400, 21 * 86400)] == [
        "Less than a second", "1 second", "30 seconds", "About a minute", "50 minutes", "About an hour",
        "2 hours", "3 days", "3 weeks"]  # fmt: skip


def test_tables_pad_like_tabwriter():
    text = render(["IMAGE", "SIZE", "COMMENT"], [["4d85107b2c59", "0B", ""]])
    assert text.splitlines() == ["IMAGE          SIZE      COMMENT", "4d85107b2c59   0B        "]
