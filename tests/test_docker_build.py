"""Docker as the oracle of the builder's words: the same context built by the private dockerd (classic builder) and
by pylayerfs gives the same stdout, stderr and exit status, for every error the classic builder reports.

Both sides build with ``--no-cache`` (the step lines do not depend on what an earlier case left) from the same base
(``busybox:base``, imported from the same tar). IDs, the context size and hashes are masked; Docker's
``Sending build context ...\\r\\r\\n`` is read as one line, and a failed RUN's stderr (in red) as one piece
however the pipe cut it. A failed RUN leaves its container on both sides.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dockerd import BASE, Docker
from tests.test_build import pylayerfs

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.timeout(600)]
B = f"FROM {BASE}\n"
U2 = "u2:x:1500:2000::/home/u2:/bin/sh"  # a user whose primary group (2000) is not the group named u2
A = {"a": "x\n"}
ACCEPTED = (B + "CMD\nENTRYPOINT\nUSER a b\nWORKDIR a b\nARG a b\nSTOPSIGNAL sigkill\nSTOPSIGNAL 9\n"
            "EXPOSE 8000-8002/udp 1.2.3.4:70:70 81/TCP 80:80\nRUN echo a \\\n\n\nRUN echo b \\")  # fmt: skip

# (name, Dockerfile, context files): each is built on both sides and must give the same output and status.
CASES = [
    # the Dockerfile as a whole: "Error response from daemon: ..." after the Sending line, status 1
    ("unknown-instruction", B + "RUN true\nfoo bar\n", {}),
    ("unknown-before-from", "FOO\n" + B, {}),
    ("copy-one-argument", B + "COPY a\n", A),
    ("add-one-argument", B + "ADD a\n", A),
    ("no-from", "RUN echo hi\n", {}),
    ("env-before-from", "ARG X=1\nENV A=b\n", {}),
    ("empty-file", "", {}),
    ("only-comments", "# nothing\n\n", {}),
    ("unknown-flag", B + "COPY --foo=bar a /b\n", A),
    ("unknown-run-flag", B + "RUN --network=none true\n", {}),
    ("unknown-from-flag", "FROM --foo=1 busybox:base\n", {}),
    ("flag-without-value", B + "COPY --from a /b\n", A),
    ("flag-twice", B + "COPY --chown=1 --chown=2 a /b\n", A),
    ("from-two-words", "FROM busybox:base x\n", {}),
    ("from-as-nothing", B + "FROM busybox:base AS\n", {}),
    ("stage-name", "FROM busybox:base AS 1abc\n", {}),
    ("user-nothing", B + "USER\n", {}),
    ("workdir-nothing", B + "WORKDIR\n", {}),
    ("stopsignal-nothing", B + "STOPSIGNAL\n", {}),
    ("maintainer-nothing", B + "MAINTAINER\n", {}),
    ("env-nothing", B + "ENV\n", {}),
    ("label-nothing", B + "LABEL\n", {}),
    ("arg-nothing", B + "ARG\n", {}),
    ("expose-nothing", B + "EXPOSE\n", {}),
    ("volume-nothing", B + "VOLUME\n", {}),
    ("shell-nothing", B + "SHELL\n", {}),
    ("onbuild-nothing", B + "ONBUILD\n", {}),
    ("env-blank-name", B + "ENV =x\n", {}),
    ("arg-blank-name", "ARG =1\n" + B, {}),
    ("env-one-word", B + "ENV A\n", {}),
    ("label-one-word", B + "LABEL a\n", {}),
    ("env-mixed-forms", B + "ENV a=1 b\n", {}),
    ("shell-not-json", B + "SHELL /bin/sh -c\n", {}),
    ("shell-empty-array", B + "SHELL []\n", {}),
    ("volume-empty-string", B + 'VOLUME [""]\n', {}),
    ("json-not-strings", B + 'COPY ["a", 1]\n', A),
    ("escape-directive", "# escape=x\n" + B, {}),
    ("onbuild-onbuild", B + "ONBUILD ONBUILD RUN x\n", {}),
    ("onbuild-from", B + "ONBUILD FROM x\n", {}),
    ("healthcheck-cmd-nothing", B + "HEALTHCHECK CMD\n", {}),
    ("healthcheck-type", B + "HEALTHCHECK FOO\n", {}),
    # one step: its error at its step, after the earlier steps ran, status 1
    ("copy-missing-source", B + "RUN echo hi\nENV A=1\nCOPY nosuch.txt /x\nRUN echo after\n", {}),
    ("copy-outside-context", B + "COPY ../x /\n", {}),
    ("copy-many-to-file", B + "COPY a a /b\n", A),
    ("copy-chmod", B + "COPY --chmod=755 a /b\n", A),
    ("add-chmod", B + "ADD --chmod=755 a /b\n", A),
    ("run-mount", B + "RUN --mount=type=cache,target=/x echo hi\n", {}),
    ("copy-from-itself", B + "COPY --from=0 /x /y\n", {}),
    ("copy-from-later-stage", B + "COPY --from=1 /x /y\n" + B, {}),
    ("stage-name-twice", "FROM busybox:base AS a\nFROM busybox:base AS a\n", {}),
    ("from-blank", "FROM $NOPE\n", {}),
    ("expose-not-a-port", B + "RUN echo hi\nEXPOSE notaport\n", {}),
    ("expose-proto", B + "EXPOSE 80/xyz\n", {}),
    ("expose-range", B + "EXPOSE 80-70\n", {}),
    ("expose-host-port", B + "EXPOSE a:80\n", {}),
    ("stopsignal-unknown", B + "STOPSIGNAL FOO\n", {}),
    ("env-open-brace", B + "ENV A=${B\n", {}),
    ("copy-open-brace", B + "COPY ${B /x\n", {}),
    ("label-modifier", B + "LABEL a=${B:x}\n", {}),
    ("workdir-no-closing-brace", B + "WORKDIR /${B:-x\n", {}),
    ("run-not-found", B + 'RUN ["nosuch"]\n', {}),
    ("run-not-executable", B + 'RUN ["/etc/passwd"]\n', {}),
    ("run-user-missing", B + "USER nosuch\nRUN true\n", {}),
    # what the classic builder accepts, pylayerfs too
    ("accepted", ACCEPTED, {}),
    ("empty-continuation-lines", B + "RUN echo a \\\n\n  && echo b  \nRUN true \\\n\n\n", {}),
    ("comment-in-continuation", B + "RUN echo a \\\n# c\n  && echo b\n", {}),
    # a failed RUN: stderr in red on stdout, the command's own status
    ("run-fails", B + "RUN echo out; sleep 0.3; echo err >&2; exit 3\n", {}),
    ("run-nothing", B + "RUN\n", {}),
    ("run-fails-with-args", B + "ARG A=1\nRUN exit 7\n", {}),
    # quotes and escapes in variable expansion (moby's shell lexer), a byte order mark
    ("env-open-quote", B + 'ENV A="abc\n', {}),
    ("label-open-single-quote", B + "LABEL a='abc\n", {}),
    ("copy-quoted-words", B + 'COPY "a" /b\nCOPY "a b" /c\n', A),
    ("chown-user-no-group", B + f"RUN echo '{U2}' >> /etc/passwd\nCOPY --chown=u2 a /a\n", A),
    ("chown-no-user", B + "COPY --chown=nosuch:0 a /a\n", A),
    ("chown-three-parts", B + "COPY --chown=1:2:3 a /a\n", A),
    (
        "chown-group-named-as-user",
        B + f"RUN echo '{U2}' >> /etc/passwd && echo 'g2:x:2000:' >> /etc/group && echo 'u2:x:7:' >> /etc/group\n"
        "ARG O=1500:g2\nCOPY --chown=u2 a /a\nCOPY --chown=1500 a /b\nCOPY --chown=$O a /c\nCOPY --chown=u2:u2 a /d\n"
        "RUN stat -c '%n %u %g' /a /b /c /d\n",
        A,
    ),
    ("question-modifier", B + "ENV A=${NOPE:?oops}\n", {}),
    ("question-modifier-no-message", B + "ENV B=1\nENV A=${B:?x}${NOPE:?}\n", {}),
    ("question-modifier-empty-value", B + "ENV E=\nENV A=${E:?empty}\n", {}),
    ("special-parameters", B + 'ENV A=x$@y$#z$1w${1}v$$u\nRUN echo "$A"\n', {}),
    ("byte-order-mark", "\ufeff" + B + "RUN echo bom\n", {}),
]


def normal(text: str) -> str:
    """Output with what differs by nature masked: IDs, the context size, source hashes; Docker's ``\\r``."""
    text = text.replace("\r", "").replace("\x1b[0m\x1b[91m", "")  # where stderr's pieces were cut: timing
    text = re.sub(r"(Sending build context to Docker daemon) +\S+\n+", r"\1 <size>\n", text)
    text = re.sub(r"(file|dir|multi):[0-9a-f]{64}\b", r"\1:<hash>", text)
    text = re.sub(r"\b(sha256:)?[0-9a-f]{64}\b", "<ID>", text)
    return re.sub(r"\b[0-9a-f]{12}\b", "<id>", text)


