"""The subscriber half of MQTT 3.1.1 and 5 as bytes in, packets out: no sockets, no clocks.

Only what an ingest session needs: CONNECT, SUBSCRIBE, PUBACK/PUBREC/PUBCOMP, PINGREQ and
DISCONNECT to send; CONNACK, SUBACK, PUBLISH, PUBREL, PINGRESP and DISCONNECT to receive.
:class:`MqttDecoder` is written for the hot path: one pass over the buffer per ``feed``, one
small struct per PUBLISH, the payload copied once.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Final

import msgspec

MQTT311: Final = 4
MQTT5: Final = 5

#: The largest remaining length the four-byte varint can say (MQTT 1.5.5).
MAX_REMAINING: Final = 268_435_455

CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
PINGREQ: Final = 12
PINGRESP: Final = 13
DISCONNECT: Final = 14

PINGREQ_BYTES: Final = b"\xc0\x00"
DISCONNECT_BYTES: Final = b"\xe0\x00"

# MQTT 5 property identifiers used here (MQTT 5 section 2.2.2.2).
_SESSION_EXPIRY: Final = 0x11
_RECEIVE_MAXIMUM: Final = 0x21
_REASON_STRING: Final = 0x1F

_U16: Final = struct.Struct(">H")


class MqttProtocolError(Exception):
    """The peer sent bytes that are not the MQTT this session speaks; the message says how."""


class Publish(msgspec.Struct, frozen=True, gc=False):
    """A PUBLISH as received; ``topic`` is the raw UTF-8 bytes (validated by the session)."""

    topic: bytes
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    #: 0 for QoS 0.
    packet_id: int


class ConnAck(msgspec.Struct, frozen=True):
    session_present: bool
    #: 0 is success; MQTT 3.1.1 return codes 1-5, MQTT 5 reason codes >= 0x80.
    reason_code: int
    reason: str = ""


class SubAck(msgspec.Struct, frozen=True):
    packet_id: int
    reason_codes: tuple[int, ...]


class PubRel(msgspec.Struct, frozen=True):
    packet_id: int


class PingResp(msgspec.Struct, frozen=True):
    pass


class Disconnect(msgspec.Struct, frozen=True):
    reason_code: int
    reason: str = ""


Packet = Publish | ConnAck | SubAck | PubRel | PingResp | Disconnect


# -- encoding ------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """The MQTT variable byte integer for ``n``."""
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"{n} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"string of {len(raw)} bytes is too long for MQTT (65535 at most)")
    return _U16.pack(len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def encode_connect(
    client_id: str,
    *,
    protocol: int = MQTT5,
    keepalive_s: int = 30,
    clean_start: bool = False,
    session_expiry_s: int = 0,
    receive_maximum: int = 65535,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A CONNECT packet; ``session_expiry_s`` and ``receive_maximum`` only exist in MQTT 5."""
    if protocol not in (MQTT311, MQTT5):
        raise ValueError(f"MQTT protocol level must be 4 or 5, got {protocol}")
    flags = 0x02 if clean_start else 0
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = _utf8("MQTT") + bytes([protocol, flags]) + _U16.pack(keepalive_s)
    if protocol == MQTT5:
        props = bytes([_SESSION_EXPIRY]) + session_expiry_s.to_bytes(4, "big")
        props += bytes([_RECEIVE_MAXIMUM]) + _U16.pack(receive_maximum)
        body += varint(len(props)) + props
    body += _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        raw = password.encode()
        body += _U16.pack(len(raw)) + raw
    return _packet(CONNECT << 4, body)


def encode_subscribe(
    packet_id: int, filters: Sequence[tuple[str, int, int]], *, protocol: int = MQTT5
) -> bytes:
    """SUBSCRIBE to ``(filter, qos, retain_handling)``s; retain handling is MQTT 5 only."""
    body = _U16.pack(packet_id)
    if protocol == MQTT5:
        body += b"\x00"  # no properties
    for topic, qos, retain_handling in filters:
        options = qos | (retain_handling << 4 if protocol == MQTT5 else 0)
        body += _utf8(topic) + bytes([options])
    return _packet((SUBSCRIBE << 4) | 0x02, body)


_ACK_FIRST: Final = {PUBACK: 0x40, PUBREC: 0x50, PUBREL: 0x62, PUBCOMP: 0x70}
#: An array of 4-byte unsigned words, if this platform has one (every common one does).
_WORD: Final = next((code for code in "IL" if array(code).itemsize == 4), None)


