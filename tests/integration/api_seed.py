"""Known rows for the API tests, and a running API over them; everything takes a db URL.

``prepare`` brings a migrated database up to the storage the API reads: on this branch it adds
the ``devices`` columns and stand-in rollup tables that the storage branch provides for real
(created only where missing, with exactly the names and columns of the real ones).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from ingest_server.api import auth
from ingest_server.consumer import Health
from ingest_server.http import HttpServer, create_app
from ingest_server.metrics import IngestMetrics
from ingest_server.migrate import migrate

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
DAY0 = date(2026, 11, 20)

_DEVICE_COLUMNS = """
ALTER TABLE devices ADD COLUMN IF NOT EXISTS room text;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS class_id text;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS grade text;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS name text;
"""
STANDINS: dict[str, str] = {
    "card_taps_daily": "day date, school_id text, device_id text, taps bigint",
    "attendance_daily": "day date, school_id text, class_id text, checkins bigint,"
    " on_time bigint, late bigint, outside_period bigint",
    "board_power_daily": "day date, school_id text, device_id text, on_minutes double precision",
    "board_input_daily": "day date, school_id text, device_id text, source text,"
    " minutes double precision",
    "env_5min": "bucket timestamptz, school_id text, device_id text, metric text,"
    " avg double precision, min double precision, max double precision, samples bigint",
    "device_online_daily": "day date, school_id text, device_id text,"
    " online_minutes double precision",
    "library_daily": "day date, school_id text, grade text, loans bigint, returns bigint",
    "library_top_items": "school_id text, item_id text, loans bigint, last_loan timestamptz",
    "device_presence": "time timestamptz, school_id text, device_id text, state text",
}
ROLLUP_ROWS: dict[str, list[tuple[Any, ...]]] = {
    "card_taps_daily": [
        (DAY0, "s001", "cr-0101", 42),
        (DAY0 + timedelta(days=1), "s001", "cr-0101", 40),
        (DAY0, "s002", "cr-0201", 7),
    ],
    "attendance_daily": [(DAY0, "s001", "c7a", 30, 27, 2, 1), (DAY0, "s001", "c7b", 28, 28, 0, 0)],
    "board_power_daily": [(DAY0, "s001", "sb-0101", 312.5)],
    "board_input_daily": [
        (DAY0, "s001", "sb-0101", "hdmi1", 200.0),
        (DAY0, "s001", "sb-0101", "ops", 112.5),
    ],
    "env_5min": [
        (T0, "s001", "env-0101", "co2_ppm", 650.0, 600.0, 700.0, 5),
        (T0 + timedelta(minutes=5), "s001", "env-0101", "co2_ppm", 720.0, 700.0, 740.0, 5),
    ],
    "device_online_daily": [(DAY0, "s001", "cr-0101", 1440.0)],
    "library_daily": [(DAY0, "s001", "7", 12, 9), (DAY0, "s001", "8", 3, 5)],
    "library_top_items": [
        ("s001", "isbn-978", 17, T0),
        ("s001", "isbn-111", 4, T0),
        ("s002", "isbn-222", 9, T0),
    ],
}
# data with the characters CSV must quote: comma, quote, newline
TRICKY = {"reader": 'door "A", east\nwing', "uid_hash": "5f1c", "tech": "iso14443a"}


@dataclass(frozen=True)
class Seeded:
    events: list[tuple[Any, ...]]  # (time, school, device, kind, seq, type, data)
    readings: list[tuple[Any, ...]]  # (time, school, device, metric, value)


def prepare(conn: psycopg.Connection[Any]) -> list[str]:
    """Migrate and add what the storage branch brings; the stand-ins created (empty)."""
    migrate(conn)
    conn.execute(_DEVICE_COLUMNS)
    made = []
    for name, columns in STANDINS.items():
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
            conn.execute(
                sql.SQL("CREATE TABLE {} ({})").format(sql.Identifier(name), sql.SQL(columns))
            )
            made.append(name)
    return made


def seed(db_url: str) -> Seeded:
    """Known devices, events, readings, quarantine rows and rollup rows."""
    events: list[tuple[Any, ...]] = []
    for i in range(10):
        events.append(
            (T0 + timedelta(minutes=i), "s001", "cr-0101", "card_reader", i + 1, "card.tap",
             {**TRICKY, "n": i})
        )  # fmt: skip
    # seq 3 of sb-0101 never arrived: missing = 1
    for seq in (1, 2, 4):
        events.append(
            (T0 + timedelta(minutes=seq, seconds=30), "s001", "sb-0101", "smart_board", seq,
             "board.power", {"on": seq % 2 == 1})
        )  # fmt: skip
    health = {
        "cpu_pct": 3.5,
        "rss_mb": 40.0,
        "outbox_depth": 17,
        "oldest_unsent_s": 2.5,
        "drivers": {"panel": "running", "camera": "error"},
    }
    events.append((T0 + timedelta(minutes=5), "s001", "sb-0101", "smart_board", 5,
                   "agent.health", health))  # fmt: skip
    for i in range(4):
        tap = {"uid_hash": f"h{i}", "tech": "em4100", "reader": "gate"}
        events.append(
            (T0 + timedelta(minutes=i), "s002", "cr-0201", "card_reader", i + 1, "card.tap", tap)
        )
    readings = [
        (T0 + timedelta(minutes=i), "s001", "env-0101", m, v + i)
        for i in range(5)
        for m, v in (("co2_ppm", 600.0), ("temperature_c", 21.0))
    ]
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare(conn)
        with conn.transaction():
            conn.cursor().executemany(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
                [(*e[:6], json.dumps(e[6])) for e in events],
            )
            conn.cursor().executemany(
                "INSERT INTO readings (time, school_id, device_id, metric, value)"
                " VALUES (%s, %s, %s, %s, %s)",
                readings,
            )
            conn.cursor().executemany(
                "INSERT INTO devices (device_id, school_id, kind, first_seen, last_seen, min_seq,"
                " max_seq, event_count, state, state_at, agent_version, room, class_id, grade,"
                " name) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    ("cr-0101", "s001", "card_reader", T0, T0 + timedelta(minutes=9), 1, 10, 10,
                     "online", T0, "1.4.0", "101", "c7a", "7", "door reader"),
                    ("sb-0101", "s001", "smart_board", T0, T0 + timedelta(minutes=5), 1, 5, 4,
                     "offline", T0 + timedelta(minutes=6), "1.4.0", "101", "c7a", "7", None),
                    ("cr-0201", "s002", "card_reader", T0, T0 + timedelta(minutes=3), 1, 4, 4,
                     "online", T0, "1.3.9", "gate", None, None, None),
                    ("env-0101", "s001", None, T0, T0, None, None, 0, None, None, None, "102",
                     None, None, None),
                ],
            )  # fmt: skip
            conn.cursor().executemany(
                "INSERT INTO quarantine (received_at, topic, payload, reason, device_id, seq)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (T0 + timedelta(seconds=i), "campus/v1/s001/cr-0101/up", payload, reason,
                     "cr-0101", None)
                    for i, (payload, reason) in enumerate(
                        [
                            (b"{not json", "not JSON: expecting property name"),
                            (b'{"v": 9}', "unsupported version 9"),
                            (b"\xff\xfe binary", "not JSON: invalid UTF-8"),
                            (b'{"v": 1}', "missing field device_id"),
                        ]
                    )
                ],
            )  # fmt: skip
            for name, rows in ROLLUP_ROWS.items():
                marks = sql.SQL(", ").join([sql.Placeholder()] * len(rows[0]))
                insert = sql.SQL("INSERT INTO {} VALUES ({})").format(sql.Identifier(name), marks)
                conn.cursor().executemany(insert, rows)
    return Seeded(events=events, readings=readings)


def make_tokens(db_url: str) -> dict[str, str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        return {
            scope: auth.create_token(conn, f"test-{scope}", [scope])[1]
            for scope in ("read", "admin")
        }


class _Healthy:
    def health(self) -> Health:
        return Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=0.0)


@contextmanager
def api_server(db_url: str) -> Iterator[HttpServer]:
    """The HTTP API alone (no MQTT) on 127.0.0.1 and a port chosen now."""
    app = create_app(_Healthy(), IngestMetrics(), db_url)
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    try:
        yield http
    finally:
        http.stop()
        app.state.pool.close()


def get(url: str, token: str | None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, headers=headers)  # noqa: S310  # http://127.0.0.1
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, token: str | None) -> tuple[int, Any]:
    status, _, body = get(url, token)
    return status, json.loads(body) if body else None
