"""The per-event cost of the event-latency histogram: ours against prometheus_client's.

    python -m bench metrics_cost [--events 200000] [--batch 5000] [--repeat 5]

After each commit the ingest records every stored event's age (commit time minus the event's
``ts``) in ``campus_ingest_event_latency_seconds``. The batch hands over the events' stamps as
encoded for COPY (µs since 2000-01-01, ascending within each message, 100 events per message
from interleaved devices), with ages from 10 ms to a day (replayed backlogs are old).

- baseline: ``prometheus_client.Histogram.observe`` once per event (its own registry, the
  same buckets), the age computed from the stamp: what the ingest would do with that library.
- ours: the server's path, :meth:`~ingest_server.metrics.Histogram.observe_ages`: sort the
  batch's stamps (a copy, as ``encode_events`` leaves them per message) and bisect once per
  bucket, however many events; and ``observe_many`` (one bisection per event, one lock per
  batch), the server's fallback when a batch was split.

Thread CPU time, the best of ``--repeat`` rounds, ns per event. The three histograms must end
with the same bucket counts, or the bench exits 1.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable

import prometheus_client

from ingest_server.metrics import IngestMetrics

Batches = list[list[int]]


def batches(events: int, size: int, per_message: int, now_us: float) -> Batches:
    """Stamps in batches of ``size``; each message's stamps ascending, messages shuffled."""
    rnd = random.Random(17)
    out: Batches = []
    for start in range(0, events, size):
        msgs = []
        for _ in range(0, min(size, events - start), per_message):
            base = now_us - math.exp(rnd.uniform(math.log(1e4), math.log(86_400e6)))
            msgs.append([int(base) + k * 1000 for k in range(per_message)])
        rnd.shuffle(msgs)
        out.append([s for m in msgs for s in m])
    return out


def best_ns(fn: Callable[[], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        fn()
        best = min(best, time.thread_time_ns() - t0)
    return best / n


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench metrics_cost", description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000, help="events per batch (--batch-events)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    # "now" in the stamps' unit; a fraction of a µs so no age falls exactly on a bucket bound
    now_us = 900_000_000_000_000.5
    data = batches(args.events, args.batch, 100, now_us)
    n = sum(map(len, data))
    buckets = IngestMetrics().event_latency.buckets

    def theirs() -> prometheus_client.Histogram:
        h = prometheus_client.Histogram(
            "bench_latency_seconds",
            "",
            buckets=buckets,
            registry=prometheus_client.CollectorRegistry(),
        )
        observe = h.observe
        for stamps in data:
            for s in stamps:
                observe((now_us - s) * 1e-6)
        return h

    def ages() -> IngestMetrics:
        m = IngestMetrics()
        for stamps in data:
            batch = list(stamps)
            batch.sort()
            m.event_latency.observe_ages(now_us, batch, 1e-6)
        return m

    def many() -> IngestMetrics:
        m = IngestMetrics()
        for stamps in data:
            m.event_latency.observe_many((now_us - s) * 1e-6 for s in stamps)
        return m

    base = best_ns(theirs, n, args.repeat)
    mine = best_ns(ages, n, args.repeat)
    per_event = best_ns(many, n, args.repeat)

    their_counts = [
        int(s.value)
        for s in next(iter(theirs().collect())).samples
        if s.name.endswith("_bucket")
    ]  # fmt: skip
    ours_counts = [
        [int(line.rsplit(" ", 1)[1]) for line in m.event_latency.samples() if "_bucket" in line]
        for m in (ages(), many())
    ]
    same = ours_counts[0] == their_counts == ours_counts[1] and their_counts[-1] == n

    print(f"\nevent-latency histogram, {n:,} events in batches of {args.batch:,}, "
          f"{len(buckets)} buckets; thread CPU, best of {args.repeat}\n")  # fmt: skip
    print(f"{'figure':54} {'value':>8} {'baseline':>8} {'ratio':>6}")
    print(f"{'prometheus_client Histogram.observe per event (ns)':54} {base:8,.0f}")
    print(f"{'observe_ages (sort + bisect per bucket) vs it (ns/event)':54} {mine:8,.1f} "
          f"{base:8,.0f} {mine / base:6.3f}")  # fmt: skip
    print(f"{'observe_many (bisect per event) vs it (ns/event)':54} {per_event:8,.0f} "
          f"{base:8,.0f} {per_event / base:6.2f}")  # fmt: skip
    print(f"{'same bucket counts, all three':54} {'yes' if same else 'NO':>8}")
    return 0 if same else 1
