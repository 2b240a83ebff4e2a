"""PostgreSQL binary COPY payloads, built without I/O, for ``COPY … FROM STDIN (FORMAT BINARY)``.

The format (PostgreSQL manual, COPY, "Binary Format"): an 11-byte signature, an int32 of flags
and an int32 header-extension length (both 0 here); per row an int16 field count, then per field
an int32 byte length (-1 for NULL) and the value in its type's binary form; an int16 -1 trailer.
All integers are big-endian. The values we send: ``timestamptz`` int64 µs since 2000-01-01 UTC,
``text`` UTF-8, ``int8``, ``bool`` one byte, ``float8`` IEEE double, ``bytea`` as is, ``jsonb``
version byte 1 then the JSON text.

:func:`encode_rows` takes any rows of those types (one call per field: for tests and rare
paths); :func:`encode_events` and :func:`encode_readings` are the ingest's two hot tables,
packed a row at a time with per-batch caches of the repeated text fields.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from struct import Struct, error
from typing import TYPE_CHECKING, Any, Final

from schemas.events import REGISTRY

if TYPE_CHECKING:
    from ingest_server.ingest.batch import EventRow

SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
HEADER: Final = SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER: Final = b"\xff\xff"
NULL: Final = b"\xff\xff\xff\xff"
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_JSONB_VERSION: Final = 1

_COUNT = Struct(">h")
_LEN = Struct(">i")
_INT8 = Struct(">iq")  # also timestamptz: length 8, then the value
_FLOAT8 = Struct(">id")
_BOOL = Struct(">i?")
_JSONB_HEAD = Struct(">iB")

EVENT_COLUMNS: Final = (
    "time, school_id, device_id, device_kind, seq, type, data, received_at, synced, replay"
)
EVENT_TYPES: Final = (
    "timestamptz", "text", "text", "text", "int8", "text", "jsonb", "timestamptz", "bool", "bool"
)  # fmt: skip
READING_COLUMNS: Final = "time, school_id, device_id, metric, value"
READING_TYPES: Final = ("timestamptz", "text", "text", "text", "float8")

# An events row: field count and time; [school, device, kind]; seq; [type]; jsonb head, data;
# received_at, synced and replay (the message's flag, carried on each event like synced).
_EVENT_HEAD = Struct(">hiq")
_EVENT_TAIL = Struct(">iqi?i?")
# A readings row: field count and time; [school, device, metric]; value.
_READING_HEAD = _EVENT_HEAD


class CopyEncodeError(ValueError):
    """A value that cannot go into a binary COPY row as the column's type."""


def micros(dt: datetime) -> int:
    """``timestamptz`` binary value: microseconds since 2000-01-01 00:00 UTC."""
    try:
        return (dt - PG_EPOCH) // _MICROSECOND
    except TypeError:
        raise CopyEncodeError(f"timestamptz needs an aware datetime, not {dt!r}") from None


def text_field(value: str) -> bytes:
    """A ``text`` field: length and UTF-8 bytes (PostgreSQL text cannot hold NUL)."""
    if "\x00" in value:
        raise CopyEncodeError(f"text cannot contain NUL characters: {value[:80]!r}")
    try:
        raw = value.encode()
    except UnicodeEncodeError as exc:
        raise CopyEncodeError(f"text is not valid Unicode ({exc.reason}): {value[:80]!r}") from None
    return _LEN.pack(len(raw)) + raw


def _bytes_field(value: bytes) -> bytes:
    return _LEN.pack(len(value)) + value


