"""The API at district size: device pages and per-school summaries over 28,000 devices.

    python -m bench district_api [--devices 28000] [--schools 805] [--repeat 40]
                                 [--seed realistic|minimal] [--health 4] [--taps 300000]

Needs no live district: it seeds a private PostgreSQL 15 itself. ``--seed realistic`` (the
default) fills it by COPY as a district looks mid-morning: ``--devices`` of eight kinds over
``--schools``, 85% online (last seen within two minutes, the rest minutes to two days ago),
each with its last ``--health`` ``agent.health`` reports (the listing joins the latest), today's
``--taps`` attendance events (card taps, class check-ins, gate passes) since the district's
midnight, and alerts open, acknowledged and resolved. ``--seed minimal`` is the registry alone
(``simulators.api_seed.seed_district``, as the tests use). Then it starts the HTTP API on
loopback and times, over ``--repeat`` calls each: a page of 1,000 devices (first and deep by
keyset cursor), a filtered page, one school's devices, the whole listing walked page by page,
and ``GET /api/v1/schools/summary``; beside them, the first page's SQL run directly.
Target (issue 20): p95 at most 300 ms per call.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
from psycopg import sql

from ingest_server.web.api import devices as devices_api
from simulators.api_seed import api_server, get, make_tokens, prepare, seed_district
from simulators.harness import Postgres, shared_tmpdir

TARGET_P95_MS = 300.0
#: (kind, weight, the attendance event its taps are, if any): a district's mix of devices.
KINDS: list[tuple[str, int, str | None]] = [
    ("class_signage", 30, "attendance.checkin"),
    ("smart_board", 25, None),
    ("card_reader", 20, "card.tap"),
    ("env_sensor", 10, None),
    ("recording_unit", 8, None),
    ("access_gate", 4, "access.pass"),
    ("library_terminal", 2, None),
    ("gateway", 1, None),
]
HEALTH_SEQ = 1_000_000  # health reports' seqs sit above any tap's


def seed_realistic(url: str, schools: int, devices: int, health: int, taps: int) -> None:
    """The district mid-morning, by COPY (see the module's docstring)."""
    rng = random.Random(20)
    with psycopg.connect(url, autocommit=True) as conn:
        prepare(conn)
        row = conn.execute(
            "SELECT now(), date_trunc('day', now() AT TIME ZONE district_tz)"
            " AT TIME ZONE district_tz FROM storage_config"
        ).fetchone()
        assert row is not None
        now, midnight = row
        # daily partitions for the days seeded, as a running server keeps them
        conn.execute(
            "SELECT campus_ensure_partitions('events', %s, %s)",
            (now - timedelta(days=3), now + timedelta(days=1)),
        )
        kinds = rng.choices([k for k, _, _ in KINDS], [w for _, w, _ in KINDS], k=devices)
        tap_type = {k: t for k, _, t in KINDS}
        regs: list[tuple[Any, ...]] = []
        reports: list[tuple[Any, ...]] = []
        for i, kind in enumerate(kinds):
            school = f"s{i % schools + 1:03d}"
            device = f"{school}-{kind[:3]}-{i:05d}"
            online = rng.random() < 0.85
            ago = rng.uniform(0, 120) if online else rng.uniform(600, 2 * 86400)
            last = now - timedelta(seconds=ago)
            max_seq = HEALTH_SEQ + health
            room = f"{rng.randrange(1, 6)}{rng.randrange(1, 30):02d}"
            regs.append(
                (device, school, kind, f"{kind} {room}", room, f"c{room}",
                 str(rng.randrange(1, 10)),
                 "online" if online else "offline", last - timedelta(hours=2),
                 now - timedelta(days=60), last, 1, max_seq, max_seq - rng.randrange(3), 1,
                 "1.4.0")
            )  # fmt: skip
            for k in range(health):
                outbox = rng.randrange(50)
                report = {
                    "cpu_pct": round(rng.uniform(1, 40), 1),
                    "rss_mb": 41.5,
                    "outbox_depth": outbox,
                    "oldest_unsent_s": round(outbox * 0.2, 1),
                    "drivers": {kind: "error" if rng.random() < 0.03 else "running"},
                }
                reports.append(
                    (last - timedelta(minutes=k), school, device, kind, max_seq - k,
                     "agent.health", json.dumps(report))
                )  # fmt: skip
        tappers = [(i, k) for i, k in enumerate(kinds) if tap_type[k] is not None]
        seqs: dict[int, int] = {}
        span = (now - midnight).total_seconds()
        for _ in range(taps if tappers else 0):
            i, kind = rng.choice(tappers)
            seqs[i] = seqs.get(i, 0) + 1
            school = f"s{i % schools + 1:03d}"
            tap = {"uid_hash": f"{rng.getrandbits(64):016x}", "reader": "door"}
            reports.append(
                (midnight + timedelta(seconds=rng.uniform(0, span)), school,
                 f"{school}-{kind[:3]}-{i:05d}", kind, seqs[i], tap_type[kind], json.dumps(tap))
            )  # fmt: skip
        cols = (
            "device_id, school_id, kind, name, room, class_id, grade, state, state_at,"
            " first_seen, last_seen, min_seq, max_seq, event_count, boot, agent_version"
        )
        with conn.transaction():
            with conn.cursor().copy(f"COPY devices ({cols}) FROM STDIN") as copy:
                for r in regs:
                    copy.write_row(r)
            with conn.cursor().copy(
                "COPY events (time, school_id, device_id, device_kind, seq, type, data) FROM STDIN"
            ) as copy:
                for r in reports:
                    copy.write_row(r)
            # alerts: about one device in 25, a third each open, acknowledged, resolved
            with conn.cursor().copy(
                "COPY alerts (rule, severity, state, school_id, device_id, message) FROM STDIN"
            ) as copy:
                for n, reg in enumerate(regs[::25]):
                    state = ("open", "acknowledged", "resolved")[n % 3]
                    copy.write_row(("device_offline", "warning", state, reg[1], reg[0], "bench"))
        conn.execute("VACUUM ANALYZE")


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) > 1 else samples[0]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench district_api", description=__doc__)
    ap.add_argument("--devices", type=int, default=28_000)
    ap.add_argument("--schools", type=int, default=805)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--seed", choices=("realistic", "minimal"), default="realistic")
    ap.add_argument("--health", type=int, default=4, help="agent.health reports per device")
    ap.add_argument("--taps", type=int, default=300_000, help="attendance events today")
    args = ap.parse_args(argv)
    work = shared_tmpdir("campus-bench-dapi-")
    pg = Postgres(work)
    pg.start()
    rows: list[tuple[str, float, float]] = []
    try:
        url = pg.create_database("district")
        started = time.perf_counter()
        if args.seed == "realistic":
            seed_realistic(url, args.schools, args.devices, args.health, args.taps)
        else:
            seed_district(url, args.schools, args.devices)
        seeded_s = time.perf_counter() - started
        token = make_tokens(url)["read"]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
            page_sql = devices_api._query(sql.SQL("true"), 1000)
            samples = []
            for _ in range(args.repeat + 1):
                t0 = time.perf_counter()
                conn.execute(page_sql).fetchall()
                samples.append((time.perf_counter() - t0) * 1000)
            samples = samples[1:]  # the first warms the caches, as the API's warm-up call
            rows.append(("SQL alone: first page of 1,000", statistics.median(samples),
                         _p95(samples)))  # fmt: skip
        with api_server(url) as http:

            def call(path: str, **params: object) -> tuple[dict[str, str], object]:
                full = f"{http.url}{path}?{urlencode(params)}" if params else http.url + path
                status, headers, body = get(full, token, timeout=60)
                assert status == 200, body[:300]
                return {k.lower(): v for k, v in headers.items()}, json.loads(body)

            headers, _ = call("/api/v1/devices", limit=1000)
            deep = headers["x-next-cursor"]
            for _ in range(10):  # ten pages in: a cursor deep in the district
                headers, _ = call("/api/v1/devices", limit=1000, cursor=deep)
                deep = headers.get("x-next-cursor", deep)

            def walk() -> None:
                params: dict[str, object] = {"limit": 5000}
                for _ in range(100):
                    h, _ = call("/api/v1/devices", **params)
                    if "x-next-cursor" not in h:
                        return
                    params["cursor"] = h["x-next-cursor"]

            cases: list[tuple[str, Callable[[], object]]] = [
                ("devices: first page of 1,000", lambda: call("/api/v1/devices", limit=1000)),
                (
                    "devices: page of 1,000 by deep cursor",
                    lambda: call("/api/v1/devices", limit=1000, cursor=deep),
                ),
                (
                    "devices: online card readers, page of 1,000",
                    lambda: call("/api/v1/devices", limit=1000, kind="card_reader", state="online"),
                ),
                ("devices: one school", lambda: call("/api/v1/devices", school="s400")),
                ("schools/summary (every school)", lambda: call("/api/v1/schools/summary")),
            ]
            for name, fn in cases:
                samples = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    fn()
                    samples.append((time.perf_counter() - t0) * 1000)
                rows.append((name, statistics.median(samples), _p95(samples)))
            t0 = time.perf_counter()
            walk()
            rows.append(("devices: whole district, pages of 5,000", 0.0,
                         (time.perf_counter() - t0) * 1000))  # fmt: skip
    finally:
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nAPI at district size: {args.devices:,} devices over {args.schools} schools "
          f"({args.seed} seed in {seeded_s:.1f} s)\n")  # fmt: skip
    print(f"{'call':46} {'median ms':>10} {'p95 ms':>8} {'target':>8}")
    ok = True
    for name, med, p95 in rows:
        timed_call = not name.startswith(("devices: whole", "SQL alone"))
        met = p95 <= TARGET_P95_MS
        ok = ok and (met or not timed_call)
        target = f"{TARGET_P95_MS:.0f} {'met' if met else 'NOT met'}" if timed_call else "-"
        print(f"{name:46} {med:10.1f} {p95:8.1f} {target:>12}")
    print("every target met" if ok else "some target NOT met")
    return 0 if ok else 1
