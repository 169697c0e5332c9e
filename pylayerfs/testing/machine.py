"""A hypothesis state machine over layered trees, for your own test suites.

Subclass :class:`OverlayMachine`, set ``subject`` (and ``reference``, the model
by default) to the implementations to compare, and expose its ``TestCase``::

    class MyFsMachine(OverlayMachine):
        subject = MountTarget("myfs", "myfs -o {options} {mountpoint}")

    TestMyFs = MyFsMachine.TestCase

Hypothesis then starts from random lower layers, applies random operations
(drawn from ``families``, aimed at the paths the tree holds), compares after
each one, and checks the lowers, persistence and interop at teardown.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from pylayerfs.testing.lowers import Node, layers
from pylayerfs.testing.model import features
from pylayerfs.testing.ops import FAMILIES
from pylayerfs.testing.run import Run
from pylayerfs.testing.strategies import operations
from pylayerfs.testing.targets import EngineTarget, ModelTarget, Target


class OverlayMachine(RuleBasedStateMachine):
    subject: Target = EngineTarget()
    reference: Target = ModelTarget()
    families: Sequence[str] = FAMILIES
    base: str | None = None  # where the layers are built (a temporary directory by default)
    mount_options: str = ""  # what both sides mount with besides their directories, e.g. "redirect_dir=on"

    def __init__(self) -> None:
        super().__init__()
        self.run: Run | None = None

    @initialize(lowers=layers())
    def start(self, lowers: list[dict[str, Node]]) -> None:
        self.run = Run(lowers, self.subject, self.reference, self.base, mount_options=self.mount_options)

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        assert self.run is not None
        run = self.run
        moves_dirs = features(self.mount_options).moves_dirs
        drawn = operations(self.families, run.paths, run.fresh, run.dirs, run.lacking, run.held, moves_dirs)
        self.run.step(data.draw(drawn))

    def teardown(self) -> None:
        if self.run is not None:
            with self.run:
                self.run.finish()
