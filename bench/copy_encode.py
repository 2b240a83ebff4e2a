"""Our binary COPY encoder against psycopg's ``Copy.write_row``, on the same rows.

    python -m bench copy_encode [--events 50000] [--repeat 5]

The rows are what the ingest writes for ``--events`` events of bench ``ingest_e2e``'s two
workloads (100 events per uplink, 20 devices), decoded by :class:`~ingest_server.ingest.batch.Batch`
as the server decodes them: ``card.tap`` (one ``events`` row each) and ``env.reading`` (one
``events`` row and two ``readings`` rows each).

- baseline: psycopg's own binary COPY (``Copy`` with ``set_types`` and ``write_row`` per row,
  jsonb passed as the device's bytes like the bench's COPY ceiling) into an in-memory writer:
  only the encoding, no server. The rows are built as tuples beforehand, outside the timing,
  which favours psycopg (the ingest would have to build them).
- ours: :func:`~ingest_server.ingest.pgcopy.encode_events` (and ``encode_readings``) from the
  batch's ``EventRow``\\s, as ``Batch.seal`` calls them.

Thread CPU time, the best of ``--repeat`` rounds, in µs per row. Then both payloads are COPYed
into twin tables of a private PostgreSQL 15 and compared with ``EXCEPT ALL`` both ways; the
bench exits 1 unless PostgreSQL stores identical rows either way.
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.copy import Copy, FileWriter

from bench.ingest_e2e import payloads
from ingest_server.ingest import pgcopy
from ingest_server.ingest.batch import Batch, EventRow, Inbound
from ingest_server.ingest.writer import _RawJsonbDumper
from schemas.uplink import metrics_of
from simulators.harness import Postgres, shared_tmpdir

Row = tuple[Any, ...]
Payloads = tuple[bytes, bytes]


def event_rows(etype: str, events: int) -> list[EventRow]:
    """The ``EventRow``\\s the server's batch makes of ``events`` events of ``etype``."""
    msgs = payloads(20, events // 20, 100, etype)
    now = datetime.now(UTC)
    batch = Batch()
    for i, (topic, body) in enumerate(msgs):
        batch.add(Inbound(topic, body, i % 65535 + 1, 1, now))
    if batch.rows.quarantine:
        raise ValueError(f"the bench made an invalid event: {batch.rows.quarantine[0].reason}")
    return batch.rows.events


def as_tuples(rows: Sequence[EventRow]) -> tuple[list[Row], list[Row]]:
    """The same rows as tuples for ``write_row``: events, and readings."""
    events: list[Row] = []
    readings: list[Row] = []
    for r in rows:
        e = r.event
        events.append((e.ts, r.school_id, r.device_id, r.kind, e.seq, e.type, e.data_json,
                       r.received_at, e.synced))  # fmt: skip
        readings += [(e.ts, r.school_id, r.device_id, m, v) for m, v in metrics_of(e)]
    return events, readings


def psycopg_payload(
    conn: psycopg.Connection[Any], types: Sequence[str], rows: Sequence[Row]
) -> bytes:
    """psycopg's binary COPY of ``rows`` into memory (its encoder only: no server). A fresh
    cursor each time: ``Copy`` refuses a cursor whose last result was not a COPY."""
    sink = io.BytesIO()
    with Copy(conn.cursor(), binary=True, writer=FileWriter(sink)) as copy:
        copy.set_types(list(types))
        for row in rows:
            copy.write_row(row)
    return sink.getvalue()


def psycopg_both(conn: psycopg.Connection[Any], events: list[Row], readings: list[Row]) -> Payloads:
    """The events payload and (when there are readings) the readings payload, by psycopg."""
    ev = psycopg_payload(conn, pgcopy.EVENT_TYPES, events)
    return ev, psycopg_payload(conn, pgcopy.READING_TYPES, readings) if readings else b""


def ours(rows: list[EventRow], readings: bool) -> Payloads:
    stamps: list[int] = []
    events = pgcopy.encode_events(rows, stamps)
    return events, pgcopy.encode_readings(rows, stamps)[0] if readings else b""


def best_us(fn: Callable[[], object], rows: int, repeat: int) -> float:
    """The lowest thread CPU time of ``repeat`` calls, in µs per row."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        fn()
        best = min(best, time.thread_time_ns() - t0)
    return best / rows / 1000


_TABLES = {
    "ev": sql.SQL(
        "time timestamptz, school_id text, device_id text, device_kind text, seq int8,"
        " type text, data jsonb, received_at timestamptz, synced bool"
    ),
    "rd": sql.SQL("time timestamptz, school_id text, device_id text, metric text, value float8"),
}


def stored_alike(cur: psycopg.Cursor[Any], kind: str, a: bytes, b: bytes) -> tuple[int, bool]:
    """COPY ``a`` and ``b`` into twin tables of ``kind`` (ev, rd); (rows stored, whether the
    two sets are equal)."""
    mine, theirs = sql.Identifier(f"bench_{kind}_ours"), sql.Identifier(f"bench_{kind}_psycopg")
    for name, payload in ((mine, a), (theirs, b)):
        cur.execute(sql.SQL("CREATE TEMP TABLE {} ({})").format(name, _TABLES[kind]))
        with cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(name)) as copy:
            copy.write(payload)
    count = sql.SQL("SELECT count(*) FROM {}")
    diff = sql.SQL(
        "SELECT (SELECT count(*) FROM (TABLE {a} EXCEPT ALL TABLE {b}) x)"
        " + (SELECT count(*) FROM (TABLE {b} EXCEPT ALL TABLE {a}) y)"
    ).format(a=mine, b=theirs)
    n, m, d = (cur.execute(q).fetchone() for q in (count.format(mine), count.format(theirs), diff))
    if n is None or m is None or d is None:
        raise RuntimeError("a count returned no row")
    return n[0], n[0] == m[0] and d[0] == 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench copy_encode", description=__doc__)
    ap.add_argument("--events", type=int, default=50_000, help="events per workload")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is kept (default 5)")
    args = ap.parse_args(argv)
    work = shared_tmpdir("campus-bench-copy-")
    pg = Postgres(work)
    pg.start()
    ok = True
    try:
        with psycopg.connect(pg.url()) as conn:
            conn.adapters.register_dumper(None, _RawJsonbDumper)  # jsonb as the device's bytes
            cur = conn.cursor()
            print(f"\nbinary COPY encoding, thread CPU, best of {args.repeat}\n")
            print(f"{'figure':56} {'value':>8} {'baseline':>8} {'ratio':>6}")
            for etype in ("card.tap", "env.reading"):
                rows = event_rows(etype, args.events)
                ev_tuples, rd_tuples = as_tuples(rows)
                readings = bool(rd_tuples)
                n = len(ev_tuples) + len(rd_tuples)
                base = best_us(lambda: psycopg_both(conn, ev_tuples, rd_tuples), n, args.repeat)  # noqa: B023
                from_rows = best_us(lambda: psycopg_both(conn, *as_tuples(rows)), n, args.repeat)  # noqa: B023
                mine = best_us(lambda: ours(rows, readings), n, args.repeat)  # noqa: B023
                a, b = ours(rows, readings), psycopg_both(conn, ev_tuples, rd_tuples)
                stored, same = stored_alike(cur, "ev", a[0], b[0])
                if readings:
                    stored_rd, same_rd = stored_alike(cur, "rd", a[1], b[1])
                    stored += stored_rd
                    same &= same_rd
                conn.rollback()  # the temp tables go
                ok &= same and stored == n
                print(f"{etype}: {len(ev_tuples):,} events, {n:,} rows")
                print(f"{'  psycopg write_row, tuples ready (µs/row): baseline':56} {base:8.3f}")
                print(f"{'  psycopg write_row + tuples from EventRows (µs/row)':56} "
                      f"{from_rows:8.3f} {base:8.3f} {from_rows / base:6.2f}")  # fmt: skip
                print(f"{'  pgcopy.encode_* from EventRows (µs/row)':56} {mine:8.3f} {base:8.3f} "
                      f"{mine / base:6.2f}")  # fmt: skip
                print(f"{'  pgcopy.encode_* vs write_row + tuples':56} {mine:8.3f} "
                      f"{from_rows:8.3f} {mine / from_rows:6.2f}")  # fmt: skip
                print(f"{'  payload bytes identical':56} {'yes' if a == b else 'no':>8}")
                print(f"{'  PostgreSQL stores identical rows either way':56} "
                      f"{'yes' if same else 'NO':>8}")  # fmt: skip
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1
