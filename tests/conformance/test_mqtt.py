"""The ingest's own MQTT codec against the MQTT 3.1.1 and 5.0 specifications.

Sources:
- [311] OASIS "MQTT Version 3.1.1" (2014): 2.2.3 Remaining Length (Table 2.4, the size ranges
  of the variable byte integer), 3.1 CONNECT, 3.2 CONNACK (Table 3.1 return codes), 3.3
  PUBLISH, 3.4 PUBACK, 3.8 SUBSCRIBE (fixed header 0x82), 3.9 SUBACK (return codes 0x00-0x02,
  0x80 failure).
- [5] OASIS "MQTT Version 5.0" (2019): 1.5.5 Variable Byte Integer (Table 1-1, "at most four
  bytes"), 2.4 Reason Codes, 3.2.2.2 CONNACK reason codes (0x87 Not authorized), 3.2.2.3
  properties (0x1F Reason String), 3.4.2.1 PUBACK reason code omitted when 0, 3.9.3 SUBACK
  reason codes, 3.14 DISCONNECT (0x8E Session taken over).
"""

from __future__ import annotations

import pytest

from ingest_server.ingest.mqtt_codec import (
    MQTT5,
    MQTT311,
    PUBACK,
    ConnAck,
    Disconnect,
    MqttDecoder,
    MqttProtocolError,
    Publish,
    SubAck,
    encode_acks,
    encode_connect,
    encode_subscribe,
    varint,
)

# [311] Table 2.4 / [5] Table 1-1: the smallest and largest value of each length.
VARINTS = [
    (0, "00"),
    (127, "7F"),
    (128, "8001"),
    (16383, "FF7F"),
    (16384, "808001"),
    (2097151, "FFFF7F"),
    (2097152, "80808001"),
    (268435455, "FFFFFF7F"),
]


@pytest.mark.parametrize(("value", "wire"), VARINTS)
def test_variable_byte_integer_encoding(value: int, wire: str) -> None:
    """[311] 2.2.3 Table 2.4, [5] 1.5.5 Table 1-1."""
    assert varint(value) == bytes.fromhex(wire)


@pytest.mark.parametrize(("value", "wire"), [v for v in VARINTS if 3 <= v[0] <= 2097152])
def test_variable_byte_integer_decoding(value: int, wire: str) -> None:
    """[311] 2.2.3: a PUBLISH whose remaining length is each boundary value decodes whole."""
    topic = b"\x00\x01t"  # the shortest PUBLISH body: a 1-byte topic (values 0 and 127 too short)
    packet = b"\x30" + bytes.fromhex(wire) + topic + b"x" * (value - len(topic))
    decoder = MqttDecoder(MQTT311)
    assert decoder.feed(packet[:-1]) == []
    (pub,) = decoder.feed(packet[-1:])
    assert isinstance(pub, Publish)
    assert len(pub.payload) == value - 3


def test_a_five_byte_variable_byte_integer_is_refused() -> None:
    """[5] 1.5.5: at most four bytes; a fifth continuation byte is a malformed packet."""
    with pytest.raises(MqttProtocolError):
        MqttDecoder().feed(b"\x30\xff\xff\xff\xff\x01")


def test_varint_beyond_the_maximum_is_refused() -> None:
    """[5] 1.5.5: 268,435,455 is the largest value."""
    with pytest.raises(ValueError, match="variable byte integer"):
        varint(268435456)


@pytest.mark.parametrize(
    ("wire", "packet"),
    [
        ("20020000", ConnAck(False, 0)),  # [311] 3.2: accepted
        ("20020100", ConnAck(True, 0)),  # [311] 3.2.2.2 session present
        ("20020005", ConnAck(False, 5)),  # [311] Table 3.1: 5 not authorized
    ],
)
def test_connack_311(wire: str, packet: ConnAck) -> None:
    assert MqttDecoder(MQTT311).feed(bytes.fromhex(wire)) == [packet]


def test_connack_5_reason_code_and_reason_string() -> None:
    """[5] 3.2.2.2 0x87 Not authorized; 3.2.2.3.9 Reason String property 0x1F."""
    props = b"\x1f\x00\x03bad"
    body = b"\x00\x87" + varint(len(props)) + props
    (ack,) = MqttDecoder(MQTT5).feed(b"\x20" + varint(len(body)) + body)
    assert ack == ConnAck(False, 0x87, "bad")


def test_suback_return_and_reason_codes() -> None:
    """[311] 3.9.3 return codes 0x00, 0x01, 0x02, 0x80; [5] 3.9 with a properties length."""
    assert MqttDecoder(MQTT311).feed(bytes.fromhex("9006000A00010280")) == [
        SubAck(10, (0x00, 0x01, 0x02, 0x80))
    ]
    assert MqttDecoder(MQTT5).feed(bytes.fromhex("9004000A0087")) == [SubAck(10, (0x87,))]


def test_disconnect_5() -> None:
    """[5] 3.14: no body = 0x00 normal; 0x8E Session taken over."""
    assert MqttDecoder(MQTT5).feed(b"\xe0\x00\xe0\x01\x8e") == [Disconnect(0), Disconnect(0x8E)]


def test_puback_311_and_5() -> None:
    """[311] 3.4: 40 02 + packet id; [5] 3.4.2.1: the same bytes mean reason 0x00 Success."""
    assert encode_acks(PUBACK, [1, 0x1234]) == bytes.fromhex("400200014002" + "1234")


def test_publish_qos1_311() -> None:
    """[311] 3.3: first byte 0x32 (QoS 1), topic "a/b", packet id 10, payload."""
    body = b"\x00\x03a/b" + b"\x00\x0a" + b"hi"
    wire = b"\x32" + bytes([len(body)]) + body
    assert MqttDecoder(MQTT311).feed(wire) == [Publish(b"a/b", b"hi", 1, False, False, 10)]


def test_publish_5_skips_properties() -> None:
    """[5] 3.3.2.3: the properties (here Message Expiry Interval 0x02) come before the payload."""
    props = b"\x02\x00\x00\x00\x3c"
    body = b"\x00\x01t" + b"\x00\x07" + bytes([len(props)]) + props + b"{}"
    wire = b"\x3b" + bytes([len(body)]) + body  # QoS 1, DUP, RETAIN
    assert MqttDecoder(MQTT5).feed(wire) == [Publish(b"t", b"{}", 1, True, True, 7)]


def test_subscribe_fixed_header_and_connect_variable_header() -> None:
    """[311] 3.8.1 SUBSCRIBE (first byte 0x82); 3.1.2 CONNECT ("MQTT", level 4, keep alive)."""
    assert encode_subscribe(1, [("a", 1, 0)], protocol=MQTT311) == bytes.fromhex(
        "820600010001" + "6101"
    )
    connect = encode_connect("c", protocol=MQTT311, keepalive_s=60, clean_start=True)
    assert connect == bytes.fromhex("100D00044D5154540402003C000163")
