"""Storage migrations, partitions, retention and rollups on real PostgreSQL and on TimescaleDB
(the PGlite harness). Rollup numbers are checked against hand-computed values."""

from __future__ import annotations

import json
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import sql

from ingest_server.storage.maintenance import maintain, set_policy
from ingest_server.storage.migrate import available, backend, migrate
from ingest_server.web.api import auth
from ingest_server.web.api.data import where

pytestmark = pytest.mark.integration

TZ = ZoneInfo("Asia/Shanghai")
# Four district days back: the first 1-day chunk (UTC-aligned) then ends at least two days
# ago at any hour, as the "compress after 2 days" policy test needs. (Three days back left
# that chunk too young between 00:00 and 08:00 in Shanghai.)
D = datetime.now(TZ).date() - timedelta(days=4)
D1 = D + timedelta(days=1)


def at(day: date, hh: int, mm: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm), TZ)


@pytest.fixture(params=["postgres", "timescaledb"])
def store(request: pytest.FixtureRequest) -> str:
    """A database URL on either backend."""
    name = "db_url" if request.param == "postgres" else "tsdb_url"
    return str(request.getfixturevalue(name))


def migrate_to(conn: psycopg.Connection[Any], version: int) -> None:
    """Apply migrations up to ``version`` only (a database as an older server left it)."""
    conn.execute(
        "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
        " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for mig in available(backend(conn)):
        if mig.version <= version:
            conn.execute(mig.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                (mig.version, mig.name, mig.checksum),
            )


_seq = iter(range(1, 1_000_000))


def event(device: str, ts: datetime, type_: str, data: dict[str, Any]) -> tuple[Any, ...]:
    return (ts, "s1", device, "x", next(_seq), type_, json.dumps(data))


def seed(conn: psycopg.Connection[Any]) -> None:
    tap = {"uid_hash": "5f" * 32, "tech": "iso14443a", "reader": "door-1"}
    rows = [
        event("cr-1", at(D, 8), "card.tap", tap),
        event("cr-1", at(D, 9), "card.tap", tap),
        event("cr-1", at(D, 23, 30), "card.tap", tap),
        event("cr-1", at(D1, 0, 10), "card.tap", tap),  # 16:10 UTC on D: still D1 locally
        *(
            event("sig-1", at(D, 8, i), "attendance.checkin", {"class_id": "c1", **status})
            for i, status in enumerate(
                [
                    {"status": "on_time"},
                    {"status": "on_time"},
                    {"status": "late"},
                    {"status": "outside_period"},
                    {},
                ]
            )
        ),
        event("sb-1", at(D, 8), "board.power", {"state": "on"}),
        event("sb-1", at(D, 10), "board.power", {"state": "off"}),
        event("sb-1", at(D, 23), "board.power", {"state": "on"}),
        event("sb-1", at(D1, 1, 30), "board.power", {"state": "off"}),
        event("sb-2", at(D, 8), "board.input", {"source": "hdmi1"}),
        event("sb-2", at(D, 9), "board.input", {"source": "ops"}),
        event("sb-2", at(D, 9, 30), "board.input", {"source": "hdmi1"}),
        event("sb-2", at(D1, 0), "board.input", {"source": "ops"}),
        event("lib-1", at(D, 10), "library.loan", {"item_id": "a"}),
        event("lib-1", at(D, 11), "library.loan", {"item_id": "a"}),
        event("lib-1", at(D, 12), "library.loan", {"item_id": "b"}),
        event("lib-1", at(D, 13), "library.return", {"item_id": "a"}),
        event("lib-2", at(D, 14), "library.loan", {"item_id": "c"}),
    ]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
            rows,
        )
        cur.executemany(
            "INSERT INTO readings VALUES (%s, 's1', 'env-1', 'temperature_c', %s)",
            [(at(D, 8, 1), 20.0), (at(D, 8, 3), 22.0), (at(D, 8, 7), 30.0)],
        )
        cur.executemany(
            "INSERT INTO device_presence (time, school_id, device_id, state) VALUES"
            " (%s, 's1', 'gw-1', %s)",
            [(at(D, 7), "online"), (at(D, 17), "offline")],
        )
        cur.execute("INSERT INTO devices (device_id, school_id, grade) VALUES ('lib-1', 's1', '7')")


