"""pylayerfs as users get it: the wheel installed in a fresh venv, and the program .ci/install links.

The wheel is built from a copy of the sources (a stale ``build/`` in the tree would slip deleted
modules into it), must hold every module and data file of the package, and the program installed
from it must work on its own: ``--help``, a mount read through, ``base`` and a ``build`` with a RUN,
run from a directory where the source tree is not importable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import pylayerfs
from tests.mounts import _mounted, force_unmount

PACKAGE = os.path.dirname(os.path.abspath(pylayerfs.__file__))
SOURCE = os.path.dirname(PACKAGE)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LINK = os.environ.get("PYLAYERFS_LINK", "/usr/local/bin/pylayerfs")  # where .ci/install links the program


def _package_files() -> set[str]:
    """Every file of the package in the source tree (modules and data), as paths in a wheel."""
    found = set()
    for directory, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if not name.endswith((".pyc", ".pyo")):
                found.add(os.path.relpath(os.path.join(directory, name), SOURCE))
    return found


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(SOURCE, name), src / name)
    shutil.copytree(PACKAGE, src / "pylayerfs", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=100)  # fmt: skip
    (wheel,) = wheels.glob("pylayerfs-*.whl")
    return wheel


@pytest.mark.install
@pytest.mark.fuse
@pytest.mark.root
def test_wheel_installed_in_a_fresh_venv_mounts_and_builds(tmp_path: Path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        assert _package_files() <= set(z.namelist())

    venv = tmp_path / "venv"
    # Without pip of its own (ensurepip takes long); our pip installs into it, dependencies included.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=100)  # fmt: skip
    work = tmp_path / "work"  # the cwd: nothing of the source tree importable from here
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:{SYSTEM_PATH}", "HOME": str(work)}

    def installed(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(venv / "bin" / "pylayerfs"), *args], cwd=work, env=env, capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"installed pylayerfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pylayerfs; print(pylayerfs.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert where.startswith(f"{venv}/"), where
    assert "usage: pylayerfs" in installed("--help").stdout

    for layer, text in (("l1", "top"), ("l2", "bottom")):
        (work / layer).mkdir()
        (work / layer / f"{layer}.txt").write_text(text)
    (work / "l1" / "shared").write_text("from l1")
    (work / "l2" / "shared").write_text("from l2")
    for d in ("upper", "workdir", "mnt"):
        (work / d).mkdir()
    mnt = str(work / "mnt")
    layers = f"lowerdir={work / 'l1'}:{work / 'l2'},upperdir={work / 'upper'},workdir={work / 'workdir'}"
    installed("mount", "-o", layers, mnt)
    try:
        assert sorted(os.listdir(mnt)) == ["l1.txt", "l2.txt", "shared"]
        assert (work / "mnt" / "shared").read_text() == "from l1"
        assert (work / "mnt" / "l2.txt").read_text() == "bottom"
        (work / "mnt" / "l2.txt").write_text("copied up")
        assert (work / "upper" / "l2.txt").read_text() == "copied up"
        installed("umount", mnt)
        assert not _mounted(mnt)
    finally:
        force_unmount(mnt)

    store = str(work / "store")
    installed("--root", store, "base", "alpine")
    (work / "ctx").mkdir()
    (work / "ctx" / "Dockerfile").write_text("FROM alpine\nRUN echo built > /f\n")
    assert "Successfully tagged app:latest" in installed("--root", store, "build", "-t", "app", "ctx").stdout
    assert installed("--root", store, "run", "--rm", "app", "cat", "/f").stdout == "built\n"


def test_installed_program_works_for_every_user():
    """.ci/install's program runs as nobody: nothing of it under root's 0700 home (the venv, pyenv)."""
    if not os.path.exists(LINK) and os.environ.get("CI") != "true":
        pytest.skip(f"{LINK} is not installed (bash .ci/install)")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    # runuser, not setpriv: setpriv's own execve still finds an interpreter nobody cannot reach.
    result = subprocess.run(["runuser", "-u", "nobody", "--", LINK, "--help"],
                            cwd="/", env={"PATH": SYSTEM_PATH, "HOME": "/nonexistent"},
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: pylayerfs" in result.stdout
