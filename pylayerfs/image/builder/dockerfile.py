"""Parsing a Dockerfile: parser directives, comments, continuations, instructions with their flags.

The result keeps what the classic builder prints and records: each
instruction's source line (continuations joined, trimmed, case kept) for the
``Step N/M :`` lines, its line number for errors, its ``--flags``, and, for
instructions written in exec form, the JSON array.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
SUPPORTED = INSTRUCTIONS - {"ONBUILD", "HEALTHCHECK", "MAINTAINER"}
EXEC_FORM = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"}
# The flags each instruction's parser knows (moby 20.10, vendored buildkit instructions/parse.go); RUN --mount and
# COPY/ADD --chmod parse, then the classic builder refuses them at their step.
FLAGS = {
    "FROM": {"platform"}, "COPY": {"chown", "from", "chmod"}, "ADD": {"chown", "chmod"}, "RUN": {"mount"},
    "HEALTHCHECK": {"interval", "timeout", "start-period", "retries"},
}  # fmt: skip
ONE_ARGUMENT = {"WORKDIR", "USER", "MAINTAINER", "STOPSIGNAL"}  # the whole text is the argument
AT_LEAST_ONE = {"ENV", "LABEL", "ARG", "EXPOSE", "VOLUME", "SHELL", "ONBUILD", "HEALTHCHECK"}
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_STAGE_NAME = re.compile(r"[a-z][a-z0-9-_.]*")


class DockerfileError(Exception):
    """A Dockerfile the classic builder refuses, in its words.

    With ``line`` (the errors of one instruction) the text is ``dockerfile parse error line 2: unknown instruction:
    FOO``; the line parser's own errors are ``failed to parse Dockerfile: ...``; a few have no prefix (``no build stage
    in current context``). Source: moby 20.10 builder/dockerfile/builder.go, buildkit instructions/parse.go.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"dockerfile parse error line {line}: {message}" if line else message)
        self.line = line


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
    warnings: list[str] = field(default_factory=list)  # the parser's, printed before the steps


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Parse a whole Dockerfile (``path``: its name as the builder names it); DockerfileError names the first
    problem, as the classic builder does before running any step."""
    if not text:
        raise DockerfileError(f"the Dockerfile ({path}) cannot be empty")
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
                raise DockerfileError(
                    f"failed to parse Dockerfile: invalid escape token '{value}' does not match ` or \\"
                )
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
        empty_line = False
        while True:
            line = lines[n].rstrip()
            n += 1
            if line.endswith(escape):
                parts.append(line[: -len(escape)])
                while n < len(lines) and (not lines[n].strip() or lines[n].strip().startswith("#")):
                    empty_line = empty_line or not lines[n].strip()  # a comment line is no empty line
                    n += 1  # comments and empty lines inside a continuation are dropped
                if n < len(lines):
                    continue
            else:
                parts.append(lines[n - 1])
            break
        if empty_line:  # moby's parser warns (with the text as joined, trailing blanks kept)
            dockerfile.warnings.append(f"[WARNING]: Empty continuation line found in:\n    {''.join(parts).lstrip()}")
        dockerfile.instructions.append(_instruction("".join(parts).strip(), start + 1))
    if not dockerfile.instructions:
        raise DockerfileError("failed to parse Dockerfile: file with no instructions")
    first = next((i for i in dockerfile.instructions if i.keyword != "ARG"), None)
    if first is not None and first.keyword != "FROM":
        raise DockerfileError("no build stage in current context")
    if dockerfile.warnings:
        dockerfile.warnings.append("[WARNING]: Empty continuation lines will become errors in a future release.")
    return dockerfile


def _json_list(rest: str) -> list[str] | None:
    """The exec form's array, or None when ``rest`` is no JSON array (then it is the shell form)."""
    if not rest.startswith("["):
        return None
    try:
        parsed = json.loads(rest)
    except ValueError:
        return None
    if not isinstance(parsed, list):
        return None
    if not all(isinstance(v, str) for v in parsed):
        raise DockerfileError("failed to parse Dockerfile: when using JSON array syntax, arrays must be comprised "
                              "of strings only")  # fmt: skip
    return parsed


def _instruction(source: str, line: int) -> Instruction:
    word, _, rest = source.partition(" ")
    keyword = word.upper()
    rest = rest.strip()
    if keyword not in INSTRUCTIONS:
        raise DockerfileError(f"unknown instruction: {keyword}", line)
    words = rest.split()
    flag_words = list(itertools.takewhile(lambda w: w.startswith("--"), words))
    if flag_words:
        rest = rest.split(None, len(flag_words))[len(flag_words)] if len(words) > len(flag_words) else ""
    exec_form = _json_list(rest) if keyword in EXEC_FORM else None
    _check_arguments(keyword, rest, exec_form, line)
    flags: dict[str, str] = {}
    for flag in flag_words:
        if flag == "--":
            break
        name, eq, value = flag[2:].partition("=")
        if name not in FLAGS.get(keyword, set()):
            raise DockerfileError(f"Unknown flag: {name}", line)
        if name in flags:
            raise DockerfileError(f"Duplicate flag specified: {name}", line)
        if not eq:
            raise DockerfileError(f"Missing a value on flag: {name}", line)
        flags[name] = value
    return Instruction(keyword, rest, line, source, flags, exec_form)