def check_rollups(conn: psycopg.Connection[Any]) -> None:
    def q(sql: str, *params: object) -> list[tuple[Any, ...]]:
        return conn.execute(sql.encode(), params).fetchall()

    assert q("SELECT day, school_id, device_id, taps FROM card_taps_daily ORDER BY day") == [
        (D, "s1", "cr-1", 3),
        (D1, "s1", "cr-1", 1),
    ]
    assert q(
        "SELECT day, school_id, class_id, checkins, on_time, late, outside_period"
        " FROM attendance_daily"
    ) == [(D, "s1", "c1", 5, 3, 1, 1)]
    assert q("SELECT day, device_id, on_minutes FROM board_power_daily ORDER BY day") == [
        (D, "sb-1", 180.0),
        (D1, "sb-1", 90.0),
    ]
    # sb-2 stays on "ops" after D1: later days (refreshed by maintain) are not checked here.
    assert q(
        "SELECT day, device_id, source, minutes FROM board_input_daily"
        " WHERE day <= %s ORDER BY day, source",
        D1,
    ) == [(D, "sb-2", "hdmi1", 930.0), (D, "sb-2", "ops", 30.0), (D1, "sb-2", "ops", 1440.0)]
    assert q("SELECT day, device_id, online_minutes FROM device_online_daily") == [
        (D, "gw-1", 600.0)
    ]
    assert q(
        "SELECT bucket, device_id, metric, avg, min, max, samples FROM env_5min ORDER BY bucket"
    ) == [
        (at(D, 8), "env-1", "temperature_c", 21.0, 20.0, 22.0, 2),
        (at(D, 8, 5), "env-1", "temperature_c", 30.0, 30.0, 30.0, 1),
    ]
    assert q(
        "SELECT day, school_id, grade, loans, returns FROM library_daily ORDER BY grade NULLS LAST"
    ) == [(D, "s1", "7", 3, 1), (D, "s1", None, 1, 0)]
    assert q("SELECT item_id, loans, last_loan FROM library_top_items ORDER BY item_id") == [
        ("a", 2, at(D, 11)),
        ("b", 1, at(D, 12)),
        ("c", 1, at(D, 14)),
    ]


def test_rollups_match_hand_computed_values(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        migrate(conn)
        seed(conn)
        conn.execute("SELECT campus_refresh_rollups(%s, %s)", (D, D1))
        check_rollups(conn)
        # A refresh of the days touched since the last one finds these days by received_at.
        conn.execute("TRUNCATE board_power_daily")
        assert maintain(conn).days_refreshed >= 2
        check_rollups(conn)


def test_timescaledb_policies_run_as_jobs(tsdb_url: str) -> None:
    with psycopg.connect(tsdb_url, autocommit=True) as conn:
        migrate(conn)
        seed(conn)
        old = datetime.now(TZ) - timedelta(days=40)
        conn.execute(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
            " VALUES (%s, 's1', 'old-1', 'x', 1, 'card.tap', '{}')",
            (old,),
        )
        set_policy(conn, "events", compress_after="2 days", retain_for="30 days")
        jobs = dict(
            conn.execute(
                "SELECT proc_name || ':' || coalesce(hypertable_name, ''), job_id"
                " FROM timescaledb_information.jobs"
            ).fetchall()
        )
        conn.execute(f"CALL run_job({jobs['policy_retention:events']})")
        assert conn.execute("SELECT count(*) FROM events WHERE device_id = 'old-1'").fetchone() == (
            0,
        )
        conn.execute(f"CALL run_job({jobs['policy_compression:events']})")
        compressed = conn.execute(
            "SELECT count(*) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'events' AND is_compressed"
        ).fetchone()
        assert compressed is not None
        assert compressed[0] >= 1
        for agg in ("card_taps_daily_agg", "attendance_daily_agg", "env_5min_agg"):
            conn.execute(f"CALL run_job({jobs['policy_refresh_continuous_aggregate:' + agg]})")
        conn.execute("SELECT campus_refresh_rollups(%s, %s)", (D, D1))
        check_rollups(conn)  # the same numbers read from materialised and compressed data


def test_migration_carries_0001_data_over(store: str) -> None:
    with psycopg.connect(store, autocommit=True) as conn:
        migrate_to(conn, 1)
        seed_v1 = [
            event("cr-1", at(D, 8), "card.tap", {}),
            event("cr-1", datetime(1999, 1, 1, tzinfo=TZ), "card.tap", {}),  # beyond retention
        ]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
                seed_v1,
            )
            cur.execute(
                "INSERT INTO readings VALUES (%s, 's1', 'env-1', 'co2_ppm', 800)", (at(D, 8),)
            )
            cur.execute("INSERT INTO devices (device_id, school_id) VALUES ('cr-1', 's1')")
        assert migrate(conn) == [m.version for m in available() if m.version > 1]
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (2,)
        assert conn.execute("SELECT value FROM readings").fetchone() == (800.0,)
        assert conn.execute("SELECT room, class_id, grade, name FROM devices").fetchone() == (
            None,
            None,
            None,
            None,
        )
        assert migrate(conn) == []


