"""A protocol-level device for control-plane tests: one process, one real MQTT client.

    python -m simulators.fleet.ack_agent --broker 127.0.0.1:1883 --school s001 \\
        --device d01 --state-file d01.json [--reject-config REASON]

It says ``online`` (retained, with an ``offline`` will), answers every ``cmd`` with an ``ok``
ack, and every ``config`` document with ``applied`` (or ``rejected`` with REASON), as the edge
agent does on the wire (``schemas.state``). Its MQTT session is persistent, so commands sent
while it was down arrive when it comes back, as with the real agent. What it applied and ran
is written to ``--state-file`` (JSON), so a test can see a device's config unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from schemas.state import CommandAck, ConfigAck, DeviceState, command_decoder, config_decoder


def _now() -> datetime:
    return datetime.now(UTC)


class AckAgent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.base = f"campus/v1/{args.school}/{args.device}"
        self.reject: str | None = args.reject_config
        self.state_file = Path(args.state_file)
        self.applied: dict[str, Any] = {"config_version": None, "config": None, "commands": []}
        if self.state_file.exists():
            self.applied = json.loads(self.state_file.read_text())
        self.lock = threading.Lock()
        host, port = args.broker.rsplit(":", 1)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"ack-{args.device}", clean_session=False
        )
        offline = DeviceState(state="offline", boot=1, agent_version="ack-agent", ts=_now())
        self.client.will_set(f"{self.base}/state", msgspec.json.encode(offline), 1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe([(f"{self.base}/cmd", 1), (f"{self.base}/config", 1)])
        online = DeviceState(
            state="online",
            boot=1,
            agent_version="ack-agent",
            ts=_now(),
            config_version=self.applied["config_version"],
        )
        client.publish(f"{self.base}/state", msgspec.json.encode(online), 1, retain=True)

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.applied))
        os.replace(tmp, self.state_file)

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            if msg.topic.endswith("/cmd"):
                cmd = command_decoder.decode(msg.payload)
                if cmd.id not in self.applied["commands"]:
                    self.applied["commands"].append(cmd.id)
                    self._save()
                ack: Any = CommandAck(id=cmd.id, status="ok", detail={"ran": cmd.name})
                client.publish(f"{self.base}/cmd/ack", msgspec.json.encode(ack), 1)
                return
            doc = config_decoder.decode(msg.payload)
            current = self.applied["config_version"]
            if current is not None and doc.version <= current:
                return  # stale, as the agent ignores it
            if self.reject is not None:
                ack = ConfigAck(
                    version=doc.version, status="rejected", detail=self.reject, ts=_now()
                )
            else:
                self.applied["config_version"], self.applied["config"] = doc.version, doc.config
                self._save()
                ack = ConfigAck(version=doc.version, status="applied", ts=_now())
            client.publish(f"{self.base}/config/ack", msgspec.json.encode(ack), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--broker", required=True, help="HOST:PORT")
    parser.add_argument("--school", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--state-file", required=True)
    parser.add_argument("--reject-config", default=None, metavar="REASON")
    args = parser.parse_args()
    agent = AckAgent(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent.client.loop_start()
    stop.wait()
    agent.client.disconnect()  # a clean goodbye: the will is not sent; say offline ourselves
    agent.client.loop_stop()


if __name__ == "__main__":
    main()
