"""Rendered rollup answers kept for the next identical request, checked against the database
before each use.

A rollup answer is a function of its table's rows and of the request (its parameters and the
caller's schools). Every table rollup carries a statement trigger (migration 0080) that bumps its
row in ``campus_rollup_generations`` in the writing transaction, so a request first reads the
table's **validator** — its generation, and the trigger's own catalogue row (``xmin`` changes
when someone disables and re-enables it; a disabled trigger or a table without one gives no
validator, and such a table is always read afresh) — then looks up an answer rendered under the
same validator. Reading the validator *before* rendering is what keeps this exact: an answer is
stored under a validator read no later than its own snapshot, so it holds every change that
validator stands for; a change committed in between makes the stored validator stale, so that
entry is never served. The validator also makes a strong ``ETag`` (``If-None-Match`` → 304).

Bounded by the bytes it holds (least recently used answers go first); its lock guards only the
dictionary, never I/O. ``Cache-Control: no-cache`` in a request renders afresh.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Final

import psycopg

#: The most bytes of answers one server keeps (a 10,000-row rollup answer is ~0.8 MB).
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

Validator = tuple[int, int, str]

_VALIDATOR_SQL: Final = (
    "SELECT t.tgrelid::int8, g.gen, t.xmin::text"
    " FROM pg_trigger t JOIN campus_rollup_generations g ON g.relid = t.tgrelid"
    " WHERE t.tgrelid = to_regclass(%s) AND t.tgname = 'campus_rollup_generation'"
    " AND t.tgenabled = 'A'"
)


def validator(conn: psycopg.Connection[Any], relation: str) -> Validator | None:
    """``relation``'s current validator; None when it carries no enabled generation trigger
    (a view, a table made by hand, a trigger disabled): its answers are not kept."""
    row = conn.execute(_VALIDATOR_SQL, (relation,)).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def etag(key: Hashable, valid: Validator) -> str:
    """A strong entity tag for the answer to ``key`` under ``valid`` (quoted, as sent)."""
    digest = hashlib.blake2b(repr((key, valid)).encode(), digest_size=12).hexdigest()
    return f'"{digest}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """Whether a request's ``If-None-Match`` names ``tag`` (or is ``*``); weak tags compare
    by their opaque part, as RFC 9110 has for this header."""
    if not if_none_match:
        return False
    for part in if_none_match.split(","):
        candidate = part.strip()
        if candidate == "*" or candidate.removeprefix("W/") == tag:
            return True
    return False


class AnswerCache:
    """Answers by key, each with the validator it was rendered under; thread-safe."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Validator, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Bytes of answers held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, valid: Validator) -> bytes | None:
        """The answer stored for ``key`` if it was rendered under ``valid``; a stale one is
        dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] != valid:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry[1]

    def put(self, key: Hashable, valid: Validator, body: bytes) -> None:
        """Keeps ``body`` as the answer to ``key`` under ``valid``, evicting the least recently
        used answers past the bound; an answer larger than the whole bound is not kept."""
        if len(body) > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (valid, body)
            self._bytes += len(body)
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: Hashable) -> None:
        _, body = self._entries.pop(key)
        self._bytes -= len(body)
