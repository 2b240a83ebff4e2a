"""The district hash key's file format, shared by the agent and the ingest server.

A key file holds either hex digits (what ``openssl rand -hex 32`` writes; surrounding
whitespace and a trailing newline are fine) or the raw key bytes, taken exactly as written: a
raw key may begin or end with bytes that look like whitespace, so nothing is stripped from it.
"""

from __future__ import annotations

import string

_HEX = frozenset(string.hexdigits.encode())


def key_from_file(raw: bytes) -> bytes:
    """The key a key file's contents ``raw`` hold."""
    text = raw.strip()
    if text and len(text) % 2 == 0 and all(c in _HEX for c in text):
        return bytes.fromhex(text.decode("ascii"))
    return raw
