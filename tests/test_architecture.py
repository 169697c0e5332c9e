"""The package's dependency rule (docs/architecture.md), checked on the source: imports run one way.

Every ``import`` and ``from ... import`` of the package is read with ``ast``: at module level, inside
functions and under ``TYPE_CHECKING`` alike, since each is a dependency. The rule:

* the subpackages are ranked ``overlay`` < ``fuse`` < ``image`` < ``container`` < ``teaching``,
  ``testing``, ``bench`` < ``cli``; a module imports only from its own subpackage and lower ranks
  (the three tools of rank 4 do not import one another);
* only the FUSE side imports a FUSE binding (``mfusepy``);
* no module imports itself back through others: the module graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pylayerfs"
RANKS = {
    "": 0,  # pylayerfs/__init__.py: the version
    "dockercli": 0,  # docker/cli's tables and units: a leaf
    "overlay": 0,
    "fuse": 1,
    "image": 2,
    "container": 3,
    "teaching": 4,
    "testing": 4,
    "bench": 4,
    "cli": 5,
    "__main__": 6,  # python -m pylayerfs: the command line
}
BINDINGS = {"mfusepy", "fuse", "fusepy", "pyfuse3", "llfuse"}
BINDING_USERS = {"pylayerfs.fuse.adapter"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules (and third-party top-level names) ``name`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import module` imports the module
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in known else module)
    return {m for m in found if m.startswith("pylayerfs") or m.split(".")[0] in BINDINGS}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: {m for m in _imports(name, path, known) if m != name} for name, path in modules.items()}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _may_import(area: str, target: str) -> bool:
    """Its own subpackage, a lower rank, or the package root (the version)."""
    return target in (area, "") or RANKS[target] < RANKS[area]


GRAPH = _graph()


def test_every_module_is_in_a_ranked_area() -> None:
    assert {_area(m) for m in GRAPH} <= set(RANKS), "a new subpackage needs a rank here and in docs/architecture.md"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_one_way(module: str) -> None:
    area = _area(module)
    upward = [t for t in GRAPH[module] if t.startswith("pylayerfs") and not _may_import(area, _area(t))]
    assert not upward, f"{module} imports {upward}: against the dependency rule (docs/architecture.md)"


def test_only_the_fuse_side_imports_a_binding() -> None:
    users = {m for m, targets in GRAPH.items() if any(t.split(".")[0] in BINDINGS for t in targets)}
    assert users <= BINDING_USERS, f"{sorted(users - BINDING_USERS)} import a FUSE binding"


def test_the_engine_imports_nothing_above_it() -> None:
    for module, targets in GRAPH.items():
        if _area(module) == "overlay":
            outside = {t for t in targets if t.startswith("pylayerfs") and _area(t) not in ("overlay", "")}
            assert not outside, f"{module} imports {outside}"


def test_no_import_cycle() -> None:
    internal = {m: {t for t in targets if t in GRAPH} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(internal[module]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(internal):
        if module not in state:
            visit(module)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walk finds function-local and TYPE_CHECKING imports, relative ones included."""
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..cli import main\n"
        "def f():\n    from pylayerfs.image import archive\n"
    )
    known = {"pylayerfs.cli.main", "pylayerfs.image.archive"}
    assert _imports("pylayerfs.overlay.m", module, known) == known
