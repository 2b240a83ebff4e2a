"""The binary COPY encoder without a database: the layout, each type, the two hot tables."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest_server.ingest import pgcopy
from ingest_server.ingest.batch import EventRow, Inbound, encode_events, rows_of
from schemas.events import REGISTRY, BoardTouch
from schemas.uplink import UplinkBatch, UplinkEvent, ValidEvent, encode_batch, metrics_of

T0 = datetime(2026, 11, 22, 7, 50, tzinfo=UTC)


def parse(payload: bytes) -> list[list[bytes | None]]:
    """Split a payload into rows of raw field bytes, checking the framing on the way."""
    assert payload[:11] == b"PGCOPY\n\xff\r\n\x00"
    flags, ext = struct.unpack_from(">ii", payload, 11)
    assert (flags, ext) == (0, 0)
    pos, rows = 19, []
    while True:
        (count,) = struct.unpack_from(">h", payload, pos)
        pos += 2
        if count == -1:
            assert pos == len(payload), "bytes after the trailer"
            return rows
        row: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack_from(">i", payload, pos)
            pos += 4
            if size == -1:
                row.append(None)
            else:
                row.append(payload[pos : pos + size])
                pos += size
        rows.append(row)


def value_of(pg_type: str, raw: bytes | None) -> Any:
    if raw is None:
        return None
    if pg_type == "timestamptz":
        return pgcopy.PG_EPOCH + timedelta(microseconds=struct.unpack(">q", raw)[0])
    if pg_type == "text":
        return raw.decode()
    if pg_type == "int8":
        return struct.unpack(">q", raw)[0]
    if pg_type == "bool":
        assert raw in (b"\x00", b"\x01")
        return raw == b"\x01"
    if pg_type == "float8":
        return struct.unpack(">d", raw)[0]
    if pg_type == "jsonb":
        assert raw[:1] == b"\x01"
        return raw[1:]
    return raw


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack(">d", a) == struct.pack(">d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))
texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "timestamptz": st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(9000, 1, 1), timezones=offsets
    ),
    "text": texts,
    "int8": st.integers(-(2**63), 2**63 - 1),
    "bool": st.booleans(),
    "float8": st.floats(allow_nan=True, allow_infinity=True),
    "bytea": st.binary(),
    "jsonb": st.binary(),
}


@st.composite
def tables(draw: st.DrawFn) -> tuple[list[str], list[tuple[Any, ...]]]:
    types = draw(st.lists(st.sampled_from(sorted(VALUES)), min_size=1, max_size=8))
    row = st.tuples(*(st.none() | VALUES[t] for t in types))
    return types, draw(st.lists(row, max_size=20))


@given(tables())
def test_any_rows_come_back_field_for_field(table: tuple[list[str], list[tuple[Any, ...]]]) -> None:
    types, rows = table
    parsed = parse(pgcopy.encode_rows(types, rows))
    assert len(parsed) == len(rows)
    for row, raw_row in zip(rows, parsed, strict=True):
        assert len(raw_row) == len(types)
        for t, value, raw in zip(types, row, raw_row, strict=True):
            assert same(value_of(t, raw), value), (t, value, raw)


def test_layout_of_one_row_byte_for_byte() -> None:
    at = datetime(2000, 1, 1, 1, 0, 0, 5, tzinfo=timezone(timedelta(hours=1)))  # 00:00 UTC
    payload = pgcopy.encode_rows(
        ["timestamptz", "text", "int8", "bool", "float8", "jsonb", "bytea"],
        [(at, "é", -2, True, -0.0, b"[]", None)],
    )
    assert payload == (
        b"PGCOPY\n\xff\r\n\x00" + bytes(8)
        + b"\x00\x07"
        + b"\x00\x00\x00\x08" + (5).to_bytes(8, "big")
        + b"\x00\x00\x00\x02" + "é".encode()
        + b"\x00\x00\x00\x08" + (-2).to_bytes(8, "big", signed=True)
        + b"\x00\x00\x00\x01\x01"
        + b"\x00\x00\x00\x08" + b"\x80" + bytes(7)
        + b"\x00\x00\x00\x03\x01[]"
        + b"\xff\xff\xff\xff"
        + b"\xff\xff"
    )  # fmt: skip


def test_no_rows_is_header_and_trailer() -> None:
    assert pgcopy.encode_rows(["text"], []) == pgcopy.HEADER + pgcopy.TRAILER
    assert parse(pgcopy.encode_events([])) == []
    assert pgcopy.encode_readings([]) == (pgcopy.HEADER + pgcopy.TRAILER, 0)


@pytest.mark.parametrize(
    ("types", "row", "says"),
    [
        (["text"], ("a\x00b",), "text cannot contain NUL"),
        (["text"], ("\ud800",), "text is not valid Unicode"),
        (["timestamptz"], (datetime(2026, 1, 1),), "timestamptz needs an aware datetime"),
        (["int8"], (2**63,), "row 0 column 0 (int8): cannot encode"),
        (["float8"], ("1.5",), "row 0 column 0 (float8): cannot encode '1.5'"),
        (["uuid"], (None,), "no binary COPY encoder for column type 'uuid'"),
        (["text", "text"], ("a",), "row 0 has 1 values for 2 columns"),
    ],
)
def test_bad_values_are_named(types: list[str], row: tuple[Any, ...], says: str) -> None:
    with pytest.raises(pgcopy.CopyEncodeError) as got:
        pgcopy.encode_rows(types, [row])
    assert says in str(got.value)


def event_tuple(r: EventRow) -> tuple[Any, ...]:
    e = r.event
    return (e.ts, r.school_id, r.device_id, r.kind, e.seq, e.type, e.data_json, r.received_at,
            e.synced, e.replay)  # fmt: skip


names = st.sampled_from(["sch-1", "cr-1", "card_reader", "é-ü", "x" * 300])
event_rows = st.builds(
    EventRow,
    school_id=names,
    device_id=names,
    kind=names,
    received_at=VALUES["timestamptz"],
    event=st.builds(
        ValidEvent,
        seq=st.integers(0, 2**63 - 1),
        ts=VALUES["timestamptz"],
        type=st.sampled_from(["card.tap", "env.reading"]),
        data_json=st.binary(max_size=200),
        data=st.none(),
        synced=st.booleans(),
        replay=st.booleans(),
    ),
)


@given(st.lists(event_rows, max_size=30))
def test_events_encoder_matches_the_generic_one(events: list[EventRow]) -> None:
    # equal strings that are distinct objects must not defeat the per-message caches
    copies = [
        EventRow("".join(r.school_id), "".join(r.device_id), r.kind, r.received_at, r.event)
        for r in events
    ]
    expected = pgcopy.encode_rows(pgcopy.EVENT_TYPES, [event_tuple(r) for r in events])
    assert pgcopy.encode_events(events) == expected
    assert pgcopy.encode_events(copies) == expected


def env_message(device: str, values: Sequence[tuple[int, float, float | None]]) -> Inbound:
    events = []
    for seq, temperature, humidity in values:
        data: dict[str, object] = {"sensor": "s1", "temperature_c": temperature}
        if humidity is not None:
            data["humidity_pct"] = humidity
        events.append(
            UplinkEvent(seq=seq, ts=T0 + timedelta(seconds=seq), type="env.reading",
                        data=msgspec.Raw(msgspec.json.encode(data)))
        )  # fmt: skip
    batch = UplinkBatch(device_id=device, kind="env_sensor", sent_at=T0, events=events)
    return Inbound(f"campus/v1/sch-1/{device}/up", encode_batch(batch), 1, 1, T0)


readings_values = st.lists(
    st.tuples(
        st.integers(0, 10**6),
        st.floats(-40, 60),
        st.none() | st.floats(0, 100),
    ),
    max_size=10,
)


@given(readings_values, readings_values)
def test_readings_encoder_matches_the_generic_one(
    a: list[tuple[int, float, float | None]], b: list[tuple[int, float, float | None]]
) -> None:
    events = rows_of(env_message("env-1", a))[0].events + rows_of(env_message("env-2", b))[0].events
    expected = [
        (r.event.ts, r.school_id, r.device_id, metric, value)
        for r in events
        for metric, value in metrics_of(r.event)
    ]
    payload, count = pgcopy.encode_readings(events)
    assert count == len(expected)
    assert payload == pgcopy.encode_rows(pgcopy.READING_TYPES, expected)


def test_the_message_replay_flag_is_each_events_last_column() -> None:
    """A backlog batch (``replay: true`` on the message) marks every one of its events; a live
    batch none; the flag is the row's tenth field, after synced."""
    values = [(1, 20.5, None), (2, 21.0, None)]
    live = env_message("env-1", values)
    body = msgspec.json.decode(live.payload)
    body["replay"] = True
    backlog = Inbound(live.topic, msgspec.json.encode(body), 1, 1, T0)
    got = {}
    for name, msg in (("live", live), ("backlog", backlog)):
        rows = parse(encode_events(rows_of(msg)[0].events).events_copy)
        assert [len(r) for r in rows] == [10, 10]
        assert pgcopy.EVENT_TYPES[8:] == ("bool", "bool")
        got[name] = [(value_of("bool", r[8]), value_of("bool", r[9])) for r in rows]
    assert got == {"live": [(True, False)] * 2, "backlog": [(True, True)] * 2}


