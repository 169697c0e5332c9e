"""``pylayerfs check``: hypothesis searches for a scenario where an implementation diverges, then shrinks it."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import DeadlineExceeded

from pylayerfs.testing.lowers import Node, layers
from pylayerfs.testing.model import features
from pylayerfs.testing.ops import FAMILIES, Op
from pylayerfs.testing.run import Divergence, Run
from pylayerfs.testing.strategies import Scenario, operations
from pylayerfs.testing.targets import Target, TargetError


@dataclass(frozen=True)
class Options:
    examples: int = 100
    seed: int = 0
    deadline_ms: float | None = None  # per example; None: no limit
    families: Sequence[str] = tuple(FAMILIES)
    max_layers: int = 3
    max_steps: int = 12
    realistic: bool = True  # lowers only as a runtime writes them (see lowers.realistic)
    skip: Sequence[str] = ()  # checks not to make (run.OPTIONAL_CHECKS)
    mount_options: str = ""  # every implementation mounts with them, e.g. "redirect_dir=on" (the model reads them)
    shrink: bool = True
    base: str | None = None  # where scenarios build their directories


@dataclass
class Report:
    """What checking one implementation against its reference found."""

    subject: str
    reference: str
    options: Options
    examples_run: int = 0
    seconds: float = 0.0
    divergence: Divergence | None = None
    scenario: Scenario | None = None
    error: str | None = None  # the check could not run (a mount failed, ...)
    unchecked: set[str] = field(default_factory=set)  # what was left out because a side does not support it

    @property
    def passed(self) -> bool:
        return self.divergence is None and self.error is None


def run_scenario(
    scenario: Scenario, subject: Target, reference: Target, base: str | None = None, mount_options: str = ""
) -> None:
    """Run one scenario; raises :class:`Divergence` (with its scenario attached) on the first difference."""
    try:
        with Run(scenario.lowers, subject, reference, base, mount_options=mount_options) as run:
            for op in scenario.ops:
                run.step(op)
            run.finish()
    except Divergence as divergence:
        divergence.scenario = scenario
        raise


def check(subject: Target, reference: Target, options: Options) -> Report:
    report = Report(subject.name, reference.name, options)
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if options.shrink else [])
    try:
        moves_dirs = features(options.mount_options).moves_dirs
    except ValueError as exc:
        report.error = f"-o {options.mount_options}: {exc}"
        return report

    @settings(
        max_examples=options.examples,
        deadline=options.deadline_ms,
        database=None,
        phases=phases,
        report_multiple_bugs=False,
        verbosity=Verbosity.verbose if os.environ.get("PYLAYERFS_CHECK_VERBOSE") else Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
    )
    @seed(options.seed)
    @given(layers(options.max_layers, only_realistic=options.realistic), st.data())
    def search(lowers: list[dict[str, Node]], data: st.DataObject) -> None:
        report.examples_run += 1
        done: list[Op] = []
        try:
            with Run(lowers, subject, reference, options.base, options.skip, options.mount_options) as run:
                report.unchecked.update(run.lacking.values())
                for _ in range(data.draw(st.integers(1, options.max_steps), label="steps")):
                    drawn = operations(options.families, run.paths, run.fresh, run.dirs, run.lacking, run.held,
                                       moves_dirs)  # fmt: skip
                    done.append(data.draw(drawn))
                    run.step(done[-1])
                run.finish()
        except Divergence as divergence:
            divergence.scenario = Scenario(lowers, done)
            raise

    start = time.monotonic()
    try:
        search()
    except Divergence as divergence:
        report.divergence = divergence
        report.scenario = divergence.scenario
    except TargetError as exc:  # an implementation cannot run (it refuses the mount options, ...): one line
        report.error = str(exc)
    except DeadlineExceeded as exc:
        report.error = (
            f"a scenario took {exc.runtime.total_seconds() * 1000:.0f} ms, more than --deadline {options.deadline_ms:g}"
        )
    except Exception as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    report.seconds = time.monotonic() - start
    return report
