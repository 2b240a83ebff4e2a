"""BatchWriter and migrations on a real PostgreSQL 15."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg import pq

from ingest_server.ingest.batch import Batch, EventRow, Inbound, Rows
from ingest_server.ingest.writer import BatchWriter, missing_total
from ingest_server.storage.migrate import available, migrate_url
from schemas.uplink import UplinkEvent
from tests.ingest_rows import T0, UID, message, rows, tap

pytestmark = pytest.mark.integration


def env(seq: int, temperature: float, humidity: float) -> UplinkEvent:
    data = {"sensor": "s1", "temperature_c": temperature, "humidity_pct": humidity}
    return UplinkEvent(
        seq=seq,
        ts=T0 + timedelta(seconds=seq),
        type="env.reading",
        data=msgspec.Raw(msgspec.json.encode(data)),
    )


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    migrate_url(db_url)
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


def keys(conn: psycopg.Connection[Any]) -> set[tuple[str, int]]:
    return {(d, s) for d, s in conn.execute("SELECT device_id, seq FROM events").fetchall()}


def device(conn: psycopg.Connection[Any], device_id: str) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM devices WHERE device_id = %s", (device_id,))
    names = [c.name for c in cur.description or []]
    row = cur.fetchone()
    assert row is not None, f"{device_id} not registered"
    return dict(zip(names, row, strict=True))


def test_migrations_are_idempotent(db_url: str) -> None:
    assert migrate_url(db_url) == [m.version for m in available()]
    assert migrate_url(db_url) == []
    with psycopg.connect(db_url) as c:
        versions = c.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
        assert versions == [(m.version,) for m in available()]
        tables = {
            r[0]
            for r in c.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert {"events", "readings", "devices", "quarantine", "schema_migrations"} <= tables


def test_fast_path_inserts_every_event(conn: psycopg.Connection[Any]) -> None:
    writer = BatchWriter(conn)
    result = writer.write(rows(message("cr-1", [tap(1), tap(2)]), message("cr-2", [tap(7)])))
    assert (result.inserted, result.duplicates, result.quarantined) == (3, 0, 0)
    assert keys(conn) == {("cr-1", 1), ("cr-1", 2), ("cr-2", 7)}
    row = conn.execute(
        "SELECT time, school_id, device_kind, type, data, synced FROM events WHERE seq = 7"
    ).fetchone()
    assert row == (
        T0 + timedelta(seconds=7),
        "sch-1",
        "card_reader",
        "card.tap",
        {"uid_hash": UID, "tech": "iso14443a", "reader": "door-1"},
        True,
    )


def test_duplicates_fall_back_and_are_counted(conn: psycopg.Connection[Any]) -> None:
    writer = BatchWriter(conn)
    writer.write(rows(message("cr-1", [tap(1), tap(2), tap(3)])))
    # 2 and 3 are stored already; 5 comes twice in this very batch.
    again = rows(message("cr-1", [tap(2), tap(3), tap(4), tap(5)]), message("cr-1", [tap(5)]))
    result = writer.write(again)
    assert (result.inserted, result.duplicates) == (2, 3)
    assert sorted(r.event.seq for r in result.stored) == [4, 5]
    assert keys(conn) == {("cr-1", s) for s in range(1, 6)}
    assert device(conn, "cr-1")["event_count"] == 5
    # The connection is still usable for the fast path after a fallback.
    assert writer.write(rows(message("cr-1", [tap(6)]))).inserted == 1


def test_fast_path_conflict_rolls_back_and_writes_the_slow_way(
    conn: psycopg.Connection[Any],
) -> None:
    """Another server stored some of the batch after this writer cached the device's max seq:
    the fast COPY fails first in the transaction, and the retry writes every row exactly once."""
    mine, other = BatchWriter(conn), BatchWriter(conn)
    mine.write(rows(message("env-1", [env(1, 20.0, 40.0)], kind="env_sensor")))
    other.write(rows(message("env-1", [env(2, 20.0, 40.0), env(3, 20.0, 40.0)], kind="env_sensor")))
    bad = Inbound("campus/v1/sch-1/env-1/up", b"{not json", 9, 1, T0)
    batch = rows(
        message(
            "env-1", [env(2, 20.0, 40.0), env(3, 20.0, 40.0), env(4, 21.0, 41.0)], kind="env_sensor"
        ),
        bad,
    )
    result = mine.write(batch)
    assert mine.fast_path_conflicts == 1
    assert (result.inserted, result.duplicates, result.quarantined) == (1, 2, 1)
    assert [r.event.seq for r in result.stored] == [4]
    assert keys(conn) == {("env-1", s) for s in range(1, 5)}
    assert conn.execute("SELECT count(*) FROM readings").fetchone() == (8,)
    assert conn.execute("SELECT count(*) FROM quarantine").fetchone() == (1,)
    d = device(conn, "env-1")
    assert (d["min_seq"], d["max_seq"], d["event_count"], d["missing"]) == (1, 4, 4, 0)
    # the cache now knows seq 4: the next batch takes the fast path again
    assert mine.write(rows(message("env-1", [env(5, 21.0, 41.0)], kind="env_sensor"))).inserted == 1
    assert mine.fast_path_conflicts == 1


def test_replay_flag_is_stored_on_both_paths(conn: psycopg.Connection[Any]) -> None:
    """The message's ``replay: true`` reaches ``events.replay`` by the fast COPY and by the
    staging table's INSERT … WHERE NOT EXISTS alike; a live message stores false."""
    mine, other = BatchWriter(conn), BatchWriter(conn)
    fast = mine.write(
        rows(message("cr-1", [tap(1)]), message("cr-1", [tap(2), tap(3)], replay=True))
    )
    assert (fast.inserted, mine.fast_path_conflicts) == (3, 0)
    other.write(rows(message("cr-1", [tap(5)])))  # mine's cached max seq is now stale
    slow = mine.write(
        rows(message("cr-1", [tap(4)], replay=True), message("cr-1", [tap(5), tap(6)]))
    )
    assert (slow.inserted, slow.duplicates, mine.fast_path_conflicts) == (2, 1, 1)
    stored = conn.execute("SELECT seq, replay FROM events ORDER BY seq").fetchall()
    assert stored == [(1, False), (2, True), (3, True), (4, True), (5, False), (6, False)]


