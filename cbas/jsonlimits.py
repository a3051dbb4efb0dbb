"""JSON from outside, parsed with a depth limit: a deeply nested body is a clear error, never a
RecursionError inside the parser (or later, in whatever walks the result)."""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # CBAS's own documents nest a few levels


class TooDeep(ValueError):
    """JSON nested deeper than a CBAS document ever is."""


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads, refusing nesting deeper than max_depth (ValueError for what is not JSON)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels") from None
    check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    pending = [(value, 1)]
    while pending:  # iterative: the check itself must not recurse
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > max_depth:
            raise TooDeep(f"JSON nested deeper than {max_depth} levels")
        pending.extend((child, depth + 1) for child in children)
