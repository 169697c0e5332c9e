"""A newcomer's first hour (issue 11): what they run first must fail in one line, clean up, and explain itself."""

from __future__ import annotations

import contextlib
import os
import pty
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pylayerfs.overlay.params import mountinfo, mounts_below
from tests.mounts import PYLAYERFS, force_unmount

TIMEOUT = 120


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes_naming(text: str) -> list[int]:
    """Live processes (not zombies: their cmdline is empty) whose command line contains ``text``."""
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and text in _cmdline(pid)]


def _mounts_seen_by(pid: int, below: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return [line.split()[4] for line in f if line.split()[4].startswith(below)]
    except OSError:
        return []


def _cleanup(path: str) -> None:
    """Whatever a broken check left behind: its processes (by pid) and its mounts."""
    for pid in _processes_naming(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for mountpoint in sorted((m.mountpoint for m in mountinfo() if m.mountpoint.startswith(path)), reverse=True):
        force_unmount(mountpoint)


def _as_nobody(*args: str, cwd: str = "/tmp") -> subprocess.CompletedProcess[str]:
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *PYLAYERFS, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=cwd)


# -- 1 and 6: pylayerfs check -------------------------------------------------------------------


@pytest.mark.root
def test_check_as_non_root_says_it_needs_root_in_one_line():
    for extra in ((), ("--impl", "engine"), ("--format", "json")):
        result = _as_nobody("check", "--examples", "1", *extra)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and "needs root" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.root
@pytest.mark.fuse
def test_check_killed_leaves_no_mount_and_no_daemon(tmp_path):
    where = str(tmp_path)
    argv = [*PYLAYERFS, "check", "--impl", "pylayerfs", "--examples", "200", "--dir", where]
    check = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        seen: list[str] = []
        while not seen and time.monotonic() < deadline and check.poll() is None:
            seen = [m for pid in _processes_naming(where) for m in _mounts_seen_by(pid, where)]
            time.sleep(0.05)
        assert seen, "the check never mounted anything"
        check.kill()
        check.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_processes_naming(where) or mounts_below(where) or os.listdir(where)):
            time.sleep(0.1)
        assert _processes_naming(where) == [], [_cmdline(str(p)) for p in _processes_naming(where)]
        assert mounts_below(where) == []
        assert os.listdir(where) == [], "the killed check's layers are left behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            check.kill()
        check.wait(timeout=10)
        _cleanup(where)


@pytest.mark.root
@pytest.mark.fuse
def test_check_mounts_stay_in_its_own_namespace_and_it_still_passes(tmp_path):
    where = str(tmp_path)
    argv = [*PYLAYERFS, "check", "--examples", "3", "--seed", "1", "--dir", where]
    check = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        leaked: list[str] = []
        while check.poll() is None:
            leaked += mounts_below(where)
            time.sleep(0.02)
        out, err = check.communicate(timeout=TIMEOUT)
        assert check.returncode == 0, out + err
        assert "engine against model: pass" in out and "pylayerfs against model: pass" in out
        assert leaked == [], "the check's mounts are visible outside its namespace"
        assert os.listdir(where) == [], "the check leaves its scratch directory behind"
    finally:
        with contextlib.suppress(ProcessLookupError):
            check.kill()
        _cleanup(where)


# -- 2: pylayerfs diagram -o x.png ----------------------------------------------------------------


