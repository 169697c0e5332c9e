"""The house rule on docstrings, checked on the source: the engine and the store document their public API.

Every public module, class, function and method (a name not starting with ``_``; properties included)
in ``pylayerfs/overlay`` and ``pylayerfs/image/store`` has a docstring saying what it returns (shapes,
units) and which errno it raises. This test reads the source with ``ast`` and fails listing every one
without a docstring, so that the rule stays true as code is added; what a docstring says is for review.
Functions nested in functions and the members of private classes are not part of the API and are not
checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pylayerfs"
DOCUMENTED = [PACKAGE / "overlay", PACKAGE / "image" / "store"]

_Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _public_definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, _Definition]]:
    """``(dotted name, node)`` of each public class, function and method in ``body``, classes recursed into."""
    for node in body:
        if isinstance(node, _Definition) and not node.name.startswith("_"):
            name = f"{prefix}{node.name}"
            yield name, node
            if isinstance(node, ast.ClassDef):
                yield from _public_definitions(node.body, f"{name}.")


def undocumented(source: str, where: str) -> list[str]:
    """``where:line name`` of every public definition in ``source`` (a module) without a docstring."""
    tree = ast.parse(source, where)
    missing = [f"{where}:1 (module)"] if ast.get_docstring(tree) is None else []
    for name, node in _public_definitions(tree.body, ""):
        if ast.get_docstring(node) is None:
            missing.append(f"{where}:{node.lineno} {name}")
    return missing


def test_the_rooms_exist() -> None:
    for room in DOCUMENTED:
        assert sorted(room.glob("*.py")), f"{room} has no module: update DOCUMENTED"


def test_public_definitions_have_docstrings() -> None:
    paths = [path for room in DOCUMENTED for path in sorted(room.glob("*.py"))]
    missing = [line for path in paths for line in undocumented(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_docstring() -> None:
    """The walk reports undocumented modules, functions, methods and properties; skips private and nested ones."""
    source = '''
class Public:
    """Documented."""

    @property
    def size(self) -> int:
        return 0

    def _private(self) -> None:
        pass


class _Private:
    def method(self) -> None:
        pass


def function() -> None:
    def nested() -> None:
        pass
'''
    assert undocumented(source, "m.py") == ["m.py:1 (module)", "m.py:6 Public.size", "m.py:18 function"]
