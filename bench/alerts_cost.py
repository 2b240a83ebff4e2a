"""``alerts_cost`` — the alert engine's CPU per event against the ingest's, in the same run.

The engine runs on a thread of its own (``ingest_server.alerts.engine``); what it adds to the
ingest server's CPU per event is (a) ``AlertEngine.submit`` on the acknowledging thread, once per
commit, and (b) the rules over each committed event (``Evaluator.events``) on its thread. This
bench decodes the bench's payloads exactly as the decoder thread does (``Batch.add`` of each
message, then ``Batch.seal``), then measures (a) and (b) with every rule on over the rows that
produced, in thread CPU time. The baseline is the decode alone, which is only part of the ingest
process's CPU per event (writer and acknowledging threads, MQTT come on top: see ``ingest_e2e``),
so ``engine / decode`` over-states the rise; the target is that it stays under 10%.

Time-based work (the tick, once a second, touching only open alerts and the silent-device index)
does not grow with the event rate and is not counted per event.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from bench.ingest_e2e import payloads
from ingest_server.alerts.config import RulesConfig
from ingest_server.alerts.engine import AlertEngine
from ingest_server.alerts.rules import Evaluator
from ingest_server.ingest.batch import Batch, EventRow, Inbound
from ingest_server.ingest.writer import WriteResult
from ingest_server.metrics import IngestMetrics

BATCH_EVENTS = 5000
TARGET = 0.10


def _decode(msgs: list[tuple[str, bytes]]) -> tuple[list[list[EventRow]], float]:
    """Batches of rows as the decoder builds them, and the CPU seconds that took."""
    now = datetime.now(UTC)
    started = time.thread_time()
    batches: list[list[EventRow]] = []
    batch = Batch()
    for i, (topic, body) in enumerate(msgs):
        batch.add(Inbound(topic, body, i % 65535 + 1, 1, now))
        if batch.size >= BATCH_EVENTS:
            batch.seal()
            batches.append(batch.rows.events)
            batch = Batch()
    if len(batch):
        batch.seal()
        batches.append(batch.rows.events)
    return batches, time.thread_time() - started


def _engine(batches: list[list[EventRow]]) -> tuple[float, float]:
    """CPU seconds of submit (all commits) and of the rules over them (every rule on)."""
    engine = AlertEngine(RulesConfig(), "postgresql:///unused", IngestMetrics())
    engine.QUEUE_COMMITS = len(batches) + 1
    at = time.time()  # events are judged fresh: the rules do their whole work
    results = [WriteResult(rows, 0, [], 0, 0) for rows in batches]
    started = time.thread_time()
    for r in results:
        engine.submit(r, at)
    submit_s = time.thread_time() - started
    ev = Evaluator(RulesConfig(), max_event_age_s=1e12)
    started = time.thread_time()
    for rows in batches:
        ev.events(rows, at)
        ev.decide(at)
    return submit_s, time.thread_time() - started


def run(etype: str, events: int, per_message: int, rounds: int) -> float:
    msgs = payloads(20, events // 20, per_message, etype)
    best: tuple[float, float, float] | None = None
    for _ in range(rounds):
        batches, decode_s = _decode(msgs)
        submit_s, rules_s = _engine(batches)
        if best is None or (submit_s + rules_s) / decode_s < (best[1] + best[2]) / best[0]:
            best = (decode_s, submit_s, rules_s)
    assert best is not None
    decode_s, submit_s, rules_s = best
    n = sum(1 for _ in range(events // 20 * 20))
    ratio = (submit_s + rules_s) / decode_s
    print(f"\n{etype}, {per_message} per message, {n:,} events (best of {rounds})")
    print("| figure | µs per event |\n|---|---|")
    print(f"| ingest decode (Batch.add + seal), the baseline | {decode_s / n * 1e6:.2f} |")
    print(f"| alert engine: submit per commit | {submit_s / n * 1e6:.3f} |")
    print(f"| alert engine: rules per event (all on) | {rules_s / n * 1e6:.2f} |")
    ok = "ok" if ratio <= TARGET else "OVER"
    print(f"| **engine / ingest decode** | **{ratio:.1%}** (target ≤ {TARGET:.0%}: {ok}) |")
    return ratio


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench alerts_cost", description=__doc__)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--per-message", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--type", action="append", choices=["card.tap", "env.reading"])
    args = p.parse_args(argv)
    worst = max(
        run(t, args.events, args.per_message, args.rounds)
        for t in args.type or ["card.tap", "env.reading"]
    )
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
