"""JSON from untrusted bytes with its nesting depth bounded before it is parsed.

Python's parser recurses once per nesting level, so 100,000 nested brackets end in a
RecursionError (a crash where a 4xx was due). The depth is measured first, cheaply: string
literals are removed (C-speed regex), every other byte but brackets is dropped (`bytes.translate`),
shallow pairs are peeled off a few levels at a time (`bytes.replace`), and the depth is followed
over runs of opening or closing brackets. Callers bound the size first (headers and configs are at
most a MiB), which bounds this work too.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prefix_registry.errors import InvalidPrefixError

MAX_DEPTH = 64  # nesting levels of arrays/objects; real headers and configs use 2-4
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # "...", escapes included
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_RUN = re.compile(rb"[\[{]+|[\]}]+")
_PEEL_PASSES = 8


def too_deep(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text `data` nests arrays/objects more than `limit` levels deep."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    peeled = 0  # each pass removes the innermost level of every branch
    while len(brackets) > limit - peeled and peeled < _PEEL_PASSES:
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
        peeled += 1
    if len(brackets) <= limit - peeled:
        return False
    limit -= peeled
    depth = 0
    for run in _RUN.finditer(brackets):
        opening = run.group()[:1] in (b"[", b"{")
        depth += len(run.group()) if opening else -len(run.group())
        if depth > limit:
            return True
    return False


def loads(data: bytes | str, what: str, *, limit: int = MAX_DEPTH) -> Any:
    """Parse JSON, refusing (InvalidPrefixError, naming `what`) nesting deeper than `limit` and
    anything that is not JSON."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if too_deep(raw, limit):
        raise InvalidPrefixError(f"{what} is nested more than {limit} levels deep")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidPrefixError(f"{what} is invalid JSON ({_short(e)})") from e


def loads_object(data: bytes | str, what: str, *, limit: int = MAX_DEPTH) -> dict[str, Any]:
    """`loads`, and the result must be a JSON object."""
    value = loads(data, what, limit=limit)
    if not isinstance(value, dict):
        raise InvalidPrefixError(f"{what} is not a JSON object (got {type(value).__name__})")
    return value


def _short(error: Exception, limit: int = 120) -> str:
    text = str(error)
    return text if len(text) <= limit else text[:limit] + "..."
