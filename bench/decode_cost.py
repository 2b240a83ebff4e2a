"""``decode_cost`` — CPU instructions per event of the ingest's decode and COPY encoding.

Wall-clock rates on this shared virtual machine move by a quarter between runs a minute apart;
instruction counts do not. This bench runs the decoder thread's work (``Batch.add`` of each
message, then ``Batch.seal``: validation, rows, de-duplication, device spans, the binary COPY
payloads of events and readings) under ``valgrind --tool=callgrind`` and prints instructions
per event, against a baseline counted in the same run: parsing the same payloads with
``msgspec.json.decode`` into plain Python objects (no validation, no rows, no encoding), the
floor of any decoder written in Python.

Each figure is a difference of three runs of the same child process (set-up only; set-up and
the baseline loop; set-up and the ingest loop), so imports and payload generation cancel out.
Needs valgrind (``apt-get install valgrind``); each child runs ~30 s under it, as many at
once as there are cores (~3.5 minutes on 2).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

#: Events per batch, as the server's default ``--batch-events``.
BATCH_EVENTS = 5000
CONFIGS = (("card.tap", 100), ("env.reading", 100), ("card.tap", 1), ("env.reading", 1))


def _child(mode: str, etype: str, per_message: int, events: int) -> None:
    import msgspec

    from bench.ingest_e2e import payloads
    from ingest_server.ingest.batch import Batch, Inbound

    msgs = payloads(20, events // 20, per_message, etype)
    now = datetime.now(UTC)
    inbound = [Inbound(t, p, i, 1, now) for i, (t, p) in enumerate(msgs)]
    per_batch = max(1, BATCH_EVENTS // per_message)
    chunks = [inbound[i : i + per_batch] for i in range(0, len(inbound), per_batch)]
    decode = msgspec.json.decode

    def ingest(chunk: list[Inbound]) -> None:
        batch = Batch()
        for m in chunk:
            batch.add(m)
        batch.seal()
        assert batch.encoded is not None
        assert len(batch.encoded.events) == len(batch.rows.events)

    def baseline(chunk: list[Inbound]) -> None:
        for m in chunk:
            decode(m.payload)

    # the same warm-up in every mode: caches filled, code paths taken once
    ingest(chunks[0])
    baseline(chunks[0])
    if mode == "ingest":
        for chunk in chunks:
            ingest(chunk)
    elif mode == "baseline":
        for chunk in chunks:
            baseline(chunk)


def _count(mode: str, etype: str, per_message: int, events: int) -> int:
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.decode_cost",
        "--child",
        mode,
        etype,
        str(per_message),
        str(events),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in every run
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        cmd, check=False, capture_output=True, text=True, cwd=root, env=env, timeout=900
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({mode} {etype}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def _split(one: float, many: float, n: int) -> tuple[float, float]:
    """(per message, per event) of a cost ``m + e * events`` a message, from its cost per
    event at 1 and at ``n`` events per message."""
    per_message = (one - many) * n / (n - 1)
    return per_message, one - per_message


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench decode_cost", description=__doc__)
    ap.add_argument("--events", type=int, default=10_000, help="events per workload")
    ap.add_argument(
        "--type",
        action="append",
        choices=sorted({t for t, _ in CONFIGS}),
        help="only this event type (repeatable; default: all)",
    )
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, etype, per, events = args.child
        _child(mode, etype, int(per), int(events))
        return 0
    if shutil.which("valgrind") is None:
        print("decode_cost needs valgrind: apt-get install valgrind", file=sys.stderr)
        return 2
    configs = [(t, n) for t, n in CONFIGS if not args.type or t in args.type]
    print(
        f"\ndecode + COPY encoding on the decoder thread, {args.events} events per workload,"
        " instructions counted by callgrind (the machine's load does not change them)\n"
    )
    print(
        f"{'workload':26} {'per event':>10} {'per message':>12} {'baseline/ev':>12}"
        f" {'baseline/msg':>13} {'ratio':>6}"
    )
    modes = ("setup", "ingest", "baseline")
    per_event: dict[tuple[str, int], tuple[float, float]] = {}
    # counts do not depend on what else runs: use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = {
            (etype, per, mode): pool.submit(_count, mode, etype, per, args.events)
            for etype, per in configs
            for mode in modes
        }
        for etype, per in configs:
            setup, ingest, baseline = (runs[etype, per, m].result() for m in modes)
            ours = (ingest - setup) / args.events
            floor = (baseline - setup) / args.events
            per_event[etype, per] = ours, floor
            name = f"{etype}, {per}/message"
            print(
                f"{name:26} {ours:10,.0f} {ours * per:12,.0f} {floor:12,.0f}"
                f" {floor * per:13,.0f} {ours / floor:6.2f}"
            )
    print("\n(baseline: msgspec.json.decode of the same payloads into plain objects)")
    print(
        "\nEach message costing m + e per event: m and e from the two shapes (per event at 1"
        " and at 100 per message)\n"
    )
    head = f"{'type':26} {'m (message)':>12} {'e (event)':>10}"
    print(f"{head} {'baseline m':>11} {'baseline e':>11}")
    for etype in dict.fromkeys(t for t, _ in configs):
        many = max(n for t, n in configs if t == etype)
        if (etype, 1) not in per_event or many == 1:
            continue
        (one, floor_one), (lots, floor_lots) = per_event[etype, 1], per_event[etype, many]
        m, e = _split(one, lots, many)
        fm, fe = _split(floor_one, floor_lots, many)
        print(f"{etype:26} {m:12,.0f} {e:10,.0f} {fm:11,.0f} {fe:11,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
