"""The whole ingest server on a real Mosquitto and a real PostgreSQL 15."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, LiteralString

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from psycopg import sql

from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, Postgres, free_port, shared_tmpdir, wait_until
from tests.ingest_publish import WAIT_S, Publisher, get, tap, up, uplink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def settings(mosquitto: Mosquitto, db_url: str, **kw: Any) -> Settings:
    kw.setdefault("client_id", f"ingest-{uuid.uuid4().hex[:8]}")
    kw.setdefault("admin_token_file", mosquitto.workdir / f"token-{uuid.uuid4().hex[:8]}")
    return Settings(broker_url=mosquitto.url, db_url=db_url, http_port=0, batch_ms=20, **kw)


def query(db_url: str, statement: LiteralString | sql.Composed) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(statement).fetchall()


def count(db_url: str, table: str) -> int:
    try:
        return int(
            query(db_url, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))[0][0]
        )
    except psycopg.Error:  # not migrated yet, or the database is restarting
        return -1


def healthy(server: IngestServer) -> bool:
    return get(server.http.url + "/healthz")[0] == 200


@contextlib.contextmanager
def running(cfg: Settings) -> Iterator[IngestServer]:
    """A started server, once it is subscribed and its database is migrated."""
    with IngestServer(cfg) as server:
        wait_until(lambda: healthy(server), WAIT_S, "a healthy server")
        wait_until(server.settings.token_file.exists, WAIT_S, "the bootstrap admin token")
        yield server


def metric(server: IngestServer, line_prefix: str) -> float:
    token = server.settings.token_file.read_text().strip()
    text = get(server.http.url + "/metrics", token)[1]
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_prefix} not in /metrics")


def test_valid_and_malformed_messages(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    """Each bad input lands in quarantine with a reason; the good ones around it are stored."""
    bad_events = [
        {"seq": -1, "ts": "2026-11-22T07:50:01+08:00", "type": "card.tap", "data": {}},
        {"ts": "2026-11-22T07:50:01+08:00", "type": "card.tap", "data": {}},
        {"seq": "7", "ts": "2026-11-22T07:50:01+08:00", "type": "card.tap", "data": {}},
        {"seq": 1.5, "ts": "2026-11-22T07:50:01+08:00", "type": "card.tap", "data": {}},
        {"seq": 8, "ts": "2026-11-22T07:50:01+08:00", "type": "card.teleport", "data": {}},
        {"seq": 9, "ts": "2026-11-22T07:50:01+08:00", "type": "card.tap", "data": {"uid": 1}},
    ]
    good = json.loads(uplink("cr-1", [tap(1), tap(2)]))
    mixed = dict(good, events=[*good["events"], *bad_events])
    cases = [
        (up("cr-1"), json.dumps(mixed).encode()),
        (up("cr-2"), b'{"v": 1, "device_id": "cr-2", '),
        (up("cr-2"), b'{"v": 1, "device_id": "cr-2\xff\xfe"}'),
        (up("cr-2"), json.dumps(dict(good, v=2, device_id="cr-2")).encode()),
        (up("cr-2"), json.dumps(good).encode()),  # device_id cr-1 on cr-2's topic
        (up("cr-2"), uplink("cr-2", [tap(1)])[:-1] + b" " * 5000 + b"}"),  # oversize
        # jsonb cannot hold this number although it is valid JSON: the database refuses it
        (up("cr-3"), uplink("cr-3", [tap(1)]).replace(b'"reader":', b'"x":1e999999,"reader":')),
    ]
    with running(settings(mosquitto, db_url, max_bytes=4096)) as server:
        for topic, payload in cases:
            publisher.send(topic, payload)
        publisher.send(up("cr-4"), uplink("cr-4", [tap(1)]))  # after all that, still working
        wait_until(lambda: count(db_url, "events") == 3, WAIT_S, "the 3 valid events")
        wait_until(lambda: count(db_url, "quarantine") == 12, WAIT_S, "12 quarantine rows")
        assert healthy(server)
        assert metric(server, "campus_ingest_events_stored_total") == 3
        assert metric(server, 'campus_ingest_quarantined_total{reason="event"}') == 6
        assert metric(server, 'campus_ingest_quarantined_total{reason="oversize"}') == 1
        assert metric(server, 'campus_ingest_quarantined_total{reason="database"}') == 1

    assert set(query(db_url, "SELECT device_id, seq FROM events")) == {
        ("cr-1", 1),
        ("cr-1", 2),
        ("cr-4", 1),
    }
    reasons = [r for (r,) in query(db_url, "SELECT reason FROM quarantine ORDER BY id")]
    expected = [
        "events[2].seq: expected `int` >= 0",
        "events[3]: object missing required field `seq`",
        "events[4].seq: expected `int`, got `str`",
        "events[5].seq: expected `int`, got `float`",
        "events[6].type: unknown event type 'card.teleport'",
        "events[7].data.uid: expected `str | null`, got `int`",
        "payload is not valid JSON",
        "payload is not UTF-8",
        "v: unsupported contract version 2",
        "device_id: 'cr-1' does not match the topic's device 'cr-2'",
        "over the limit of 4096 bytes",
        "the database refused this message",
    ]
    assert len(reasons) == len(expected), reasons
    for reason, want in zip(reasons, expected, strict=True):
        assert want in reason, reasons
    rows = query(db_url, "SELECT reason, length(payload), device_id, seq FROM quarantine")
    oversize = next(r for r in rows if "over the limit" in r[0])
    assert oversize[1:3] == (len(cases[5][1]), "cr-2")
    rejected_seq9 = next(r for r in rows if r[0].startswith("events[7]"))
    assert rejected_seq9[2:] == ("cr-1", 9)


def test_replay_batches_are_stored_listed_and_exported_as_backlog(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    """A live batch and a ``replay: true`` batch through Mosquitto and the real server: the
    events table, the API's ``?replay=`` filter and the CSV export (last column) tell them apart."""
    with running(settings(mosquitto, db_url)) as server:
        publisher.send(up("cr-5"), uplink("cr-5", [tap(1), tap(2)]))
        publisher.send(up("cr-5"), uplink("cr-5", [tap(3), tap(4)], replay=True))
        wait_until(lambda: count(db_url, "events") == 4, WAIT_S, "the 4 events")
        token = server.settings.token_file.read_text().strip()
        api = server.http.url + "/api/v1"
        backlog = json.loads(get(f"{api}/events?device=cr-5&replay=true", token)[1])
        live = json.loads(get(f"{api}/events?device=cr-5&replay=false", token)[1])
        status, text = get(f"{api}/export/events.csv?device=cr-5", token)
    assert query(db_url, "SELECT seq, replay FROM events ORDER BY seq") == [
        (1, False), (2, False), (3, True), (4, True)
    ]  # fmt: skip
    assert [(i["seq"], i["replay"]) for i in backlog["items"]] == [(3, True), (4, True)]
    assert [(i["seq"], i["replay"]) for i in live["items"]] == [(1, False), (2, False)]
    assert status == 200
    lines = text.splitlines()
    assert lines[0].endswith(",synced,replay")
    # replay is each row's last field, after synced
    assert sorted(line.rsplit(",", 1)[1] for line in lines[1:]) == ["false"] * 2 + ["true"] * 2