def encode_acks(kind: int, packet_ids: Iterable[int]) -> bytes:
    """Back-to-back PUBACKs (or PUBRECs, PUBCOMPs) without reason code: success in both
    versions (MQTT 5 section 3.4.2.1 lets the reason code be omitted when it is 0)."""
    first = _ACK_FIRST[kind]
    ids = packet_ids if isinstance(packet_ids, list) else list(packet_ids)
    if not ids:
        return b""
    if min(ids) < 0 or max(ids) > 0xFFFF:
        raise ValueError("an MQTT packet identifier is a 16-bit number")
    if _WORD is None:
        return b"".join(bytes((first, 2, pid >> 8, pid & 0xFF)) for pid in ids)
    # Each ack is one big-endian word: type, length 2, the identifier. One array of them
    # instead of a bytes object per message (a commit acknowledges thousands).
    head = (first << 24) | (2 << 16)
    words = array(_WORD, [head | pid for pid in ids])
    if sys.byteorder == "little":
        words.byteswap()
    return words.tobytes()


def encode_publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int = 0,
    retain: bool = False,
    dup: bool = False,
    protocol: int = MQTT5,
) -> bytes:
    """A PUBLISH (the broker's side; used by tests and benchmarks to produce wire bytes)."""
    body = _utf8(topic)
    if qos:
        body += _U16.pack(packet_id)
    if protocol == MQTT5:
        body += b"\x00"
    first = (PUBLISH << 4) | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    return _packet(first, body + payload)


# -- decoding ------------------------------------------------------------------------------


def _read_varint(buf: bytes | bytearray | memoryview, i: int, end: int) -> tuple[int, int] | None:
    """(value, index after it), or None if the buffer ends first."""
    value = 0
    shift = 0
    while True:
        if i >= end:
            return None
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise MqttProtocolError("variable byte integer longer than four bytes")


def _reason_string(body: bytes, at: int) -> str:
    """The reason string property of an MQTT 5 ack/disconnect body, if it has one."""
    parsed = _read_varint(body, at, len(body)) if at < len(body) else None
    if parsed is None:
        return ""
    length, i = parsed
    end = min(i + length, len(body))
    while i < end:
        ident = body[i]
        i += 1
        if ident == _REASON_STRING:
            n = _U16.unpack_from(body, i)[0]
            return body[i + 2 : i + 2 + n].decode(errors="replace")
        # other properties are skipped by their sizes (MQTT 5 section 2.2.2.2)
        if ident in (0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A):
            i += 1
        elif ident in (0x13, 0x21, 0x22):
            i += 2
        elif ident in (0x02, 0x11, 0x18, 0x27):
            i += 4
        elif ident == 0x0B:
            skipped = _read_varint(body, i, end)
            if skipped is None:
                return ""
            i = skipped[1]
        elif ident == 0x26:  # user property: two strings
            for _ in range(2):
                i += 2 + _U16.unpack_from(body, i)[0]
        else:  # strings and binary data
            i += 2 + _U16.unpack_from(body, i)[0]
    return ""


#: A PUBLISH's fixed-header flags (its first byte's low four bits) → (QoS, retain, dup).
_PUBLISH_FLAGS: Final = tuple(((f >> 1) & 3, bool(f & 1), bool(f & 8)) for f in range(16))