def test_a_batch_encodes_each_distinct_event_once() -> None:
    msg = env_message("env-1", [(1, 20.5, 40.0), (2, 21.0, None), (1, 20.5, 40.0)])
    events = rows_of(msg)[0].events
    encoded = encode_events(events)
    assert [r.event.seq for r in encoded.events] == [1, 2]
    assert [value_of("int8", row[4]) for row in parse(encoded.events_copy)] == [1, 2]
    assert encoded.readings == 3  # two of seq 1, one of seq 2
    assert [value_of("float8", row[4]) for row in parse(encoded.readings_copy)] == [
        20.5,
        40.0,
        21.0,
    ]


_MIXED = st.sampled_from(
    [
        ("card.tap", {"uid_hash": "ab" * 32, "tech": "em4100", "reader": "r"}),
        ("board.touch", {"touches": 12, "window_s": 60.0}),
        ("board.touch", {"touches": 0, "window_s": 0.5}),
        ("env.reading", {"co2_ppm": 900}),
        ("env.reading", {"temperature_c": 21.5, "humidity_pct": 40, "noise_db": None}),
        ("camera.activity", {"camera": "c", "motion": 0.25, "people": None}),
        ("camera.activity", {"camera": "c", "motion": 1, "people": 31}),
        (
            "agent.health",
            {"cpu_pct": 1.5, "rss_mb": 40, "outbox_depth": 3, "oldest_unsent_s": 0.0},
        ),
    ]
)


