"""Property-testing copy-on-write semantics: the checker behind ``pylayerfs check``, as a library.

* :func:`~pylayerfs.testing.lowers.layers` and
  :func:`~pylayerfs.testing.strategies.operations` /
  :func:`~pylayerfs.testing.strategies.scenarios` are hypothesis strategies
  for starting lower layers and operations on the merged view;
* :class:`~pylayerfs.testing.model.Model` is the reference model of overlay
  semantics, :func:`~pylayerfs.testing.lowers.flatten` builds it from layers;
* targets (:class:`ModelTarget`, :class:`EngineTarget`, :class:`MountTarget`)
  are the implementations that can be compared;
* :class:`~pylayerfs.testing.run.Run` runs one scenario and raises
  :class:`~pylayerfs.testing.run.Divergence`; :class:`OverlayMachine` is the
  same as a hypothesis state machine; :func:`~pylayerfs.testing.search.check`
  is the search behind the command.

See docs/property-testing.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pylayerfs.testing.lowers import Node, flatten, layers
    from pylayerfs.testing.machine import OverlayMachine
    from pylayerfs.testing.model import Model
    from pylayerfs.testing.ops import FAMILIES, FileSystem, Op, OsFileSystem, snapshot
    from pylayerfs.testing.run import Divergence, Run
    from pylayerfs.testing.search import Options, Report, check, run_scenario
    from pylayerfs.testing.strategies import Scenario, operations, scenarios
    from pylayerfs.testing.targets import EngineTarget, ModelTarget, MountTarget, Target, target

# Imported on first use, so that `pylayerfs mount` does not pay for hypothesis.
_HOME = {
    **dict.fromkeys(["Options", "Report", "check", "run_scenario"], "search"),
    **dict.fromkeys(["Node", "flatten", "layers"], "lowers"),
    "OverlayMachine": "machine",
    "Model": "model",
    **dict.fromkeys(["FAMILIES", "FileSystem", "Op", "OsFileSystem", "snapshot"], "ops"),
    **dict.fromkeys(["Divergence", "Run"], "run"),
    **dict.fromkeys(["Scenario", "operations", "scenarios"], "strategies"),
    **dict.fromkeys(["EngineTarget", "ModelTarget", "MountTarget", "Target", "target"], "targets"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'pylayerfs.testing' has no attribute '{name}'")
    return getattr(importlib.import_module(f"pylayerfs.testing.{_HOME[name]}"), name)


__all__ = [
    "FAMILIES",
    "Divergence",
    "EngineTarget",
    "FileSystem",
    "Model",
    "ModelTarget",
    "MountTarget",
    "Node",
    "Op",
    "Options",
    "OsFileSystem",
    "OverlayMachine",
    "Report",
    "Run",
    "Scenario",
    "Target",
    "check",
    "flatten",
    "layers",
    "operations",
    "run_scenario",
    "scenarios",
    "snapshot",
    "target",
]
