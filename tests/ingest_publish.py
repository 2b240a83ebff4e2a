"""Publishing uplinks straight to the broker for the ingest-server tests: tap events, batches,
topics and a QoS 1 ``Publisher``; ``get`` reads an HTTP endpoint."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch
from simulators.harness import Mosquitto


def tap(seq: int, *, ts: datetime | None = None) -> UplinkEvent:
    data = {"uid_hash": UID, "tech": "em4100", "reader": "gate"}
    return UplinkEvent(
        seq=seq,
        ts=ts or datetime.now(UTC),
        type="card.tap",
        data=msgspec.Raw(msgspec.json.encode(data)),
    )


def uplink(device: str, events: list[UplinkEvent], *, replay: bool = False) -> bytes:
    """A card reader's batch; ``replay`` marks it backlog, as the agent's publisher does after
    an outage."""
    return encode_batch(
        UplinkBatch(
            device_id=device,
            kind="card_reader",
            sent_at=datetime.now(UTC),
            events=events,
            replay=replay,
        )
    )


def up(device: str, school: str = "sch-1") -> str:
    return f"campus/v1/{school}/{device}/up"


class Publisher:
    """A paho MQTT 5 publisher that waits for each QoS 1 PUBACK."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        req = urllib.request.Request(url, headers=headers)  # noqa: S310  # http://127.0.0.1
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening (yet)
        return 0, ""


WAIT_S = 30.0


UID = "ab" * 32


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    """A paho client on the test's broker, closed after the test."""
    pub = Publisher(mosquitto)
    try:
        yield pub
    finally:
        pub.close()
