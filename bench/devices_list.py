"""The device listing (``GET /api/v1/devices``' one query) with and without the health index.

    python -m bench devices_list [--devices 1000] [--days 7] [--repeat 5]

Seeds a private PostgreSQL 15 with ``--days`` of events in the daily partitions: half the
devices are smart boards reporting ``agent.health`` every 10 minutes among their other events,
half are card readers with 2,000 taps a day and no health at all (the case that made the
listing slow). Times the listing's query (median of ``--repeat``) with the partial index
``events_health_idx`` (migration 0031), then drops it in the same run for the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import psycopg
from psycopg import sql

from ingest_server.storage.migrate import migrate
from ingest_server.web.api.devices import MAX_DEVICES, _query
from simulators.harness import Postgres, shared_tmpdir

_BOARDS = """
INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)
SELECT now() - make_interval(days => %(days)s) + g * interval '5 min', 's' || (d %% 50),
       'dev-' || d, 'smart_board', g,
       CASE WHEN g %% 2 = 0 THEN 'agent.health' ELSE 'board.power' END,
       '{"outbox_depth": 3, "oldest_unsent_s": 1.5, "drivers": {"panel": "running"}}'
FROM generate_series(1, %(half)s) d, generate_series(1, %(days)s * 288) g
"""
_READERS = """
INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)
SELECT now() - make_interval(days => %(days)s) + g * interval '43.2 s', 's' || (d %% 50),
       'dev-' || d, 'card_reader', g, 'card.tap', '{"card_hash": "x"}'
FROM generate_series(%(half)s + 1, %(devices)s) d, generate_series(1, %(days)s * 2000) g
"""
_DEVICES = """
INSERT INTO devices (device_id, school_id, kind, first_seen, last_seen, min_seq, max_seq,
                     event_count)
SELECT device_id, min(school_id), min(device_kind), min(time), max(time), min(seq), max(seq),
       count(*)
FROM events GROUP BY device_id
"""


def _time(conn: psycopg.Connection[Any], query: sql.Composed, repeat: int) -> tuple[float, int]:
    conn.execute(query).fetchall()  # warm
    took = []
    rows: list[Any] = []
    for _ in range(repeat):
        start = time.perf_counter()
        rows = conn.execute(query).fetchall()
        took.append(time.perf_counter() - start)
    return statistics.median(took), sum(r[17] is not None for r in rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench devices_list")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    params = {"devices": args.devices, "half": args.devices // 2, "days": args.days}
    pg = Postgres(shared_tmpdir("bench-devices-"))
    pg.start()
    try:
        url = pg.create_database("devices_list")
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
            conn.execute(
                "SELECT campus_ensure_partitions('events', now() - make_interval(days => %s),"
                " now() + interval '1 day')",
                (args.days + 1,),
            )
            start = time.perf_counter()
            for statement in (_BOARDS, _READERS, _DEVICES):
                conn.execute(statement, params)
            conn.execute("VACUUM ANALYZE")
            (events,) = conn.execute("SELECT count(*) FROM events").fetchone() or (0,)
            print(
                f"seeded {events:,} events, {args.devices} devices in "
                f"{time.perf_counter() - start:.0f} s"
            )
            query = _query(sql.SQL("true"), MAX_DEVICES)
            with_idx, healthy = _time(conn, query, args.repeat)
            conn.execute("DROP INDEX events_health_idx")
            conn.execute("ANALYZE events")
            without, healthy_too = _time(conn, query, args.repeat)
    finally:
        pg.stop("immediate")
    ok = healthy == healthy_too == args.devices // 2
    print(f"\n{'figure':<52}{'value':>10}{'baseline':>10}{'ratio':>8}")
    print(
        f"{'listing of all devices, median (ms)':<52}{with_idx * 1000:>10.0f}"
        f"{without * 1000:>10.0f}{with_idx / without:>8.2f}"
    )
    print(f"devices with health: {healthy} (expected {args.devices // 2}, baseline {healthy_too})")
    return 0 if ok else 1
