"""The server's side of one device on a real broker: sends config and cmd, collects the rest.

A paho client on its own thread with a persistent session, so nothing the agent publishes while
it reconnects is missed. Used by the agent's config, command and quota tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from schemas.state import (
    CommandAck,
    ConfigAck,
    DeviceState,
    ack_decoder,
    config_ack_decoder,
    state_decoder,
)
from schemas.uplink import ValidEvent, decode_uplink
from simulators.harness import Mosquitto, wait_until

_ids = itertools.count()


class DeviceServer:
    def __init__(self, broker: Mosquitto, school: str, device: str) -> None:
        self.base = f"campus/v1/{school}/{device}"
        self.acks: list[CommandAck] = []
        self.config_acks: list[ConfigAck] = []
        self.states: list[DeviceState] = []
        self.events: list[ValidEvent] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"server-{os.getpid()}-{next(_ids)}",
            clean_session=False,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{self.base}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # floats work
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(self._subscribed.is_set, 10, "the server's subscription")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            topic = msg.topic.removeprefix(self.base + "/")
            if topic == "cmd/ack":
                self.acks.append(ack_decoder.decode(msg.payload))
            elif topic == "config/ack":
                self.config_acks.append(config_ack_decoder.decode(msg.payload))
            elif topic == "up":
                self.events.extend(decode_uplink(msg.topic, bytes(msg.payload)).events)
            elif topic == "state":
                self.states.append(state_decoder.decode(msg.payload))

    def send_config(self, version: int, config: dict[str, Any] | bytes) -> None:
        """Publish the desired config, retained, as the server does."""
        if isinstance(config, bytes):
            raw = config
        else:
            doc = {"version": version, "issued_at": datetime.now(UTC).isoformat(), "config": config}
            raw = json.dumps(doc).encode()
        self.client.publish(f"{self.base}/config", raw, qos=1, retain=True).wait_for_publish(5)

    def send_command(self, cmd_id: str, name: str, /, **args: Any) -> None:
        raw = json.dumps({"id": cmd_id, "name": name, "args": args}).encode()
        self.client.publish(f"{self.base}/cmd", raw, qos=1).wait_for_publish(5)

    def config_ack(self, version: int) -> ConfigAck | None:
        with self._lock:
            return next((a for a in reversed(self.config_acks) if a.version == version), None)

    def ack(self, cmd_id: str) -> CommandAck | None:
        with self._lock:
            return next((a for a in self.acks if a.id == cmd_id), None)

    def of(self, kind: str, where: Callable[[Any], bool] = lambda _d: True) -> list[Any]:
        with self._lock:
            return [e.data for e in self.events if e.type == kind and where(e.data)]

    def seqs(self) -> list[int]:
        with self._lock:
            return [e.seq for e in self.events]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def until(pred: Callable[[], object], what: str, within: float = 10.0) -> Any:
    """Poll ``pred`` on the event loop until it is truthy (returned) or ``within`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (value := pred()):
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


KEY_HEX = "0f" * 32


class _Enrolment(BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, dict[str, Any]]]] = []
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        status, answer = type(self).answers.pop(0)
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *_: object) -> None:
        pass