@pytest.fixture
def image_store(tmp_path):
    """A store with one small imported image, 'pic' (import needs root, nothing is mounted)."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("hello\n")
    with tarfile.open(tmp_path / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    store = str(tmp_path / "store")
    result = subprocess.run([*PYLAYERFS, "--root", store, "import", str(tmp_path / "rootfs.tar"), "pic"],
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return store


def _diagram(store: str, output: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path}
    return subprocess.run([*PYLAYERFS, "--root", store, "diagram", "pic", "-o", str(output)], capture_output=True,
                          text=True, timeout=TIMEOUT, check=False, env=env)  # fmt: skip


def _fake_converter(directory: Path, script: str) -> str:
    directory.mkdir()
    converter = directory / "rsvg-convert"
    converter.write_text("#!/bin/sh\n" + script)
    converter.chmod(0o755)
    return f"{directory}:/usr/bin:/bin"


@pytest.mark.root
def test_diagram_png_without_converter_says_what_to_install_and_leaves_nothing(image_store, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    result = _diagram(image_store, out_dir / "x.png", str(empty))
    assert result.returncode == 1
    assert result.stderr == "pylayerfs diagram: needs rsvg-convert to write a PNG (apt-get install librsvg2-bin)\n"
    assert list(out_dir.iterdir()) == []


@pytest.mark.root
def test_diagram_png_when_the_converter_fails_gives_its_message_and_leaves_nothing(image_store, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # writes half a PNG where it was told to, then fails as a real converter would
    script = 'while [ "$1" != -o ]; do shift; done; printf "\\211PNG" > "$2"\n'
    path = _fake_converter(tmp_path / "bin", script + 'echo "rsvg-convert: Error reading SVG: no memory" >&2; exit 1\n')
    result = _diagram(image_store, out_dir / "x.png", path)
    assert result.returncode == 1
    assert result.stderr == "pylayerfs diagram: rsvg-convert failed: rsvg-convert: Error reading SVG: no memory\n"
    assert list(out_dir.iterdir()) == []
    (out_dir / "x.png").write_bytes(b"an older picture")  # a failed run leaves an older picture alone
    assert _diagram(image_store, out_dir / "x.png", path).returncode == 1
    assert [p.name for p in out_dir.iterdir()] == ["x.png"] and (out_dir / "x.png").read_bytes() == b"an older picture"


@pytest.mark.root
def test_diagram_png_with_the_converter(image_store, tmp_path):
    assert shutil.which("rsvg-convert"), "rsvg-convert is not installed (.ci/install installs librsvg2-bin)"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = _diagram(image_store, out_dir / "x.png", os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out_dir.iterdir()] == ["x.png"]
    assert (out_dir / "x.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.root
def test_diagram_output_names_that_cannot_be_written_say_so_in_one_line(image_store, tmp_path):
    result = _diagram(image_store, tmp_path / "z.jpg", os.environ["PATH"])
    assert (result.returncode, result.stderr) == (
        1,
        f"pylayerfs diagram: -o {tmp_path}/z.jpg: name a .svg or a .png file\n",
    )
    assert not list(tmp_path.glob("z.jpg*"))
    result = _diagram(image_store, tmp_path / "nowhere" / "z.svg", os.environ["PATH"])
    assert (result.returncode, result.stderr) == (
        1,
        f"pylayerfs diagram: {tmp_path}/nowhere/z.svg: No such file or directory\n",
    )


# -- 5: mount --help, bench's legend -------------------------------------------------------------


def test_mount_help_lists_every_option_in_a_clean_table():
    env = {**os.environ, "COLUMNS": "60"}  # a narrow terminal must not re-wrap the table
    result = subprocess.run([*PYLAYERFS, "mount", "--help"], capture_output=True, text=True, timeout=TIMEOUT,
                            check=False, env=env)  # fmt: skip
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    for option in ("lowerdir=TOP:...:BOTTOM", "upperdir=U,workdir=W", "userxattr", "debug", "noallow_other",
                   "nodefault_permissions", "timeout=SECONDS", "metacopy=on|off"):  # fmt: skip
        assert [line for line in lines if line.startswith(f"  {option} ")], f"{option} is not a row of the table"
    assert "logfile=PATH" in result.stdout and "ro, nodev, nosuid," in result.stdout
    assert max(len(line) for line in lines) <= 79


def test_bench_text_report_has_a_legend_line_per_workload():
    from pylayerfs.bench import data
    from pylayerfs.bench.run import Results, report

    results = Results(data.QUICK, 1, ["pylayerfs"])
    for name in ("W1 cold", "W2 warm", "W3 cold", "W4 write", "W5 create", "W6 copy-up", "W7 10 layers",
                 "W8 round trip"):  # fmt: skip
        results.add("pylayerfs", iter([(name, 0.01)]))
    results.extra["M1"] = {"files": data.QUICK.many, "rss_after_each_walk": [1 << 20] * 5, "peak_rss": 1 << 20}
    results.extra["B1"] = {"steps": 10, "rebuild_s": 0.1, "files": 7, "ps_s": 0.1}
    text = report(results)
    for workload in ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "M1", "B1"):
        assert [line for line in text.splitlines() if line.startswith(f"{workload}  ")], f"no legend for {workload}"
    assert f"{data.QUICK.wide:,} entries" in text and f"lstat {10 * data.QUICK.depth_files:,} files" in text


def test_bench_explain_says_what_each_workload_measures():
    result = subprocess.run([*PYLAYERFS, "bench", "--explain", "--quick"], capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [*(f"W{n}" for n in range(1, 9)), "M1", "B1"]


# -- 3 and 4: the demos ---------------------------------------------------------------------------


def _demo(*args: str, stdin: int = subprocess.DEVNULL, env: dict[str, str] | None = None,
          stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([*PYLAYERFS, "demo", *args], stdin=stdin, stdout=subprocess.PIPE, stderr=stderr, text=True,
                          timeout=300, check=False, env=env)  # fmt: skip


@pytest.mark.root
@pytest.mark.fuse
def test_demo_step_without_a_terminal_runs_through_and_answers_the_blog_readers_questions(tmp_path):
    result = _demo("--step", "--dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "pylayerfs demo: --step: stdin is not a terminal, so the demo runs without pausing\n"
    out = result.stdout
    assert "[Enter for the next section]" not in out
    # Dockerfile.base is shown before it is built
    assert out.index("$ cat Dockerfile.base\nFROM alpine\n") < out.index("$ pylayerfs build -f Dockerfile.base")
    # the store listing, explained
    for entry in ("busy:", "lock:", "tmp:"):
        assert f"\n   {entry}" in out, entry
    # fewer layer directories than images: counted on the store
    store = tmp_path / "d" / "store"
    images = len(os.listdir(store / "image" / "overlay2" / "imagedb" / "content" / "sha256")) - 1  # + with-file
    assert f"{images} images but 4 layer directories" in out
    assert "ENTRYPOINT" in out and "changed no file" in out
    assert "RUN chmod +x app.sh and RUN chmod 755 app.sh made the same files" in out
    # 12B here, 11B in the blog: the newline
    assert "The blog shows 11B here: 'hello world' is 11 characters" in out and "so the file holds 12 bytes" in out
    # system df's ~
    assert "A ~ in front of a size marks an estimate" in out
    assert mounts_below(str(tmp_path)) == []


@pytest.mark.root
@pytest.mark.fuse
def test_demo_step_on_a_terminal_at_end_of_input_goes_on(tmp_path):
    master, slave = pty.openpty()
    try:
        os.write(master, b"\x04" * 20)  # Ctrl-D: end of input, every time the demo asks
        result = _demo("--step", "--dir", str(tmp_path / "d"), stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
    assert "[Enter for the next section]" in result.stdout
    assert "That is the whole post" in result.stdout


def _buffered() -> dict[str, str]:
    """The environment, with stdout block-buffered into a pipe as a user's Python has it."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