@given(st.lists(_MIXED, max_size=12))
def test_readings_of_mixed_types_match_metrics_of(kinds: list[tuple[str, dict[str, Any]]]) -> None:
    """Per-type plans read the same readings as metrics_of, whatever the mix of types."""
    events = [
        EventRow(
            "sch-1",
            "dev-1",
            "gateway",
            T0,
            ValidEvent(
                i + 1,
                T0 + timedelta(seconds=i),
                etype,
                msgspec.json.encode(data),
                msgspec.json.decode(msgspec.json.encode(data), type=REGISTRY[etype].data),
                True,
                False,
            ),
        )
        for i, (etype, data) in enumerate(kinds)
    ]
    expected = [
        (r.event.ts, r.school_id, r.device_id, metric, value)
        for r in events
        for metric, value in metrics_of(r.event)
    ]
    payload, count = pgcopy.encode_readings(events)
    assert (payload, count) == (pgcopy.encode_rows(pgcopy.READING_TYPES, expected), len(expected))


def test_a_reading_too_big_for_float8_is_an_encode_error_not_a_crash() -> None:
    """A value float8 cannot hold must not escape as OverflowError (it stopped the decoder
    thread): the batch then takes the per-message path, which quarantines the message."""
    data = BoardTouch(touches=10**400, window_s=1.0)
    row = EventRow(
        "sch-1", "sb-1", "smart_board", T0,
        ValidEvent(1, T0, "board.touch", b"{}", data, True, False),
    )  # fmt: skip
    with pytest.raises(pgcopy.CopyEncodeError, match="readings row"):
        pgcopy.encode_readings([row])
    with pytest.raises(pgcopy.CopyEncodeError):
        encode_events([row])


