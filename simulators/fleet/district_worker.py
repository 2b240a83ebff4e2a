"""One simulator process of a district run: a few thousand protocol-level light devices.

    python -m simulators.fleet.district_worker    # started by simulators/fleet/district.py

Each device is its own MQTT 5 connection (TLS when asked) with its own username and password,
keeps its own ``seq`` and a durable outbox: the worker's SQLite file (WAL, ``synchronous=FULL``)
holds every event from before it is first sent until its PUBACK, so a fault is accounted for
exactly. A device sends one batch at a time and deletes it only after the PUBACK; on any
disconnect it reconnects after a jittered, growing backoff, at most ``connect_concurrency``
handshakes at once per worker (no thundering herd), and sends its backlog again.

Protocol (JSON lines): stdin first carries the job (devices, scenario, secrets: never argv),
then ``go EPOCH`` (the school day starts at that wall time) and ``stop``. stdout carries a
``stat`` line every second and one ``final`` line (per-device counts) after ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import ssl
import sys
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import msgspec

from schemas.events import DeviceKind
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch
from simulators.fleet.events import MAKERS, Hasher, keyed_hasher
from simulators.fleet.scenario import KindProfile, Scenario, clock_seconds, rate_factor

log = logging.getLogger(__name__)
HEALTH: Final = "agent.health"
#: Largest packet a device accepts from the broker (CONNACK, PUBACK, PINGRESP are tiny).
MAX_IN: Final = 4096
_json: Final = msgspec.json.Encoder()
PINGREQ: Final = b"\xc0\x00"


# The device's side of MQTT 5, written here as a device would (the simulators do not borrow the
# server's codec): CONNECT with credentials, QoS 1 PUBLISH, fixed headers.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    raw = s.encode()
    return len(raw).to_bytes(2, "big") + raw


def mqtt_connect(client_id: str, username: str, password: str, keepalive_s: int) -> bytes:
    """MQTT 5 CONNECT: clean start, user name and password, no properties."""
    body = _str("MQTT") + bytes([5, 0x80 | 0x40 | 0x02]) + keepalive_s.to_bytes(2, "big")
    body += b"\x00" + _str(client_id) + _str(username) + _str(password)
    return b"\x10" + _varint(len(body)) + body


def mqtt_publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    """MQTT 5 PUBLISH at QoS 1, no properties."""
    body = _str(topic) + packet_id.to_bytes(2, "big") + b"\x00" + payload
    return b"\x32" + _varint(len(body)) + body


def device_password(key: bytes, device_id: str) -> str:
    """The run's password of a device: HMAC of its id with the run's secret key."""
    return hmac.new(key, device_id.encode(), hashlib.sha256).hexdigest()[:32]


class Job(msgspec.Struct, frozen=True, kw_only=True):
    #: (device_id, school_id, kind, host, port) for every device of this worker.
    devices: list[tuple[str, str, str, str, int]]
    scenario: Scenario
    password_key: str
    hash_key: str
    outbox: str
    ca: str | None = None
    worker: int = 0


class Outbox:
    """The worker's durable outbox: ``(device, seq) → event`` until acknowledged."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (device TEXT, seq INTEGER, ts TEXT, type TEXT,"
            " data BLOB, PRIMARY KEY (device, seq)) WITHOUT ROWID"
        )
        self.acked: list[tuple[str, int]] = []

    def add(self, rows: list[tuple[str, int, str, str, bytes]]) -> None:
        """Store rows in one transaction; they exist on disk before any is sent."""
        if rows:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")

    def flush_acks(self) -> None:
        if self.acked:
            acked, self.acked = self.acked, []
            self.db.execute("BEGIN")
            self.db.executemany("DELETE FROM outbox WHERE device = ? AND seq <= ?", acked)
            self.db.execute("COMMIT")

    def depth(self) -> int:
        row = self.db.execute("SELECT count(*) FROM outbox").fetchone()
        return int(row[0])


