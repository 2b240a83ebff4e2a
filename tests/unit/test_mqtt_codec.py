"""The ingest session's MQTT codec: bytes alone, both protocol versions, any chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest_server.ingest.mqtt_codec import (
    MAX_REMAINING,
    MQTT5,
    MQTT311,
    PUBACK,
    PUBCOMP,
    PUBREC,
    ConnAck,
    Disconnect,
    MqttDecoder,
    MqttProtocolError,
    PingResp,
    Publish,
    PubRel,
    SubAck,
    _read_varint,
    encode_acks,
    encode_connect,
    encode_publish,
    encode_subscribe,
    varint,
)

protocols = st.sampled_from([MQTT311, MQTT5])
topics = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80
)
publishes = st.builds(
    lambda topic, payload, qos, pid, retain, dup: (
        topic,
        payload,
        qos,
        pid if qos else 0,
        retain,
        dup,
    ),
    topics,
    st.binary(max_size=300),
    st.integers(0, 2),
    st.integers(1, 65535),
    st.booleans(),
    st.booleans(),
)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(protocols, st.lists(publishes, max_size=20), st.lists(st.integers(0, 10_000), max_size=8))
def test_publishes_survive_any_chunking(
    protocol: int, msgs: list[tuple[str, bytes, int, int, bool, bool]], cuts: list[int]
) -> None:
    wire = b"".join(
        encode_publish(t, p, qos=q, packet_id=i, retain=r, dup=d, protocol=protocol)
        for t, p, q, i, r, d in msgs
    )
    decoder = MqttDecoder(protocol)
    got = [pkt for part in chunks(wire, cuts) for pkt in decoder.feed(part)]
    assert got == [Publish(t.encode(), p, q, r, d, i) for t, p, q, i, r, d in msgs]
    assert decoder.buffered == 0


def test_a_large_packet_in_many_reads_then_more_in_the_same_read() -> None:
    """A packet of a 3-byte length over 40 reads, the last carrying the next packet too: the
    decoder waits for the whole packet, then hands out both, as bytes."""
    big = encode_publish("campus/v1/s001/d1/up", bytes(range(256)) * 400, qos=1, packet_id=7)
    small = encode_publish("campus/v1/s001/d2/up", b"{}", qos=1, packet_id=8)
    wire = big + small
    decoder = MqttDecoder(MQTT5)
    step = len(big) // 40
    got = []
    for k in range(0, len(wire), step):
        got += decoder.feed(bytearray(wire[k : k + step]))
        if k + step < len(big):
            assert got == []
            assert decoder.buffered == k + step
    assert got == [
        Publish(b"campus/v1/s001/d1/up", bytes(range(256)) * 400, 1, False, False, 7),
        Publish(b"campus/v1/s001/d2/up", b"{}", 1, False, False, 8),
    ]
    assert all(type(p.payload) is bytes and type(p.topic) is bytes for p in got)
    assert decoder.buffered == 0


@given(st.integers(0, MAX_REMAINING))
def test_varint_round_trip(n: int) -> None:
    raw = varint(n)
    assert 1 <= len(raw) <= 4
    assert _read_varint(raw, 0, len(raw)) == (n, len(raw))
    assert _read_varint(raw[:-1], 0, len(raw) - 1) is None


def test_varint_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="variable byte integer"):
        varint(MAX_REMAINING + 1)


def test_five_byte_length_is_a_protocol_error() -> None:
    with pytest.raises(MqttProtocolError, match="longer than four bytes"):
        MqttDecoder().feed(b"\x30\xff\xff\xff\xff\x01")


def test_oversize_packet_is_refused_before_it_is_buffered() -> None:
    with pytest.raises(MqttProtocolError, match="over the limit of 100"):
        MqttDecoder(max_packet=100).feed(b"\x30" + varint(101))


def test_topic_length_past_the_packet_is_a_protocol_error() -> None:
    # remaining length 4, but the topic claims 200 bytes
    with pytest.raises(MqttProtocolError, match="runs past"):
        MqttDecoder(MQTT311).feed(b"\x30\x04\x00\xc8ab" + b"\x00" * 300)


def test_qos_3_is_a_protocol_error() -> None:
    with pytest.raises(MqttProtocolError, match="QoS 3"):
        MqttDecoder(MQTT311).feed(b"\x36\x04\x00\x01a\x00")


def test_v5_publish_properties_are_skipped() -> None:
    # topic "t", packet id 7, properties: payload format indicator (0x01 = 1), then payload
    wire = b"\x32\x0a\x00\x01t\x00\x07\x02\x01\x01hi"
    [pkt] = MqttDecoder(MQTT5).feed(wire)
    assert pkt == Publish(b"t", b"hi", 1, False, False, 7)


def test_connack_suback_pubrel_pingresp_disconnect_v5() -> None:
    reason = b"\x1f\x00\x04nope"  # reason string property
    wire = (
        b"\x20\x03\x01\x00\x00"  # CONNACK, session present, success, no properties
        + b"\x90\x05\x00\x01\x00\x01\x80"  # SUBACK id 1: granted QoS 1, refused
        + b"\x62\x02\x00\x09"  # PUBREL id 9
        + b"\xd0\x00"  # PINGRESP
        + b"\xe0"
        + varint(2 + len(reason))
        + b"\x8e"
        + bytes([len(reason)])
        + reason
    )
    assert MqttDecoder(MQTT5).feed(wire) == [
        ConnAck(True, 0, ""),
        SubAck(1, (1, 0x80)),
        PubRel(9),
        PingResp(),
        Disconnect(0x8E, "nope"),
    ]


def test_connack_refusal_v5_carries_the_reason_string() -> None:
    props = b"\x1f\x00\x03bad"
    wire = b"\x20" + varint(3 + len(props)) + b"\x00\x87" + bytes([len(props)]) + props
    assert MqttDecoder(MQTT5).feed(wire) == [ConnAck(False, 0x87, "bad")]


def test_connack_v311() -> None:
    assert MqttDecoder(MQTT311).feed(b"\x20\x02\x00\x05") == [ConnAck(False, 5, "")]


def test_unexpected_packet_type_is_named() -> None:
    with pytest.raises(MqttProtocolError, match="unexpected packet type 1"):
        MqttDecoder().feed(b"\x10\x00")


def test_truncated_control_packet_is_a_protocol_error() -> None:
    with pytest.raises(MqttProtocolError, match="truncated packet of type 9"):
        MqttDecoder(MQTT311).feed(b"\x90\x01\x00")


def test_connect_v5_layout() -> None:
    wire = encode_connect(
        "ingest", protocol=MQTT5, keepalive_s=30, session_expiry_s=3600, username="u", password="p"
    )
    body = (
        b"\x00\x04MQTT\x05\xc0\x00\x1e"  # protocol name, level 5, user+password, keepalive 30
        b"\x08\x11\x00\x00\x0e\x10\x21\xff\xff"  # session expiry 3600, receive maximum 65535
        b"\x00\x06ingest\x00\x01u\x00\x01p"
    )
    assert wire == b"\x10" + varint(len(body)) + body


def test_connect_v311_has_no_properties() -> None:
    wire = encode_connect("c", protocol=MQTT311, keepalive_s=60)
    assert wire == b"\x10\x0d\x00\x04MQTT\x04\x00\x00\x3c\x00\x01c"


def test_subscribe_options_per_version() -> None:
    subs = [("a/+", 1, 1)]
    assert encode_subscribe(1, subs, protocol=MQTT5) == b"\x82\x09\x00\x01\x00\x00\x03a/+\x11"
    assert encode_subscribe(1, subs, protocol=MQTT311) == b"\x82\x08\x00\x01\x00\x03a/+\x01"


@given(st.lists(st.integers(1, 65535), max_size=50))
def test_acks_are_back_to_back_four_byte_packets(ids: list[int]) -> None:
    wire = encode_acks(PUBACK, ids)
    assert len(wire) == 4 * len(ids)
    assert [int.from_bytes(wire[k + 2 : k + 4], "big") for k in range(0, len(wire), 4)] == ids
    assert all(wire[k : k + 2] == b"\x40\x02" for k in range(0, len(wire), 4))
    assert encode_acks(PUBREC, ids[:1])[:1] in (b"", b"\x50")


def test_bad_protocol_level_is_refused() -> None:
    with pytest.raises(ValueError, match="4 or 5"):
        MqttDecoder(3)
    with pytest.raises(ValueError, match="4 or 5"):
        encode_connect("c", protocol=6)


def test_acks_of_an_iterable_and_of_nothing_and_a_bad_identifier() -> None:
    assert encode_acks(PUBACK, iter([1, 0xFFFF])) == bytes.fromhex("40020001" + "4002ffff")
    assert encode_acks(PUBCOMP, []) == b""
    for bad in (-1, 0x10000):
        with pytest.raises(ValueError, match="16-bit"):
            encode_acks(PUBACK, [1, bad])
