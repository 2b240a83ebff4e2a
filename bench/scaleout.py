"""Two ingest processes on one ``$share`` group against one, and a SIGKILL mid-run.

    python -m bench scaleout [--events 100000] [--per-message 1]

Same backlog, same broker, a fresh database each: (1) one ingest process drains it (the
baseline), (2) two processes share the subscription, (3) two again, and the first is killed with
SIGKILL halfway and restarted: every event must be stored exactly once (exit 1 otherwise).
CPU per event is given for (1) and (2): the scale-out figure that the machine's other load does
not move.
"""

from __future__ import annotations

import argparse
import os
import shutil

import psycopg

from bench.ingest_e2e import CpuMeter, e2e, payloads
from ingest_server.migrate import migrate_url
from tests.services import Mosquitto, Postgres, shared_tmpdir


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench scaleout", description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-message", type=int, default=1)
    args = ap.parse_args(argv)
    per_device = args.events // args.devices
    total = per_device * args.devices
    work = shared_tmpdir("campus-bench-")
    pg = Postgres(work)
    pg.start()
    broker = Mosquitto(shared_tmpdir("campus-bench-mq-"))
    broker.start()
    msgs = payloads(args.devices, per_device, args.per_message)
    rates: dict[str, float] = {}
    cpu: dict[str, dict[str, float]] = {}
    ok: dict[str, bool] = {}
    try:
        for name, servers, kill in (("one", 1, None), ("two", 2, None), ("kill", 2, 0.5)):
            url = pg.create_database(name)
            migrate_url(url)
            meters: list[CpuMeter] = []
            rates[name] = e2e(
                work, broker, url, msgs, total, pg=pg, meter=meters, servers=servers, kill_at=kill
            )
            if meters:
                cpu[name] = meters[0].used
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events")
                stored, distinct = row.fetchone() or (0, 0)
            ok[name] = stored == distinct == total
    finally:
        broker.kill()
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    print(
        f"\nscale-out: {total} events, {args.per_message}/message, {args.devices} devices; "
        f"load average at the end {load:.1f} on {os.cpu_count()} cores\n"
    )
    print(f"{'figure':46} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    one, two = rates["one"], rates["two"]
    print(
        f"{'two processes vs one (ev/s)':46} {two:10,.0f} {one:10,.0f} "
        f"{two / one:7.2f} {'>=1.6':>8}"
    )
    for name in ("one", "two"):
        used = cpu.get(name)
        if used:
            n = used["events"]
            per = used["ingest"] * 1e6 / n
            print(f"{'ingest CPU per event, ' + name + ' (µs)':46} {per:10.1f}")
    print(f"{'two processes, one SIGKILLed halfway (ev/s)':46} {rates['kill']:10,.0f}")
    for name, good in ok.items():
        print(f"{name}: every event stored exactly once: {'yes' if good else 'NO'}")
    return 0 if all(ok.values()) else 1