class LightDevice:
    """A device: its seq, its unacknowledged events in memory (mirrored in the outbox), and
    one MQTT connection it keeps up."""

    def __init__(self, w: Worker, spec: tuple[str, str, str, str, int]) -> None:
        self.w = w
        self.id, self.school, self.kind, self.host, self.port = spec
        self.topic = f"campus/v1/{self.school}/{self.id}/up"
        self.seq = 0
        self.made = 0
        self.health_made = 0
        self.pending: deque[tuple[int, str, str, bytes]] = deque()
        self.wake = asyncio.Event()
        self.connected = False
        self.connects = 0
        self.replayed = 0
        self._pid = 0

    def make(self, etype: str, ts: str, n: int) -> tuple[str, int, str, str, bytes]:
        self.seq += 1
        data = _json.encode(MAKERS[etype](n, self.id, self.w.hasher))
        self.pending.append((self.seq, ts, etype, data))
        return (self.id, self.seq, ts, etype, data)

    def _backoff(self, attempt: int) -> float:
        t = self.w.s.tuning
        cap = min(t.backoff_max_s, t.backoff_initial_s * 2 ** min(attempt, 16))
        return self.w.rng.uniform(0, cap)  # full jitter: reconnects spread over the window

    async def run(self) -> None:
        attempt = 0
        while True:
            streams = await self._connect()
            if streams is None:
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            attempt = 0
            reader, writer = streams
            self.connected = True
            self.connects += 1
            self.w.online += 1
            try:
                await self._session(reader, writer)
            except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            finally:
                self.connected = False
                self.w.online -= 1
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)
            await asyncio.sleep(self._backoff(1))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        w, t = self.w, self.w.s.tuning
        async with w.handshakes:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        self.host,
                        self.port,
                        ssl=w.ssl,
                        server_hostname=self.host if w.ssl else None,
                    ),
                    t.puback_timeout_s,
                )
            except (OSError, TimeoutError, ssl.SSLError):
                w.connect_failures += 1
                return None
            try:
                writer.write(
                    mqtt_connect(f"agent-{self.id}", self.id, w.password(self.id), t.keepalive_s)
                )
                first, body = await asyncio.wait_for(_read_packet(reader), t.puback_timeout_s)
                if first >> 4 != 2 or len(body) < 2 or body[1] != 0:
                    w.refused += 1
                    raise ConnectionError(f"CONNACK refused: {body[:2].hex()}")
            except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                w.connect_failures += 1
                writer.close()
                return None
        return reader, writer

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t = self.w.s.tuning
        backlog = len(self.pending)
        while True:
            if not self.pending:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), t.keepalive_s / 2)
                except TimeoutError:
                    writer.write(PINGREQ)
                    await writer.drain()
                    await asyncio.wait_for(_read_packet(reader), t.puback_timeout_s)
                continue
            batch = [self.pending[i] for i in range(min(len(self.pending), t.max_batch_events))]
            replay = backlog > 0
            payload = encode_batch(
                UplinkBatch(
                    device_id=self.id,
                    kind=self.kind,
                    sent_at=datetime.now(UTC),
                    events=[
                        UplinkEvent(seq=s, ts=_ts(ts), type=et, data=msgspec.Raw(d))
                        for s, ts, et, d in batch
                    ],
                    replay=replay,
                )
            )
            self._pid = self._pid % 65535 + 1
            writer.write(mqtt_publish(self.topic, payload, self._pid))
            await writer.drain()
            while True:
                first, body = await asyncio.wait_for(_read_packet(reader), t.puback_timeout_s)
                if first >> 4 == 4 and int.from_bytes(body[:2], "big") == self._pid:
                    break
            if len(body) > 2 and body[2] >= 0x80:
                self.w.refused += 1
                raise ConnectionError(f"PUBACK reason {body[2]:#x}")
            for _ in batch:
                self.pending.popleft()
            if replay:
                self.replayed += len(batch)
                backlog = max(0, backlog - len(batch))
            self.w.outbox.acked.append((self.id, batch[-1][0]))
            self.w.acked += len(batch)


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    first, length, shift, b = head[0], 0, 0, head[1]
    while True:
        length |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 21:
            raise EOFError("malformed remaining length")
        b = (await reader.readexactly(1))[0]
    if length > MAX_IN:
        raise EOFError(f"packet of {length} bytes from the broker")
    return first, await reader.readexactly(length) if length else b""


_ts_decoder: Final = msgspec.json.Decoder(datetime)


def _ts(iso: str) -> datetime:
    return _ts_decoder.decode(f'"{iso}"')


