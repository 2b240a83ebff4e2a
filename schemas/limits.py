"""Bounds on a device's JSON message before anything decodes or stores it: size, nesting depth,
string length, and what PostgreSQL refuses (a ``\\u0000`` escape: neither text nor jsonb can
hold NUL; invalid UTF-8, whose encoded lone surrogates included).

The check reads the bytes only (regular expressions, no decoding), so a message nested a
million deep costs no recursion, and it names the first bound exceeded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

#: A JSON string literal (its quotes included); escapes are skipped whole.
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
#: A ``\u0000`` escape whose backslash is not itself escaped.
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_BRACKET: Final = re.compile(rb"[\[\]{}]")


@dataclass(frozen=True, slots=True)
class JsonLimits:
    max_bytes: int
    #: Arrays and objects inside one another, the outermost counted.
    max_depth: int
    #: Bytes of one string literal as sent (escapes counted as written).
    max_string: int


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """Which bound a message broke (``kind``: oversize, encoding, nul, depth, string) and how."""

    kind: str
    reason: str


def check_json(payload: bytes, limits: JsonLimits) -> LimitExceeded | None:
    """The first bound ``payload`` breaks, or None; it says nothing about JSON validity."""
    if len(payload) > limits.max_bytes:
        return LimitExceeded(
            "oversize", f"message is {len(payload)} bytes, over the limit of {limits.max_bytes}"
        )
    if not payload.isascii():
        try:
            payload.decode("utf-8")  # (Python's codec refuses encoded surrogates too)
        except UnicodeDecodeError as exc:
            return LimitExceeded(
                "encoding", f"payload is not UTF-8: invalid byte at offset {exc.start}"
            )
    if payload.find(b"\\u0000") >= 0 and _NUL_ESCAPE.search(payload):
        return LimitExceeded("nul", "contains a \\u0000 character, which the database cannot store")
    longest = 0
    for m in _STRING.finditer(payload):
        longest = max(longest, m.end() - m.start() - 2)
    if longest > limits.max_string:
        return LimitExceeded(
            "string",
            f"a string is {longest} bytes long, over the limit of {limits.max_string}",
        )
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub(b'""', payload)):
        if m.group() in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limits.max_depth:
                    return LimitExceeded(
                        "depth", f"nested deeper than the limit of {limits.max_depth} levels"
                    )
        else:
            depth -= 1
    return None


__all__ = ["JsonLimits", "LimitExceeded", "check_json"]
