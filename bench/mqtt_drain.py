"""How fast a QoS 1 backlog leaves Mosquitto, one event per message, by receive loop.

    python -m bench mqtt_drain [--messages 100000]

The backlog is queued in Mosquitto for a persistent session while the subscriber is away; then
the subscriber connects and drains it, acknowledging every message. Three subscribers, each in
the same run on the same broker:

1. ``mosquitto_sub`` (Mosquitto's own C client): the broker's ceiling here, the baseline.
2. paho-mqtt with manual acks, one ``ack()`` per message: the ingest server's previous loop.
3. :class:`~ingest_server.ingest.mqtt_session.MqttSubscriber`: the ingest server's loop now,
   acks sent
   in one write per chunk.

No database: this isolates the MQTT receive path. CPU is this process's CPU time per message
(the subscriber's threads), so it holds even when the machine is busy with other work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence

import paho.mqtt.client as mqtt

from bench.ingest_e2e import T0, event
from ingest_server.ingest.mqtt_codec import Publish
from ingest_server.ingest.mqtt_session import MqttSubscriber, SessionConfig
from simulators.harness import Mosquitto, shared_tmpdir, wait_until

TOPIC = "campus/v1/s001/env-0000/up"
FILTER = "campus/v1/+/+/up"


def payload(seq: int) -> bytes:
    body = {
        "v": 1,
        "device_id": "env-0000",
        "kind": "env_sensor",
        "sent_at": T0.isoformat(),
        "events": [event(seq)],
    }
    return json.dumps(body).encode()


def fill(broker: Mosquitto, n: int) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(500)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        window = []
        for s in range(1, n + 1):
            window.append(pub.publish(TOPIC, payload(s), qos=1))
            if len(window) >= 5000:  # bound paho's queue: it slows down when it grows
                for info in window:
                    info.wait_for_publish(60)
                window = []
        for info in window:
            info.wait_for_publish(60)
    finally:
        pub.disconnect()
        pub.loop_stop()


def cpu() -> float:
    return time.process_time()


def drain_mosquitto_sub(broker: Mosquitto, n: int, client_id: str) -> tuple[float, float]:
    argv = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5",
            "-i", client_id, "-c", "-x", "604800", "-q", "1", "-t", FILTER,
            "-D", "connect", "receive-maximum", "65535"]  # fmt: skip
    subprocess.run([*argv, "-W", "1"], check=False, capture_output=True, timeout=30)
    fill(broker, n)
    start = time.perf_counter()
    proc = subprocess.run([*argv, "-C", str(n)], check=True, stdout=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0
    return n / (time.perf_counter() - start), float("nan")


def drain_paho(broker: Mosquitto, n: int, client_id: str) -> tuple[float, float]:
    done = threading.Event()
    count = 0

    def on_message(client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal count
        client.ack(msg.mid, msg.qos)
        count += 1
        if count >= n:
            done.set()

    def session() -> mqtt.Client:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        c.on_message = on_message
        return c

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 604800
    props.ReceiveMaximum = 65535
    c = session()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.subscribe(FILTER, qos=1)
    c.loop_start()
    time.sleep(0.5)  # benchmark setup, not a test: let the SUBACK land before leaving
    c.disconnect()
    c.loop_stop()
    fill(broker, n)
    c = session()
    start, cpu0 = time.perf_counter(), cpu()
    c.connect(broker.host, broker.port, clean_start=False, properties=props)
    c.loop_start()
    try:
        if not done.wait(600):
            raise TimeoutError(f"paho drained {count} of {n}")
        return n / (time.perf_counter() - start), (cpu() - cpu0) / n
    finally:
        c.disconnect()
        c.loop_stop()


def drain_session(broker: Mosquitto, n: int, client_id: str) -> tuple[float, float]:
    count = 0
    ready = threading.Event()
    holder: list[MqttSubscriber] = []

    def deliver(pubs: Sequence[Publish], generation: int, _t: float) -> int:
        nonlocal count
        holder[0].ack(_Acked(p.packet_id, p.qos, generation) for p in pubs)
        count += len(pubs)
        return len(pubs)

    cfg = SessionConfig(broker.host, broker.port, client_id, ((FILTER, 1, 0),))
    first = MqttSubscriber(cfg, deliver, lambda ok: ok and ready.set())
    holder.append(first)
    first.start()
    ready.wait(10)
    first.stop()
    fill(broker, n)
    session = MqttSubscriber(cfg, deliver)
    holder[0] = session
    start, cpu0 = time.perf_counter(), cpu()
    session.start()
    try:
        wait_until(lambda: count >= n, 600, f"{n} drained", interval=0.005)
        return n / (time.perf_counter() - start), (cpu() - cpu0) / n
    finally:
        session.stop()


class _Acked:
    __slots__ = ("generation", "mid", "qos")

    def __init__(self, mid: int, qos: int, generation: int) -> None:
        self.mid, self.qos, self.generation = mid, qos, generation


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench mqtt_drain", description=__doc__)
    ap.add_argument("--messages", type=int, default=100_000)
    n = ap.parse_args(argv).messages
    work = shared_tmpdir("campus-bench-mq-")
    broker = Mosquitto(work)
    broker.start()
    try:
        have_sub = shutil.which("mosquitto_sub") is not None
        ceiling = drain_mosquitto_sub(broker, n, "b-sub")[0] if have_sub else float("nan")
        paho_rate, paho_cpu = drain_paho(broker, n, "b-paho")
        ours_rate, ours_cpu = drain_session(broker, n, "b-ours")
    finally:
        broker.kill()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nQoS 1 backlog of {n} one-event messages drained from Mosquitto (acked)\n")
    print(f"{'figure':46} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    print(f"{'mosquitto_sub drain (msgs/s): broker ceiling':46} {ceiling:10,.0f}")
    print(f"{'paho manual-ack drain (msgs/s)':46} {paho_rate:10,.0f}")
    print(
        f"{'MqttSubscriber drain vs paho (msgs/s)':46} {ours_rate:10,.0f} {paho_rate:10,.0f} "
        f"{ours_rate / paho_rate:7.1f} {'-':>8}"
    )
    print(
        f"{'MqttSubscriber drain vs broker ceiling':46} {ours_rate:10,.0f} {ceiling:10,.0f} "
        f"{ours_rate / ceiling:7.2f} {'-':>8}"
    )
    print(
        f"{'CPU per message, MqttSubscriber vs paho (µs)':46} {ours_cpu * 1e6:10.1f} "
        f"{paho_cpu * 1e6:10.1f} {ours_cpu / paho_cpu:7.2f} {'-':>8}"
    )
    return 0
