"""Broker security on a real Mosquitto (the shipped TLS config) and on the embedded broker:
devices enrol through the API, the server keeps the broker's credentials and ACL current, and
a device can act only as itself."""

from __future__ import annotations

import json
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import wait_until
from tests.api_client import call

pytestmark = pytest.mark.integration


@dataclass
class Client:
    """A paho client on its own network thread, recording what happens to it."""

    client: mqtt.Client
    connack: list[int] = field(default_factory=list)
    suback: list[int] = field(default_factory=list)
    puback: dict[int, int] = field(default_factory=dict)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sub(self, topic: str) -> int:
        n = len(self.suback)
        self.client.subscribe(topic, qos=1)
        wait_until(lambda: len(self.suback) > n, 10, f"SUBACK for {topic}")
        return self.suback[n]

    def pub(self, topic: str, payload: bytes) -> int | None:
        """Publish QoS 1; the PUBACK reason code (MQTT 5), or None for 3.1.1."""
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.puback, 10, f"PUBACK on {topic}")
        return self.puback[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    port: int,
    user: str | None,
    password: str | None,
    ca: Path | None,
    *,
    v5: bool = True,
    timeout: float = 10,
) -> Client:
    proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=proto
    )
    rec = Client(c)
    if user is not None:
        c.username_pw_set(user, password)
    if ca is not None:
        c.tls_set(ca_certs=str(ca))

    def on_connect(_c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any = None) -> None:
        rec.connack.append(rc.value)

    def on_subscribe(_c: Any, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        rec.suback.append(rcs[0].value)

    def on_publish(_c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Properties) -> None:
        rec.puback[mid] = rc.value

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with rec.lock:
            rec.received.append((msg.topic, msg.payload))

    c.on_connect, c.on_subscribe = on_connect, on_subscribe
    c.on_publish, c.on_message = on_publish, on_message
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    try:
        wait_until(lambda: rec.connack, timeout, "CONNACK")
    except TimeoutError:
        rec.close()
        raise
    return rec


def refused(port: int, user: str | None, password: str | None, ca: Path | None, **kw: Any) -> int:
    """The CONNACK reason of a connection expected to be refused."""
    c = connect(port, user, password, ca, **kw)
    c.close()
    assert c.connack[0] != 0, f"{user} was admitted"
    return c.connack[0]


def batch(device_id: str, seq: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "device_id": device_id,
            "kind": "smart_board",
            "sent_at": "2026-11-22T07:50:02+08:00",
            "events": [
                {
                    "seq": seq,
                    "ts": "2026-11-22T07:50:01+08:00",
                    "type": "board.power",
                    "data": {"state": "on"},
                    "synced": True,
                }
            ],
        }
    ).encode()


def enrol(base: str, admin: str, school: str, **code_args: Any) -> dict[str, Any]:
    status, made = call(
        base + "/api/v1/enrolment-codes", admin, "POST", {"school_id": school, **code_args}
    )
    assert status == 201, made
    status, creds = call(
        base + "/api/v1/enrol",
        None,
        "POST",
        {
            "code": made["code"],
            "kind": "smart_board",
            "room": "101",
            "hardware_ids": {"mac": "00:11:22:33:44:55"},
            "agent_version": "0.1.0",
        },
    )
    assert status == 201, creds
    return creds


