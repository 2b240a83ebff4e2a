"""The service fixtures themselves work: a broken fixture would make every other test lie."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import psycopg
import pytest

from simulators.harness import Mosquitto, Postgres, wait_until


@pytest.mark.integration
def test_postgres_fixture_gives_empty_database(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        n = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
    assert n == (0,)


@pytest.mark.integration
def test_postgres_restart_keeps_data(pg_server: Postgres, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    pg_server.restart("immediate")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


@pytest.mark.integration
def test_mosquitto_keeps_queued_qos1_across_restart(mosquitto: Mosquitto) -> None:
    got: list[bytes] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-sub", clean_session=False)
    sub.on_message = lambda _c, _u, m: got.append(m.payload)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("smoke/#", qos=1)
    sub.loop_start()
    wait_until(sub.is_connected, 5, "subscriber connected")
    sub.disconnect()
    sub.loop_stop()

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-pub")
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    for i in range(1500):  # more than Mosquitto's default queue limit of 1000
        pub.publish("smoke/x", str(i).encode(), qos=1).wait_for_publish(5)
    pub.disconnect()
    pub.loop_stop()
    mosquitto.restart()

    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    try:
        wait_until(lambda: len(got) >= 1500, 20, "1500 queued messages")
    finally:
        sub.disconnect()
        sub.loop_stop()
    assert sorted(int(p) for p in got) == list(range(1500))
