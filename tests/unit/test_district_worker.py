"""The district worker's device-side MQTT bytes and credentials (fleet/district_worker.py)."""

from __future__ import annotations

from ingest_server.ingest.mqtt_codec import MQTT5, MqttDecoder, Publish, encode_publish
from simulators.fleet.district_worker import device_password, mqtt_connect, mqtt_publish


def test_publish_is_what_the_server_reads() -> None:
    payload = b"x" * 300  # a two-byte remaining length
    wire = mqtt_publish("campus/v1/s001/d1/up", payload, 513)
    assert wire == encode_publish("campus/v1/s001/d1/up", payload, qos=1, packet_id=513)
    (pkt,) = MqttDecoder(MQTT5).feed(wire)
    assert isinstance(pkt, Publish)
    assert pkt.topic == b"campus/v1/s001/d1/up"
    assert pkt.packet_id == 513
    assert bytes(pkt.payload) == payload


def test_connect_carries_user_password_and_clean_start() -> None:
    wire = mqtt_connect("agent-d1", "d1", "pw", 120)
    assert wire[0] == 0x10
    assert wire[1] == len(wire) - 2
    assert wire[2:8] == b"\x00\x04MQTT"
    assert wire[8] == 5  # MQTT 5
    assert wire[9] == 0xC2  # user name, password, clean start
    assert wire.endswith(b"\x00\x02d1\x00\x02pw")


def test_device_passwords_are_per_device_and_per_run() -> None:
    a, b = bytes(32), bytes([1]) * 32
    assert device_password(a, "d1") == device_password(a, "d1")
    assert device_password(a, "d1") != device_password(a, "d2")
    assert device_password(a, "d1") != device_password(b, "d1")
    assert len(device_password(a, "d1")) == 32