def _row(ts: datetime, data: bytes = b"{}", *, synced: Any = True, seq: int = 1) -> EventRow:
    event = ValidEvent(seq, ts, "card.tap", data, None, synced, False)  # type: ignore[arg-type]
    return EventRow("sch-1", "cr-1", "card_reader", T0, event)


def test_an_events_row_is_one_pack_per_shape_and_the_same_bytes() -> None:
    """Rows of many shapes (data lengths) and flags that are not bools but truthy: each the
    bytes the generic encoder gives, and the cache of row layouts stays bounded."""
    rows = [_row(T0 + timedelta(microseconds=n), b"[" + b"1," * n + b"1]") for n in range(50)]
    rows.append(_row(T0, synced=2))
    expected = pgcopy.encode_rows(pgcopy.EVENT_TYPES, [event_tuple(r) for r in rows])
    assert pgcopy.encode_events(rows) == expected
    assert len(pgcopy._ROW_STRUCTS) <= pgcopy._ROW_STRUCTS_MAX
    assert all(len(by) <= pgcopy._ROW_STRUCTS_MAX for by in pgcopy._ROW_STRUCTS.values())
    assert any(len(by) >= 50 for by in pgcopy._ROW_STRUCTS.values())  # one per data length


@pytest.mark.parametrize("ts", [datetime(2026, 11, 22, 7, 50), None])
def test_a_naive_event_time_is_named_by_the_events_encoder(ts: Any) -> None:
    """The same message as :func:`pgcopy.micros` gives, which the inline arithmetic replaced."""
    rows = [_row(T0), _row(ts)]
    with pytest.raises(pgcopy.CopyEncodeError, match="timestamptz needs an aware datetime") as got:
        pgcopy.encode_events(rows)
    with pytest.raises(pgcopy.CopyEncodeError) as said:
        pgcopy.micros(ts)
    assert str(got.value) == str(said.value)


def test_a_batch_of_types_without_readings_skips_their_encoding() -> None:
    """Whether a type carries readings is its registered metrics; a batch of such types sends
    the COPY payload of no rows, as :func:`pgcopy.encode_readings` itself would give."""
    for name, registered in REGISTRY.items():
        assert pgcopy.carries_readings([name]) is bool(registered.metrics)
    assert not pgcopy.carries_readings(["no.such.type"])
    rows = [_row(T0 + timedelta(seconds=n), seq=n) for n in range(3)]
    encoded = encode_events(rows)
    assert (encoded.readings_copy, encoded.readings) == pgcopy.encode_readings(rows)
    assert encoded.readings_copy == pgcopy.NO_ROWS
    mixed = rows_of(env_message("env-1", [(1, 20.5, 40.0)]))[0].events + rows
    encoded = encode_events(mixed)
    assert (encoded.readings_copy, encoded.readings) == pgcopy.encode_readings(mixed)
    assert encoded.readings == 2
