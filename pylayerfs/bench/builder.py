"""B1: the builder's cache and ``ps -s``, as a user runs them (whole commands, start-up included)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from pylayerfs.bench.data import Sizes

STEPS = 10


def _pylayerfs(root: str, *args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pylayerfs", "--root", root, *args], capture_output=True,
                            text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pylayerfs {' '.join(args)}: {result.stderr.strip()}")
    return time.perf_counter() - start


def builder(root: str, sizes: Sizes) -> dict[str, Any]:
    store = os.path.join(root, "store")
    context = os.path.join(root, "context")
    os.makedirs(context)
    with open(os.path.join(context, "app.sh"), "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    steps = ["FROM alpine", "COPY app.sh /app/app.sh", "RUN chmod +x /app/app.sh", "ENV MODE=bench",
             "WORKDIR /app", "RUN echo built > /app/built", "LABEL bench=yes", "EXPOSE 80", "USER nobody",
             'CMD ["/app/app.sh"]']  # fmt: skip
    with open(os.path.join(context, "Dockerfile"), "w") as f:
        f.write("\n".join(steps[:STEPS]) + "\n")
    _pylayerfs(store, "base", "alpine")
    first = _pylayerfs(store, "build", "-t", "bench", context)
    rebuild = _pylayerfs(store, "build", "-t", "bench", context)
    files = sizes.many // 2
    script = f"i=0; while [ $i -lt {files} ]; do : > /tmp/f$i; i=$((i+1)); done"
    _pylayerfs(store, "run", "--name", "many", "bench", "sh", "-c", script)
    ps = _pylayerfs(store, "ps", "-a", "-s")
    _pylayerfs(store, "rm", "-f", "many")
    return {"steps": STEPS, "build_s": first, "rebuild_s": rebuild, "files": files, "ps_s": ps}
