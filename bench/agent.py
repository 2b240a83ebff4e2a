"""The edge agent: sustained rate through its durable outbox, memory, idle CPU, backlog drain.

    python -m bench agent [--events 100000] [--backlog 200000]

One real ``edge-agent`` process (synthetic driver, no OpenCV) against a real Mosquitto; a plain
subscriber counts the events that arrive.

1. Sustained: the driver produces as fast as the agent takes events (``rate = 0``); every event
   goes through the SQLite outbox (WAL) before it is published, and is deleted after PUBACK.
2. Idle: the driver has finished; the agent's CPU share over a few seconds, and its RSS.
3. Backlog: ``--backlog`` events wait in a second agent's outbox when it starts; it drains them
   (``replay_rate`` set well above the target) and the rate runs from the first arrival at the
   subscriber to the last. The subscriber checks every seq 1..N arrived exactly once (exit 1
   otherwise). The baseline is the sustained rate of (1), measured in the same run.

   By default (``--backlog-via outbox``) the backlog is written straight into the agent's outbox
   file with ``edge_agent.outbox.Outbox.append_many`` in transactions of 50,000, the events the
   synthetic driver makes: building 1M through a running agent takes minutes and is not the
   figure. ``--backlog-via agent`` builds it the slow way instead: the agent's own driver runs
   while the broker is down, and the broker comes back once the backlog is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import psutil

from device_drivers.base import UidHasher
from device_drivers.synthetic import GENERATORS
from edge_agent.outbox import Outbox
from schemas.reading import Reading
from simulators.harness import Mosquitto, shared_tmpdir, wait_until
from simulators.harness_pipeline import HASH_KEY_HEX, Agent


class _Seq(msgspec.Struct):
    seq: int


class _Up(msgspec.Struct):
    events: list[_Seq]


_decode_up = msgspec.json.Decoder(_Up).decode


class Counter:
    """Counts events arriving on ``up`` (QoS 1, so none is dropped on the way); with ``seqs``,
    also how often each seq 1..seqs arrived."""

    def __init__(self, broker: Mosquitto, seqs: int = 0) -> None:
        self.n = 0
        self.seen = bytearray(seqs + 1) if seqs else None
        self.outside = 0
        self.first: float | None = None
        self.last = 0.0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.broker = broker

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if self.seen is None:
            k = len(json.loads(msg.payload)["events"])
        else:
            events = _decode_up(msg.payload).events
            k = len(events)
            seen, top = self.seen, len(self.seen) - 1
            for e in events:
                if 0 < e.seq <= top:
                    seen[e.seq] = min(seen[e.seq] + 1, 255)
                else:
                    self.outside += 1
        now = time.perf_counter()
        with self._lock:
            self.first = now if self.first is None else self.first
            self.n += k
            self.last = now

    def start(self) -> None:
        self.client.connect(self.broker.host, self.broker.port)
        self.client.subscribe("campus/v1/+/+/up", qos=1)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def rate(self) -> float:
        return self.n / (self.last - self.first) if self.first and self.last > self.first else 0.0


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def outbox_depth(agent: Agent) -> int:
    try:
        with sqlite3.connect(f"file:{agent.dir / 'outbox.db'}?mode=ro", uri=True, timeout=1) as c:
            return int(c.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.Error:
        return -1


def build_outbox(path: Path, n: int, chunk: int = 50_000) -> float:
    """Write ``n`` synthetic env.reading events into the outbox at ``path``; return events/s."""
    make = GENERATORS["env.reading"]
    hasher = UidHasher(bytes.fromhex(HASH_KEY_HEX))  # env.reading carries no card: unused
    start = time.perf_counter()
    with Outbox(path) as box:
        for base in range(0, n, chunk):
            ids = range(base, min(n, base + chunk))
            box.append_many([Reading("env.reading", make(i, "gen", hasher)) for i in ids])
        if box.depth() != n:
            raise RuntimeError(f"the outbox holds {box.depth()} events, not {n}")
    return n / (time.perf_counter() - start)


def disk_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("outbox.db*")) / 2**20


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench agent", description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--backlog", type=int, default=200_000)
    ap.add_argument("--backlog-via", choices=("outbox", "agent"), default="outbox")
    args = ap.parse_args(argv)
    work = shared_tmpdir("campus-bench-agent-")
    broker = Mosquitto(work)
    broker.start()
    pub = {"max_batch_events": 500, "inflight": 16, "replay_rate": 100_000}
    try:
        counter = Counter(broker)
        counter.start()
        agent = Agent(work, "env-7001", broker.url, count=args.events, publish=pub)
        agent.start()
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        wait_until(lambda: counter.n > 0, 60, "the first event")
        c0, n0 = cpu_s(proc), counter.n
        wait_until(lambda: counter.n >= args.events, 600, f"{args.events} events", 0.02)
        sustained = counter.rate()
        cpu_per_event = (cpu_s(proc) - c0) / (counter.n - n0)
        t0, c1 = time.perf_counter(), cpu_s(proc)
        time.sleep(5)  # measuring idle CPU over a fixed window, not waiting for anything
        idle = (cpu_s(proc) - c1) / (time.perf_counter() - t0)
        rss = proc.memory_info().rss / 2**20
        loaded = "cv2" in open(f"/proc/{proc.pid}/maps").read()  # noqa: SIM115
        agent.terminate()
        counter.stop()

        # the driver's count is reached as soon as the outbox holds that many events, so a
        # backlog agent adds nothing of its own
        backlog = Agent(work, "env-7002", broker.url, count=args.backlog, publish=pub)
        built = 0.0
        deadline = 120 + args.backlog / 2000  # generous: the machine is shared
        drain = Counter(broker, seqs=args.backlog)
        if args.backlog_via == "agent":
            broker.stop()
            t0 = time.perf_counter()
            backlog.start()
            wait_until(lambda: outbox_depth(backlog) >= args.backlog, deadline, "the backlog", 0.2)
            built = args.backlog / (time.perf_counter() - t0)
            outbox_mb = disk_mb(backlog.dir)
            broker.start()
            drain.start()
        else:
            built = build_outbox(backlog.dir / "outbox.db", args.backlog)
            outbox_mb = disk_mb(backlog.dir)
            drain.start()
            backlog.start()
        assert backlog.proc is not None
        bproc = psutil.Process(backlog.proc.pid)
        wait_until(lambda: drain.n > 0, 120, "the first backlog event")
        c0 = cpu_s(bproc)
        wait_until(lambda: drain.n >= args.backlog, deadline, "the backlog drained", 0.02)
        drain_cpu = (cpu_s(bproc) - c0) / args.backlog
        drained = drain.rate()
        drain_load = os.getloadavg()[0]
        wait_until(lambda: outbox_depth(backlog) == 0, 60, "the outbox emptied", 0.1)
        backlog.terminate()
        drain.stop()
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)
    assert drain.seen is not None
    missing = drain.seen.count(0) - 1  # index 0 is no seq
    doubled = sum(1 for c in drain.seen if c > 1)

    print(
        f"\nedge agent: {args.events} events sustained, {args.backlog} backlog (built via"
        f" {args.backlog_via} at {built:,.0f} ev/s, {outbox_mb:.0f} MB on disk); load average"
        f" {drain_load:.1f} at the drain's end on {os.cpu_count()} cores\n"
    )
    rows = [
        ("sustained through the outbox (ev/s)", f"{sustained:,.0f}", "", "", ">=5000"),
        ("agent CPU per event (µs)", f"{cpu_per_event * 1e6:.1f}", "", "", ""),
        ("events per agent CPU-second", f"{1 / cpu_per_event:,.0f}", "", "", ">=5000"),
        (f"RSS after the run (MB; OpenCV loaded: {loaded})", f"{rss:.1f}", "", "", "<=60"),
        ("idle CPU (% of one core)", f"{idle * 100:.2f}", "", "", "<=1"),
        (
            "backlog drain vs sustained (ev/s)",
            f"{drained:,.0f}",
            f"{sustained:,.0f}",
            f"{drained / sustained:.2f}",
            ">=10000",
        ),
        (
            "backlog drain vs target (ev/s)",
            f"{drained:,.0f}",
            "10,000",
            f"{drained / 1e4:.2f}",
            ">=1",
        ),
        ("agent CPU per event while draining (µs)", f"{drain_cpu * 1e6:.1f}", "", "", ""),
        ("backlog seqs missing / doubled", f"{missing} / {doubled}", "", "", "0 / 0"),
    ]
    print(f"{'figure':46} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    for name, value, base, ratio, target in rows:
        print(f"{name:46} {value:>10} {base:>10} {ratio:>7} {target:>8}")
    if drain.outside:
        print(f"{drain.outside} events arrived with a seq outside 1..{args.backlog}")
    return 0 if missing == doubled == drain.outside == 0 else 1
