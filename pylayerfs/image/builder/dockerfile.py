"""Parsing a Dockerfile: parser directives, comments, continuations, instructions with their flags.

The result keeps what the classic builder prints and records: each
instruction's source line (continuations joined, trimmed, case kept) for the
``Step N/M :`` lines, its line number for errors, its ``--flags``, and, for
instructions written in exec form, the JSON array.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
SUPPORTED = INSTRUCTIONS - {"ONBUILD", "HEALTHCHECK", "STOPSIGNAL", "MAINTAINER"}
EXEC_FORM = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"}
FLAGS = {"FROM": {"platform"}, "COPY": {"chown", "from", "chmod"}, "ADD": {"chown", "chmod"}, "RUN": set()}
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")


class DockerfileError(Exception):
    """What is wrong, with the file and line: ``Dockerfile:3: unknown instruction: FOO``."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the text after the keyword and the flags
    line: int
    source: str  # the instruction as written, continuations joined (the Step line)
    flags: dict[str, str] = field(default_factory=dict)
    exec_form: list[str] | None = None  # the JSON array of the exec form


@dataclass
class Dockerfile:
    path: str
    instructions: list[Instruction]
    escape: str = "\\"

    def error(self, line: int, message: str) -> DockerfileError:
        return DockerfileError(f"{self.path}:{line}: {message}")


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile; DockerfileError names the first problem."""
    lines = text.splitlines()
    escape = "\\"
    n = 0
    seen: set[str] = set()
    while n < len(lines):  # parser directives: only at the very top
        match = _DIRECTIVE.match(lines[n])
        if not match or match.group(1).lower() in seen:
            break
        name, value = match.group(1).lower(), match.group(2)
        seen.add(name)
        if name == "escape":
            if value not in ("\\", "`"):
                raise DockerfileError(f"{path}:{n + 1}: invalid escape token '{value}' does not validate")
            escape = value
        n += 1
    dockerfile = Dockerfile(path, [], escape)
    while n < len(lines):
        stripped = lines[n].strip()
        if not stripped or stripped.startswith("#"):
            n += 1
            continue
        start = n
        parts = []
        while True:
            line = lines[n].rstrip()
            n += 1
            if line.endswith(escape):
                parts.append(line[: -len(escape)])
                while n < len(lines) and (not lines[n].strip() or lines[n].strip().startswith("#")):
                    n += 1  # comments and empty lines inside a continuation are dropped
                if n < len(lines):
                    continue
            else:
                parts.append(line)
            break
        dockerfile.instructions.append(_instruction(dockerfile, "".join(parts).strip(), start + 1))
    if not dockerfile.instructions:
        raise DockerfileError(f"{path}: the Dockerfile has no instructions")
    first = next((i for i in dockerfile.instructions if i.keyword != "ARG"), None)
    if first is None or first.keyword != "FROM":
        at = first.line if first else dockerfile.instructions[-1].line
        raise dockerfile.error(at, "the first instruction (after ARGs) must be FROM")
    return dockerfile


def _instruction(dockerfile: Dockerfile, source: str, line: int) -> Instruction:
    word, _, rest = source.partition(" ")
    keyword = word.upper()
    rest = rest.strip()
    if keyword not in INSTRUCTIONS:
        raise dockerfile.error(line, f"unknown instruction: {word}")
    if keyword not in SUPPORTED:
        raise dockerfile.error(line, f"{keyword} is not supported by pylayerfs")
    flags: dict[str, str] = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        rest = rest.strip()
        name, eq, value = flag[2:].partition("=")
        if name not in FLAGS.get(keyword, set()):
            raise dockerfile.error(line, f"unknown flag for {keyword}: --{name}")
        if not eq or not value:
            raise dockerfile.error(line, f"--{name} needs a value (--{name}=VALUE)")
        flags[name] = value
    if not rest:
        raise dockerfile.error(line, f"{keyword} requires at least one argument")
    exec_form = None
    if keyword in EXEC_FORM and rest.startswith("["):
        parsed: object = None
        with contextlib.suppress(ValueError):
            parsed = json.loads(rest)
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            exec_form = parsed
        elif keyword in ("SHELL", "COPY", "ADD") or (keyword == "VOLUME" and parsed is not None):
            raise dockerfile.error(line, f"{keyword}: the JSON array is not valid: {rest}")
    if keyword == "SHELL" and exec_form is None:
        raise dockerfile.error(line, "SHELL requires the arguments to be in JSON form")
    if keyword in ("COPY", "ADD") and len(exec_form if exec_form is not None else split_words(rest)) < 2:
        raise dockerfile.error(line, f"{keyword} requires at least two arguments: source(s) and destination")
    return Instruction(keyword, rest, line, source, flags, exec_form)


def split_words(text: str) -> list[str]:
    """Words separated by whitespace, with "double" and 'single' quotes kept together (quotes removed)."""
    words: list[str] = []
    current: list[str] = []
    quote = ""
    pending = False
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"' and i + 1 < len(text):
                i += 1
                current.append(text[i])
            else:
                current.append(c)
        elif c in "\"'":
            quote = c
            pending = True
        elif c == "\\" and i + 1 < len(text):
            i += 1
            current.append(text[i])
        elif c.isspace():
            if current or pending:
                words.append("".join(current))
                current, pending = [], False
        else:
            current.append(c)
        i += 1
    if quote:
        raise ValueError(f"unmatched quote in: {text}")
    if current or pending:
        words.append("".join(current))
    return words


def key_values(text: str, keyword: str) -> list[tuple[str, str]]:
    """The pairs of ENV/LABEL: ``K=V K2="v 2"``, or the legacy ``K value with spaces``."""
    words = split_words(text)
    if words and "=" not in words[0]:
        if keyword == "LABEL" or len(words) < 2:
            raise ValueError(f"{keyword} names must be followed by = and a value")
        return [(words[0], text.strip()[len(text.strip().split(None, 1)[0]) :].strip())]
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ValueError(f"{keyword} expects KEY=VALUE, not '{word}'")
        pairs.append((key, value))
    return pairs


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, variables: dict[str, str], escape: str = "\\") -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alternative}``; an escaped ``$`` stays."""
    out = []
    i = 0
    while i < len(text):
        if text[i] == escape and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        match = _VAR.match(text, i) if text[i] == "$" else None
        if match is None:
            out.append(text[i])
            i += 1
            continue
        name = match.group(1) or match.group(4)
        value = variables.get(name)
        if match.group(2) == ":-":
            value = value if value else match.group(3)
        elif match.group(2) == ":+":
            value = match.group(3) if value else ""
        out.append(value or "")
        i = match.end()
    return "".join(out)
