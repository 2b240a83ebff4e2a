"""The ingest MQTT session against a real Mosquitto: persistence, acks, sharing, TLS, auth."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from ingest_server.ingest.mqtt_codec import MQTT5, MQTT311, Publish
from ingest_server.ingest.mqtt_session import MqttSubscriber, SessionConfig
from simulators.harness import Mosquitto, free_port, port_open, shared_tmpdir, wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True, slots=True)
class Got:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


class Sink:
    """Collects deliveries; ``room`` bounds how many it takes, like a full inbox."""

    def __init__(self, room: int = 1_000_000) -> None:
        self.room = room
        self.got: list[Got] = []
        self.ready: list[bool] = []
        self._lock = threading.Lock()

    def deliver(self, pubs: Sequence[Publish], generation: int, _timeout: float) -> int:
        with self._lock:
            n = max(0, min(len(pubs), self.room - len(self.got)))
            self.got += [
                Got(p.topic.decode(), p.payload, p.packet_id, p.qos, generation) for p in pubs[:n]
            ]
            return n

    def on_ready(self, ready: bool) -> None:
        self.ready.append(ready)

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [g.payload for g in self.got]


@pytest.fixture
def prefix() -> str:
    return f"campus/v1/t{uuid.uuid4().hex[:8]}"


def publish(broker: Mosquitto, topic: str, payloads: list[bytes], **auth: str) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if auth:
        client.username_pw_set(auth["username"], auth["password"])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def config(
    broker: Mosquitto, prefix: str, client_id: str, protocol: int = MQTT5, **kw: object
) -> SessionConfig:
    return SessionConfig(
        host="127.0.0.1",
        port=broker.port,
        client_id=client_id,
        subscriptions=((f"{kw.pop('filter_prefix', '')}{prefix}/+/up", 1, 0),),
        protocol=protocol,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def running() -> Iterator[list[MqttSubscriber]]:
    """Sessions started in a test, stopped after it whatever happens."""
    sessions: list[MqttSubscriber] = []
    yield sessions
    for s in sessions:
        s.stop()


def start(running: list[MqttSubscriber], cfg: SessionConfig, sink: Sink) -> MqttSubscriber:
    session = MqttSubscriber(cfg, sink.deliver, sink.on_ready)
    running.append(session)
    session.start()
    wait_until(lambda: sink.ready and sink.ready[-1], 30, "subscribed")
    return session


@pytest.mark.parametrize("protocol", [MQTT5, MQTT311])
def test_unacked_messages_come_back_and_acked_ones_do_not(
    mosquitto: Mosquitto, prefix: str, running: list[MqttSubscriber], protocol: int
) -> None:
    cfg = config(mosquitto, prefix, f"ingest-{uuid.uuid4().hex[:6]}", protocol)
    first = Sink()
    session = start(running, cfg, first)
    publish(mosquitto, f"{prefix}/d1/up", [b"m%d" % i for i in range(200)])
    wait_until(lambda: len(first.got) == 200, 30, "200 delivered")
    assert first.payloads() == [b"m%d" % i for i in range(200)]
    assert {g.qos for g in first.got} == {1}
    assert session.ack(first.got[:120]) == 0  # the first 120 committed, the rest not
    session.stop()  # flushes queued acks before DISCONNECT

    second = Sink()
    start(running, cfg, second)
    wait_until(lambda: len(second.got) >= 80, 30, "the 80 unacknowledged back")
    assert second.payloads() == [b"m%d" % i for i in range(120, 200)]


def test_messages_queued_while_offline_are_delivered(
    mosquitto: Mosquitto, prefix: str, running: list[MqttSubscriber]
) -> None:
    cfg = config(mosquitto, prefix, "ingest-offline")
    sink = Sink()
    start(running, cfg, sink).stop()  # creates the persistent session
    publish(mosquitto, f"{prefix}/d1/up", [b"x%d" % i for i in range(2000)])
    sink2 = Sink()
    session = start(running, cfg, sink2)
    wait_until(lambda: len(sink2.got) == 2000, 30, "the backlog")
    assert sink2.payloads() == [b"x%d" % i for i in range(2000)]
    session.ack(sink2.got)


def test_a_full_inbox_holds_the_rest_back_without_losing_it(
    mosquitto: Mosquitto, prefix: str, running: list[MqttSubscriber]
) -> None:
    cfg = config(mosquitto, prefix, "ingest-full")
    sink = Sink(room=10)
    start(running, cfg, sink)
    publish(mosquitto, f"{prefix}/d1/up", [b"y%d" % i for i in range(50)])
    wait_until(lambda: len(sink.got) == 10, 30, "the first 10")
    sink.room = 50  # room again: the session offers the rest on its next turn
    wait_until(lambda: len(sink.got) == 50, 30, "all 50")
    assert sink.payloads() == [b"y%d" % i for i in range(50)]


def test_broker_restart_reconnects_and_stale_acks_are_dropped(
    mosquitto: Mosquitto, prefix: str, running: list[MqttSubscriber]
) -> None:
    cfg = config(mosquitto, prefix, "ingest-restart")
    sink = Sink()
    session = start(running, cfg, sink)
    publish(mosquitto, f"{prefix}/d1/up", [b"z%d" % i for i in range(30)])
    wait_until(lambda: len(sink.got) == 30, 30, "30 delivered")
    before = list(sink.got)
    mosquitto.restart()  # graceful: the broker keeps the session and its unacked messages
    wait_until(lambda: session.generation == 2 and sink.ready[-1], 30, "reconnected")
    assert session.ack(before) == 30  # from the old connection: not acknowledged
    wait_until(lambda: len(sink.got) >= 60, 30, "the 30 redelivered")
    again = sink.got[30:]
    assert [g.payload for g in again] == [b"z%d" % i for i in range(30)]
    assert {g.generation for g in again} == {2}
    assert session.ack(again) == 0


def test_shared_subscription_splits_the_stream(
    mosquitto: Mosquitto, prefix: str, running: list[MqttSubscriber]
) -> None:
    sinks = [Sink(), Sink()]
    for k, sink in enumerate(sinks):
        start(running, config(mosquitto, prefix, f"share-{k}", filter_prefix="$share/g/"), sink)
    publish(mosquitto, f"{prefix}/d1/up", [b"s%d" % i for i in range(400)])
    wait_until(lambda: sum(len(s.got) for s in sinks) == 400, 30, "400 across both")
    a, b = (set(s.payloads()) for s in sinks)
    assert a
    assert b
    assert not a & b
    assert a | b == {b"s%d" % i for i in range(400)}


def test_bad_password_is_refused_then_tls_with_credentials_works(
    prefix: str, running: list[MqttSubscriber]
) -> None:
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs openssl and mosquitto_passwd")
    work = shared_tmpdir("campus-mqtt-tls-")
    try:
        _make_certs(work)
        pwfile = work / "passwd"
        subprocess.run(
            ["mosquitto_passwd", "-b", "-c", str(pwfile), "ingest", "s3cret"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        tls_port = free_port()
        broker = Mosquitto(
            work,
            extra_conf=(
                f"password_file {pwfile}\n"
                f"listener {tls_port} 127.0.0.1\n"
                f"cafile {work}/ca.pem\ncertfile {work}/server.pem\nkeyfile {work}/server.key\n"
            ),
        )
        broker.conf.write_text(
            broker.conf.read_text().replace("allow_anonymous true", "allow_anonymous false")
        )
        broker.start()
        try:
            wait_until(lambda: port_open(tls_port), 30, "the TLS listener")
            context = ssl.create_default_context(cafile=str(work / "ca.pem"))
            bad = Sink()
            wrong = config(broker, prefix, "tls-bad", username="ingest", password="nope")
            wrong = SessionConfig(**{**_fields(wrong), "port": tls_port, "ssl_context": context})
            session = MqttSubscriber(wrong, bad.deliver, bad.on_ready)
            running.append(session)
            session.start()
            wait_until(lambda: session.generation == 0 and len(bad.ready) >= 2, 30, "refusals")
            assert True not in bad.ready

            good = Sink()
            right = config(broker, prefix, "tls-good", username="ingest", password="s3cret")
            right = SessionConfig(**{**_fields(right), "port": tls_port, "ssl_context": context})
            tls_session = start(running, right, good)
            publish(broker, f"{prefix}/d1/up", [b"t1", b"t2"], username="ingest", password="s3cret")
            wait_until(lambda: len(good.got) == 2, 30, "two messages over TLS")
            assert good.payloads() == [b"t1", b"t2"]
            assert tls_session.ack(good.got) == 0
        finally:
            broker.kill()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fields(cfg: SessionConfig) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in SessionConfig.__slots__}  # type: ignore[attr-defined]


def _make_certs(d: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=campus test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    for name in ("server.key", "server.pem", "ca.pem"):
        (d / name).chmod(0o644)
