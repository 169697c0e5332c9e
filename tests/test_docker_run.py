"""The same containers as Docker's: the same commands run on both sides (the private dockerd and a pylayerfs store
holding the same base), their outputs compared after masking IDs, hostnames, dates and PIDs.

What a process sees (``env``, ``/etc/hosts``, ``/etc/hostname``, ``/etc/resolv.conf``, ``/dev``, its mounts,
``id``, ``ps``) in ``run``, ``exec`` and a build's RUN; the users (``--user``, ``USER``, supplementary groups,
``HOME``); the exit statuses and messages (125, 126, 127); the PID namespace (``stop`` and ``rm -f`` stop the
whole tree, in well under the 10 s timeout; Ctrl-C goes to PID 1, which decides); a foreground ``run``'s streams
(stdout and stderr apart, in the log too; no stdin without ``-i``; a slow reader slows the command down, a reader
gone ends the client); ``run --rm -d``.
"""

from __future__ import annotations

import functools
import glob
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

from pylayerfs.overlay import realfs
from pylayerfs.overlay.params import mounts_below
from tests.dockerd import BASE, DOCKER, Docker
from tests.mounts import processes, unique_seconds
from tests.test_build import pylayerfs

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.fuse, pytest.mark.timeout(600)]

# Docker's mounts pylayerfs does not make: cgroups, and the masked and read-only paths of /proc and /sys.
NOT_MOUNTED = re.compile(r"^/(sys/fs/cgroup|sys/firmware|proc/)")
# What a process sees, one section per line of output.
LOOK = (
    "env; echo --; cat /etc/hosts; echo --; cat /etc/hostname; echo --; cat /etc/resolv.conf; echo --; "
    "ls -l /dev /dev/pts /dev/shm /dev/mqueue; echo --; id; echo --; ps; echo --; "
    "cut -d' ' -f5,9 /proc/self/mountinfo; echo --; hostname; ls -a /; ls -l /etc/mtab /.dockerenv"
)
USERS = f"""FROM {BASE}
RUN echo 'app:x:1000:1000:app:/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group \\
 && echo 'wheel:x:10:root,app' >> /etc/group && echo 'staff:x:50:app' >> /etc/group
RUN {LOOK}
USER app
RUN id; echo HOME=$HOME
"""


