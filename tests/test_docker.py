"""The private dockerd itself (``tests/dockerd.py``): it starts, builds with the classic builder, runs a RUN step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dockerd import BASE, Docker

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.timeout(600)]


def test_private_dockerd_builds_on_the_shared_base(docker: Docker, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo hello > /greeting\n")
    out = docker.build(str(tmp_path), "-t", "smoke")
    assert "Step 2/2 : RUN echo hello > /greeting" in out.stdout
    assert docker.run("run", "--rm", "smoke", "cat", "/greeting").stdout == "hello\n"
    assert docker.run("info", "--format", "{{.Driver}}").stdout.strip() == "overlay2"
    docker.clean()
    assert docker.run("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split() == [BASE]