@pytest.fixture(scope="module")
def store(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A pylayerfs store with the same base as the private dockerd's."""
    root = tmp_path_factory.mktemp("pylayerfs") / "store"
    pylayerfs(root, "import", docker.directory + "/busybox-rootfs.tar", BASE)
    yield root
    docker.clean()


def context(path: Path, dockerfile: str, files: dict[str, str]) -> str:
    path.mkdir()
    (path / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (path / name).write_text(text)
    return str(path)


def both(docker: Docker, store: Path, ctx: str, *args: str) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """``build ARGS CTX`` on both sides: (status, stdout, stderr) of Docker's and of pylayerfs's, normalized."""
    ours = pylayerfs(store, "build", *args, ctx, check=False)
    theirs = subprocess.run(["/usr/bin/docker", "build", *args, ctx], env=docker.env(), capture_output=True,
                            timeout=300, check=False)  # fmt: skip
    return (
        (theirs.returncode, normal(theirs.stdout.decode()), normal(theirs.stderr.decode())),
        (ours.returncode, normal(ours.stdout), normal(ours.stderr)),
    )


@pytest.mark.parametrize(("dockerfile", "files"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_build_output_and_status_are_dockers(docker: Docker, store: Path, tmp_path: Path, dockerfile, files):
    theirs, ours = both(docker, store, context(tmp_path / "ctx", dockerfile, files), "--no-cache")
    assert ours == theirs


def _ps_rows(text: str) -> list[list[str]]:
    """``ps -a`` rows as (image, status without its time): the columns both sides fill the same way."""
    rows = [re.split(r"\s{2,}", line) for line in text.splitlines()[1:]]
    return [[normal(r[1]), re.sub(r"\).*", ")", r[4])] for r in rows]


def test_a_failed_run_leaves_its_container(docker: Docker, store: Path, tmp_path: Path):
    docker.clean()
    for container in pylayerfs(store, "ps", "-aq").stdout.split():
        pylayerfs(store, "rm", container)
    ctx = context(tmp_path / "ctx", B + "RUN echo kept > /kept\nRUN echo x > /made; exit 4\n", {})
    theirs, ours = both(docker, store, ctx)
    assert ours == theirs and ours[0] == 4
    docker_ps, our_ps = docker.run("ps", "-a").stdout, pylayerfs(store, "ps", "-a").stdout
    assert _ps_rows(our_ps) == _ps_rows(docker_ps) == [["<id>", "Exited (4)"]]
    ids = [docker_ps.splitlines()[1].split()[0], our_ps.splitlines()[1].split()[0]]
    assert docker.run("diff", ids[0]).stdout == pylayerfs(store, "diff", ids[1]).stdout == "A /made\n"
    df = [docker.run("system", "df").stdout, pylayerfs(store, "system", "df").stdout]
    assert [re.findall(r"^Containers +(\d+) +(\d+)", d, re.M) for d in df] == [[("1", "0")]] * 2
    assert docker.run("rm", ids[0]).stdout == f"{ids[0]}\n" and pylayerfs(store, "rm", ids[1]).stdout == f"{ids[1]}\n"
    assert docker.run("ps", "-aq").stdout == pylayerfs(store, "ps", "-aq").stdout == ""
    ctx = context(tmp_path / "ctx2", B + 'RUN ["nosuch"]\n', {})
    theirs, ours = both(docker, store, ctx)
    assert ours == theirs and ours[0] == 1
    assert _ps_rows(pylayerfs(store, "ps", "-a").stdout) == _ps_rows(docker.run("ps", "-a").stdout)
    assert _ps_rows(docker.run("ps", "-a").stdout) == [["<id>", "Created"]], "a command that never started"


def test_copy_flags_in_created_by_are_dockers(docker: Docker, store: Path, tmp_path: Path):
    """moby 20.10 writes ``COPY --chown=1:2file:<hash> in /a `` (no space), and nothing of ``--from``."""
    ctx = tmp_path / "ctx"
    context(ctx, "FROM busybox:base AS one\nRUN echo 1 > /one\nFROM busybox:base\nCOPY --chown=1:2 a /a\n"
            "COPY --chown=nobody d /d/\nADD --chown=1 a /b\nCOPY --from=one /one /one\n"
            "COPY --from=one --chown=5:5 /one /two\nCOPY --chown=1:2 a d /m/\n", A)  # fmt: skip
    (ctx / "d").mkdir()
    (ctx / "d" / "f").write_text("y\n")
    both(docker, store, str(ctx), "-t", "copy-flags")
    theirs = docker.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", "copy-flags").stdout.splitlines()
    rows = pylayerfs(store, "history", "--no-trunc", "--format", "json", "copy-flags").stdout.splitlines()
    ours = [json.loads(row)["CreatedBy"] for row in rows]
    assert [normal(c) for c in ours[:6]] == [normal(c) for c in theirs[:6]]
    assert normal(ours[0]) == "/bin/sh -c #(nop) COPY --chown=1:2multi:<hash> in /m/ "


def test_expose_and_stopsignal_configs_are_dockers(docker: Docker, store: Path, tmp_path: Path):
    ctx = context(tmp_path / "ctx", B + 'ENV PORTS="90 91"\nEXPOSE 8000-8002/udp 1.2.3.4:70:70 81/TCP 80:80 $PORTS\n'
                  "EXPOSE $NOPE\nSTOPSIGNAL sigkill\n", {})  # fmt: skip
    both(docker, store, ctx, "-t", "ports")
    fields = "{{json .Config.ExposedPorts}} {{json .Config.StopSignal}}"
    theirs = docker.run("image", "inspect", "--format", fields, "ports").stdout
    config = json.loads(pylayerfs(store, "inspect", "ports").stdout)[0]["Config"]
    ours = json.dumps(config["ExposedPorts"], separators=(",", ":")) + " " + json.dumps(config["StopSignal"])
    assert ours + "\n" == theirs
    assert theirs.startswith('{"70/tcp":{},"80/tcp":{},"8000/udp":{},"8001/udp":{},"8002/udp":{},"81/tcp":{},')
    history = docker.run("history", "--no-trunc", "--format", "{{.CreatedBy}}", "ports").stdout.splitlines()
    assert history[2] == "/bin/sh -c #(nop)  EXPOSE 90 91 1.2.3.4:70:70 8000-8002/udp 80:80 81/TCP"
    assert history[2] in pylayerfs(store, "history", "--no-trunc", "--format", "json", "ports").stdout


def test_the_clients_own_errors_are_dockers(docker: Docker, store: Path, tmp_path: Path):
    """What the docker client refuses before sending anything: a bad tag (125), no context, no Dockerfile."""
    ctx = context(tmp_path / "ctx", B, {})
    for args in (["-t", "UPPER", ctx], ["-t", "a:b:c", ctx], [str(tmp_path / "nowhere")], ["-f", ctx + "/nope", ctx]):
        theirs, ours = both(docker, store, args[-1], *args[:-1])
        assert ours == theirs and theirs[0] in (1, 125) and theirs[1] == ""
    (tmp_path / "ctx" / "Dockerfile").unlink()
    theirs, ours = both(docker, store, ctx)
    assert ours == theirs and theirs[0] == 1


# Every instruction that expands variables, with quotes and escapes: the RUN prints what ENV/ARG gave.
QUOTES = (B + "ENV A=1 B=\"two words\" C=three\\ words D='single $A' E=\"dq $A ${A}x ${NOPE:-def} ${A:+alt}\"\n"
          "ENV F $A and $B\nENV PS1='\\u@\\h $ ' Q=\"a\\\"b\" R=a\\$b S='it''s' T=\\$HOME U=\"\\q\\\\\"\n"
          "LABEL l1='$A' l2=\"\\$A\" l3=$A \"k$A\"=v\nARG G='$A'x\"$A\"\nWORKDIR '/w/$A'\n"
          "VOLUME '/v/$A' /v2/$A\nCOPY \\$A '$A' /d/\nEXPOSE \"8$A\" '9'\n"
          'RUN echo "$A|$B|$C|$D|$E|$F|$G|$PS1|$Q|$R|$S|$T|$U" && pwd && ls /d\nUSER \'$A\'\n')  # fmt: skip
BACKTICK = ("# escape=`\n" + B + "ENV A=1 B=a`$A C=\"q`\"`$A\\$A\" D=x\\y\nLABEL l=`$A\n"
            'RUN echo "$B|$C|$D"\n')  # fmt: skip
CONFIG = "{{json .Config.Env}} {{json .Config.Labels}} {{json .Config.WorkingDir}} {{json .Config.User}} " \
    "{{json .Config.Volumes}} {{json .Config.ExposedPorts}}"  # fmt: skip


@pytest.mark.parametrize("dockerfile", [QUOTES, BACKTICK], ids=["quotes", "backtick-escape"])
def test_quotes_and_escapes_expand_as_dockers(docker: Docker, store: Path, tmp_path: Path, dockerfile: str):
    """moby's lexer (shell/lex.go): 'single quotes' keep ``$A``, "double quotes" expand it, an escape keeps the next
    character; the same output (the RUN prints the values) and the same configuration on both sides."""
    ctx = context(tmp_path / "ctx", dockerfile, {"$A": "dollar\n"})
    theirs, ours = both(docker, store, ctx, "-t", "quotes")
    assert ours == theirs and theirs[0] == 0, theirs
    config = json.loads(pylayerfs(store, "inspect", "quotes").stdout)[0]["Config"]
    keys = ["Env", "Labels", "WorkingDir", "User", "Volumes", "ExposedPorts"]
    ours_config = " ".join(json.dumps(config.get(k), separators=(",", ":"), ensure_ascii=False) for k in keys)
    assert ours_config + "\n" == docker.run("image", "inspect", "--format", CONFIG, "quotes").stdout


def _tar(entries: dict[str, bytes | None]) -> bytes:
    """A tar of regular files (None: a directory), all 0644/0755 root-owned at a fixed mtime."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1_600_000_000, 0o644 if data is not None else 0o755
            info.type = tarfile.REGTYPE if data is not None else tarfile.DIRTYPE
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data or b""))
    return out.getvalue()


def test_add_whiteouts_and_copy_through_dangling_symlinks_are_dockers(docker: Docker, store: Path, tmp_path: Path):
    """ADD of a tar with ``.wh.X`` removes X and ``.wh..wh..opq`` hides what the directory held (as Docker's commit
    of what ``Unpack`` wrote); COPY through an image symlink to a missing target creates the target inside the
    image. The RUN lists the results: the same output on both sides."""
    wh = _tar({"etc/.wh.group": b"", "o/": None, "o/.wh..wh..opq": b"", "o/new": b"n\n", "tmp/.wh.nothing": b"",
               "hello": b"hi\n"})  # fmt: skip
    ctx = context(tmp_path / "ctx", B + "RUN mkdir -p /o/sub && touch /o/old /o/sub/gone /o/sub/stays\n"
                  "RUN ln -s /tmp/x/y /evil && ln -s ../../nowhere/z /rel\nADD w.tar /\nCOPY a /evil/\nCOPY d /rel/\n"
                  "RUN ls -a /etc /o /tmp/x/y /nowhere/z && cat /hello /evil/a /rel/f\n", A)  # fmt: skip
    (tmp_path / "ctx" / "w.tar").write_bytes(wh)
    (tmp_path / "ctx" / "d").mkdir()
    (tmp_path / "ctx" / "d" / "f").write_text("f\n")
    theirs, ours = both(docker, store, ctx, "--no-cache")
    assert ours == theirs and theirs[0] == 0, theirs
    assert "group" not in theirs[1].split("Step 7/7")[1]