def _jsonb_field(value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _JSONB_HEAD.pack(len(raw) + 1, _JSONB_VERSION) + raw


def _timestamptz_field(value: datetime) -> bytes:
    return _INT8.pack(8, micros(value))


def _int8_field(value: int) -> bytes:
    return _INT8.pack(8, value)


def _float8_field(value: float) -> bytes:
    return _FLOAT8.pack(8, value)


def _bool_field(value: bool) -> bytes:
    return _BOOL.pack(1, value)


#: The column types this module encodes, by PostgreSQL name.
FIELD_ENCODERS: Final[dict[str, Callable[[Any], bytes]]] = {
    "timestamptz": _timestamptz_field,
    "text": text_field,
    "int8": _int8_field,
    "bool": _bool_field,
    "float8": _float8_field,
    "bytea": _bytes_field,
    "jsonb": _jsonb_field,
}


def encode_rows(types: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """A whole COPY payload of ``rows``, each a value (None: NULL) per column of ``types``."""
    try:
        encoders = [FIELD_ENCODERS[t] for t in types]
    except KeyError as exc:
        raise CopyEncodeError(f"no binary COPY encoder for column type {exc.args[0]!r}") from None
    count = _COUNT.pack(len(encoders))
    out = bytearray(HEADER)
    for n, row in enumerate(rows):
        if len(row) != len(encoders):
            raise CopyEncodeError(f"row {n} has {len(row)} values for {len(encoders)} columns")
        out += count
        for i, (encode, value) in enumerate(zip(encoders, row, strict=True)):
            if value is None:
                out += NULL
                continue
            try:
                out += encode(value)
            except (error, TypeError, AttributeError) as exc:
                raise CopyEncodeError(
                    f"row {n} column {i} ({types[i]}): cannot encode {value!r}: {exc}"
                ) from None
    out += TRAILER
    return bytes(out)


def _event_row_struct(where: int, typ: int, data: int) -> Struct:
    """The layout of a whole events row whose variable parts have these byte lengths: field
    count and time; [school, device, kind]; seq; [type]; jsonb head, data; [the tail of
    received_at, synced and replay, one bytes object per message]."""
    return Struct(f">hiq{where}siq{typ}siB{data}s{_EVENT_TAIL.size}s")


#: Row layouts by (where, type, data) lengths: a server sees few (bounded: start over).
_ROW_STRUCTS: dict[tuple[int, int], dict[int, Callable[..., bytes]]] = {}
_ROW_STRUCTS_MAX: Final = 4096


def _layouts(where: int, typ: int) -> dict[int, Callable[..., bytes]]:
    """The row layouts of these (where, type) lengths, by the data's length."""
    got = _ROW_STRUCTS.get((where, typ))
    if got is None:
        if len(_ROW_STRUCTS) >= _ROW_STRUCTS_MAX:
            _ROW_STRUCTS.clear()
        got = _ROW_STRUCTS[where, typ] = {}
    return got


def encode_events(
    events: Sequence[EventRow], stamps: list[int] | None = None, seen: set[str] | None = None
) -> bytes:
    """The COPY payload of ``events`` rows (:data:`EVENT_COLUMNS`); each event's ``ts`` as
    encoded (µs since 2000-01-01 UTC) is appended to ``stamps`` when given, and the event
    types met are added to ``seen`` (for :func:`carries_readings`)."""
    out = bytearray(HEADER)
    tail = _EVENT_TAIL.pack
    types: dict[str, tuple[bytes, int]] = {}
    #: By device id: (school, kind, the three fields encoded, their length).
    wheres: dict[str, tuple[str, str, bytes, int]] = {}
    # Rows of one message share their school, device, kind and received_at objects, and rows
    # of one batch mostly their type and flags: each is worked out again only when its object
    # changes (an identity test, where a look-up by a tuple would build the tuple every row).
    school = device = kind = etype = synced = replay = None
    where = typ = end = b""
    where_n = typ_n = -1
    received: datetime | None = None
    received_us = 0
    # the row layouts of the current (where, type) lengths, by the data's length
    by_data: dict[int, Callable[..., bytes]] = {}
    stamp = (stamps if stamps is not None else []).append
    epoch, micro = PG_EPOCH, _MICROSECOND
    try:
        for r in events:
            if r.device_id is not device or r.school_id is not school or r.kind is not kind:
                school, device, kind = r.school_id, r.device_id, r.kind
                cached = wheres.get(device)
                if cached is None or cached[0] != school or cached[1] != kind:
                    # (one message per device interleaved: seen again and again)
                    field = text_field(school) + text_field(device) + text_field(kind)
                    cached = wheres[device] = school, kind, field, len(field)
                _, _, where, n = cached
                if n != where_n:
                    where_n = n
                    if typ_n >= 0:  # (else the type, on the first row, is next)
                        by_data = _layouts(where_n, typ_n)
            e = r.event
            if e.type is not etype:
                etype = e.type
                got = types.get(etype)
                if got is None:
                    field = text_field(etype)
                    got = types[etype] = field, len(field)
                typ, n = got
                if n != typ_n:
                    typ_n = n
                    by_data = _layouts(where_n, typ_n)
            if r.received_at is not received or e.synced is not synced or e.replay is not replay:
                if r.received_at is not received:
                    received = r.received_at
                    received_us = micros(received)
                synced, replay = e.synced, e.replay
                # received_at, synced and replay (flags that are not bools packed by truth,
                # as ``?`` does): the same few byte strings for every row
                end = tail(8, received_us, 1, synced, 1, replay)
            data = e.data_json
            data_n = len(data)
            # micros(), inline: a call per event costs more than the arithmetic
            ts = (e.ts - epoch) // micro
            stamp(ts)
            pack = by_data.get(data_n)
            if pack is None:
                if len(by_data) >= _ROW_STRUCTS_MAX:
                    by_data.clear()
                pack = by_data[data_n] = _event_row_struct(where_n, typ_n, data_n).pack
            # the whole row in one pack: cheaper than a pack per field and a join
            out += pack(
                10, 8, ts, where, 8, e.seq, typ, data_n + 1, _JSONB_VERSION, data, end
            )  # fmt: skip
    except TypeError:
        # a naive ts (as micros() says); any other TypeError is a bug, raised as it is
        bad = [r.event.ts for r in events if not _aware(r.event.ts)]
        if not bad:
            raise
        raise CopyEncodeError(f"timestamptz needs an aware datetime, not {bad[0]!r}") from None
    except (error, OverflowError) as exc:
        raise CopyEncodeError(f"cannot encode an events row: {exc}") from None
    out += TRAILER
    if seen is not None:
        seen.update(types)
    return bytes(out)


#: A COPY payload of no rows.
NO_ROWS: Final = HEADER + TRAILER


def carries_readings(event_types: Iterable[str]) -> bool:
    """Whether events of these types can have ``readings`` rows: when not, a batch skips
    :func:`encode_readings` (a look-up per event) and sends nothing."""
    return any(_metric_plan(t) is not None for t in event_types)


def _aware(dt: object) -> bool:
    return isinstance(dt, datetime) and dt.utcoffset() is not None


def encode_readings(
    events: Sequence[EventRow], stamps: Sequence[int] | None = None
) -> tuple[bytes, int]:
    """The COPY payload of the ``readings`` rows (:data:`READING_COLUMNS`) the events carry,
    and how many rows that is (0: nothing to send). ``stamps``, when given, are the events'
    ``ts`` already encoded (µs since 2000-01-01 UTC), in the order of ``events``.

    The same readings as :func:`schemas.uplink.metrics_of`, without a call per event."""
    if stamps is None:
        stamps = [micros(r.event.ts) for r in events]
    out = bytearray(HEADER)
    head, value_field, join = _READING_HEAD.pack, _FLOAT8.pack, b"".join
    plans: dict[str, _MetricPlan | None] = {}
    wheres: dict[tuple[str, str], bytes] = {}
    school = device = None
    where = b""
    rows = 0
    try:
        for r, ts in zip(events, stamps, strict=True):
            e = r.event
            try:
                plan = plans[e.type]
            except KeyError:
                plan = plans[e.type] = _metric_plan(e.type)
            if plan is None:  # most events: no readings at all
                continue
            get, names = plan
            row_head = b""
            for name, value in zip(names, get(e.data), strict=True):
                if value is None:  # the common case for optional fields
                    continue
                cls = value.__class__
                if (cls is not float and cls is not int) and (
                    cls is bool or not isinstance(value, (int, float))
                ):
                    continue
                if not row_head:
                    if r.device_id is not device or r.school_id is not school:
                        school, device = r.school_id, r.device_id
                        where = wheres.get((school, device), b"")
                        if not where:
                            where = wheres[school, device] = text_field(school) + text_field(device)
                    row_head = head(5, 8, ts) + where
                out += join((row_head, name, value_field(8, float(value))))
                rows += 1
    except (error, OverflowError) as exc:
        raise CopyEncodeError(f"cannot encode a readings row: {exc}") from None
    out += TRAILER
    return bytes(out), rows


#: How to read an event type's readings: its metric fields' values at once, and each metric's
#: name as an encoded ``text`` field.
_MetricPlan = tuple[Callable[[Any], tuple[Any, ...]], tuple[bytes, ...]]


@functools.cache
def _metric_plan(event_type: str) -> _MetricPlan | None:
    """None for a type without readings (or not registered)."""
    registered = REGISTRY.get(event_type)
    if registered is None or not registered.metrics:
        return None
    fields = tuple(registered.metrics)
    names = tuple(text_field(m) for m in registered.metrics.values())
    if len(fields) == 1:
        one = attrgetter(fields[0])
        return (lambda data: (one(data),)), names
    return attrgetter(*fields), names


__all__ = [
    "EVENT_COLUMNS",
    "EVENT_TYPES",
    "FIELD_ENCODERS",
    "HEADER",
    "NO_ROWS",
    "READING_COLUMNS",
    "READING_TYPES",
    "TRAILER",
    "CopyEncodeError",
    "carries_readings",
    "encode_events",
    "encode_readings",
    "encode_rows",
    "micros",
    "text_field",
]
