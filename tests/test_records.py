"""Container records: snake_case in Python, Docker's CamelCase in ``config.v2.json``, byte for byte.

No mount here: records are read and written in-process, and through ``pylayerfs ps``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pylayerfs.cli.main import DRIVERS
from pylayerfs.container.changes import ChangeKind
from pylayerfs.container.records import CONFIG_FILE, Container, ContainerStatus, ContainerStore, State
from pylayerfs.image.drivers import StorageDriver
from pylayerfs.image.store import Store, StoreError

ID = "a" * 64
# What pylayerfs has written since containers exist (json.dumps of moby's field names, in this order).
RECORD = (
    '{"ID": "' + ID + '", "Created": "2026-11-29T04:13:00.123456789Z", "Path": "sh", '
    '"Args": ["-c", "echo \\"\\u00e9\\" > /f"], "Config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Image": "x"}, '
    '"Image": "sha256:' + "b" * 64 + '", "ImageName": "app:1", "Name": "/web", "MountID": "' + "c" * 64 + '", '
    '"Driver": "vfs", "State": {"Status": "exited", "Running": false, "Pid": 0, "MonitorPid": 0, "ExitCode": 3, '
    '"StartedAt": "2026-11-29T04:13:01Z", "FinishedAt": "2026-11-29T04:13:02.5Z"}}'
)


def _write(root: Path, container_id: str, text: str) -> ContainerStore:
    containers = ContainerStore(Store(str(root)))
    os.makedirs(containers.dir(container_id))
    Path(containers.dir(container_id), CONFIG_FILE).write_text(text)
    return containers


def test_a_record_on_disk_loads_into_snake_case_and_saves_byte_identical(tmp_path):
    containers = _write(tmp_path, ID, RECORD)
    c = containers.load(ID)
    assert (c.id, c.created, c.path, c.args) == (ID, "2026-11-29T04:13:00.123456789Z", "sh", ["-c", 'echo "é" > /f'])
    assert (c.image_id, c.image_name, c.name, c.mount_id) == ("sha256:" + "b" * 64, "app:1", "web", "c" * 64)
    assert c.config == {"Env": ["PATH=/bin"], "Cmd": ["sh"], "Image": "x"}, "Config passes through as Docker's"
    assert c.driver is StorageDriver.VFS
    assert c.state == State(ContainerStatus.EXITED, False, 0, 0, 3, "2026-11-29T04:13:01Z", "2026-11-29T04:13:02.5Z")
    assert c.state.status is ContainerStatus.EXITED
    os.remove(os.path.join(containers.dir(ID), CONFIG_FILE))
    containers.save(c)
    assert Path(containers.dir(ID), CONFIG_FILE).read_text() == RECORD
    assert containers.find("web") == containers.find("/web") == containers.find("aaa") == c


def test_a_record_without_driver_or_state_fields_gets_the_defaults(tmp_path):
    record = json.loads(RECORD)
    del record["Driver"], record["State"]["MonitorPid"], record["State"]["FinishedAt"]
    c = _write(tmp_path, ID, json.dumps(record)).load(ID)
    assert c.driver is StorageDriver.FUSE
    assert (c.state.monitor_pid, c.state.finished_at) == (0, "0001-01-01T00:00:00Z")


def test_fields_a_record_may_carry_beyond_ours_are_ignored_as_go_does(tmp_path):
    record = json.loads(RECORD)
    record["RestartCount"] = 0
    record["State"]["OOMKilled"] = False
    assert _write(tmp_path, ID, json.dumps(record)).load(ID).state.exit_code == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("MountID"), "missing MountID"),
        (lambda r: r.update(Driver="zfs"), "Driver: unknown value 'zfs'"),
        (lambda r: r["State"].update(Status="paused"), "State.Status: unknown value 'paused'"),
        (lambda r: r["State"].update(Pid="12"), "State.Pid: not an int"),
        (lambda r: r.update(Args="sh"), "Args: not a list of strings"),
        (lambda r: r.update(State=[]), "State: not an object"),
    ],
)
def test_a_damaged_record_is_a_store_error_naming_the_field(tmp_path, change, message):
    record = json.loads(RECORD)
    change(record)
    containers = _write(tmp_path, ID, json.dumps(record))
    with pytest.raises(StoreError, match=f"container {ID}: {CONFIG_FILE}: {message}"):
        containers.load(ID)
    assert containers.all() == []


def test_ps_skips_a_damaged_record_without_a_traceback(tmp_path):
    record = json.loads(RECORD)
    record["State"]["Status"] = "paused"
    _write(tmp_path, ID, json.dumps(record))
    good = json.loads(RECORD)
    good["ID"], good["Name"] = "d" * 64, "/ok"
    _write(tmp_path, "d" * 64, json.dumps(good))
    out = subprocess.run([sys.executable, "-m", "pylayerfs", "--root", str(tmp_path), "ps", "-a", "--format", "json"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert (out.returncode, out.stderr) == (0, "")
    assert [json.loads(line)["Names"] for line in out.stdout.splitlines()] == ["ok"]


def test_the_closed_sets_are_enums_with_docker_values():
    assert list(DRIVERS) == ["fuse", "overlay", "vfs"] == [d.value for d in StorageDriver]
    assert [k.value for k in ChangeKind] == ["A", "C", "D"]
    assert f"{ChangeKind.MODIFY} /etc" == "C /etc"
    assert Container("x" * 64, "", "sh", [], {}, "", "", "n", "m").state.status is ContainerStatus.CREATED


@pytest.mark.parametrize("name", ["../../evil", "a b", "-x", "x", "é", "a/b", ""])
def test_container_names_docker_refuses_are_refused(tmp_path, name):
    containers = ContainerStore(Store(str(tmp_path)))
    with pytest.raises(
        StoreError, match=r"Invalid container name \(.*\), only \[a-zA-Z0-9\]\[a-zA-Z0-9_.-\] are allowed"
    ):
        containers.check_name(name)


@pytest.mark.parametrize("name", ["web", "/web", "a.b_c-1", "9lives"])
def test_container_names_docker_accepts_are_accepted(tmp_path, name):
    ContainerStore(Store(str(tmp_path))).check_name(name)