def test_replay_column_is_not_null_false_on_every_partition(conn: psycopg.Connection[Any]) -> None:
    """Migration 0070's column: boolean NOT NULL DEFAULT false on the parent and on every
    partition (new partitions are made LIKE events and get it too)."""
    conn.execute("SELECT campus_ensure_partitions('events', now(), now() + interval '1 day')")
    cols = conn.execute(
        "SELECT c.relname, a.attnotnull, pg_get_expr(d.adbin, d.adrelid)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE a.attname = 'replay' AND (c.relname = 'events' OR c.relname LIKE 'events\\_p%'"
        " OR c.relname = 'events_default')"
    ).fetchall()
    names = {c[0] for c in cols}
    assert {"events", "events_default"} <= names
    assert len(names) >= 3  # and at least one daily partition
    assert all(notnull and default == "false" for _, notnull, default in cols)
    cols_sql = "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data"
    conn.execute(f"{cols_sql}) VALUES (now(), 's', 'd', 'k', 1, 't', '{{}}')")
    assert conn.execute("SELECT replay FROM events").fetchall() == [(False,)]
    with pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute(f"{cols_sql}, replay) VALUES (now(), 's', 'd', 'k', 2, 't', '{{}}', NULL)")


def test_nothing_to_write_sends_no_statement(conn: psycopg.Connection[Any], tmp_path: Path) -> None:
    """A batch of card taps (no readings, no quarantine, no states) costs BEGIN, one COPY, the
    device upsert and COMMIT: no empty COPY and no savepoint."""
    writer = BatchWriter(conn)
    writer.write(rows(message("cr-1", [tap(1)])))  # the device is now cached
    trace = tmp_path / "libpq.trace"
    with trace.open("w") as out:
        conn.pgconn.trace(out.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            assert writer.write(rows(message("cr-1", [tap(2), tap(3)]))).inserted == 2
        finally:
            conn.pgconn.untrace()
    # what the client sent: simple queries and the text of each parsed statement
    sent = re.findall(
        r'^F\t\d+\t(?:Query|Parse)\t\s*(?:"[^"]*"\s+)??"\s*(\w+)', trace.read_text(), re.M
    )
    assert [w.upper() for w in sent] == ["BEGIN", "COPY", "WITH", "COMMIT"], sent


def test_readings_only_for_inserted_events(conn: psycopg.Connection[Any]) -> None:
    writer = BatchWriter(conn)
    batch = rows(message("env-1", [env(1, 21.5, 40.0), env(2, 22.0, 41.0)], kind="env_sensor"))
    assert writer.write(batch).inserted == 2
    assert writer.write(batch).duplicates == 2
    got = conn.execute("SELECT time, metric, value FROM readings ORDER BY time, metric").fetchall()
    assert got == [
        (T0 + timedelta(seconds=1), "humidity_pct", 40.0),
        (T0 + timedelta(seconds=1), "temperature_c", 21.5),
        (T0 + timedelta(seconds=2), "humidity_pct", 41.0),
        (T0 + timedelta(seconds=2), "temperature_c", 22.0),
    ]
    # card.tap carries no numeric metric
    writer.write(rows(message("cr-1", [tap(1)])))
    assert conn.execute("SELECT count(*) FROM readings").fetchone() == (4,)


def test_sealed_batch_sends_its_payloads_and_reencodes_only_a_stored_subset(
    conn: psycopg.Connection[Any],
) -> None:
    """The decoder thread's payloads are what is stored; after duplicates, only the new
    events' readings go, re-encoded on the writer thread."""
    writer = BatchWriter(conn)
    first = Batch()
    first.add(message("env-1", [env(1, -12.25, 0.0), env(2, 22.0, 41.0)], kind="env_sensor"))
    first.seal()
    assert first.encoded is not None
    assert (len(first.encoded.events), first.encoded.readings) == (2, 4)
    assert writer.write(first.rows, first.encoded).inserted == 2
    second = Batch()
    second.add(message("env-1", [env(2, 22.0, 41.0), env(3, 23.5, 42.0)], kind="env_sensor"))
    second.add(message("env-1", [env(3, 23.5, 42.0)], kind="env_sensor"))
    second.seal()
    assert second.encoded is not None
    assert [r.event.seq for r in second.encoded.events] == [2, 3]  # one of each seq
    result = writer.write(second.rows, second.encoded)
    assert (result.inserted, result.duplicates) == (1, 2)
    got = conn.execute("SELECT time, metric, value FROM readings ORDER BY time, metric").fetchall()
    assert got == [
        (T0 + timedelta(seconds=1), "humidity_pct", 0.0),
        (T0 + timedelta(seconds=1), "temperature_c", -12.25),
        (T0 + timedelta(seconds=2), "humidity_pct", 41.0),
        (T0 + timedelta(seconds=2), "temperature_c", 22.0),
        (T0 + timedelta(seconds=3), "humidity_pct", 42.0),
        (T0 + timedelta(seconds=3), "temperature_c", 23.5),
    ]
    assert device(conn, "env-1")["event_count"] == 3


def test_unencodable_value_is_a_data_error_and_writes_nothing(
    conn: psycopg.Connection[Any],
) -> None:
    """Like a value the database refuses: the consumer then writes message by message."""
    good = rows(message("cr-1", [tap(1)]))
    e = good.events[0]
    bad = EventRow(e.school_id, e.device_id, e.kind, e.received_at.replace(tzinfo=None), e.event)
    batch = Batch()
    batch.rows = Rows(events=[bad])
    batch.seal()
    assert batch.encoded is None  # the decoder leaves it to the writer
    writer = BatchWriter(conn)
    with pytest.raises(psycopg.DataError, match="timestamptz needs an aware datetime"):
        writer.write(batch.rows, batch.encoded)
    assert keys(conn) == set()
    assert writer.write(good).inserted == 1


def test_an_encoder_bug_is_a_data_error_and_writes_nothing(
    conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception the encoder did not mean to raise takes the same path as a refused value:
    the consumer then quarantines the message that meets it, and ingest goes on."""
    from ingest_server.ingest import pgcopy

    good = rows(message("env-1", [env(1, 21.5, 40.0)], kind="env_sensor"))
    real = pgcopy.encode_readings

    def broken(*args: Any) -> tuple[bytes, int]:
        raise RuntimeError("boom")

    monkeypatch.setattr(pgcopy, "encode_readings", broken)
    writer = BatchWriter(conn)
    with pytest.raises(psycopg.DataError, match="internal error while encoding: RuntimeError"):
        writer.write(good)
    assert keys(conn) == set()
    monkeypatch.setattr(pgcopy, "encode_readings", real)
    assert writer.write(good).inserted == 1


def test_device_counters_and_gaps(conn: psycopg.Connection[Any]) -> None:
    writer = BatchWriter(conn)
    first = writer.write(rows(message("cr-1", [tap(1), tap(2), tap(5)])))
    d = device(conn, "cr-1")
    assert (d["min_seq"], d["max_seq"], d["event_count"], d["missing"]) == (1, 5, 3, 2)
    assert (d["school_id"], d["kind"]) == ("sch-1", "card_reader")
    assert first.new_missing == 2
    assert writer.write(rows(message("cr-1", [tap(3)]))).new_missing == 0  # a late one fills in
    assert device(conn, "cr-1")["missing"] == 1
    assert writer.write(rows(message("cr-1", [tap(9)]))).new_missing == 3  # 6, 7, 8
    assert writer.write(rows(message("cr-1", [tap(9), tap(2)]))).new_missing == 0
    d = device(conn, "cr-1")
    assert (d["min_seq"], d["max_seq"], d["event_count"], d["missing"]) == (1, 9, 5, 4)
    assert d["max_seq"] - d["min_seq"] + 1 - d["event_count"] == d["missing"]
    assert missing_total(conn) == 4


def test_quarantine_rows_are_readable(conn: psycopg.Connection[Any]) -> None:
    writer = BatchWriter(conn)
    bad_utf8 = Inbound("campus/v1/sch-1/cr-9/up", b'{"v": 1, "x": "\xff\xfe"}', 2, 1, T0)
    batch = rows(
        message("cr-1", [tap(1)]),
        bad_utf8,
        Inbound("campus/v1/sch-1/cr-9/up", b"{not json", 3, 1, T0),
    )
    result = writer.write(batch)
    assert (result.inserted, result.quarantined) == (1, 2)
    got = conn.execute(
        "SELECT device_id, payload, payload_text, reason FROM quarantine ORDER BY id"
    ).fetchall()
    assert got[0][:2] == ("cr-9", bad_utf8.payload)
    assert got[0][2] == '{"v": 1, "x": "\\377\\376"}'
    assert "not UTF-8" in got[0][3]
    assert got[1][2] == "{not json"
    assert "not valid JSON" in got[1][3]


def test_state_updates_the_registry(conn: psycopg.Connection[Any]) -> None:
    writer = BatchWriter(conn)

    def state(value: str, boot: int, *, retain: bool = False) -> Inbound:
        body = {"state": value, "boot": boot, "agent_version": "1.2.0", "ts": T0.isoformat()}
        return Inbound(
            "campus/v1/sch-1/cr-1/state",
            msgspec.json.encode(body),
            1,
            1,
            T0 + timedelta(hours=1),
            retain=retain,
        )

    assert writer.write(rows(state("online", 3, retain=True))).states == 1
    d = device(conn, "cr-1")
    assert (d["state"], d["boot"], d["agent_version"], d["kind"]) == ("online", 3, "1.2.0", None)
    assert d["state_at"] == T0  # a retained copy: its own ts
    writer.write(rows(message("cr-1", [tap(1)]), state("offline", 3)))
    d = device(conn, "cr-1")
    assert (d["state"], d["kind"], d["event_count"]) == ("offline", "card_reader", 1)
    assert d["state_at"] == T0 + timedelta(hours=1)  # live: when it arrived
    bad = Inbound("campus/v1/sch-1/cr-1/state", b'{"state": "sleeping"}', 1, 1, T0)
    result = writer.write(rows(bad))
    assert (result.states, result.quarantined) == (0, 1)
    reason = conn.execute("SELECT reason FROM quarantine").fetchone()
    assert reason is not None
    assert reason[0].startswith("state: ")


def _state(value: str, received_at: Any, *, device: str = "cr-1", retain: bool = False) -> Inbound:
    body = {"state": value, "boot": 1, "agent_version": "1.2.0", "ts": T0.isoformat()}
    return Inbound(
        f"campus/v1/sch-1/{device}/state", msgspec.json.encode(body), 1, 1, received_at, retain
    )


def _presence(conn: psycopg.Connection[Any], device_id: str) -> list[tuple[Any, str]]:
    return conn.execute(
        "SELECT time, state FROM device_presence WHERE device_id = %s ORDER BY time", (device_id,)
    ).fetchall()


def test_states_of_one_read_keep_their_arrival_order(conn: psycopg.Connection[Any]) -> None:
    """Every message of one socket read shares its received_at: a device that went offline and
    back within one read must not store two rows at one instant (their order would be the
    database's choice; CI once saw the presence history list online before offline)."""
    writer = BatchWriter(conn)
    read = T0 + timedelta(hours=1)
    us = timedelta(microseconds=1)
    got = writer.write(
        rows(
            _state("offline", read),
            _state("online", read, device="cr-2"),
            _state("online", read),
            _state("online", read),
        )
    )
    assert [(s.device_id, s.state_at) for s in got.state_rows] == [
        ("cr-1", read),
        ("cr-2", read),
        ("cr-1", read + us),
        ("cr-1", read + 2 * us),
    ]
    # the same read's rest in the next batch still comes after; a later read is left as it is
    writer.write(rows(_state("offline", read)))
    writer.write(rows(_state("online", read + timedelta(seconds=1))))
    assert _presence(conn, "cr-1") == [
        (read, "offline"),
        (read + us, "online"),
        (read + 2 * us, "online"),
        (read + 3 * us, "offline"),
        (read + timedelta(seconds=1), "online"),
    ]
    assert device(conn, "cr-1")["state_at"] == read + timedelta(seconds=1)
    # a retained copy's own ts, older than what was stored, is not moved
    writer.write(rows(_state("offline", read + timedelta(seconds=2), retain=True)))
    assert _presence(conn, "cr-1")[0] == (T0, "offline")


def test_a_rolled_back_batch_does_not_move_the_next_ones_states(
    conn: psycopg.Connection[Any],
) -> None:
    writer = BatchWriter(conn)
    read = T0 + timedelta(hours=1)
    bad = Rows(states=rows(_state("online", read)).states)
    conn.execute("ALTER TABLE device_presence ADD CONSTRAINT no_online CHECK (state <> 'online')")
    with pytest.raises(psycopg.errors.CheckViolation):
        writer.write(bad)
    conn.execute("ALTER TABLE device_presence DROP CONSTRAINT no_online")
    writer.write(bad)  # the retry of the same rows stores them at their own time
    assert _presence(conn, "cr-1") == [(read, "online")]


@pytest.mark.slow
def test_fast_path_over_many_batches(conn: psycopg.Connection[Any]) -> None:
    """100k card taps in batches of 5000 from 100 devices, all by the fast path. (Its speed is
    measured in bench/, not here.)"""
    writer = BatchWriter(conn)
    batches = [
        rows(*(message(f"cr-{d}", [tap(b * 50 + i) for i in range(50)]) for d in range(100)))
        for b in range(20)
    ]
    for batch in batches:
        writer.write(batch)
    assert writer.fast_path_conflicts == 0
    assert conn.execute(
        "SELECT count(*), count(DISTINCT (device_id, seq)) FROM events"
    ).fetchone() == (
        100_000,
        100_000,
    )
    assert device(conn, "cr-7")["event_count"] == 1000
