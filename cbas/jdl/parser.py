"""JDL text -> JobDescription. Pure: no file access; errors carry line and column.

Grammar (the original system's JDL, ClassAd-like):
    file      := ['['] { KEY '=' value [';'] } [']']
    value     := STRING | NUMBER | WORD | '{' [ item { ',' item } [','] ] '}'
    item      := value | KEY '=' value          (the second form only in Environment)
Comments run from '#' or '//' to the end of the line, or between '/*' and '*/'.
Keys are case-insensitive, as in the original.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from cbas.jdl.errors import JDLError
from cbas.jdl.model import JobDescription

# JDL key -> (field name, kind). Kinds decide which value shapes are accepted.
KEYS: dict[str, tuple[str, str]] = {
    "Executable": ("executable", "string"),
    "Arguments": ("arguments", "string"),
    "Name": ("name", "string"),
    "Prologue": ("prologue", "list"),
    "InputSandbox": ("input_sandbox", "list"),
    "OutputSandbox": ("output_sandbox", "list"),
    "CheckpointStrategy": ("checkpoint_strategy", "string"),
    "CheckpointInterval": ("checkpoint_interval", "integer"),
    "Deadline": ("deadline", "string"),
    "Runtime": ("runtime", "string"),
    "MaxPrice": ("max_price", "number"),
    "Market": ("market", "string"),
    "InstanceTypes": ("instance_types", "list"),
    "Environment": ("environment", "environment"),
    "ValidateCheckpoint": ("validate_checkpoint", "boolean"),
    "BuildImage": ("build_image", "boolean"),
    "VolumeSize": ("volume_size", "integer"),
    "CheckpointStorage": ("checkpoint_storage", "string"),
    "MaxProcesses": ("max_processes", "integer"),
    "MemoryLimit": ("memory_limit", "integer"),
    "DiskLimit": ("disk_limit", "integer"),
    "StateSizeLimit": ("state_size_limit", "integer"),
}
_BY_LOWER = {key.lower(): key for key in KEYS}
_FIELD_TO_KEY = {field: key for key, (field, _) in KEYS.items()}

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "0": "\0"}
_PUNCTUATION = "={},;[]"
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?![A-Za-z_])")


@dataclass(frozen=True)
class Token:
    kind: str  # 'word', 'string', 'number', one of _PUNCTUATION, or 'end'
    text: str
    value: Any
    line: int
    column: int

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the file"
        if self.kind == "string":
            return f"the string {self.text}"
        return f"{self.text!r}"


class _Lexer:
    def __init__(self, text: str, filename: str | None) -> None:
        self.text = text
        self.filename = filename
        self.pos = 0
        self.line = 1
        self.column = 1

    def error(self, message: str, line: int | None = None, column: int | None = None) -> JDLError:
        return JDLError(message, line or self.line, column or self.column, self.filename)

    def _advance(self, count: int = 1) -> None:
        for _ in range(count):
            if self.text[self.pos] == "\n":
                self.line += 1
                self.column = 1
            else:
                self.column += 1
            self.pos += 1

    def _skip_blanks_and_comments(self) -> None:
        text = self.text
        while self.pos < len(text):
            char = text[self.pos]
            if char.isspace():
                self._advance()
            elif char == "#" or text.startswith("//", self.pos):
                while self.pos < len(text) and text[self.pos] != "\n":
                    self._advance()
            elif text.startswith("/*", self.pos):
                line, column = self.line, self.column
                end = text.find("*/", self.pos + 2)
                if end < 0:
                    raise self.error("comment opened here is never closed with '*/'", line, column)
                self._advance(end + 2 - self.pos)
            else:
                return

    def tokens(self) -> list[Token]:
        out: list[Token] = []
        while True:
            self._skip_blanks_and_comments()
            if self.pos >= len(self.text):
                out.append(Token("end", "", None, self.line, self.column))
                return out
            out.append(self._next())

    def _next(self) -> Token:
        text, start, line, column = self.text, self.pos, self.line, self.column
        char = text[start]
        if char in _PUNCTUATION:
            self._advance()
            return Token(char, char, None, line, column)
        if char == '"':
            return self._string(line, column)
        number = _NUMBER.match(text, start)
        if number:
            raw = number.group(0)
            value: int | float = float(raw) if any(c in raw for c in ".eE") else int(raw)
            self._advance(len(raw))
            return Token("number", raw, value, line, column)
        if char.isalpha() or char == "_":
            end = start + 1
            while end < len(text) and (text[end].isalnum() or text[end] in "_.-"):
                end += 1
            self._advance(end - start)
            return Token("word", text[start:end], text[start:end], line, column)
        raise self.error(f"unexpected character {char!r}")

    def _string(self, line: int, column: int) -> Token:
        text = self.text
        self._advance()  # opening quote
        chars: list[str] = []
        while True:
            if self.pos >= len(text) or text[self.pos] == "\n":
                raise self.error("string opened here is never closed with '\"'", line, column)
            char = text[self.pos]
            if char == '"':
                self._advance()
                break
            if char == "\\":
                if self.pos + 1 >= len(text):
                    raise self.error("string ends in a lone backslash")
                escape = text[self.pos + 1]
                if escape not in _ESCAPES:
                    raise self.error(
                        f"unknown escape '\\{escape}' (known: \\n \\t \\r \\\" \\\\ \\0)"
                    )
                chars.append(_ESCAPES[escape])
                self._advance(2)
                continue
            chars.append(char)
            self._advance()
        value = "".join(chars)
        return Token("string", f'"{value}"', value, line, column)


class _Parser:
    def __init__(self, tokens: list[Token], filename: str | None) -> None:
        self.tokens = tokens
        self.filename = filename
        self.index = 0

    @property
    def current(self) -> Token:
        return self.tokens[self.index]

    def error(self, message: str, token: Token | None = None) -> JDLError:
        token = token or self.current
        return JDLError(message, token.line, token.column, self.filename)

    def take(self) -> Token:
        token = self.current
        if token.kind != "end":
            self.index += 1
        return token

    def expect(self, kind: str, what: str) -> Token:
        if self.current.kind != kind:
            raise self.error(f"expected {what}, found {self.current.describe()}")
        return self.take()

    def parse(self) -> dict[str, tuple[Any, Token]]:
        bracketed = self.current.kind == "["
        if bracketed:
            self.take()
        found: dict[str, tuple[Any, Token]] = {}
        while True:
            token = self.current
            if token.kind == "end" or (bracketed and token.kind == "]"):
                break
            if token.kind != "word":
                raise self.error(f"expected a key such as Executable, found {token.describe()}")
            key = self._known_key(token)
            self.take()
            self.expect("=", f"'=' after {key}")
            value_token = self.current
            value = self._value(allow_pairs=KEYS[key][1] == "environment")
            if key in found:
                raise self.error(f"{key} is given twice (first on line {found[key][1].line})", token)
            found[key] = (value, value_token)
            if self.current.kind == ";":
                self.take()
            elif self.current.kind not in ("word", "end", "]"):
                raise self.error(f"expected ';' or a new key after the value of {key}, found {self.current.describe()}")
        if bracketed:
            self.expect("]", "']' closing the '[' on line 1")
        if self.current.kind != "end":
            raise self.error(f"expected the end of the file, found {self.current.describe()}")
        return found

    def _known_key(self, token: Token) -> str:
        key = _BY_LOWER.get(token.text.lower())
        if key is None:
            near = difflib.get_close_matches(token.text.lower(), list(_BY_LOWER), n=1, cutoff=0.6)
            hint = f"; did you mean {_BY_LOWER[near[0]]}?" if near else f"; known keys: {', '.join(KEYS)}"
            raise self.error(f"unknown key {token.text!r}{hint}", token)
        return key

    def _value(self, allow_pairs: bool = False) -> Any:
        token = self.current
        if token.kind in ("string", "number", "word"):
            self.take()
            return token
        if token.kind == "{":
            self.take()
            items: list[Any] = []
            while self.current.kind != "}":
                if allow_pairs and self.current.kind == "word" and self.tokens[self.index + 1].kind == "=":
                    name = self.take()
                    self.take()
                    items.append((name, self._scalar()))
                else:
                    items.append(self._scalar())
                if self.current.kind == ",":
                    self.take()
                elif self.current.kind != "}":
                    raise self.error(f"expected ',' or '}}' in the list, found {self.current.describe()}")
            self.take()
            return items
        raise self.error(f"expected a value (a \"string\", a number or a {{list}}), found {token.describe()}")

    def _scalar(self) -> Token:
        token = self.current
        if token.kind in ("string", "number", "word"):
            return self.take()
        raise self.error(f"expected a \"string\" or a number in the list, found {token.describe()}")


def _convert(key: str, kind: str, raw: Any, anchor: Token, fail: Callable[[str, Token], JDLError]) -> Any:
    def scalar_text(token: Token) -> str:
        if token.kind == "number":
            return token.text
        return str(token.value)

    if kind in ("list", "environment") and not isinstance(raw, list):
        if kind == "list":  # a lone value is a one-element list, as in the original
            return (scalar_text(raw),)
        raise fail(f"{key} expects a list such as {{NAME=\"value\", ...}}", anchor)
    if kind == "list":
        return tuple(scalar_text(item) for item in raw)
    if kind == "environment":
        env: dict[str, str] = {}
        for item in raw:
            if isinstance(item, tuple):
                name, value = item[0].text, scalar_text(item[1])
            else:
                text = scalar_text(item)
                if "=" not in text:
                    raise fail(f"Environment entry {text!r} has no '=': write NAME=\"value\"", item)
                name, value = text.split("=", 1)
            if name in env:
                raise fail(f"Environment sets {name} twice", anchor)
            env[name] = value
        return env
    if isinstance(raw, list):
        raise fail(f"{key} expects a single value, not a list", anchor)
    if kind == "integer":
        if raw.kind != "number" or not isinstance(raw.value, int):
            raise fail(f"{key} expects a whole number of seconds, found {raw.describe()}", raw)
        return raw.value
    if kind == "boolean":
        text = str(raw.value).lower() if raw.kind in ("word", "string") else ""
        if text not in ("true", "false"):
            raise fail(f"{key} expects true or false, found {raw.describe()}", raw)
        return text == "true"
    if kind == "number":
        if raw.kind != "number":
            raise fail(f"{key} expects a number, found {raw.describe()}", raw)
        return float(raw.value)
    return scalar_text(raw)


def parse(text: str, filename: str | None = None) -> JobDescription:
    """Parse JDL text; raise JDLError (with line and column) on anything wrong."""
    tokens = _Lexer(text, filename).tokens()
    found = _Parser(tokens, filename).parse()

    def fail(message: str, token: Token) -> JDLError:
        return JDLError(message, token.line, token.column, filename)

    fields: dict[str, Any] = {}
    anchors: dict[str, Token] = {}
    for key, (raw, anchor) in found.items():
        field, kind = KEYS[key]
        fields[field] = _convert(key, kind, raw, anchor, fail)
        anchors[field] = anchor
    if "executable" not in fields:
        raise JDLError("missing required key Executable (the program to run)", 1, 1, filename)
    try:
        return JobDescription(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "executable"
        anchor = anchors.get(field, tokens[0])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise JDLError(f"{_FIELD_TO_KEY.get(field, field)}: {message}", anchor.line, anchor.column, filename) from None