class Both:
    """The same command line on both sides: ``docker ARGS`` and ``pylayerfs --root ROOT ARGS``."""

    def __init__(self, docker: Docker, root: Path) -> None:
        self.docker, self.root = docker, root

    def run(self, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], ...]:
        return self.docker.run(*args, check=False, timeout=timeout), pylayerfs(self.root, *args, check=False,
                                                                                timeout=timeout)  # fmt: skip

    def popen(self, *args: str, stdin: int | None = None) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
        """``docker ARGS`` and ``pylayerfs ARGS`` started, stdout and stderr piped (``stdin``: as subprocess's)."""
        ours = {**os.environ, "PYLAYERFS_ROOT": str(self.root)}
        return (
            subprocess.Popen([DOCKER, *args], env=self.docker.env(), stdin=stdin, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True),
            subprocess.Popen([sys.executable, "-m", "pylayerfs", *args], env=ours, stdin=stdin,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )  # fmt: skip


@pytest.fixture(scope="module")
def both(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Both]:
    """A pylayerfs store with the same base as the dockerd, and the ``users`` image built on both sides."""
    root = tmp_path_factory.mktemp("run") / "store"
    pylayerfs(root, "import", os.path.join(docker.directory, "busybox-rootfs.tar"), BASE)
    sides = Both(docker, root)
    try:
        yield sides
    finally:
        ids = pylayerfs(root, "ps", "-a", "-q", check=False).stdout.split()
        if ids:
            pylayerfs(root, "rm", "-f", *ids, check=False)
        for mountpoint in mounts_below(str(root)):
            realfs.detach(mountpoint)
        docker.clean()


@pytest.fixture(scope="module")
def builds(both: Both, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The build output of :data:`USERS` on both sides (Docker's, ours); the image is tagged ``users``."""
    ctx = tmp_path_factory.mktemp("users")
    (ctx / "Dockerfile").write_text(USERS)
    theirs, ours = both.run("build", "-t", "users", str(ctx))
    assert theirs.returncode == 0, theirs.stderr
    assert ours.returncode == 0, ours.stderr
    return theirs.stdout, ours.stdout


def mask(text: str, hostname: str = "") -> str:
    """IDs, the hostname, dates and the PIDs in ``ps`` (but 1) masked."""
    if hostname:
        text = text.replace(hostname, "<host>")
    text = re.sub(r"\b[0-9a-f]{64}\b|\b[0-9a-f]{12}\b", "<id>", text)
    text = re.sub(r"[A-Z][a-z]{2} +\d+ +\d\d:\d\d", "<date>", text)
    return re.sub(r"^ +(?!1 )\d+ ", "<pid> ", text, flags=re.M)


def sections(text: str) -> list[str]:
    """The output of :data:`LOOK`, by section; in the mounts (``mountpoint source``), Docker's own are left out
    (:data:`NOT_MOUNTED`), and the root's source (overlay on one side, pylayerfs on the other)."""
    parts = text.split("--\n")
    mounts = [line for line in parts[7].splitlines() if not NOT_MOUNTED.match(line)]
    assert mounts[0].startswith("/ "), mounts
    parts[7] = "\n".join(["/", *mounts[1:]])
    return parts


def run_steps(build: str) -> list[str]:
    """What each RUN step printed, between ``Running in`` and ``Removing intermediate container``."""
    steps = re.findall(r" ---> Running in (\w+)\n(.*?)Removing intermediate container", build, re.S)
    return [mask(out, hostname) for hostname, out in steps if out]


def test_a_container_sees_what_dockers_sees(both: Both) -> None:
    theirs, ours = both.run("run", "--rm", BASE, "sh", "-c", LOOK)
    assert (theirs.returncode, ours.returncode) == (0, 0), ours.stderr
    docker_host, our_host = (out.stdout.split("--\n")[2].strip() for out in (theirs, ours))
    assert re.fullmatch("[0-9a-f]{12}", our_host), "the hostname is the container's short ID"
    assert f"HOSTNAME={our_host}\n" in ours.stdout
    assert sections(mask(ours.stdout, our_host)) == sections(mask(theirs.stdout, docker_host))


def test_run_steps_see_what_dockers_see(builds: tuple[str, str]) -> None:
    theirs, ours = (run_steps(b) for b in builds)
    assert len(ours) == len(theirs) == 2
    assert sections(ours[0]) == sections(theirs[0])
    assert ours[1] == theirs[1] == "uid=1000(app) gid=1000(app) groups=10(wheel),50(staff),1000(app)\nHOME=/home/app\n"


@pytest.mark.parametrize(
    "user", [None, "nobody", "1234", "1234:5", "root:nobody", "app", "app:staff", "0:10", "nosuch", "root:nosuch"]
)
def test_users_groups_and_home_as_dockers(both: Both, builds: tuple[str, str], user: str | None) -> None:
    args = ["run", "--rm", *(["--user", user] if user is not None else []), "users", "sh", "-c", "id; env"]
    theirs, ours = both.run(*args)
    assert ours.returncode == theirs.returncode
    assert mask(ours.stdout, ours.stdout.partition("HOSTNAME=")[2][:12]) == mask(
        theirs.stdout, theirs.stdout.partition("HOSTNAME=")[2][:12]
    )
    if theirs.returncode:
        assert ours.returncode == 125
        assert _message(ours.stderr) in theirs.stderr


def _message(stderr: str) -> str:
    """Our error message without our prefix (``pylayerfs: ``, ``pylayerfs run: ``)."""
    return re.sub(r"^pylayerfs( \w+)?: ", "", stderr.strip())


@pytest.mark.parametrize(
    "command",
    [["nosuch"], ["/nosuch"], ["/etc/passwd"], ["/etc"], ["sh", "-c", "exit 3"], ["sh", "-c", "kill -9 $$"],
     ["sh", "-c", "kill -15 $$; exit 4"]],
)  # fmt: skip
def test_exit_statuses_and_messages_as_dockers(both: Both, command: list[str]) -> None:
    theirs, ours = both.run("run", "--rm", BASE, *command)
    assert ours.returncode == theirs.returncode, (ours.stderr, theirs.stderr)
    if theirs.returncode in (126, 127):
        assert _message(ours.stderr) in theirs.stderr


def test_run_errors_answer_125(both: Both) -> None:
    theirs, ours = both.run("run", "--rm", BASE)
    assert (theirs.returncode, ours.returncode) == (125, 125)
    assert _message(ours.stderr) in theirs.stderr
    ours = pylayerfs(both.root, "run", "--rm", "nosuchimage", check=False)  # Docker would try to pull it
    assert ours.returncode == 125


def _status(both: Both, name: str) -> tuple[str, str]:
    statuses = []
    for side in both.run("ps", "-a", "--format", "{{.Names}}\t{{.Status}}"):  # pylayerfs's ps has no --filter
        rows = dict(line.split("\t", 1) for line in side.stdout.splitlines() if "\t" in line)
        statuses.append(rows.get(name, ""))
    return statuses[0], statuses[1]


def test_exec_joins_the_containers_namespaces(both: Both) -> None:
    nap = unique_seconds()
    for side in both.run("run", "-d", "--name", "joined", BASE, "sleep", nap):
        assert side.returncode == 0, side.stderr
    for options, command in (
        ([], ["ps"]),
        (["--user", "nobody"], ["sh", "-c", "id; env"]),
        ([], ["sh", "-c", "cat /etc/hostname; hostname"]),
        ([], ["cat", "/proc/1/cmdline"]),
    ):
        theirs, ours = both.run("exec", *options, "joined", *command)
        assert ours.returncode == theirs.returncode == 0, ours.stderr
        assert mask(ours.stdout) == mask(theirs.stdout)
    for args, code in ((["nosuch"], 126), (["/etc/passwd"], 126), (["sh", "-c", "exit 4"], 4)):
        theirs, ours = both.run("exec", "joined", *args)
        assert ours.returncode == theirs.returncode == code
        assert _message(ours.stderr) in theirs.stdout + theirs.stderr  # docker prints the runtime's error on stdout
    for options in (["--user", "nosuch"], ["-w", "/nosuch"]):
        theirs, ours = both.run("exec", *options, "joined", "true")
        assert ours.returncode == theirs.returncode == 126
        assert _message(ours.stderr) in theirs.stdout + theirs.stderr
    both.run("rm", "-f", "joined")


def test_stop_and_rm_f_stop_the_whole_tree_at_once(both: Both) -> None:
    nap = unique_seconds()
    script = f"sleep {nap} & sleep {nap}; true"  # an orphan holds the output pipe: the old 'cannot stop container'
    for name in ("tree", "forced"):
        for side in both.run("run", "-d", "--name", name, BASE, "sh", "-c", script):
            assert side.returncode == 0, side.stderr
    assert len(processes(["sleep", nap])) == 8  # two in each of the two containers on each side
    for args in (("stop", "-t", "1", "tree"), ("rm", "-f", "forced")):
        took = []
        for client in (both.docker.run, functools.partial(pylayerfs, both.root)):
            start = time.monotonic()
            assert client(*args, check=False).returncode == 0
            took.append(time.monotonic() - start)
        assert took[1] < took[0] + 2, f"{args}: Docker took {took[0]:.1f} s, pylayerfs {took[1]:.1f} s"
        assert took[1] < 4, "well under the 10 s timeout"
    assert processes(["sleep", nap]) == [], "every process of the container is gone, orphans included"
    theirs, ours = _status(both, "tree")
    assert theirs.startswith("Exited (137)") and ours.startswith("Exited (137)"), (theirs, ours)
    both.run("rm", "tree")


def test_ctrl_c_goes_to_pid_1_as_dockers(both: Both) -> None:
    """The client forwards SIGINT to PID 1: a shell that traps it exits at once (and --rm removes it); ``sleep``
    as PID 1 has no handler, so the kernel ignores it, on both sides, until ``rm -f``."""
    trap = ["sh", "-c", "trap 'echo got; exit 5' INT; sleep 600 & wait"]
    for name, command in (("trapping", trap), ("ignoring", ["sleep", unique_seconds()])):
        clients = both.popen("run", "--rm", "--name", name, BASE, *command)
        try:
            _wait_running(both, name)
            for client in clients:
                client.send_signal(signal.SIGINT)
            if name == "ignoring":
                time.sleep(1)
                assert [c.poll() for c in clients] == [None, None], "still running on both sides"
                both.run("rm", "-f", name)
            results = [c.communicate(timeout=15)[0] for c in clients]
            assert list(zip([c.returncode for c in clients], results, strict=True)) == 2 * [
                (5, "got\n") if name == "trapping" else (137, "")
            ]
            assert _status(both, name) == ("", ""), "removed on both sides"
        finally:
            both.run("rm", "-f", name)
            for client in clients:
                client.kill()
                client.communicate()


def _wait_running(both: Both, name: str) -> None:
    deadline = time.monotonic() + 30
    while _status(both, name)[0][:2] != "Up" or _status(both, name)[1][:2] != "Up":
        assert time.monotonic() < deadline, _status(both, name)
        time.sleep(0.1)
    time.sleep(0.3)  # the shell has set its trap


CONFINED = (
    "mount -t tmpfs none /mnt 2>/dev/null; echo mount $?; "
    "echo 1 2>/dev/null > /proc/sys/vm/drop_caches; echo sysctl $?; "
    "(mknod /tmp/b b 7 0 && head -c1 /tmp/b) >/dev/null 2>&1; echo block-device $?; "
    "grep CapBnd /proc/self/status"
)
CAP_MKNOD = 27


def _confinement(out: str) -> tuple[dict[str, bool], int]:
    """Which of :data:`CONFINED`'s attempts succeeded, and the bounding set of capabilities."""
    fields = dict(line.split(None, 1) for line in out.splitlines())
    return {k: fields[k] == "0" for k in ("mount", "sysctl", "block-device")}, int(fields["CapBnd:"], 16)


def test_a_container_or_a_run_step_cannot_reach_the_host_as_with_docker(both: Both, tmp_path: Path) -> None:
    """No mount, no write to /proc/sys, no use of a block device it makes (found by a user's try: a RUN step mounted
    the host's disk and copied a host file into the image): Docker's capabilities (but CAP_MKNOD, which Docker keeps
    and fences with a device cgroup) and its read-only and masked /proc paths."""
    theirs, ours = both.run("run", "--rm", BASE, "sh", "-c", CONFINED)
    (docker_did, docker_caps), (we_did, our_caps) = _confinement(theirs.stdout), _confinement(ours.stdout)
    assert docker_did == we_did == {"mount": False, "sysctl": False, "block-device": False}
    assert our_caps == docker_caps & ~(1 << CAP_MKNOD)
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN {CONFINED}\n")
    built = pylayerfs(both.root, "build", "--no-cache", str(tmp_path), check=False)
    assert built.returncode == 0, built.stderr
    step = re.search(r"mount \d+\nsysctl \d+\nblock-device \d+\nCapBnd:\s+\w+\n", built.stdout)
    assert step is not None and _confinement(step.group(0)) == (we_did, our_caps), built.stdout


# A line of 40000 bytes without a newline, then lines on both streams: moby's json-file log keeps them apart.
STREAMS = "head -c 40000 /dev/zero | tr '\\0' a; echo; echo out; echo err >&2; echo out2; printf 'no newline' >&2"


def _log(both: Both, name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The json-file log of container ``name`` on both sides, as ``(stream, log)`` pairs."""
    theirs = both.docker.run("inspect", "-f", "{{.LogPath}}", name).stdout.strip()
    short = pylayerfs(both.root, "ps", "-a", "--format", "{{.ID}} {{.Names}}").stdout
    ours = glob.glob(str(both.root / "containers" / f"{short.split(f' {name}')[0].split()[-1]}*" / "*-json.log"))
    logs = []
    for path in (theirs, *ours):
        with open(path) as f:
            logs.append([(e["stream"], e["log"]) for e in map(json.loads, f)])
    assert len(logs) == 2, ours
    return logs[0], logs[1]


def test_stdout_and_stderr_apart_as_dockers(both: Both) -> None:
    """Attached, stdout to stdout and stderr to stderr; the log records each line's stream (a long line in 16 KiB
    pieces, as moby's copier); ``logs`` gives each back on its own stream."""
    results = both.run("run", "--name", "streams", BASE, "sh", "-c", STREAMS)
    expected = ("a" * 40000 + "\nout\nout2\n", "err\nno newline")
    for side in results:
        assert (side.returncode, side.stdout, side.stderr) == (0, *expected)
    logs = _log(both, "streams")
    theirs, ours = ([[text for name, text in log if name == stream] for stream in ("stdout", "stderr")] for log in logs)
    # Each stream's text is the same; where a long line is cut depends on how the pipe's reads fell on each side
    # (the order between the two streams too), but no piece is longer than moby's 16 KiB.
    assert ["".join(entries) for entries in ours] == ["".join(entries) for entries in theirs]
    assert max(len(text) for text in ours[0]) == 16384 and len(ours[0]) >= 5, "40,001 bytes in 3 pieces or more"
    for side in both.run("logs", "streams"):
        assert (side.returncode, side.stdout, side.stderr) == (0, *expected)
    both.run("rm", "streams")


def test_no_stdin_without_i_as_dockers(both: Both) -> None:
    clients = both.popen("run", "--rm", BASE, "sh", "-c", "cat; echo end", stdin=subprocess.PIPE)
    results = [c.communicate("input\n", timeout=60) for c in clients]
    assert results == [("end\n", ""), ("end\n", "")]
    assert [c.returncode for c in clients] == [0, 0]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_slow_reader_slows_the_command_and_a_reader_gone_ends_the_client(both: Both) -> None:
    """Output nobody reads for a while stays in the pipes (the client's memory does not grow); when the reader goes,
    the client exits 1 with Docker's message. Docker leaves the command running; pylayerfs kills it (and --rm
    removes it: docs/containers.md)."""
    clients = both.popen("run", "--rm", "--name", "zeros", BASE, "sh", "-c", "cat /dev/zero")
    try:
        _wait_running(both, "zeros")
        time.sleep(2)
        assert _rss_kib(clients[1].pid) < 100 * 1024, "a client of a few tens of MB, not the command's output"
        for client in clients:
            assert client.stdout is not None
            assert len(client.stdout.read(10)) == 10
            client.stdout.close()
        for client in clients:
            assert client.wait(timeout=15) == 1
            assert client.stderr is not None
            assert "write /dev/stdout: broken pipe" in client.stderr.read()
        assert _status(both, "zeros")[1] == "", "killed, and removed by --rm"
    finally:
        both.run("rm", "-f", "zeros")
        for client in clients:
            client.kill()
            client.wait()


def test_run_rm_d_removes_the_container_once_it_exited(both: Both) -> None:
    for side in both.run("run", "--rm", "-d", "--name", "brief", BASE, "sleep", "1"):
        assert side.returncode == 0, side.stderr
    deadline = time.monotonic() + 20
    while _status(both, "brief") != ("", ""):
        assert time.monotonic() < deadline, _status(both, "brief")
        time.sleep(0.2)
    theirs, ours = both.run("run", "--rm", "-d", "--name", "nostart", BASE, "nosuch")
    assert (theirs.returncode, ours.returncode) == (127, 127)
    assert _message(ours.stderr) in theirs.stderr
    assert _status(both, "nostart") == ("", ""), "removed on both sides"