class MqttDecoder:
    """``feed(bytes) -> list[Packet]`` for the packets a subscriber receives."""

    def __init__(self, protocol: int = MQTT5, max_packet: int = MAX_REMAINING) -> None:
        if protocol not in (MQTT311, MQTT5):
            raise ValueError(f"MQTT protocol level must be 4 or 5, got {protocol}")
        self.protocol = protocol
        self.max_packet = max_packet
        self._buf = bytearray()
        #: Bytes the incomplete packet at the head of ``_buf`` needs in all (0: its header is
        #: not in yet), so a large packet arriving in many reads is not parsed again each time.
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete packet held back for the next ``feed``."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        if type(data) is not bytes:
            data = bytes(data)
        out: list[Packet] = []
        v5 = self.protocol == MQTT5
        start = 0
        try:
            if buf:
                need = self._need
                if not need:  # its header is not whole yet: a few bytes, join them
                    buf += data
                    data = bytes(buf)
                    buf.clear()
                elif len(buf) + len(data) < need:
                    buf += data
                    return []
                else:
                    # the held-back packet completed on its own, the rest parsed where it
                    # lies: joining the whole read (256 KiB) would copy it twice per read
                    start = need - len(buf)
                    buf += data[:start]
                    head = bytes(buf)
                    buf.clear()
                    self._packets(head, 0, len(head), v5, out)
            # Packets are cut from ``data`` itself: a slice of bytes is the bytes object a
            # Publish holds (a memoryview slice and then a copy cost twice as many objects).
            pos = self._packets(data, start, len(data), v5, out)
        except IndexError:
            raise MqttProtocolError("a packet's header runs past its end") from None
        if pos < len(data):
            with memoryview(data) as mv:
                buf += mv[pos:]
        return out

    def _packets(self, buf: bytes, pos: int, n: int, v5: bool, out: list[Packet]) -> int:
        """Decode whole packets from ``buf[pos:n]`` into ``out``; the index after the last one
        (and :attr:`_need` set for the incomplete packet after it)."""
        self._need = 0
        max_packet, append, flags = self.max_packet, out.append, _PUBLISH_FLAGS
        while n - pos >= 2:
            first = buf[pos]
            # the remaining length, inlined: this loop runs once per message
            b = buf[pos + 1]
            if b < 0x80:
                length = b
                i = pos + 2
            elif pos + 2 < n and buf[pos + 2] < 0x80:  # two bytes: a packet under 16 KiB
                length = (b & 0x7F) | (buf[pos + 2] << 7)
                i = pos + 3
            else:
                parsed = _read_varint(buf, pos + 1, n)
                if parsed is None:
                    break
                length, i = parsed
            if length > max_packet:
                raise MqttProtocolError(
                    f"packet of {length} bytes is over the limit of {self.max_packet}"
                )
            end = i + length
            if end > n:
                self._need = end - pos
                break
            kind = first >> 4
            if kind == PUBLISH:
                # QoS, retain and dup from the low four bits, by look-up (two bool() calls
                # and the arithmetic cost more, once per message)
                qos, retain, dup = flags[first & 0x0F]
                if qos == 3:
                    raise MqttProtocolError("PUBLISH with QoS 3")
                tlen = (buf[i] << 8) | buf[i + 1]
                j = i + 2 + tlen
                topic = buf[i + 2 : j]
                pid = 0
                if qos:
                    pid = (buf[j] << 8) | buf[j + 1]
                    j += 2
                if v5:
                    b = buf[j]
                    if b < 0x80:
                        j += 1 + b
                    else:
                        parsed = _read_varint(buf, j, end)
                        if parsed is None:
                            raise MqttProtocolError("PUBLISH properties run past the packet")
                        j = parsed[1] + parsed[0]
                if j > end:
                    raise MqttProtocolError("PUBLISH header runs past the packet")
                append(Publish(topic, buf[j:end], qos, retain, dup, pid))
            else:
                append(self._other(kind, first, buf[i:end]))
            pos = end
        return pos

    def _other(self, kind: int, first: int, body: bytes) -> Packet:
        try:
            if kind == CONNACK:
                reason = _reason_string(body, 2) if self.protocol == MQTT5 else ""
                return ConnAck(bool(body[0] & 1), body[1], reason)
            if kind == SUBACK:
                pid = _U16.unpack_from(body)[0]
                at = 2
                if self.protocol == MQTT5:
                    parsed = _read_varint(body, 2, len(body))
                    if parsed is None:
                        raise MqttProtocolError("SUBACK properties run past the packet")
                    at = parsed[1] + parsed[0]
                return SubAck(pid, tuple(body[at:]))
            if kind == PUBREL:
                return PubRel(_U16.unpack_from(body)[0])
            if kind == PINGRESP:
                return PingResp()
            if kind == DISCONNECT:
                code = body[0] if body else 0
                return Disconnect(code, _reason_string(body, 1))
        except (IndexError, struct.error):
            raise MqttProtocolError(f"truncated packet of type {kind}") from None
        raise MqttProtocolError(f"unexpected packet type {kind} (first byte 0x{first:02x})")


__all__ = [
    "MQTT5",
    "MQTT311",
    "ConnAck",
    "Disconnect",
    "MqttDecoder",
    "MqttProtocolError",
    "Packet",
    "PingResp",
    "PubRel",
    "Publish",
    "SubAck",
    "encode_acks",
    "encode_connect",
    "encode_publish",
    "encode_subscribe",
    "varint",
]
