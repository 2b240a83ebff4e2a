"""End-to-end ingest throughput beside the raw COPY ceiling, measured in the same run.

    python -m bench ingest_e2e [--events 200000] [--per-message 100]

1. Baseline: one binary COPY stream of the same rows into a fresh ``events`` table with the
   same indexes (unique ``(device_id, seq)`` included): the most PostgreSQL takes here.
2. Baseline: one INSERT + commit per message, the naive consumer.
3. End to end: the events are queued in Mosquitto (QoS 1) for the ingest server's persistent
   session while it is stopped; then it starts and drains them with ack-after-commit and
   de-duplication. The rate is taken from the first stored row to the last.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import UTC, datetime, timedelta

import paho.mqtt.client as mqtt
import psutil
import psycopg

from ingest_server.writer import _RawJsonbDumper
from tests.pipeline import IngestServer
from tests.services import Mosquitto, Postgres, shared_tmpdir, wait_until

SCHOOL = "s001"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def event(seq: int) -> dict[str, object]:
    return {
        "seq": seq,
        "ts": (T0 + timedelta(milliseconds=seq)).isoformat(),
        "type": "env.reading",
        "data": {"sensor": "room", "temperature_c": 21.5, "co2_ppm": 600 + seq % 400},
        "synced": True,
    }


def payloads(devices: int, per_device: int, per_message: int) -> list[tuple[str, bytes]]:
    out = []
    for d in range(devices):
        dev = f"env-{d:04d}"
        for start in range(1, per_device + 1, per_message):
            evs = [event(s) for s in range(start, min(start + per_message, per_device + 1))]
            body = {
                "v": 1,
                "device_id": dev,
                "kind": "env_sensor",
                "sent_at": T0.isoformat(),
                "events": evs,
            }
            out.append((f"campus/v1/{SCHOOL}/{dev}/up", json.dumps(body).encode()))
    return out


def copy_ceiling(url: str, devices: int, per_device: int) -> float:
    rows = [
        (
            T0 + timedelta(milliseconds=s),
            SCHOOL,
            f"env-{d:04d}",
            "env_sensor",
            s,
            "env.reading",
            json.dumps(event(s)["data"]).encode(),
            datetime.now(UTC),
            True,
        )
        for d in range(devices)
        for s in range(1, per_device + 1)
    ]
    types = ["timestamptz", "text", "text", "text", "int8", "text", "jsonb", "timestamptz", "bool"]
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        cur = conn.cursor()
        # jsonb from the JSON bytes as they are, exactly as the ingest writer sends it
        cur.adapters.register_dumper(None, _RawJsonbDumper)
        with cur.copy(
            "COPY events (time, school_id, device_id, device_kind, seq, type, data, received_at,"
            " synced) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
        conn.commit()
        return len(rows) / (time.perf_counter() - start)


def insert_per_message(url: str, n: int) -> float:
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        for s in range(1, n + 1):
            conn.execute(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (device_id, seq) DO NOTHING",
                (
                    T0,
                    SCHOOL,
                    "naive-0001",
                    "env_sensor",
                    s,
                    "env.reading",
                    json.dumps(event(s)["data"]),
                ),
            )
            conn.commit()
        return n / (time.perf_counter() - start)


def fill_broker(broker: Mosquitto, msgs: list[tuple[str, bytes]]) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(200)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        infos = [pub.publish(topic, body, qos=1) for topic, body in msgs]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        pub.disconnect()
        pub.loop_stop()


class CpuMeter:
    """CPU seconds (user + system) used by the ingest server, Mosquitto and PostgreSQL (all its
    processes) between :meth:`start` and :meth:`stop`: a figure the machine's other load does
    not inflate the way it inflates wall-clock time."""

    def __init__(self, ingest_pids: list[int], broker_pid: int, pg: Postgres) -> None:
        postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        self.groups = {"ingest": ingest_pids, "mosquitto": [broker_pid], "postgres": [postmaster]}
        self.used: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    procs = [proc, *proc.children(recursive=True)] if name == "postgres" else [proc]
                    for p in procs:
                        t = p.cpu_times()
                        total += t.user + t.system
                        if name == "postgres":  # backends that already exited
                            total += t.children_user + t.children_system
                except psutil.NoSuchProcess:
                    continue
            out[name] = total
        return out

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        end = self._now()
        self.used = {k: end[k] - self._start.get(k, 0.0) for k in end}


def e2e(
    work,
    broker: Mosquitto,
    url: str,
    msgs: list[tuple[str, bytes]],
    total: int,
    *,
    pg: Postgres | None = None,
    meter: list[CpuMeter] | None = None,
    servers: int = 1,
    kill_at: float | None = None,
) -> float:
    """Drain ``msgs`` (queued while the servers are away) with ``servers`` ingest processes on
    one ``$share`` group when more than one; at ``kill_at`` (a fraction of ``total`` stored)
    the first is SIGKILLed and started again, as a supervisor would."""
    # a group of its own: Mosquitto keeps dealing a group's messages to members that are
    # offline but whose persistent sessions live on, such as the servers of an earlier run
    extra = ("--share-group", f"ingest-{time.monotonic_ns()}") if servers > 1 else ()
    procs = [
        IngestServer(work, broker.url, url, *extra, name=f"ingest{k}-{time.monotonic_ns()}")
        for k in range(servers)
    ]
    for server in procs:
        server.start()  # once, to create its persistent session and subscription
    for server in procs:
        server.wait_healthy()
        server.terminate()
    fill_broker(broker, msgs)
    for server in procs:
        server.start()
    # One connection reading the devices' counters (committed with the events): polling
    # count(*) over a new connection each time cost PostgreSQL a backend fork and a table scan
    # 50 times a second, on the same two cores as the server under test.
    with psycopg.connect(url, autocommit=True) as conn:

        def stored() -> int:
            row = conn.execute("SELECT coalesce(sum(event_count), 0) FROM devices").fetchone()
            return int(row[0]) if row else 0

        try:
            wait_until(lambda: stored() > 0, 60, "first stored event", interval=0.005)
            cpu = None
            pids = [s.proc.pid for s in procs if s.proc]
            if pg is not None and meter is not None and broker.proc and kill_at is None:
                cpu = CpuMeter(pids, broker.proc.pid, pg)
                cpu.start()
                meter.append(cpu)
            t0, n0 = time.perf_counter(), stored()
            if kill_at is not None:
                wait_until(lambda: stored() >= total * kill_at, 600, "the kill point", 0.01)
                procs[0].kill()
                procs[0].start()
            try:
                wait_until(lambda: stored() >= total, 300, f"{total} stored", interval=0.02)
            except TimeoutError:
                for server in procs:
                    print(f"--- {server.log.name} (stored {stored()})\n{server.tail()}")
                raise
            t1 = time.perf_counter()
            if cpu is not None:
                cpu.stop()
                cpu.used["events"] = total - n0
        finally:
            for server in procs:
                server.terminate()
    return (total - n0) / (t1 - t0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ingest_e2e", description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-message", type=int, default=100)
    args = ap.parse_args(argv)
    per_device = args.events // args.devices
    total = per_device * args.devices

    work = shared_tmpdir("campus-bench-")
    pg = Postgres(work)
    pg.start()
    broker = Mosquitto(shared_tmpdir("campus-bench-mq-"))
    broker.start()
    try:
        from ingest_server.migrate import migrate_url

        urls = {name: pg.create_database(name) for name in ("copy", "naive", "e2e")}
        for u in urls.values():
            migrate_url(u)
        msgs = payloads(args.devices, per_device, args.per_message)
        ceiling = copy_ceiling(urls["copy"], args.devices, per_device)
        naive = insert_per_message(urls["naive"], min(3000, total))
        meters: list[CpuMeter] = []
        rate = e2e(work, broker, urls["e2e"], msgs, total, pg=pg, meter=meters)
        with psycopg.connect(urls["e2e"]) as conn:
            row = conn.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events")
            stored, distinct = row.fetchone() or (0, 0)
    finally:
        broker.kill()
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\ningest end to end: {total} events in {len(msgs)} messages "
        f"({args.per_message}/message, {args.devices} devices), Mosquitto → PostgreSQL 15\n"
    )
    print(f"{'figure':44} {'value':>12} {'baseline':>12} {'ratio':>7} {'target':>7}")
    print(f"{'raw binary COPY ceiling (rows/s)':44} {ceiling:12,.0f} {'-':>12} {'-':>7} {'-':>7}")
    print(f"{'INSERT+commit per message (rows/s)':44} {naive:12,.0f} {'-':>12} {'-':>7} {'-':>7}")
    print(
        f"{'e2e durable ingest vs COPY ceiling (ev/s)':44} {rate:12,.0f} {ceiling:12,.0f} "
        f"{rate / ceiling:7.2f} {'>=0.60':>7}"
    )
    print(
        f"{'e2e durable ingest vs INSERT+commit (ev/s)':44} {rate:12,.0f} {naive:12,.0f} "
        f"{rate / naive:7.1f} {'>=10':>7}"
    )
    if meters:
        used = meters[0].used
        n = used.pop("events")
        parts = ", ".join(f"{k} {v * 1e6 / n:.1f}" for k, v in used.items())
        print(f"\nCPU per stored event during the drain (µs): {parts}")
        print(f"ingest events per CPU-second of the ingest process: {n / used['ingest']:,.0f}")
    print(f"\nstored {stored} rows, {distinct} distinct (device_id, seq), expected {total}")
    return 0 if stored == distinct == total else 1
