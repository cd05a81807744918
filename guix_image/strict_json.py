"""JSON read as Go's encoding/json reads it (what docker and podman use), or refused.

Python's `json` and Go's differ where an attacker can use it: Go matches an
object's keys to struct fields case-insensitively and takes the last match
(`{"Cmd": ["/good"], "cmd": ["/evil"]}` runs `/evil` in docker), refuses a
byte-order mark, NaN and Infinity, and replaces a lone surrogate with
U+FFFD; Python keeps both keys, decodes UTF-16 and a BOM, accepts NaN,
keeps lone surrogates, and fails with RecursionError around 1,000 levels
of nesting and ValueError past 4,300 digits. So a document is refused
(`JSONRefused`, with a reason) when it is not UTF-8 text without a BOM,
when an object has two keys equal but for case, when a number is not
finite or an integer does not fit 64 bits, when a string holds a lone
surrogate, or when it nests deeper than MAX_DEPTH. What is accepted reads
the same in both languages.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # image configs and manifests nest 4 or 5 deep
_INT64 = range(-(1 << 63), 1 << 63)


class JSONRefused(ValueError):
    """The document is not JSON (`invalid`), or JSON that readers read differently."""

    def __init__(self, reason: str, *, invalid: bool = False) -> None:
        super().__init__(reason)
        self.invalid = invalid

    def describe(self, what: str) -> str:
        """A message about `what` ("manifest.json", ...): why it is refused."""
        if self.invalid:
            return f"{what} is not valid JSON: {self}"
        return f"{what} is JSON that readers read differently: {self}"


def loads(data: bytes | str) -> Any:
    """The document in `data`, or JSONRefused saying why not."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise JSONRefused(f"not UTF-8 text: {error}", invalid=True) from None
    if data.startswith("\ufeff"):
        raise JSONRefused("it starts with a byte-order mark")
    try:
        document = json.loads(
            data,
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_int=_integer,
            parse_float=_float,
        )
    except RecursionError:
        raise JSONRefused(f"it nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as error:
        raise JSONRefused(str(error), invalid=True) from None
    _check_strings_and_depth(document)
    return document


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, str] = {}
    for key, _ in pairs:
        folded = key.casefold()
        if folded in seen:
            raise JSONRefused(f"duplicate key {key!r} (also {seen[folded]!r}); readers disagree")
        seen[folded] = key
    return dict(pairs)


def _constant(name: str) -> Any:
    raise JSONRefused(f"{name} is not JSON")


def _integer(text: str) -> int:
    # Checked before int(): Python refuses to convert over 4,300 digits.
    value = int(text) if len(text) <= 20 else None
    if value is None or value not in _INT64:
        raise JSONRefused(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is too large")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONRefused(f"the number {text[:24]} is not finite")
    return value


def _check_strings_and_depth(document: Any) -> None:
    """No lone surrogate in any key or string, and at most MAX_DEPTH levels."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise JSONRefused(f"it nests deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_string(key)
                stack.append((item, depth + 1))


def _check_string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JSONRefused(f"the string {text[:40]!r} holds a lone surrogate") from None