def test_a_value_past_a_database_limit_is_quarantined_not_retried(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    """PostgreSQL refuses some JSON with a program-limit error (class 54) rather than a data
    error: here jsonb nested deeper than the server's stack allows. Retrying that batch would
    stall ingest for every device, so the message is quarantined and the rest goes on."""
    dbname = query(db_url, "SELECT current_database()")[0][0]
    with psycopg.connect(db_url, autocommit=True) as conn:  # the smallest stack PG accepts
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET max_stack_depth = '100kB'").format(
                sql.Identifier(dbname)
            )
        )
    try:
        deep = b"[" * 900 + b"]" * 900
        payload = uplink("cr-5", [tap(1)]).replace(b'"reader":', b'"x":' + deep + b',"reader":')
        with running(settings(mosquitto, db_url)) as server:
            publisher.send(up("cr-5"), payload)
            publisher.send(up("cr-6"), uplink("cr-6", [tap(1)]))
            wait_until(lambda: count(db_url, "events") == 1, WAIT_S, "the good event")
            wait_until(lambda: count(db_url, "quarantine") == 1, WAIT_S, "the quarantine row")
            assert healthy(server)
        ((reason, device),) = query(db_url, "SELECT reason, device_id FROM quarantine")
        assert device == "cr-5"
        assert "the database refused this message" in reason
        assert "stack depth" in reason
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} RESET max_stack_depth").format(sql.Identifier(dbname))
            )


