"""Thousands of devices on one Mosquitto: periodic messages plus bursts; does ingest keep up?

    python -m bench connections [--devices 5000] [--seconds 90] [--period 30]

Each simulated device is one MQTT 5 connection (asyncio, the ingest codec's encoder) that sends
a one-event QoS 1 message every ``period`` seconds (first one at a random offset), and every
few seconds a random 2% of devices send a burst of 20 events. One ``ingest-server`` stores
everything. Figures: connections held, events sent, stored, the lag between the last send and
the last commit, and the ingest server's CPU share. Baseline: the offered rate. Exit 1 unless
every event was stored exactly once. Needs ``ulimit -n`` above the device count: the bench
raises its own soft limit (Mosquitto inherits it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import time
from datetime import UTC, datetime

import psutil
import psycopg

from ingest_server.ingest.mqtt_codec import MQTT5, encode_connect, encode_publish
from ingest_server.storage.migrate import migrate_url
from simulators.harness import Mosquitto, Postgres, shared_tmpdir, wait_until
from simulators.harness_pipeline import IngestServer

SCHOOL = "s001"


def body(dev: str, first: int, n: int) -> bytes:
    now = datetime.now(UTC).isoformat()
    events = [
        {"seq": s, "ts": now, "type": "env.reading",
         "data": {"sensor": "room", "temperature_c": 21.5}, "synced": True}
        for s in range(first, first + n)
    ]  # fmt: skip
    env = {"v": 1, "device_id": dev, "kind": "env_sensor", "sent_at": now, "events": events}
    return json.dumps(env).encode()


class Device:
    def __init__(self, k: int) -> None:
        self.id = f"fl-{k:05d}"
        self.seq = 0
        self.pid = 0
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, host: str, port: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(encode_connect(f"dev-{self.id}", protocol=MQTT5, keepalive_s=120))
        await writer.drain()
        ack = await reader.readexactly(2)
        rest = await reader.readexactly(ack[1])
        if ack[0] >> 4 != 2 or rest[1] != 0:
            raise RuntimeError(f"{self.id}: CONNACK refused {rest!r}")
        self.writer = writer
        # PUBACKs are read and dropped: whether all arrived is checked in the database
        asyncio.get_running_loop().create_task(self._drain(reader))

    @staticmethod
    async def _drain(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def send(self, n: int) -> int:
        assert self.writer is not None
        self.pid = self.pid % 65535 + 1
        payload = body(self.id, self.seq + 1, n)
        self.seq += n
        topic = f"campus/v1/{SCHOOL}/{self.id}/up"
        self.writer.write(encode_publish(topic, payload, qos=1, packet_id=self.pid))
        await self.writer.drain()
        return n


async def run_fleet(
    broker: Mosquitto, devices: int, seconds: float, period: float
) -> tuple[int, int, float]:
    fleet = [Device(k) for k in range(devices)]
    sem = asyncio.Semaphore(200)

    async def connect(d: Device) -> None:
        async with sem:
            await d.connect(broker.host, broker.port)

    await asyncio.gather(*(connect(d) for d in fleet))
    connected = sum(1 for d in fleet if d.writer is not None)
    sent = 0
    start = time.monotonic()

    async def periodic(d: Device) -> None:
        nonlocal sent
        await asyncio.sleep(random.uniform(0, period))
        while time.monotonic() - start < seconds:
            sent += await d.send(1)
            await asyncio.sleep(period)

    async def bursts() -> None:
        nonlocal sent
        while time.monotonic() - start < seconds:
            await asyncio.sleep(5)
            for d in random.sample(fleet, max(1, devices // 50)):
                sent += await d.send(20)

    await asyncio.gather(*(periodic(d) for d in fleet), bursts())
    last_send = time.monotonic()
    for d in fleet:
        if d.writer is not None:
            d.writer.close()
    return connected, sent, last_send


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench connections", description=__doc__)
    ap.add_argument("--devices", type=int, default=5000)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--period", type=float, default=30)
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.devices + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    work = shared_tmpdir("campus-bench-")
    pg = Postgres(work)
    pg.start()
    mqdir = shared_tmpdir("campus-bench-mq-")
    broker = Mosquitto(mqdir)
    broker.start()
    server = None
    try:
        url = pg.create_database("fleet")
        migrate_url(url)
        server = IngestServer(work, broker.url, url, name="fleet")
        server.start()
        server.wait_healthy()
        assert server.proc is not None
        proc = psutil.Process(server.proc.pid)
        c0, t0 = proc.cpu_times(), time.monotonic()
        connected, sent, last_send = asyncio.run(
            run_fleet(broker, args.devices, args.seconds, args.period)
        )
        with psycopg.connect(url, autocommit=True) as conn:

            def stored() -> int:
                row = conn.execute("SELECT coalesce(sum(event_count), 0) FROM devices").fetchone()
                return int(row[0]) if row else 0

            wait_until(lambda: stored() >= sent, 120, f"{sent} stored", interval=0.05)
            lag = time.monotonic() - last_send
            c1, t1 = proc.cpu_times(), time.monotonic()
            row = conn.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events")
            total, distinct = row.fetchone() or (0, 0)
    finally:
        if server is not None:
            server.terminate()
        broker.kill()
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mqdir, ignore_errors=True)
    cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0)
    offered = sent / args.seconds
    print(
        f"\nfleet: {args.devices} devices, one event every {args.period:.0f} s each plus bursts, "
        f"{args.seconds:.0f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
    )
    print(f"{'figure':46} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    print(
        f"{'connections held':46} {connected:10,} {args.devices:10,} "
        f"{connected / args.devices:7.2f} {'1.00':>8}"
    )
    print(
        f"{'events stored (of sent)':46} {distinct:10,} {sent:10,} "
        f"{distinct / max(1, sent):7.3f} {'1.000':>8}"
    )
    print(f"{'offered rate (ev/s)':46} {offered:10,.0f}")
    print(f"{'last commit after last send (s)':46} {lag:10.2f}")
    print(f"{'ingest server CPU (% of one core)':46} {cpu * 100:10.1f}")
    return 0 if total == distinct == sent and connected == args.devices else 1
