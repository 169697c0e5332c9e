"""The container a failed RUN step leaves, as the classic builder leaves it: ``Exited (N)`` in ``ps -a`` (``Created``
when the command could not start).

moby's builder runs each RUN in a container, and removes it only when the command succeeded
(builder/dockerfile/internals.go, containerbackend.go): a failed one stays, with what the command wrote in its
read-write layer, counted by ``system df`` and removable with ``rm``. The builder (which may not import containers)
hands the step over as a :class:`~pylayerfs.image.builder.build.FailedRun`.
"""

from __future__ import annotations

import os

from pylayerfs.container.records import Container, ContainerStatus, State
from pylayerfs.container.runtime import Runtime
from pylayerfs.image.builder.build import FailedRun
from pylayerfs.image.drivers import vfs as vfsdriver


def keep_failed_run(runtime: Runtime, failed: FailedRun) -> Container:
    """Record ``failed`` as an exited container of its parent image, under the ID the build printed (``Running
    in``), its changes moved into the container's read-write layer (with vfs: applied to its tree). Returns it.

    Raises StoreError (the image is gone) and the OSError of moving the changes.
    """
    container = runtime.create(failed.image.id, failed.command, container_id=failed.container_id)
    container.image_name = failed.image.short_id  # ps shows the short ID of an image given by ID
    container.config = failed.config
    if container.driver.mounts:
        upper = runtime.upper(container)
        for name in os.listdir(failed.changes):
            os.rename(os.path.join(failed.changes, name), os.path.join(upper, name))
    else:
        vfsdriver.apply_diff(failed.changes, runtime.merged(container))
    if failed.exit_code is not None:  # else it never started: Created, as Docker's
        container.state = State(status=ContainerStatus.EXITED, exit_code=failed.exit_code,
                                started_at=failed.started, finished_at=failed.finished)  # fmt: skip
    runtime.containers.save(container)
    return container
