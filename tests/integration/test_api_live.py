"""The live stream on a real ingest path: MQTT → writer → commit → hub → SSE clients.

A client that stops reading is dropped with ``event: dropped`` while a fast one receives
every event, and ingest stores every event meanwhile.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from ingest_server.web.api import auth
from ingest_server.web.app import HttpServer
from ingest_server.web.live import LiveHub
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch
from simulators.harness import Mosquitto, wait_until

pytestmark = pytest.mark.integration

WAIT_S = 60
PER_MESSAGE = 100
UID = "ab" * 32  # a keyed hash as the contract has it (64 hex digits)


def payloads(school: str, device: str, n: int) -> list[tuple[str, bytes]]:
    t0 = datetime.now(UTC)
    out = []
    for start in range(1, n + 1, PER_MESSAGE):
        events = [
            UplinkEvent(
                seq=seq,
                ts=t0 + timedelta(milliseconds=seq),
                type="card.tap",
                data=msgspec.Raw(
                    msgspec.json.encode({"uid_hash": UID, "tech": "em4100", "reader": "gate"})
                ),
            )
            for seq in range(start, min(start + PER_MESSAGE, n + 1))
        ]
        batch = UplinkBatch(device_id=device, kind="card_reader", sent_at=t0, events=events)
        out.append((f"campus/v1/{school}/{device}/up", encode_batch(batch)))
    return out


def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


class SseClient:
    """An SSE connection; ``rcvbuf`` small makes a client that stops reading back up fast."""

    def __init__(self, url: str, path: str, token: str, rcvbuf: int | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(WAIT_S)
        sock.connect((host, int(port)))
        self.conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
        self.conn.sock = sock
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.read()
        assert self.resp.getheader("content-type", "").startswith("text/event-stream")
        assert self.resp.readline() == b": connected\n"  # subscribed from here on

    def messages(self, limit: int) -> Iterator[dict[str, str]]:
        """Parsed messages with data (comments skipped) until EOF or ``limit`` of them."""
        buf = b""
        for _ in range(limit + 10_000):
            *blocks, buf = buf.split(b"\n\n")
            for block in blocks:
                fields = dict(
                    line.decode().partition(": ")[::2]
                    for line in block.split(b"\n")
                    if line and not line.startswith(b":")
                )
                if "data" in fields:
                    yield fields
                    limit -= 1
                    if limit == 0:
                        return
            chunk = self.resp.read1(1 << 16)
            if not chunk:
                return
            buf += chunk

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def server(mosquitto: Mosquitto, db_url: str) -> Iterator[IngestServer]:
    cfg = Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        batch_ms=20,
        batch_events=500,  # so the live queue bound below is many commits deep
        client_id=f"ingest-{uuid.uuid4().hex[:8]}",
        admin_token_file=mosquitto.workdir / "admin-token",
    )
    with IngestServer(cfg) as srv:
        wait_until(lambda: srv.consumer.health().mqtt_connected, WAIT_S, "a subscribed server")
        wait_until(cfg.token_file.exists, WAIT_S, "the bootstrap admin token")
        yield srv


def stored(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


def read_token(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return auth.create_token(conn, "live-test", ["read"])[1]


def test_slow_client_dropped_fast_client_and_ingest_unaffected(
    server: IngestServer, mosquitto: Mosquitto, db_url: str
) -> None:
    hub = server.consumer.on_commit.__self__  # type: ignore[union-attr]
    assert isinstance(hub, LiveHub)
    # the stalled client's socket buffers absorb ~10k events: past them it must overflow this
    hub.max_queue = 4000
    token = read_token(db_url)
    n = 24_000

    def ingest(messages: list[tuple[str, bytes]]) -> float:
        """Seconds to store ``messages``, sent in two parts so later commits find a backlog."""
        before = stored(db_url)
        total = before + sum(p.count(b'"seq"') for _, p in messages)
        half = len(messages) * 5 // 6
        started = time.monotonic()
        publish_all(mosquitto, messages[:half])
        wait_until(lambda: stored(db_url) == before + half * PER_MESSAGE, WAIT_S, "part one")
        publish_all(mosquitto, messages[half:])
        wait_until(lambda: stored(db_url) == total, WAIT_S, "every event stored")
        return time.monotonic() - started

    alone_s = ingest(payloads("s003", "cr-0301", n) + payloads("s002", "cr-0202", 300))
    fast = SseClient(server.http.url, "/api/v1/live?school=s001", token)
    slow = SseClient(server.http.url, "/api/v1/live", token, rcvbuf=4096)
    other = SseClient(server.http.url, "/api/v1/live?device=cr-9999&type=card.tap", token)
    got: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: got.extend(json.loads(m["data"]) for m in fast.messages(n)), daemon=True
    )
    reader.start()
    ingest_s = ingest(payloads("s001", "cr-0101", n) + payloads("s002", "cr-0201", 300))
    reader.join(WAIT_S)
    assert not reader.is_alive()
    assert "reason" not in got[-1], got[-1]
    assert [e["seq"] for e in got] == list(range(1, n + 1))  # all of s001, in order, no s002
    assert {e["school_id"] for e in got} == {"s001"}
    assert got[0]["data"] == {"uid_hash": UID, "tech": "em4100", "reader": "gate"}

    # the stalled client now reads what the kernel held, then the reason, then the end
    slow_msgs = list(slow.messages(n + 10))
    assert slow_msgs[-1]["event"] == "dropped"
    assert "too slow" in json.loads(slow_msgs[-1]["data"])["reason"]
    assert len(slow_msgs) - 1 < n
    assert hub.subscribers == 2  # fast and other remain; slow is gone
    assert server.consumer.health().db_ok
    # the writer never waits for clients: only the test's own reader thread shares the CPU
    assert ingest_s < 2.5 * alone_s + 1, (ingest_s, alone_s)
    print(
        f"ingest of {n + 300} events: {alone_s:.2f} s alone, {ingest_s:.2f} s with live clients;"
        f" the stalled client got {len(slow_msgs) - 1} before its drop"
    )
    for c in (fast, slow, other):
        c.close()
    wait_until(lambda: hub.subscribers == 0, 10, "closed clients unsubscribed")


def test_live_filters_and_errors(server: IngestServer, mosquitto: Mosquitto, db_url: str) -> None:
    token = read_token(db_url)
    client = SseClient(server.http.url, "/api/v1/live?device=cr-0202&type=card.tap", token)
    publish_all(mosquitto, payloads("s002", "cr-0201", 5) + payloads("s002", "cr-0202", 3))
    msgs = list(client.messages(3))
    assert [(json.loads(m["data"])["device_id"], m["id"]) for m in msgs] == [
        ("cr-0202", "cr-0202:1"),
        ("cr-0202", "cr-0202:2"),
        ("cr-0202", "cr-0202:3"),
    ]
    client.close()
    conn = http.client.HTTPConnection(server.http.url.removeprefix("http://"), timeout=10)
    conn.request(
        "GET", "/api/v1/live?school=Bad%20Id", headers={"Authorization": f"Bearer {token}"}
    )
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 422
    assert body["detail"][0]["loc"] == ["query", "school"]
    conn.request("GET", "/api/v1/live")
    assert conn.getresponse().status == 401
    conn.close()

    # a stopping server ends open streams with a reason instead of waiting for them
    lingering = SseClient(server.http.url, "/api/v1/live", token)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < HttpServer.STOP_TIMEOUT_S / 2  # not its timeout
    (last,) = list(lingering.messages(1))
    assert last["event"] == "dropped"
    assert "shutting down" in json.loads(last["data"])["reason"]
    lingering.close()