def _check_arguments(keyword: str, rest: str, exec_form: list[str] | None, line: int) -> None:
    """The argument errors of moby's instruction parsers (buildkit instructions/parse.go, parser/line_parsers.go)."""
    words = exec_form if exec_form is not None else rest.split()
    if keyword in ONE_ARGUMENT and not rest:
        raise DockerfileError(f"{keyword} requires exactly one argument", line)
    if keyword in AT_LEAST_ONE and not words:
        raise DockerfileError(f"{keyword} requires at least one argument", line)
    if keyword in ("COPY", "ADD") and len(words) < 2:
        raise DockerfileError(f"{keyword} requires at least two arguments, but only one was provided. "
                              "Destination could not be determined", line)  # fmt: skip
    if keyword == "FROM":
        if len(words) == 3 and words[1].lower() == "as":
            if not _STAGE_NAME.fullmatch(words[2].lower()):
                raise DockerfileError(f'invalid name for build stage: "{words[2]}", name can\'t start with a number '
                                      "or contain symbols", line)  # fmt: skip
        elif len(words) != 1:
            raise DockerfileError("FROM requires either one or three arguments", line)
    elif keyword in ("ENV", "LABEL"):
        try:
            pairs = key_values(rest, keyword)
        except ValueError as exc:
            raise DockerfileError(f"failed to parse Dockerfile: {exc}") from exc
        if any(not key for key, _ in pairs):
            raise DockerfileError(f"{keyword} names can not be blank", line)
    elif keyword == "ARG" and any(w.startswith("=") for w in words):
        raise DockerfileError("ARG names can not be blank", line)
    elif keyword == "SHELL" and exec_form is None:
        raise DockerfileError("SHELL requires the arguments to be in JSON form", line)
    elif keyword == "VOLUME" and any(not v.strip() for v in words):
        raise DockerfileError("VOLUME specified can not be an empty string", line)
    elif keyword == "ONBUILD":
        trigger = words[0].upper()
        if trigger == "ONBUILD":
            raise DockerfileError("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed", line)
        if trigger in ("MAINTAINER", "FROM"):
            raise DockerfileError(f"{trigger} isn't allowed as an ONBUILD trigger", line)
    elif keyword == "HEALTHCHECK":
        kind = words[0].upper()
        if kind == "NONE" and words[1:]:
            raise DockerfileError("HEALTHCHECK NONE takes no arguments", line)
        if kind == "CMD" and not words[1:]:
            raise DockerfileError("Missing command after HEALTHCHECK CMD", line)
        if kind not in ("NONE", "CMD"):
            raise DockerfileError(f'Unknown type "{kind}" in HEALTHCHECK (try CMD)', line)


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
    """The pairs of ENV/LABEL: ``K=V K2="v 2"``, or the legacy ``K value with spaces``; ValueError in the words of
    moby's line parser (``parseNameVal``)."""
    words = split_words(text)
    if words and "=" not in words[0]:
        if len(words) < 2:
            raise ValueError(f"{keyword} must have two arguments")
        return [(words[0], text.strip()[len(text.strip().split(None, 1)[0]) :].strip())]
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise ValueError(f'Syntax error - can\'t find = in "{word}". Must be of the form: name=value')
        pairs.append((key, value))
    return pairs


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, variables: dict[str, str], escape: str = "\\") -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alternative}``; an escaped ``$`` stays.

    A ``${`` that is none of these raises ValueError as moby's shell lexer (shell/lex.go, processDollar) with the word
    it was in: ``failed to process "${B": missing ':' in substitution``.
    """
    out = []
    i = 0
    while i < len(text):
        if text[i] == escape and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        match = _VAR.match(text, i) if text[i] == "$" else None
        if match is None and text.startswith("${", i):
            i = _odd_braces(text, i)  # ${1}: nothing; else ValueError in moby's words
            continue
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


def _odd_braces(text: str, i: int) -> int:
    """Where to go on after the ``${`` at ``i`` that :data:`_VAR` did not take; ValueError for a bad one."""
    j = i + 2
    while j < len(text) and (text[j].isalnum() or text[j] == "_"):
        j += 1
    if j < len(text) and text[j] == "}":
        return j + 1  # a name moby takes and pylayerfs has no value for (${1}): empty
    if j < len(text) and text[j] == ":":
        modifier = text[j + 1 : j + 2]
        message = (
            f"unsupported modifier ({modifier}) in substitution"
            if "}" in text[j + 2 :]
            else "syntax error: missing '}'"
        )
    else:
        message = "missing ':' in substitution"
    start, end = text.rfind(" ", 0, i) + 1, text.find(" ", i)
    word = text[start:] if end < 0 else text[start:end]
    if "=" in text[start:i]:  # ENV/LABEL/ARG: the value is the word
        word = word[word.index("=") + 1 :]
    raise ValueError(f'failed to process "{word}": {message}')
