"""Device groups: which devices a target names, resolved in SQL.

A target is ``{"schools": [...], "rooms": [...], "kinds": [...], "tags": [...], "devices": [...]}``;
every field given must match (within a field, any of its values does), and at least one must be
given, so no target reaches the whole district by accident. :func:`resolve_target` is the one
place a target becomes device ids; ``allowed_schools`` limits it to the caller's schools.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import psycopg

#: A tag: lower-case, digits and ``_ . : -``, like the ids elsewhere; at most this many per device.
TAG_RE: Final = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,63}$")
MAX_TAGS: Final = 32
#: Values one target field may list (``devices``: up to :data:`MAX_TARGET_DEVICES`).
MAX_FIELD_VALUES: Final = 1000
#: Devices one rollout may reach; a target resolving to more is refused, not cut.
MAX_TARGET_DEVICES: Final = 50_000
FIELDS: Final = ("schools", "rooms", "kinds", "tags", "devices")


class TargetError(ValueError):
    """A target that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Target:
    schools: tuple[str, ...] | None = None
    rooms: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Target:
        unknown = sorted(set(raw) - set(FIELDS))
        if unknown:
            raise TargetError(f"target: unknown field(s) {', '.join(unknown)}; known: {FIELDS}")
        values: dict[str, tuple[str, ...]] = {}
        for name in FIELDS:
            got = raw.get(name)
            if got is None:
                continue
            if not isinstance(got, list) or not all(isinstance(v, str) for v in got):
                raise TargetError(f"target.{name}: expected a list of strings")
            if not got:
                raise TargetError(f"target.{name}: an empty list matches nothing; leave it out")
            most = MAX_TARGET_DEVICES if name == "devices" else MAX_FIELD_VALUES
            if len(got) > most:
                raise TargetError(f"target.{name}: at most {most} values")
            if any(not 0 < len(v) <= 64 for v in got):
                raise TargetError(f"target.{name}: each value must have 1-64 characters")
            values[name] = tuple(dict.fromkeys(got))
        if not values:
            raise TargetError(f"target: give at least one of {', '.join(FIELDS)}")
        return cls(**values)

    def to_dict(self) -> dict[str, list[str]]:
        return {n: list(v) for n in FIELDS if (v := getattr(self, n)) is not None}


_RESOLVE: Final = """
SELECT device_id, school_id FROM devices
WHERE (%(schools)s::text[] IS NULL OR school_id = ANY(%(schools)s::text[]))
  AND (%(rooms)s::text[] IS NULL OR room = ANY(%(rooms)s::text[]))
  AND (%(kinds)s::text[] IS NULL OR kind = ANY(%(kinds)s::text[]))
  AND (%(tags)s::text[] IS NULL OR tags && %(tags)s::text[])
  AND (%(devices)s::text[] IS NULL OR device_id = ANY(%(devices)s::text[]))
  AND (%(allowed)s::text[] IS NULL OR school_id = ANY(%(allowed)s::text[]))
ORDER BY device_id
LIMIT %(limit)s
"""


def resolve_target(
    conn: psycopg.Connection[Any],
    target: Target,
    allowed_schools: Collection[str] | None = None,
    limit: int = MAX_TARGET_DEVICES,
) -> list[tuple[str, str]]:
    """``(device_id, school_id)`` of the registered devices ``target`` names, in device_id
    order; only those of ``allowed_schools`` when given. More than ``limit`` is a
    :class:`TargetError` (a rollout never silently leaves devices out)."""
    params: dict[str, Any] = {n: _arr(getattr(target, n)) for n in FIELDS}
    params["allowed"] = None if allowed_schools is None else sorted(allowed_schools)
    params["limit"] = limit + 1
    rows = conn.execute(_RESOLVE, params).fetchall()
    if len(rows) > limit:
        raise TargetError(f"target matches more than {limit} devices; narrow it")
    return [(str(d), str(s)) for d, s in rows]


def _arr(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)


def check_tags(tags: list[str]) -> list[str]:
    """``tags`` without duplicates, sorted; :class:`TargetError` naming a bad one."""
    if len(tags) > MAX_TAGS:
        raise TargetError(f"tags: at most {MAX_TAGS} per device, got {len(tags)}")
    for tag in tags:
        if not TAG_RE.match(tag):
            raise TargetError(f"tags: {tag[:70]!r} must match {TAG_RE.pattern}")
    return sorted(set(tags))


__all__ = [
    "MAX_TARGET_DEVICES",
    "Target",
    "TargetError",
    "check_tags",
    "resolve_target",
]