def test_mosquitto_tls_enrolled_devices_confined(
    tls_mosquitto: dict[str, Any], tls_files: dict[str, Path], db_url: str, tmp_path: Path
) -> None:
    port, ca = tls_mosquitto["port"], tls_files["ca"]
    settings = Settings(
        broker_url=f"mqtts://ingest:ingest-secret@127.0.0.1:{port}?ca={ca}",
        db_url=db_url,
        http_port=0,
        client_id="ingest-sec",
        admin_token_file=tmp_path / "admin-token",
        enrol_broker_url=f"mqtts://127.0.0.1:{port}",
        ca_cert=ca,
        hash_key_file=tls_files["hash_key"],
        mosquitto_passwd=tls_mosquitto["passwd"],
        mosquitto_acl=tls_mosquitto["acl"],
        mosquitto_pid_file=tls_mosquitto["pid"],
        broker_auth_interval_s=0.5,
    )
    with IngestServer(settings) as server:
        wait_until(settings.token_file.exists, 60, "the admin token")
        wait_until(lambda: server.consumer.health().mqtt_connected, 20, "server on TLS broker")
        admin, base = settings.token_file.read_text().strip(), server.http.url
        a, b = enrol(base, admin, "s01"), enrol(base, admin, "s01")
        assert a["mqtt_url"] == f"mqtts://127.0.0.1:{port}"
        assert a["ca_cert_pem"] == ca.read_text()
        assert a["hash_key_hex"] == "ab" * 32
        assert a["seq_floor"] == 0
        assert re.fullmatch(r"s01-sb-[a-z0-9]{6}", a["device_id"])
        passwd = tls_mosquitto["passwd"]
        # enrolled devices can connect once the server has rewritten the files and reloaded
        wait_until(lambda: b["device_id"] in passwd.read_text(), 10, "passwd file updated")
        wait_until(lambda: _admitted(port, a, ca) and _admitted(port, b, ca), 10, "reloaded")
        assert a["mqtt_password"] not in passwd.read_text()

        da = connect(port, a["mqtt_username"], a["mqtt_password"], ca)
        db_ = connect(port, b["mqtt_username"], b["mqtt_password"], ca)
        watcher = connect(port, "ingest", "ingest-secret", ca)
        try:
            pa = f"campus/v1/s01/{a['device_id']}/"
            pb = f"campus/v1/s01/{b['device_id']}/"
            assert watcher.sub("campus/v1/+/+/up") == 1
            # publishing as another device is refused (MQTT 5: PUBACK 0x87 Not authorized)
            assert da.pub(pb + "up", batch(b["device_id"], 1)) == 0x87
            assert da.pub(pa + "up", batch(a["device_id"], 1)) == 0
            wait_until(lambda: len(watcher.received) >= 1, 10, "the allowed uplink")
            assert [t for t, _ in watcher.received] == [pa + "up"]
            # ... and the server stored only that one, over TLS with its own credentials
            wait_until(lambda: _stored(db_url) == [(a["device_id"], 1)], 20, "the row stored")
            # reading another device's commands is refused: Mosquitto 2.0 grants the SUBACK
            # but checks the ACL at delivery, so nothing arrives
            da.sub(pb + "cmd")
            da.sub("campus/v1/s01/+/cmd")
            assert db_.sub(pb + "cmd") == 1
            assert watcher.pub(pb + "cmd", b'{"id": "1"}') == 0
            wait_until(lambda: db_.received, 10, "B's command delivered to B")
            assert not da.received
        finally:
            for c in (da, db_, watcher):
                c.close()

        # Mosquitto 2.0.11 answers a wrong password with 0x87 Not authorized (not 0x86)
        assert refused(port, a["mqtt_username"], b["mqtt_password"], ca) in (0x86, 0x87)
        assert refused(port, None, None, ca) == 0x87  # no anonymous
        # plaintext to the TLS listener: no MQTT session is ever established
        with pytest.raises((TimeoutError, OSError, ConnectionError)):
            connect(port, a["mqtt_username"], a["mqtt_password"], None, timeout=2).close()

        # re-enrolment of a replaced device: same device_id, old password no longer works
        with psycopg.connect(db_url, autocommit=True) as conn:
            max_seq = conn.execute(
                "SELECT max_seq FROM devices WHERE device_id = %s", (a["device_id"],)
            ).fetchone()
        assert max_seq == (1,)
        a2 = enrol(base, admin, "s01", replaces=a["device_id"])
        assert a2["device_id"] == a["device_id"]
        assert a2["seq_floor"] == 1
        wait_until(lambda: _admitted(port, a2, ca), 10, "the replacement admitted")
        assert refused(port, a["mqtt_username"], a["mqtt_password"], ca) in (0x86, 0x87)


def _admitted(port: int, creds: dict[str, Any], ca: Path) -> bool:
    c = connect(port, creds["mqtt_username"], creds["mqtt_password"], ca)
    c.close()
    return c.connack[0] == 0


def _stored(db_url: str) -> list[tuple[str, int]]:
    with psycopg.connect(db_url) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT device_id, seq FROM events")]


def test_embedded_broker_enforces_the_same_rules(db_url: str, tmp_path: Path) -> None:
    key = tmp_path / "hash-key"
    key.write_bytes(os.urandom(32))
    settings = Settings(
        db_url=db_url,
        http_port=0,
        embedded_broker_port=0,
        client_id="ingest-emb",
        admin_token_file=tmp_path / "admin-token",
        hash_key_file=key,
        broker_auth_interval_s=0.5,
        embedded_allow_anonymous=False,
    )
    with IngestServer(settings) as server:
        wait_until(settings.token_file.exists, 60, "the admin token")
        wait_until(lambda: server.consumer.health().mqtt_connected, 20, "server on its broker")
        admin, base = settings.token_file.read_text().strip(), server.http.url
        a, b = enrol(base, admin, "s02"), enrol(base, admin, "s02")
        assert a["hash_key_hex"] == key.read_bytes().hex()
        assert a["mqtt_url"].endswith("?protocol=3.1.1")
        port = int(a["mqtt_url"].split(":")[2].split("?")[0])
        rules = server.broker_rules
        assert rules is not None
        wait_until(lambda: b["device_id"] in rules.rules.devices, 10, "rules refreshed")
        srv = server.consumer.broker

        assert refused(port, a["mqtt_username"], b["mqtt_password"], None, v5=False) in (5, 0x87)
        # paho reports 3.1.1's CONNACK 5 (not authorised) as reason 0x87
        assert refused(port, None, None, None, v5=False) in (5, 0x87)  # anonymous off
        da = connect(port, a["mqtt_username"], a["mqtt_password"], None, v5=False)
        db_ = connect(port, b["mqtt_username"], b["mqtt_password"], None, v5=False)
        watcher = connect(port, srv.username, srv.password, None, v5=False)
        try:
            pa = f"campus/v1/s02/{a['device_id']}/"
            pb = f"campus/v1/s02/{b['device_id']}/"
            assert watcher.sub("campus/v1/+/+/up") == 1
            da.pub(pb + "up", batch(b["device_id"], 1))  # 3.1.1 has no refusal code: dropped
            da.pub(pa + "up", batch(a["device_id"], 1))
            wait_until(lambda: watcher.received, 10, "the allowed uplink")
            wait_until(lambda: _stored(db_url) == [(a["device_id"], 1)], 20, "the row stored")
            assert [t for t, _ in watcher.received] == [pa + "up"]
            assert da.sub(pb + "cmd") == 0x80
            assert db_.sub(pb + "cmd") == 1
            watcher.pub(pb + "cmd", b'{"id": "1"}')
            wait_until(lambda: db_.received, 10, "B's command delivered to B")
            assert not da.received
        finally:
            for c in (da, db_, watcher):
                c.close()
