"""``--format`` as docker/cli takes it: ``table``, ``json`` (pylayerfs's short word for ``{{json .}}``), or a template.

Templates are the part of Go's text/template that Docker's users write for these commands: ``{{.Field}}``,
``{{json .}}`` and ``{{json .Field}}``, with ``\\t`` and ``\\n`` written as two characters (docker/cli's
``formatter.Context.preFormat``), and a ``table`` prefix that adds the header row and aligns the columns with
Go's tabwriter (:func:`pylayerfs.dockercli.render`). Anything else in ``{{ }}`` is refused (StoreError), as is
an unknown field (Docker: "can't evaluate field").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pylayerfs.dockercli import render
from pylayerfs.image.store import StoreError

_ACTION = re.compile(r"{{-?\s*(.*?)\s*-?}}")
_FIELD = re.compile(r"^(json\s+)?\.(\w*)$")


def go_json(value: Any, escape_html: bool = True) -> str:
    """Go's ``json.Marshal``: compact, map keys sorted, ``<``, ``>``, ``&`` escaped (with ``escape_html``), other
    characters as they are."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")) if escape_html else ():
        text = text.replace(char, escaped)
    return text


def execute(template: str, row: Mapping[str, str], header: bool = False) -> str:
    """One row through the template; StoreError for what this subset does not know.

    docker/cli's ``json``: the row (``{{json .}}``) as Go marshals a map, HTML-escaped; a field as its encoder
    writes it, not escaped; in the ``header`` row, the column title as it is (``templates.HeaderFunctions``).
    """

    def action(match: re.Match[str]) -> str:
        found = _FIELD.match(match.group(1))
        if found is None:
            raise StoreError(f"template: unsupported action {match.group(0)!r} (pylayerfs knows {{{{.Field}}}}, "
                             "{{json .}} and {{json .Field}})")  # fmt: skip
        name = found.group(2)
        if name and name not in row:
            raise StoreError(f"template: can't evaluate field {name} (fields: {', '.join(sorted(row))})")
        value: Any = row[name] if name else dict(row)
        return go_json(value, not name) if found.group(1) and not header else str(value)

    return _ACTION.sub(action, template)


def write(fmt: str, headers: Mapping[str, str], rows: Sequence[Mapping[str, str]], default: Sequence[str]) -> str:
    """The rows as ``--format fmt`` prints them (lines joined, no final newline).

    ``headers`` maps each field to its column title; ``default`` is the fields of the plain ``table``.
    """
    if fmt in ("", "table"):
        fmt = "table " + "\\t".join(f"{{{{.{f}}}}}" for f in default)
    elif fmt == "json":
        fmt = "{{json .}}"
    table = fmt.startswith("table")
    template = fmt.removeprefix("table").strip(" ").replace("\\t", "\t").replace("\\n", "\n")
    lines = [execute(template, row) for row in rows]
    if not table:
        return "\n".join(lines)
    cells = [line.split("\t") for line in "\n".join([execute(template, headers, header=True), *lines]).split("\n")]
    return render(cells[0], cells[1:])
