"""The edge agent: sustained rate through its durable outbox, memory, idle CPU, backlog drain.

    python -m bench agent [--events 100000] [--backlog 200000]

One real ``edge-agent`` process (synthetic driver, no OpenCV) against a real Mosquitto; a plain
subscriber counts the events that arrive.

1. Sustained: the driver produces as fast as the agent takes events (``rate = 0``); every event
   goes through the SQLite outbox (WAL) before it is published, and is deleted after PUBACK.
2. Idle: the driver has finished; the agent's CPU share over a few seconds, and its RSS.
3. Backlog: the broker is down while ``--backlog`` events pile up in the outbox; then it comes
   back and the agent drains them (``replay_rate`` set well above the target). The baseline
   is the sustained rate of (1), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import threading
import time

import paho.mqtt.client as mqtt
import psutil

from tests.pipeline import Agent
from tests.services import Mosquitto, shared_tmpdir, wait_until


class Counter:
    """Counts events arriving on ``up`` (QoS 1, so none is dropped on the way)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.n = 0
        self.first: float | None = None
        self.last = 0.0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.broker = broker

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        k = len(json.loads(msg.payload)["events"])
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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench agent", description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--backlog", type=int, default=200_000)
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

        broker.stop()
        backlog = Agent(work, "env-7002", broker.url, count=args.backlog, publish=pub)
        backlog.start()
        wait_until(lambda: outbox_depth(backlog) >= args.backlog, 600, "the backlog", 0.2)
        broker.start()
        drain = Counter(broker)
        drain.start()
        wait_until(lambda: drain.n >= args.backlog, 600, "the backlog drained", 0.02)
        drained = drain.rate()
        backlog.terminate()
        drain.stop()
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nedge agent: {args.events} events sustained, {args.backlog} backlog; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n"
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
    ]
    print(f"{'figure':46} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    for name, value, base, ratio, target in rows:
        print(f"{name:46} {value:>10} {base:>10} {ratio:>7} {target:>8}")
    return 0
