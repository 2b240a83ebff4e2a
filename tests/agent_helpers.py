"""Agent test helpers: config files, a collector of what an agent publishes, a subprocess agent,
and polls with deadlines (shared by the agent integration tests; loaded as a plugin)."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from schemas.events import AgentHealth
from schemas.state import DeviceState, state_decoder
from schemas.uplink import DecodedUplink, decode_uplink
from simulators.harness import Mosquitto, wait_until

SCHOOL, DEVICE = "s001", "env-0101"
_ids = itertools.count()


class Collector:
    """A persistent-session QoS 1 subscriber to one device's topics, on paho's own thread."""

    def __init__(self, broker: Mosquitto, *, protocol: int = mqtt.MQTTv311) -> None:
        self.batches: list[DecodedUplink] = []
        self.states: list[DeviceState] = []
        self.arrivals: list[float] = []
        self.sizes: list[int] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client_id = f"collector-{os.getpid()}-{next(_ids)}"
        kwargs: dict[str, object] = {"clean_session": False} if protocol != mqtt.MQTTv5 else {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "the collector's subscription")

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe(f"campus/v1/{SCHOOL}/{DEVICE}/#", qos=1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/up"):
                self.batches.append(decode_uplink(msg.topic, msg.payload))
                self.arrivals.append(time.monotonic())
                self.sizes.append(len(msg.payload))
            elif msg.topic.endswith("/state"):
                self.states.append(state_decoder.decode(msg.payload))

    def seqs(self) -> list[int]:
        with self._lock:
            return [e.seq for b in self.batches for e in b.events]

    def has_all(self, count: int) -> bool:
        return set(self.seqs()) >= set(range(1, count + 1))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _Url:
    """Stands in for a broker where only the url matters."""

    def __init__(self, url: str) -> None:
        self.url = url


def write_config(
    tmp_path: Path,
    broker: Mosquitto | _Url,
    driver: str,
    *,
    protocol: str = "5",
    publish: str = "",
    health_interval_s: float | str | None = 0,  # off: tests count seqs exactly; None: default
) -> Path:
    path = tmp_path / "agent.toml"
    protocol_line = f'protocol = "{protocol}"' if protocol else ""
    health_lines = (
        "" if health_interval_s is None else f"[health]\ninterval_s = {health_interval_s}"
    )
    path.write_text(f"""
[device]
id = "{DEVICE}"
school_id = "{SCHOOL}"
kind = "env_sensor"
[outbox]
path = "outbox.db"
[mqtt]
url = "{broker.url}"
{protocol_line}
[publish]
backoff_initial_s = 0.1
backoff_max_s = 0.5
{publish}
{health_lines}
[[drivers]]
type = "synthetic"
name = "gen"
{driver}
""")
    return path


async def until(pred: Callable[[], object], what: str, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
        )


def health_events(c: Collector) -> list[AgentHealth]:
    events = [e for b in list(c.batches) for e in b.events]
    return [e.data for e in events if isinstance(e.data, AgentHealth)]


def with_health(tmp_path: Path, broker: Mosquitto | _Url, interval: str) -> Path:
    return write_config(tmp_path, broker, "rate = 20", health_interval_s=interval)


MINIMAL = """
[device]
id = "cr-0101"
school_id = "s001"
kind = "card_reader"
[mqtt]
url = "mqtt://127.0.0.1:1883"
"""
