"""Binary COPY payloads from ingest_server.ingest.pgcopy, read back from a real PostgreSQL 15."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest_server.ingest import pgcopy
from ingest_server.ingest.batch import encode_events
from ingest_server.storage.migrate import migrate_url
from tests.ingest_rows import message, rows, tap

pytestmark = pytest.mark.integration

TYPES = ["timestamptz", "text", "int8", "bool", "float8", "bytea", "jsonb"]
IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.execute(
            "CREATE TEMP TABLE t (n serial, ts timestamptz, s text, i int8, b bool, f float8,"
            " raw bytea, j jsonb)"
        )
        yield c


def copy_and_read(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> list[Any]:
    conn.execute("TRUNCATE t")
    with conn.cursor().copy("COPY t (ts, s, i, b, f, raw, j) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(pgcopy.encode_rows(TYPES, rows))
    return conn.execute("SELECT ts, s, i, b, f, raw, j FROM t ORDER BY n").fetchall()


def check(rows: list[tuple[Any, ...]], back: list[Any]) -> None:
    assert len(back) == len(rows)
    for sent, got in zip(rows, back, strict=True):
        ts, s, i, b, f, raw, j = sent
        assert got[0] == ts
        assert ts is None or got[0].tzinfo is not None
        assert got[1:4] == (s, i, b)
        if f is None or got[4] is None:
            assert got[4] is f
        elif math.isnan(f):
            assert math.isnan(got[4])
        else:
            assert got[4] == f
            assert math.copysign(1, got[4]) == math.copysign(1, f)
        assert got[5] == raw
        assert got[6] == (None if j is None else msgspec.json.decode(j))


def test_edge_values_come_back_exactly(conn: psycopg.Connection[Any]) -> None:
    rows: list[tuple[Any, ...]] = [
        (
            datetime(2026, 11, 22, 7, 50, 1, 999_999, tzinfo=IST),
            "Zürich Grundschule 学校 🎒",
            -(2**63),
            False,
            -0.0,
            b"\x00\xff\x01",
            '{"name": "Ærø", "n": [1, -2, null], "ok": true}'.encode(),
        ),
        (
            datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=PST),  # before the 2000 epoch
            "",
            2**63 - 1,
            True,
            float("inf"),
            b"",
            b"[]",
        ),
        (datetime(2000, 1, 1, tzinfo=UTC), "a", -1, True, 5e-324, b"x", b"{}"),
        (None, None, None, None, None, None, None),
        (None, "β", 0, None, float("-inf"), None, b'"text"'),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), "z", 7, False, math.nan, None, b"0"),
        (datetime(1970, 1, 1, tzinfo=UTC), "q", 1, True, 1.7976931348623157e308, None, None),
    ]
    back = copy_and_read(conn, rows)
    check(rows, back)
    # microsecond precision, and the instant, not the wall clock, is stored
    assert back[0][0] == datetime(2026, 11, 22, 2, 20, 1, 999_999, tzinfo=UTC)
    us = conn.execute(
        "SELECT (extract(epoch FROM ts) * 1000000)::int8 FROM t WHERE ts IS NOT NULL ORDER BY n"
    ).fetchall()
    assert us[1] == (946_684_799_000_001 + 8 * 3600 * 1_000_000,)


def test_the_database_refuses_what_the_encoder_passed_through(
    conn: psycopg.Connection[Any],
) -> None:
    """jsonb is sent as the caller's JSON text: PostgreSQL, not the encoder, validates it."""
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        copy_and_read(conn, [(None, None, None, None, None, None, b"{not json")])
    assert copy_and_read(conn, [(None, "after", None, None, None, None, None)])[0][1] == "after"


texts = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
row_strategy = st.tuples(
    st.none()
    | st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(9000, 1, 1),
        timezones=st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m))),
    ),
    st.none() | texts,
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.none() | st.booleans(),
    st.none() | st.floats(),
    st.none() | st.binary(max_size=64),
    st.none() | json_values.map(msgspec.json.encode),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(row_strategy, max_size=15))
def test_arbitrary_rows_round_trip(
    conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]
) -> None:
    check(rows, copy_and_read(conn, rows))


def test_events_rows_round_trip_into_the_events_table_with_replay(db_url: str) -> None:
    """The hot encoder's rows go into the migrated ``events`` (EVENT_COLUMNS, ten fields):
    a live message's events read back replay false, a backlog message's true, synced intact."""
    migrate_url(db_url)
    batch = rows(message("cr-9", [tap(1), tap(2)]), message("cr-9", [tap(3)], replay=True))
    payload = encode_events(batch.events).events_copy
    with psycopg.connect(db_url, autocommit=True) as c:
        target = f"events ({pgcopy.EVENT_COLUMNS})"
        with c.cursor().copy(f"COPY {target} FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(payload)
        back = c.execute(
            "SELECT seq, synced, replay, data->>'reader' FROM events WHERE device_id = 'cr-9'"
            " ORDER BY seq"
        ).fetchall()
    assert back == [
        (1, True, False, "door-1"),
        (2, True, False, "door-1"),
        (3, True, True, "door-1"),
    ]
