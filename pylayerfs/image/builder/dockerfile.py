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
    escape: str = "\\"  # the escape directive's token


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
        dockerfile.instructions.append(_instruction("".join(parts).strip(), start + 1, escape))
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


def _instruction(source: str, line: int, escape: str = "\\") -> Instruction:
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
    _check_arguments(keyword, rest, exec_form, line, escape)
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
    return Instruction(keyword, rest, line, source, flags, exec_form, escape)


def _check_arguments(keyword: str, rest: str, exec_form: list[str] | None, line: int, escape: str) -> None:
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
            pairs = key_values(rest, keyword, escape)
        except ValueError as exc:
            raise DockerfileError(f"failed to parse Dockerfile: {exc}") from exc
        if any(not key for key, _ in pairs):
            raise DockerfileError(f"{keyword} names can not be blank", line)
    elif keyword == "ARG" and any(w.startswith("=") for w in parse_words(rest, escape)):
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


def parse_words(text: str, escape: str = "\\") -> list[str]:
    """The words of ENV, LABEL and ARG as moby's line parser splits them (parser/line_parsers.go, parseWords):
    separated by unquoted whitespace, with the quotes and escapes kept for :func:`process_word`."""
    words: list[str] = []
    word: list[str] = []
    quote = ""
    blank_ok = False  # a word that had quotes is a word even when empty
    i = 0
    while i < len(text):
        c = text[i]
        if not quote and c.isspace():
            if word or blank_ok:
                words.append("".join(word))
            word, blank_ok = [], False
        elif c == escape and (not quote or quote == '"'):
            word.append(text[i : i + 2])  # an escape at the very end is dropped
            i += 1
        else:
            if quote and c == quote:
                quote = ""
            elif not quote and c in "\"'":
                quote, blank_ok = c, True
            word.append(c)
        i += 1
    if word or blank_ok:
        words.append("".join(word))
    return words


def key_values(text: str, keyword: str, escape: str = "\\") -> list[tuple[str, str]]:
    """The pairs of ENV/LABEL as written (quotes kept): ``K=V K2="v 2"``, or the legacy ``K value with spaces``;
    ValueError in the words of moby's line parser (``parseNameVal``)."""
    words = parse_words(text, escape)
    if words and "=" not in words[0]:
        parts = text.strip().split(None, 1)
        if len(parts) < 2:
            raise ValueError(f"{keyword} must have two arguments")
        return [(parts[0], parts[1])]
    pairs = []
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise ValueError(f'Syntax error - can\'t find = in "{word}". Must be of the form: name=value')
        pairs.append((key, value))
    return pairs


def process_word(word: str, variables: dict[str, str], escape: str = "\\") -> str:
    """One word as moby's shell lexer gives it (shell/lex.go, ProcessWord): 'single quotes' literal, "double
    quotes" with ``$`` expanded and ``\\"``, ``\\$``, ``\\\\`` escaped, an escape outside quotes taking the next
    character as it is; ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alternative}``,
    ``${VAR:?message}``; unset is empty, as are the special parameters (``$@``, ``$#``, ``$$``...).

    ValueError in moby's words with the word: ``failed to process "${B": missing ':' in substitution``.
    """
    return _Lexer(word, variables, escape).process()[0]


def process_words(word: str, variables: dict[str, str], escape: str = "\\") -> list[str]:
    """The words ``word`` gives (shell/lex.go, ProcessWords): split at unquoted whitespace, also in values."""
    return _Lexer(word, variables, escape).process()[1]


class _Lexer:
    """moby 20.10's shellWord (vendored buildkit frontend/dockerfile/shell/lex.go), followed step by step."""

    def __init__(self, word: str, variables: dict[str, str], escape: str) -> None:
        self.text, self.variables, self.escape, self.i = word, variables, escape, 0
        self.words: list[str] = []
        self.word: list[str] = []
        self.in_word = False

    def process(self) -> tuple[str, list[str]]:
        try:
            result = self._until("")
        except ValueError as exc:
            raise ValueError(f"failed to process {json.dumps(self.text, ensure_ascii=False)}: {exc}") from None
        if self.word:
            self.words.append("".join(self.word))
        return result, self.words

    def _peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def _next(self) -> str:
        c = self._peek()
        self.i += 1 if c else 0
        return c

    def _add(self, text: str, raw: bool) -> None:
        """wordsStruct: raw text (quoted, escaped) never splits; other text splits at whitespace."""
        for c in text:
            if raw or not c.isspace():
                self.word.append(c)
                self.in_word = True
            elif self.in_word:
                self.words.append("".join(self.word))
                self.word, self.in_word = [], False
        self.in_word = self.in_word or raw

    def _until(self, stop: str) -> str:
        """processStopOn: the text up to ``stop`` (taken; "" for the end); at the top level, also the words."""
        out: list[str] = []
        while self._peek():
            c = self._peek()
            if stop and c == stop:
                self._next()
                return "".join(out)
            if c in "$'\"":
                text = self._dollar() if c == "$" else self._single() if c == "'" else self._double()
                raw = c != "$"
            else:
                text = self._next()
                raw = text == self.escape
                if raw:
                    text = self._next()
                    if not text:
                        break
            if not stop:
                self._add(text, raw)
            out.append(text)
        if stop:
            raise ValueError(f"unexpected end of statement while looking for matching {stop}")
        return "".join(out)

    def _single(self) -> str:
        self._next()
        end = self.text.find("'", self.i)
        if end < 0:
            raise ValueError("unexpected end of statement while looking for matching single-quote")
        text, self.i = self.text[self.i : end], end + 1
        return text

    def _double(self) -> str:
        self._next()
        out: list[str] = []
        while True:
            c = self._peek()
            if not c:
                raise ValueError("unexpected end of statement while looking for matching double-quote")
            if c == '"':
                self._next()
                return "".join(out)
            if c == "$":
                out.append(self._dollar())
                continue
            c = self._next()
            if c == self.escape:
                if not self._peek():
                    continue  # an escape at the end of the word is dropped
                if self._peek() in ('"', "$", self.escape):
                    c = self._next()
            out.append(c)

    def _name(self) -> str:
        start = self.i
        if self._peek() and self._peek() in "@*#?-$!":  # a special parameter: one character (Docker: unset)
            return self._next()
        if self._peek().isdigit():
            while self._peek().isdigit():
                self._next()
            return self.text[start : self.i]
        while self._peek() and (self._peek().isalnum() or self._peek() == "_"):
            self._next()
        return self.text[start : self.i]

    def _dollar(self) -> str:
        self._next()
        if self._peek() != "{":
            name = self._name()
            return self.variables.get(name, "") if name else "$"
        self._next()
        if not self._peek():
            raise ValueError("syntax error: missing '}'")
        if self._peek() in "{}:":
            raise ValueError("syntax error: bad substitution")
        name = self._name()
        c = self._next()
        if c == "}":
            return self.variables.get(name, "")
        if c != ":":
            raise ValueError("missing ':' in substitution")
        modifier = self._next()
        try:
            word = self._until("}")
        except ValueError:
            if not self._peek():
                raise ValueError("syntax error: missing '}'") from None
            raise
        value = self.variables.get(name, "")
        if modifier == "+":
            return word if value else ""
        if modifier == "-":
            return value or word
        if modifier == "?":
            if not value:
                raise ValueError(f"{name}: {word or 'is not allowed to be unset'}")
            return value
        raise ValueError(f"unsupported modifier ({modifier}) in substitution")