def test_oversize_payload_is_cut_to_64_kib(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    big = b'{"v": 1, "pad": "' + b"x" * 300_000 + b'"}'
    with running(settings(mosquitto, db_url)):
        publisher.send(up("cr-1"), big)
        wait_until(lambda: count(db_url, "quarantine") == 1, WAIT_S, "the quarantine row")
    ((reason, size),) = query(db_url, "SELECT reason, length(payload) FROM quarantine")
    assert size == 64 * 1024
    assert f"message is {len(big)} bytes" in reason
    assert "only its first 65536 bytes are kept" in reason


def test_state_channel_and_duplicates(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    state = {"state": "online", "boot": 4, "agent_version": "0.3.1", "ts": "2026-11-22T07:00:00Z"}
    publisher.send("campus/v1/sch-1/cr-1/state", json.dumps(state).encode(), retain=True)
    with running(settings(mosquitto, db_url)) as server:
        publisher.send(up("cr-1"), uplink("cr-1", [tap(1), tap(2), tap(4)]))
        publisher.send(up("cr-1"), uplink("cr-1", [tap(2), tap(4)]))  # a resend
        wait_until(
            lambda: metric(server, "campus_ingest_events_duplicate_total") == 2,
            WAIT_S,
            "2 duplicates counted",
        )
        wait_until(
            lambda: metric(server, "campus_ingest_seq_missing") == 1, WAIT_S, "the missing gauge"
        )
        assert metric(server, "campus_ingest_seq_gaps_detected_total") == 1
        assert metric(server, "campus_ingest_events_received_total") == 5
    assert query(db_url, "SELECT state, boot, agent_version, missing FROM devices") == [
        ("online", 4, "0.3.1", 1)
    ]
    assert count(db_url, "events") == 3


def test_not_acked_until_committed(
    mosquitto: Mosquitto, db_url: str, pg_server: Postgres, publisher: Publisher
) -> None:
    """With the database down, a stopped server has acknowledged nothing: a new one (same
    session) gets the messages again and stores them."""
    cfg = settings(mosquitto, db_url)
    with running(cfg) as server:
        pg_server.stop()
        try:
            for seq in range(1, 21):
                publisher.send(up("cr-1"), uplink("cr-1", [tap(seq)]))
            wait_until(
                lambda: metric(server, "campus_ingest_messages_received_total") == 20,
                WAIT_S,
                "the server to receive all 20",
            )
            wait_until(lambda: not healthy(server), WAIT_S, "/healthz to report the database")
            body = json.loads(get(server.http.url + "/healthz")[1])
            assert body["db"] == "down"
            assert body["mqtt"] == "connected"
        finally:
            server.stop()  # abandons the batch it holds: nothing acknowledged
            pg_server.start()
    assert count(db_url, "events") == 0
    with running(cfg):
        wait_until(lambda: count(db_url, "events") == 20, WAIT_S, "all 20 after a restart")


def test_database_outage_while_running(
    mosquitto: Mosquitto, db_url: str, pg_server: Postgres, publisher: Publisher
) -> None:
    with running(settings(mosquitto, db_url)) as server:
        publisher.send(up("cr-1"), uplink("cr-1", [tap(1)]))
        wait_until(lambda: count(db_url, "events") == 1, WAIT_S, "the first event")
        pg_server.stop()
        try:
            for seq in range(2, 12):
                publisher.send(up("cr-1"), uplink("cr-1", [tap(seq)]))
        finally:
            pg_server.start()
        wait_until(lambda: count(db_url, "events") == 11, WAIT_S, "all events after the outage")
        wait_until(lambda: healthy(server), WAIT_S, "healthy again")
    assert query(db_url, "SELECT event_count, missing FROM devices") == [(11, 0)]


def test_broker_restart_and_mqtt_311(mosquitto: Mosquitto, db_url: str) -> None:
    cfg = replace(settings(mosquitto, db_url), broker_url=mosquitto.url + "?protocol=3.1.1")
    with running(cfg) as server:
        mosquitto.stop()
        wait_until(lambda: not healthy(server), WAIT_S, "/healthz to see the broker gone")
        assert json.loads(get(server.http.url + "/healthz")[1])["mqtt"] == "disconnected"
        mosquitto.start()
        wait_until(lambda: healthy(server), WAIT_S, "reconnected")
        pub = Publisher(mosquitto)
        try:
            pub.send(up("cr-1"), uplink("cr-1", [tap(1)]))
        finally:
            pub.close()
        wait_until(lambda: count(db_url, "events") == 1, WAIT_S, "the event after a restart")


def test_shared_subscription_splits_without_duplicates(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    cfg = settings(mosquitto, db_url, share_group="ingest")
    with running(cfg) as a, running(replace(cfg, client_id=cfg.client_id + "-b")) as b:
        for seq in range(1, 41):
            publisher.send(up("cr-1"), uplink("cr-1", [tap(seq)]))
        wait_until(lambda: count(db_url, "events") == 40, WAIT_S, "all 40 events")
        got = [metric(s, "campus_ingest_messages_received_total") for s in (a, b)]
    assert sum(got) == 40
    assert all(n > 0 for n in got)


def test_cli_run_stops_cleanly_and_hides_passwords(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher
) -> None:
    port = free_port()
    broker = mosquitto.url.replace("mqtt://", "mqtt://ingest:hunter2@")
    db = db_url.replace("postgres@", "postgres:s3cret@")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "ingest_server.cli", "run", "--broker", broker),
            *("--http", f"127.0.0.1:{port}", "--client-id", "cli-test"),
        ],
        env={**os.environ, "CAMPUS_DB_URL": db},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200 or proc.poll() is not None,
            WAIT_S,
            "the CLI server",
        )
        publisher.send(up("cr-1"), uplink("cr-1", [tap(1)]))
        wait_until(lambda: count(db_url, "events") == 1, WAIT_S, "the event")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = out.decode()
    assert proc.returncode == 0, log
    assert "stopping" in log
    assert "hunter2" not in log
    assert "s3cret" not in log
    assert "***" in log


@pytest.mark.slow
def test_embedded_default_mode() -> None:
    """No URLs: the in-process broker (MQTT 3.1.1) and a private PostgreSQL under data_dir."""
    data_dir = shared_tmpdir("campus-ingest-embedded-")
    try:
        cfg = Settings(
            data_dir=data_dir, embedded_broker_port=0, http_port=0, embedded_allow_anonymous=True
        )
        with running(cfg) as server:
            broker = server.consumer.broker
            assert broker.protocol == 4
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id="emb-pub", protocol=mqtt.MQTTv311
            )
            client.connect(broker.host, broker.port)
            client.loop_start()
            try:
                client.publish(
                    up("cr-1"), uplink("cr-1", [tap(1), tap(2)]), qos=1
                ).wait_for_publish(WAIT_S)
                url = server.consumer.db_url
                wait_until(lambda: count(url, "events") == 2, WAIT_S, "2 events stored")
            finally:
                client.disconnect()
                client.loop_stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