class Worker:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.s = job.scenario
        self.key = bytes.fromhex(job.password_key)
        self.hasher: Hasher = keyed_hasher(bytes.fromhex(job.hash_key))
        self.rng = random.Random(self.s.seed * 1000 + job.worker)  # noqa: S311 - jitter only
        self.outbox = Outbox(Path(job.outbox))
        self.ssl: ssl.SSLContext | None = None
        if job.ca:
            self.ssl = ssl.create_default_context(cafile=job.ca)
        self.handshakes = asyncio.Semaphore(self.s.layout.connect_concurrency)
        self.devices = [LightDevice(self, d) for d in job.devices]
        self.online = 0
        self.acked = 0
        self.refused = 0
        self.connect_failures = 0
        self.generating = False
        self.done_generating = False
        self._passwords: dict[str, str] = {}

    def password(self, dev: str) -> str:
        return device_password(self.key, dev)

    def profiles(self) -> list[KindProfile | None]:
        return [self.s.profile(DeviceKind(d.kind)) for d in self.devices]

    async def generate(self, start_epoch: float) -> None:
        """The school day: per device, events at its kind's rate, plus health every health_s."""
        s = self.s
        await asyncio.sleep(max(0.0, start_epoch - time.time()))
        self.generating = True
        profiles = self.profiles()
        acc = [self.rng.random() for _ in self.devices]
        hacc = [self.rng.random() for _ in self.devices]
        health_per_h = 3600 / s.health_s if s.health_s else 0.0
        sim0, wall, last = clock_seconds(s.start), s.wall_seconds, 0.0
        while last < wall:
            await asyncio.sleep(s.tick_s)
            now = min(time.time() - start_epoch, wall)
            sim_a, sim_b = sim0 + last * s.speed, sim0 + now * s.speed
            dt_h, mid = (sim_b - sim_a) / 3600, (sim_a + sim_b) / 2
            last = now
            ts = datetime.now(UTC).astimezone().isoformat()
            rows: list[tuple[str, int, str, str, bytes]] = []
            woken = []
            for i, (dev, prof) in enumerate(zip(self.devices, profiles, strict=True)):
                before = len(rows)
                if prof is not None:
                    acc[i] += prof.per_hour * rate_factor(prof, mid) * dt_h
                    n, acc[i] = int(acc[i]), acc[i] - int(acc[i])
                    for _ in range(n):
                        et = prof.event_types[dev.made % len(prof.event_types)]
                        rows.append(dev.make(et, ts, dev.made))
                        dev.made += 1
                hacc[i] += health_per_h * dt_h
                n, hacc[i] = int(hacc[i]), hacc[i] - int(hacc[i])
                for _ in range(n):
                    rows.append(dev.make(HEALTH, ts, dev.health_made))
                    dev.health_made += 1
                if len(rows) > before:
                    woken.append(dev)
            # on disk first, then offered to the connections
            self.outbox.add(rows)
            for dev in woken:
                dev.wake.set()
        self.generating = False
        self.done_generating = True

    def stat(self) -> dict[str, Any]:
        return {
            "t": "stat",
            "online": self.online,
            "made": sum(d.seq for d in self.devices),
            "acked": self.acked,
            "pending": sum(len(d.pending) for d in self.devices),
            "replayed": sum(d.replayed for d in self.devices),
            "connects": sum(d.connects for d in self.devices),
            "refused": self.refused,
            "connect_failures": self.connect_failures,
            "done": self.done_generating,
        }

    def final(self) -> dict[str, Any]:
        self.outbox.flush_acks()
        return {
            "t": "final",
            "devices": {d.id: [d.seq, len(d.pending)] for d in self.devices},
            "outbox_depth": self.outbox.depth(),
            **{k: v for k, v in self.stat().items() if k != "t"},
        }


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 28)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    job = msgspec.json.decode(await reader.readline(), type=Job)
    w = Worker(job)
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(d.run()) for d in w.devices]

        async def report() -> None:
            while True:
                w.outbox.flush_acks()
                _emit(w.stat())
                await asyncio.sleep(1.0)

        tasks.append(tg.create_task(report()))
        while line := (await reader.readline()).decode().strip():
            cmd, _, arg = line.partition(" ")
            if cmd == "go":
                tasks.append(tg.create_task(w.generate(float(arg))))
            elif cmd == "stop":
                break
        for task in tasks:
            task.cancel()
    _emit(w.final())


#: The simulated devices share this box with the pipeline they load; in a district they run
#: on their own hardware. A lower priority gives the brokers, ingest and PostgreSQL the CPU
#: first, so what the run measures is the pipeline, not the simulator's contention with it.
NICE: Final = 10


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with contextlib.suppress(OSError):
        os.nice(NICE)
    asyncio.run(_main())


if __name__ == "__main__":
    main()