def test_replay_column_reaches_rows_stored_and_compressed_before_it(store: str) -> None:
    """Migration 0070 on a database holding events (on TimescaleDB in a compressed chunk):
    the old rows read replay false, new rows can say true, and ``?replay`` filtering works."""
    with psycopg.connect(store, autocommit=True) as conn:
        migrate_to(conn, 69)
        old = [event("cr-1", at(D, 8, m), "card.tap", {}) for m in range(3)]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
                old,
            )
        if backend(conn) == "timescaledb":
            conn.execute("SELECT compress_chunk(c) FROM show_chunks('events') c")
            compressed = conn.execute(
                "SELECT count(*) FROM timescaledb_information.chunks"
                " WHERE hypertable_name = 'events' AND is_compressed"
            ).fetchone()
            assert compressed == (1,)
        assert migrate(conn) == [m.version for m in available() if m.version >= 70]
        assert conn.execute("SELECT replay, count(*) FROM events GROUP BY 1").fetchall() == [
            (False, 3)
        ]
        conn.execute(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data, replay)"
            " VALUES (%s, 's1', 'cr-1', 'card_reader', 99, 'card.tap', '{}', true)",
            (at(D, 9),),
        )
        # the API's own filter (a plain `replay = true` fails on TimescaleDB's chunk compressed
        # before the column existed: "unexpected column type 'boolean'")
        everyone = auth.Principal(0, "test", "district_admin")
        for flag, seqs in ((True, [99]), (False, [r[4] for r in old])):
            cond, params = where(at(D, 0), at(D1, 0), {"replay": flag}, everyone)
            # (no ORDER BY: a sorted plan happens not to take the failing path; the API's may)
            query = sql.SQL("SELECT seq FROM events WHERE {}").format(cond)
            assert sorted(s for (s,) in conn.execute(query, params).fetchall()) == sorted(seqs)


def test_partitions_made_ahead_and_dropped_after_retention(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        today = datetime.now(TZ).date()
        names = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'events'::regclass"
            )
        }
        for k in range(8):  # today and partitions_ahead (7) days
            assert f"events_p{(today + timedelta(days=k)):%Y%m%d}" in names
        assert "events_default" in names
        # An event 10 days back has no partition: DEFAULT takes it until one is made for its day.
        conn.execute(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
            " VALUES (%s, 's1', 'd', 'x', 1, 'card.tap', '{}')",
            (at(today - timedelta(days=10), 12),),
        )
        assert conn.execute("SELECT count(*) FROM ONLY events_default").fetchone() == (1,)
        conn.execute(
            "SELECT campus_ensure_partitions('events', %s, %s)",
            (at(today - timedelta(days=10), 0), at(today - timedelta(days=9), 0)),
        )
        assert conn.execute("SELECT count(*) FROM ONLY events_default").fetchone() == (0,)
        assert conn.execute("SELECT tableoid::regclass::text FROM events").fetchone() == (
            f"events_p{(today - timedelta(days=10)):%Y%m%d}",
        )
        set_policy(conn, "events", compress_after=None, retain_for="5 days")
        result = maintain(conn)
        assert result.dropped == 1
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
        assert maintain(conn).created == 0  # already there


def test_writer_keeps_device_seq_identity(db_url: str) -> None:
    from ingest_server.ingest.writer import BatchWriter
    from tests.ingest_rows import message, rows, tap

    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        writer = BatchWriter(conn)
        assert writer.write(rows(message("cr-1", [tap(5), tap(6)]))).inserted == 2
        # Same seq, same ts (a resend): dropped.
        again = writer.write(rows(message("cr-1", [tap(6), tap(7)])))
        assert (again.inserted, again.duplicates) == (1, 1)
        # Same seq with another ts (breaks the contract): still dropped, by (device_id, seq).
        moved = tap(5)
        moved = type(moved)(
            seq=5, ts=moved.ts + timedelta(days=2), type=moved.type, data=moved.data
        )
        assert writer.write(rows(message("cr-1", [moved]))).duplicates == 1
        # Out of order: below the device's max seq, new, takes the slow path and is kept.
        assert writer.write(rows(message("cr-1", [tap(3), tap(1)]))).inserted == 2
        # Far past and far future land in DEFAULT.
        far = [
            type(moved)(seq=s, ts=ts, type=moved.type, data=moved.data)
            for s, ts in (
                (100, datetime(1990, 1, 1, tzinfo=TZ)),
                (101, datetime(2100, 1, 1, tzinfo=TZ)),
            )
        ]
        assert writer.write(rows(message("cr-1", far))).inserted == 2
        assert conn.execute(
            "SELECT count(*) FROM ONLY events_default WHERE seq >= 100"
        ).fetchone() == (2,)
        assert conn.execute(
            "SELECT count(*), count(DISTINCT seq) FROM events WHERE device_id = 'cr-1'"
        ).fetchone() == (7, 7)
        assert conn.execute("SELECT event_count, max_seq FROM devices").fetchone() == (7, 101)
