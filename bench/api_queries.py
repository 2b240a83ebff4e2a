"""The HTTP API's queries beside the same SQL run directly with psycopg, in the same run.

    python -m bench api_queries [--events 1000000] [--repeat 30]

Seeds ``events`` with COPY (200 card readers in 4 schools over 10 days) and refreshes the
product's ``card_taps_daily`` table from it (``campus_refresh_rollups``, as the maintenance loop
does), then times, through the running API and directly:

1. a time-range page: one school's events in a random hour, 1000 rows (``/api/v1/events``);
2. a keyset walk: 50 pages of 1000 rows following ``next`` (the same keyset SQL directly);
3. a full export: every event as NDJSON (``/api/v1/export/events.ndjson``; directly: the
   export's page queries, which render each line in PostgreSQL, keyset pages of ``CHUNK_ROWS``
   one after the other on one connection);
4. a daily rollup: taps per reader and day over the 10 days (``/api/v1/rollups/card-taps``),
   as a client repeating it gets it (the answer kept while the table is unchanged:
   ``web/api/answer_cache.py``) and, for comparison, with ``Cache-Control: no-cache`` (rendered
   by PostgreSQL each time);
5. the fixed cost of a request: ``/api/v1/meta`` (token, pool, middleware, one-row query)
   against its one-row query.

Targets (issue 20), printed with each figure: time-range page and keyset walk at most 1.5x the
SQL's time, the daily rollup at most 2x, the export at least 0.9x the SQL's rate.

The API server runs in a process of its own (as in production: no client shares its
interpreter); ``--profile FILE`` has that process write a cProfile of everything it served.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import psycopg
from psycopg_pool import ConnectionPool

from ingest_server.web.api import auth
from ingest_server.web.api.data import where
from ingest_server.web.api.export import export_query, pages
from simulators.api_seed import api_server, make_tokens, prepare
from simulators.harness import Postgres, shared_tmpdir

T0 = datetime(2026, 11, 10, tzinfo=UTC)
DAYS = 10
SCHOOLS = 4
DEVICES = 200
PAGE = 1000

#: The product's own rollup table, refreshed by the maintenance loop's function (a day either
#: side of the seeded range: days are district-local).
_ROLLUP = "SELECT campus_refresh_rollups(%s, %s)"
_PAGE_SQL = (
    "SELECT time, school_id, device_id, device_kind, seq, type, data, received_at, synced"
    " FROM events WHERE time >= %s AND time < %s AND school_id = %s"
)
_ORDER = " ORDER BY time, device_id, seq LIMIT %s"
_META_SQL = (
    "SELECT district_tz, (now() AT TIME ZONE district_tz)::date,"
    " date_trunc('day', now() AT TIME ZONE district_tz) AT TIME ZONE district_tz"
    " FROM storage_config"
)
#: figure -> (the most API p50 / SQL p50 allowed, what the target says)
TARGETS: dict[str, tuple[float, str]] = {
    "time-range page (1000 rows)": (1.5, "<= 1.5x"),
    "keyset walk (50 pages x 1000)": (1.5, "<= 1.5x"),
    "full export NDJSON (all rows)": (1 / 0.9, "rate >= 0.9x"),
    "daily rollup (card_taps_daily)": (2.0, "<= 2x"),
}
#: Sent on the rendered-afresh rollup figure: the API renders it though it kept the answer.
NO_CACHE: Final = {"Cache-Control": "no-cache"}
_ROLLUP_SQL = (
    "SELECT day, school_id, device_id, taps FROM card_taps_daily WHERE day >= %s AND day <= %s"
    " ORDER BY day, school_id, device_id LIMIT 10001"
)


def seed(url: str, n: int) -> None:
    per_device = n // DEVICES
    step = timedelta(days=DAYS) / per_device
    with psycopg.connect(url, autocommit=True) as conn:
        prepare(conn)
        with conn.cursor().copy(
            "COPY events (time, school_id, device_id, device_kind, seq, type, data) FROM STDIN"
        ) as copy:
            for d in range(DEVICES):
                dev, school = f"cr-{d:04d}", f"s{d % SCHOOLS:03d}"
                offset = timedelta(milliseconds=d)
                for seq in range(1, per_device + 1):
                    data = f'{{"uid_hash": "{seq:064x}", "tech": "em4100", "reader": "door-{d}"}}'
                    copy.write_row(
                        (
                            T0 + seq * step + offset,
                            school,
                            dev,
                            "card_reader",
                            seq,
                            "card.tap",
                            data,
                        )
                    )
        conn.execute(_ROLLUP, (T0.date() - timedelta(days=1), T0.date() + timedelta(days=DAYS)))
        conn.execute("VACUUM ANALYZE events")
        conn.execute("VACUUM ANALYZE card_taps_daily")


def timed(
    api: Callable[[], Any], direct: Callable[[], Any], repeat: int
) -> tuple[list[float], list[float]]:
    """``repeat`` timings of each, taken in turns (API, SQL, API, ...), so both sides see the
    same load from the machine's other users: on a shared box it moves by 2x within a minute,
    and one side timed wholly before the other measured that, not the API."""
    api()  # warm caches and connections
    direct()
    out: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, times in ((api, out[0]), (direct, out[1])):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return out


def serve(url: str, profile: str | None) -> int:
    """The child's side: the API over ``url``; prints its base URL, serves until stdin closes.
    With ``profile``, every thread it starts (the event loop's, the endpoints' workers) runs
    under a cProfile of its own (3.11's profiler sees one thread), merged into ``profile``."""
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []

    def start(*_: object) -> None:
        sys.setprofile(None)
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()

    if profile:
        threading.setprofile(start)
    with api_server(url) as server:
        print(server.url, flush=True)
        sys.stdin.read()  # the parent closes it when done (or dies)
        threading.setprofile(None)  # type: ignore[arg-type]
        if profile and profiles:
            pstats.Stats(*profiles).dump_stats(profile)  # type: ignore[arg-type]
    return 0


@contextmanager
def server_process(url: str, profile: str | None) -> Iterator[str]:
    """The API server in a process of its own; yields its base URL."""
    cmd = [sys.executable, "-m", "bench", "api_queries", "--serve", url]
    if profile:
        cmd += ["--profile", profile]
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        base = child.stdout.readline().strip()  # ends when the child prints or exits
        if not base.startswith("http://"):
            raise RuntimeError(f"the API server process did not start ({child.poll()=})")
        yield base
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class Client:
    """One keep-alive HTTP connection with a token."""

    def __init__(self, base: str, token: str) -> None:
        parts = urlsplit(base)
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=600)
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str, headers: dict[str, str] | None = None, **params: Any) -> bytes:
        target = f"{path}?{urlencode(params)}" if params else path
        for attempt in (1, 2):
            try:
                self.conn.request("GET", target, headers={**self.headers, **(headers or {})})
                resp = self.conn.getresponse()
                break
            except (http.client.RemoteDisconnected, ConnectionError):
                # uvicorn closes a connection idle for 5 s (while the SQL side runs): reopen
                self.conn.close()
                if attempt == 2:
                    raise
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {body[:200]!r}")
        return body


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench api_queries", description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--export-repeat", type=int, default=3)
    ap.add_argument("--profile", metavar="FILE", help="cProfile the API server's process")
    ap.add_argument("--serve", metavar="DB_URL", help=argparse.SUPPRESS)  # the server's child
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.profile)
    rng = random.Random(7)
    work = shared_tmpdir("campus-bench-api-")
    pg = Postgres(work)
    pg.start()
    rows: list[tuple[str, list[float], list[float]]] = []
    try:
        url = pg.create_database("api")
        started = time.perf_counter()
        seed(url, args.events)
        seeded_s = time.perf_counter() - started
        tokens = make_tokens(url)
        end = T0 + timedelta(days=DAYS + 1)
        with (
            server_process(url, args.profile) as base,
            psycopg.connect(url, autocommit=True) as conn,
            ConnectionPool(url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool,
        ):
            api = Client(base, tokens["read"])
            read_cpu: list[float] = []

            def window() -> tuple[datetime, datetime, str]:
                start = T0 + timedelta(minutes=rng.randrange(DAYS * 24 * 60 - 60))
                return start, start + timedelta(hours=1), f"s{rng.randrange(SCHOOLS):03d}"

            def api_range() -> None:
                a, b, s = window()
                json.loads(
                    api.get("/api/v1/events", **{"from": a.isoformat(), "to": b.isoformat()},
                            school=s, limit=PAGE)
                )  # fmt: skip

            def sql_range() -> None:
                a, b, s = window()
                conn.execute(_PAGE_SQL + _ORDER, (a, b, s, PAGE + 1)).fetchall()

            def api_walk() -> None:
                params = {"from": T0.isoformat(), "to": end.isoformat(), "school": "s001"}
                page = json.loads(api.get("/api/v1/events", **params, limit=PAGE))
                for _ in range(49):
                    if page["cursor"] is None:
                        break
                    more = api.get("/api/v1/events", **params, cursor=page["cursor"], limit=PAGE)
                    page = json.loads(more)

            def sql_walk() -> None:
                rows = conn.execute(_PAGE_SQL + _ORDER, (T0, end, "s001", PAGE + 1)).fetchall()
                for _ in range(49):
                    if len(rows) <= PAGE:
                        break
                    last = rows[PAGE - 1]
                    rows = conn.execute(
                        _PAGE_SQL
                        + " AND time >= %s AND (time, device_id, seq) > (%s, %s, %s)"
                        + _ORDER,
                        (T0, end, "s001", last[0], last[0], last[2], last[4], PAGE + 1),
                    ).fetchall()

            def api_export() -> None:
                params = {"from": T0.isoformat(), "to": end.isoformat()}
                cpu = time.process_time()
                body = api.get("/api/v1/export/events.ndjson", **params)
                read_cpu.append(time.process_time() - cpu)  # the client's own share
                lines = body.count(b"\n")
                assert lines == args.events // DEVICES * DEVICES, lines

            def sql_export() -> None:
                cond, params = where(T0, end, {}, auth.Principal(0, "bench", "district_admin"))
                q = export_query("events", "ndjson", cond, params)
                # the same page queries, one after the other, on a pool of one connection
                # (one SELECT of every row plans a sort of them all: not what the API runs)
                n = sum(len(rows) for rows in pages(pool, q))
                assert n == args.events // DEVICES * DEVICES, n

            days = {
                "from": T0.date().isoformat(),
                "to": (T0 + timedelta(days=DAYS)).date().isoformat(),
            }

            def api_rollup() -> None:
                assert json.loads(api.get("/api/v1/rollups/card-taps", **days))["items"]

            def api_rollup_afresh() -> None:
                body = api.get("/api/v1/rollups/card-taps", headers=NO_CACHE, **days)
                assert json.loads(body)["items"]

            def sql_rollup() -> None:
                assert conn.execute(_ROLLUP_SQL, (T0.date(), end.date())).fetchall()

            def api_meta() -> None:
                assert json.loads(api.get("/api/v1/meta"))["timezone"]

            def sql_meta() -> None:
                assert conn.execute(_META_SQL).fetchone()

            r, e = args.repeat, args.export_repeat
            figures = [
                ("time-range page (1000 rows)", api_range, sql_range, r),
                ("keyset walk (50 pages x 1000)", api_walk, sql_walk, max(3, r // 6)),
                ("full export NDJSON (all rows)", api_export, sql_export, e),
                ("daily rollup (card_taps_daily)", api_rollup, sql_rollup, r),
                ("  the same, no-cache (rendered)", api_rollup_afresh, sql_rollup, r),
                ("fixed cost (/api/v1/meta)", api_meta, sql_meta, r),
            ]
            for name, api_fn, sql_fn, n in figures:
                api_t, sql_t = timed(api_fn, sql_fn, n)
                rows.append((name, api_t, sql_t))
    finally:
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nAPI queries over {args.events:,} events (seeded by COPY in {seeded_s:.1f} s), "
          "PostgreSQL 15; baseline: the same SQL via psycopg\n")  # fmt: skip
    print(f"{'figure':32} {'API p50':>9} {'API p95':>9} {'SQL p50':>9} {'SQL p95':>9} {'ratio':>6}"
          f"  target")  # fmt: skip
    met = True
    for name, api_t, sql_t in rows:
        a50, a95 = _pct(api_t)
        s50, s95 = _pct(sql_t)
        ratio = a50 / s50
        verdict = "-"
        if name in TARGETS:
            most, text = TARGETS[name]
            ok = ratio <= most
            met = met and ok
            verdict = f"{text}: {'met' if ok else 'NOT met'}"
        print(f"{name:32} {_ms(a50):>9} {_ms(a95):>9} {_ms(s50):>9} {_ms(s95):>9} {ratio:6.2f}"
              f"  {verdict}")  # fmt: skip
    export_api, export_sql = _pct(rows[2][1])[0], _pct(rows[2][2])[0]
    api_rate, sql_rate = args.events / export_api, args.events / export_sql
    print(f"\nexport rate through the API: {api_rate:,.0f} rows/s (p50), "
          f"{api_rate / sql_rate:.2f}x the SQL's {sql_rate:,.0f} rows/s; the client's CPU "
          f"reading it: {statistics.median(read_cpu):.2f} s of {export_api:.2f} s")  # fmt: skip
    print("every target met" if met else "some target NOT met")
    return 0 if met else 1


def _pct(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=20, method="inclusive")
    return statistics.median(xs), q[18]


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"
