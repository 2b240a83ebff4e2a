"""The API at district size: device pages and per-school summaries over 28,000 devices.

    python -m bench district_api [--devices 28000] [--schools 805] [--repeat 40]

Seeds a private PostgreSQL 15 with the district's registry (``simulators.api_seed.
seed_district``), starts the HTTP API on loopback and times, over ``--repeat`` calls each:
a page of 1,000 devices (first and deep by keyset cursor), a filtered page, one school's
devices, the whole listing walked page by page, and ``GET /api/v1/schools/summary``.
Target: p95 under 300 ms per call. Baseline: the same SQL of the page run directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlencode

import psycopg

from simulators.api_seed import api_server, get, make_tokens, seed_district
from simulators.harness import Postgres, shared_tmpdir

TARGET_P95_MS = 300.0


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1] if len(samples) > 1 else samples[0]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench district_api", description=__doc__)
    ap.add_argument("--devices", type=int, default=28_000)
    ap.add_argument("--schools", type=int, default=805)
    ap.add_argument("--repeat", type=int, default=40)
    args = ap.parse_args(argv)
    work = shared_tmpdir("campus-bench-dapi-")
    pg = Postgres(work)
    pg.start()
    rows: list[tuple[str, float, float]] = []
    try:
        url = pg.create_database("district")
        seed_district(url, args.schools, args.devices)
        token = make_tokens(url)["read"]
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ANALYZE")
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
    print(f"\nAPI at district size: {args.devices:,} devices over {args.schools} schools\n")
    print(f"{'call':46} {'median ms':>10} {'p95 ms':>8} {'target':>8}")
    ok = True
    for name, med, p95 in rows:
        walk_row = name.startswith("devices: whole")
        ok = ok and (walk_row or p95 <= TARGET_P95_MS)
        target = "-" if walk_row else f"{TARGET_P95_MS:.0f}"
        print(f"{name:46} {med:10.1f} {p95:8.1f} {target:>8}")
    return 0 if ok else 1
