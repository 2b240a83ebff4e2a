"""Our MQTT decoder against the ``mqtt5`` package's Rust codec, on the same PUBLISH stream.

    python -m bench mqtt_codec [--events 100000] [--repeat 5]

The stream is what the ingest session reads from the broker: MQTT 5 PUBLISH packets, QoS 1,
one uplink per packet (bench ``ingest_e2e``'s ``env.reading`` payloads), cut into the session's
256 KiB reads, so packets straddle chunk boundaries as they do on the socket. Two cases: one
event per uplink and 100 events per uplink.

- baseline: ``mqtt5.read`` (Rust, one packet per call) in the smallest loop that does what
  :meth:`MqttDecoder.feed` does: keep the tail of a chunk that holds half a packet, and return
  each PUBLISH's topic, payload, QoS and packet id.
- ours: :class:`~ingest_server.ingest.mqtt_codec.MqttDecoder` ``feed`` per chunk; then the
  same again with the topic decoded to ``str`` per packet, as ``mqtt5`` hands it over (the
  session caches decoded topics per device, so the plain figure is the one the server pays).

CPU time of this thread (so other load on the machine does not inflate it), the best of
``--repeat`` rounds, in ns per packet and as a ratio. Both decoders must return the same
topics, payloads, QoS and packet ids, or the bench exits 1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import cast

import mqtt5

from bench.ingest_e2e import payloads
from ingest_server.ingest.mqtt_codec import MQTT5, MqttDecoder, Publish, encode_publish

#: The session's socket read size (ingest_server.ingest.mqtt_session._RECV_BYTES).
CHUNK = 256 * 1024

Decoded = list[tuple[str, bytes, int, int]]


def stream(events: int, per_message: int) -> tuple[list[bytes], int]:
    """The wire bytes of ``events`` events in uplinks of ``per_message``, in 256 KiB reads;
    and the number of packets."""
    msgs = payloads(20, events // 20, per_message, "env.reading")
    wire = b"".join(
        encode_publish(t, p, qos=1, packet_id=i % 65535 + 1, protocol=MQTT5)
        for i, (t, p) in enumerate(msgs)
    )
    return [wire[i : i + CHUNK] for i in range(0, len(wire), CHUNK)], len(msgs)


def ours(chunks: list[bytes]) -> int:
    decoder = MqttDecoder(MQTT5)
    n = 0
    for chunk in chunks:
        n += len(decoder.feed(chunk))
    return n


def ours_str_topic(chunks: list[bytes]) -> int:
    decoder = MqttDecoder(MQTT5)
    n = 0
    for chunk in chunks:
        for p in cast(list[Publish], decoder.feed(chunk)):  # (all are PUBLISH here)
            p.topic.decode()
            n += 1
    return n


def theirs(chunks: list[bytes]) -> int:
    read = mqtt5.read
    buf = b""
    n = 0
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        view = memoryview(buf)
        pos, end = 0, len(buf)
        while pos < end:
            try:
                _packet, size = read(view[pos:])
            except IndexError:  # half a packet: wait for the next read
                break
            pos += size
            n += 1
        view.release()
        buf = buf[pos:]
    return n


def decoded_ours(chunks: list[bytes]) -> Decoded:
    decoder = MqttDecoder(MQTT5)
    out: Decoded = []
    for chunk in chunks:
        for p in decoder.feed(chunk):
            assert isinstance(p, Publish)
            out.append((p.topic.decode(), p.payload, p.qos, p.packet_id))
    return out


def decoded_theirs(chunks: list[bytes]) -> Decoded:
    wire = memoryview(b"".join(chunks))
    out: Decoded = []
    pos = 0
    while pos < len(wire):
        p, size = mqtt5.read(wire[pos:])
        assert isinstance(p, mqtt5.PublishPacket)
        out.append((p.topic, p.payload, int(p.qos), p.packet_id or 0))
        pos += size
    return out


def best_ns(fn: Callable[[list[bytes]], int], chunks: list[bytes], n: int, repeat: int) -> float:
    """The lowest thread CPU time of ``repeat`` runs, in ns per packet."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        got = fn(chunks)
        best = min(best, time.thread_time_ns() - t0)
        if got != n:
            raise AssertionError(f"{fn.__name__} decoded {got} packets of {n}")
    return best / n


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench mqtt_codec", description=__doc__)
    ap.add_argument("--events", type=int, default=100_000, help="events per case (default 1e5)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is kept (default 5)")
    args = ap.parse_args(argv)
    ok = True
    print(f"\nMQTT 5 PUBLISH decode, QoS 1, {CHUNK // 1024} KiB reads; thread CPU, best of "
          f"{args.repeat}\n")  # fmt: skip
    print(f"{'figure':52} {'value':>9} {'baseline':>9} {'ratio':>6}")
    for per_message in (1, 100):
        chunks, n = stream(args.events, per_message)
        same = decoded_ours(chunks) == decoded_theirs(chunks)
        ok &= same
        base = best_ns(theirs, chunks, n, args.repeat)
        mine = best_ns(ours, chunks, n, args.repeat)
        mine_str = best_ns(ours_str_topic, chunks, n, args.repeat)
        size = sum(map(len, chunks)) // n
        label = f"{per_message} ev/uplink ({n:,} packets, {size:,} B each)"
        print(f"{label:52}")
        print(f"{'  mqtt5.read loop (ns/packet): baseline':52} {base:9,.0f}")
        print(f"{'  MqttDecoder.feed vs mqtt5 (ns/packet)':52} {mine:9,.0f} {base:9,.0f} "
              f"{mine / base:6.2f}")  # fmt: skip
        print(f"{'  MqttDecoder.feed + topic.decode() vs mqtt5':52} {mine_str:9,.0f} "
              f"{base:9,.0f} {mine_str / base:6.2f}")  # fmt: skip
        print(f"{'  same topics, payloads, QoS, packet ids':52} {'yes' if same else 'NO':>9}")
    return 0 if ok else 1