@pytest.mark.root
def test_demo_error_comes_after_what_was_printed_when_stdout_is_a_pipe(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "store").write_text("not a directory\n")  # the first pylayerfs command fails
    result = _demo("--dir", str(directory), stderr=subprocess.STDOUT, env=_buffered())
    assert result.returncode == 1
    out = result.stdout
    assert out.startswith("Deep dive into Docker image layers"), out
    assert out.index("$ pylayerfs base alpine") < out.index("pylayerfs demo: pylayerfs base alpine failed")


@pytest.mark.root
@pytest.mark.fuse
def test_overlay_demo_removes_its_directory_unless_kept(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = _demo("--overlay", env=env)
    assert result.returncode == 0, result.stderr
    assert "4. rm merged/app/app.sh" in result.stdout
    assert list(tmp_path.iterdir()) == []
    kept = _demo("--overlay", "--keep", env=env)
    assert kept.returncode == 0, kept.stderr
    [directory] = tmp_path.iterdir()
    assert f"The layers are kept in {directory}" in kept.stdout and (directory / "upper" / "etc" / "motd").exists()
    assert mounts_below(str(tmp_path)) == []


_INTERRUPTED = """
import sys
from pylayerfs.cli.main import main
from pylayerfs.fuse import mount
from pylayerfs.overlay.params import MountError
from pylayerfs.teaching import overlaydemo
show = overlaydemo._tree
def interrupted(title, root):
    if title == "merged view:":  # the mount is up
        raise {exception}
    show(title, root)
overlaydemo._tree = interrupted
sys.exit(main(["demo", "--overlay"]))
"""


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize(("exception", "status"), [("KeyboardInterrupt", 130), ("MountError('boom')", 1)])
def test_overlay_demo_cleans_up_after_an_error_or_ctrl_c(tmp_path, exception, status):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", _INTERRUPTED.format(exception=exception)], capture_output=True,
                            text=True, timeout=TIMEOUT, check=False, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        assert result.returncode == status, result.stderr
        assert "Traceback" not in result.stderr
        assert list(tmp_path.iterdir()) == [] and mounts_below(str(tmp_path)) == []
    finally:
        _cleanup(str(tmp_path))


@pytest.mark.root
@pytest.mark.fuse
def test_overlay_demo_error_comes_after_what_was_printed(tmp_path):
    env = {**_buffered(), "TMPDIR": str(tmp_path)}
    script = _INTERRUPTED.format(exception="MountError('boom')")
    result = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=TIMEOUT, check=False, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    _cleanup(str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.index("2. pylayerfs mount") < result.stdout.index("boom"), result.stdout


@pytest.mark.parametrize("argv", [["bench", "--explain"], ["images"], ["ps", "-a"], ["system", "df"]])
def test_a_reader_that_goes_away_ends_a_listing_quietly(tmp_path, argv):
    """``pylayerfs images | head -1``: no traceback, no "Broken pipe" line; the listing just stops (SIGPIPE)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        result = subprocess.run([*PYLAYERFS, "--root", str(tmp_path), *argv], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    finally:
        os.close(write)
    assert result.stderr == ""
    assert result.returncode == -signal.SIGPIPE


@pytest.mark.root
@pytest.mark.fuse
@pytest.mark.parametrize("command", [["demo"], ["bench", "--quick", "--no-builder"]], ids=["demo", "bench"])
def test_a_demo_stopped_by_sigterm_leaves_nothing_behind(tmp_path, command):
    """``kill`` (SIGTERM) cleans up as Ctrl-C does: no throw-away store, no mount (the bench's data set and tracefs:
    found left mounted), no container process."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    demo = subprocess.Popen([*PYLAYERFS, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not mounts_below(str(tmp_path)) and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mounts_below(str(tmp_path)), "the demo mounted nothing to interrupt"
        demo.send_signal(signal.SIGTERM)
        demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
        for mountpoint in mounts_below(str(tmp_path)):
            force_unmount(mountpoint)
    assert demo.returncode == 130
    deadline = time.monotonic() + 10
    while (mounts_below(str(tmp_path)) or list(tmp_path.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mounts_below(str(tmp_path)) == [] and list(tmp_path.iterdir()) == []
