"""Event-to-committed latency at a steady rate through Mosquitto into PostgreSQL.

    python -m bench latency [--rate 5000] [--seconds 10] [--per-message 10]

A publisher paces ``rate`` events/s (``per-message`` events per QoS 1 message, ``ts`` stamped
when the event is made) into a running ingest server. The server's own histogram
(``campus_ingest_event_latency_seconds``: commit time minus the event's ``ts``) gives the share
committed within 500 ms; the baseline is the broker alone: the same stream's publish-to-receive
time at a plain subscriber, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

from ingest_server.storage.migrate import migrate_url
from simulators.harness import Mosquitto, Postgres, shared_tmpdir, wait_until
from simulators.harness_pipeline import IngestServer

SCHOOL = "s001"


def histogram(text: str, name: str) -> tuple[list[tuple[float, int]], int]:
    """(le, cumulative count) pairs and the total, from a Prometheus text exposition."""
    buckets = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append(
                (float("inf") if le == "+Inf" else float(le), int(float(line.split()[-1])))
            )
    return buckets, buckets[-1][1] if buckets else 0


def quantile_bound(buckets: list[tuple[float, int]], total: int, q: float) -> float:
    """The smallest bucket bound under which at least ``q`` of the observations fall."""
    return next((le for le, n in buckets if n >= q * total), float("inf"))


def run_stream(broker: Mosquitto, rate: int, seconds: float, per_message: int, tag: str) -> int:
    """Publish the paced stream; returns how many events were sent."""
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"lat-pub-{tag}",
                      protocol=mqtt.MQTTv5)  # fmt: skip
    pub.max_inflight_messages_set(1000)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    seqs: dict[str, int] = {}
    sent = 0
    tick = 0.01
    per_tick = max(1, round(rate * tick / per_message))
    start = time.monotonic()
    try:
        k = 0
        while time.monotonic() - start < seconds:
            for _ in range(per_tick):
                dev = f"lat-{k % 20:04d}"
                k += 1
                first = seqs.get(dev, 0) + 1
                seqs[dev] = first + per_message - 1
                now = datetime.now(UTC).isoformat()
                events = [
                    {"seq": s, "ts": now, "type": "env.reading",
                     "data": {"sensor": "room", "temperature_c": 21.5}, "synced": True}
                    for s in range(first, first + per_message)
                ]  # fmt: skip
                body = {"v": 1, "device_id": dev, "kind": "env_sensor", "sent_at": now,
                        "events": events}  # fmt: skip
                pub.publish(f"campus/v1/{SCHOOL}/{dev}/up", json.dumps(body).encode(), qos=1)
                sent += per_message
            # pacing, not synchronisation: the next tick of the stream
            time.sleep(max(0.0, start + (sent / rate) - time.monotonic()))
    finally:
        pub.disconnect()
        pub.loop_stop()
    return sent


def broker_only(broker: Mosquitto, rate: int, seconds: float, per_message: int) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        ts = json.loads(msg.payload)["events"][0]["ts"]
        with lock:
            lat.append(time.time() - datetime.fromisoformat(ts).timestamp())

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lat-sub", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"campus/v1/{SCHOOL}/+/up", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.5)  # benchmark setup: the SUBACK lands before the stream starts
        n = run_stream(broker, rate, seconds, per_message, "base")
        wait_until(lambda: len(lat) * per_message >= n, 60, "the baseline stream")
    finally:
        sub.disconnect()
        sub.loop_stop()
    return sorted(lat)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__)
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--per-message", type=int, default=10)
    args = ap.parse_args(argv)
    work = shared_tmpdir("campus-bench-")
    pg = Postgres(work)
    pg.start()
    mqdir = shared_tmpdir("campus-bench-mq-")
    broker = Mosquitto(mqdir)
    broker.start()
    server = None
    try:
        base = broker_only(broker, args.rate, args.seconds, args.per_message)
        url = pg.create_database("lat")
        migrate_url(url)
        server = IngestServer(work, broker.url, url, name="lat")
        server.start()
        server.wait_healthy()
        sent = run_stream(broker, args.rate, args.seconds, args.per_message, "ingest")

        def done() -> bool:
            return (
                histogram(server.get("/metrics")[1], "campus_ingest_event_latency_seconds")[1]
                >= sent
            )

        wait_until(done, 120, f"{sent} events committed")
        buckets, total = histogram(server.get("/metrics")[1], "campus_ingest_event_latency_seconds")
    finally:
        if server is not None:
            server.terminate()
        broker.kill()
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mqdir, ignore_errors=True)
    within = next((n for le, n in buckets if le == 0.5), 0) / total
    p99 = quantile_bound(buckets, total, 0.99)
    b99 = base[min(len(base) - 1, int(0.99 * len(base)))]
    print(
        f"\nlatency: {sent} events at {args.rate}/s, {args.per_message}/message, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print(f"{'figure':46} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    print(
        f"{'p99 event-to-committed (s, bucket bound)':46} {p99:10.3f} {b99:10.3f} "
        f"{p99 / b99 if b99 else float('nan'):7.1f} {'<=0.5':>8}"
    )
    print(f"{'share committed within 500 ms':46} {within:10.4f} {'':>10} {'':>7} {'>=0.99':>8}")
    print("(baseline: publish-to-receive p99 at a plain paho subscriber, no database)")
    return 0 if within >= 0.99 else 1
