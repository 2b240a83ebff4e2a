"""Anchored patterns, the same in Python as in the published JSON Schemas.

The contract writes a value's pattern as ECMA-262 does (JSON Schema's dialect): ``^...$``, where
``$`` is the end of the value. Python's ``re`` (which msgspec's ``Meta(pattern=...)`` searches
with) lets ``$`` match before a final newline too, so ``"s001\\n"`` passed as a school id and a
64-hex ``uid_hash`` with a newline after it passed as a hash. In code each pattern ends in
``\\Z`` (:func:`whole`); the exported schemas carry the contract's ``$`` (:func:`published`).
"""

from __future__ import annotations

from typing import Any


def whole(pattern: str) -> str:
    """``pattern`` (``^...$``, as the contract writes it) for Python: its ``$`` as ``\\Z``."""
    if not pattern.endswith("$") or pattern.endswith("\\$"):
        raise ValueError(f"not a pattern anchored at its end: {pattern!r}")
    return pattern[:-1] + "\\Z"


def published(pattern: str) -> str:
    """The contract's spelling of a :func:`whole` pattern (others as they are)."""
    return pattern[:-2] + "$" if pattern.endswith("\\Z") else pattern


def publish_patterns(schema: Any) -> Any:
    """``schema`` (a JSON Schema as dicts and lists) with every ``pattern`` :func:`published`."""
    if isinstance(schema, dict):
        return {
            k: published(v) if k == "pattern" and isinstance(v, str) else publish_patterns(v)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [publish_patterns(v) for v in schema]
    return schema


__all__ = ["publish_patterns", "published", "whole"]
