"""JobDescription -> canonical JDL text, readable by parse() to the same description."""

from __future__ import annotations

from cbas.jdl.model import JobDescription
from cbas.jdl.parser import KEYS

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}


def quote(text: str) -> str:
    return '"' + "".join(_ESCAPES.get(char, char) for char in text) + '"'


def write(job: JobDescription) -> str:
    """Write every field that differs from its default, in the canonical key order."""
    defaults = JobDescription(executable="x")
    lines: list[str] = []
    for key, (field, kind) in KEYS.items():
        value = getattr(job, field)
        if field != "executable" and value == getattr(defaults, field):
            continue
        if kind == "list":
            text = "{" + ", ".join(quote(item) for item in value) + "}"
        elif kind == "environment":
            text = "{" + ", ".join(f"{name} = {quote(val)}" for name, val in value.items()) + "}"
        elif kind == "boolean":
            text = "true" if value else "false"
        elif kind in ("integer", "number"):
            text = repr(value)
        else:
            text = quote(value)
        lines.append(f"{key} = {text};")
    return "\n".join(lines) + "\n"
