"""Writer lanes on a real Mosquitto and a real PostgreSQL 15: faults between a part's COPY and
its COMMIT, a commit whose answer is lost, and a resend spanning two batches in flight, each
stored exactly once and acknowledged in arrival order, only after commit."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from ingest_server.ingest import consumer as consumer_module
from ingest_server.ingest.batch import Batch, Inbound
from ingest_server.ingest.consumer import Consumer
from ingest_server.ingest.lanes import LaneOf
from ingest_server.ingest.writer import BatchWriter, WriteResult
from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, wait_until
from tests.ingest_publish import WAIT_S, Publisher, get, tap, up, uplink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: Devices on both lanes of two (checked below).
DEVICES = [f"cr-{d}" for d in range(8)]


def settings(mosquitto: Mosquitto, db_url: str) -> Settings:
    return Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        batch_ms=20,
        writers=2,
        client_id=f"ingest-{uuid.uuid4().hex[:8]}",
        admin_token_file=mosquitto.workdir / f"token-{uuid.uuid4().hex[:8]}",
    )


@contextlib.contextmanager
def running(cfg: Settings) -> Iterator[IngestServer]:
    with IngestServer(cfg) as server:
        wait_until(lambda: get(server.http.url + "/healthz")[0] == 200, WAIT_S, "a healthy server")
        yield server


def stored(db_url: str) -> list[tuple[str, int]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT device_id, seq FROM events ORDER BY 1, 2").fetchall()


def counters(db_url: str) -> dict[str, tuple[int, int, int, int]]:
    with psycopg.connect(db_url) as conn:
        got = conn.execute(
            "SELECT device_id, min_seq, max_seq, event_count, missing FROM devices"
        ).fetchall()
    return {d: (lo, hi, n, missing) for d, lo, hi, n, missing in got}


def n_stored(db_url: str) -> int:
    try:
        return len(stored(db_url))
    except psycopg.Error:  # not migrated yet
        return -1


def terminate(db_url: str, writer: BatchWriter) -> None:
    """End ``writer``'s backend from another connection, as a crash or an admin would."""
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [writer.conn.info.backend_pid])


def devices_of(batch: Batch) -> set[str]:
    return {r.device_id for r in batch.rows.events}


def test_the_test_devices_use_both_lanes() -> None:
    lane_of = LaneOf(2)
    assert {lane_of(up(d)) for d in DEVICES} == {0, 1}


def test_a_connection_killed_between_copy_and_commit_loses_and_doubles_nothing(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first two parts to reach the devices upsert (after their events' COPY, before
    COMMIT) lose their connection; their lanes reconnect and write them again, while the other
    lane goes on; every event is stored once and every counter is exact."""
    real = BatchWriter._upsert_devices
    killed: list[set[str]] = []

    def upsert_then_die(self: BatchWriter, encoded: Any, rows: Any) -> Any:
        if len(killed) < 2:
            killed.append({r.device_id for r in encoded.events})
            terminate(db_url, self)
        return real(self, encoded, rows)

    monkeypatch.setattr(BatchWriter, "_upsert_devices", upsert_then_die)
    with running(settings(mosquitto, db_url)) as server:
        for seq in range(1, 16):
            for d in DEVICES:
                publisher.send(up(d), uplink(d, [tap(2 * seq - 1), tap(2 * seq)]))
        want = len(DEVICES) * 30
        wait_until(lambda: n_stored(db_url) == want, WAIT_S, f"{want} events stored")
        m = server.consumer.metrics
        wait_until(lambda: m.events_stored.value() == want, WAIT_S, "every commit recorded")
        assert m.events_duplicate.value() == 0  # never committed: written again, the fast way
    assert len(killed) == 2
    assert stored(db_url) == sorted((d, s) for d in DEVICES for s in range(1, 31))
    assert counters(db_url) == dict.fromkeys(DEVICES, (1, 30, 30, 0))


def test_a_commit_whose_answer_is_lost_is_written_again_the_slow_way(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cr-1's first part commits, then its connection dies before the lane hears so: the lane
    writes it again on a new connection, whose fresh max seq sends it the slow way: counted as
    duplicates, stored once, the device counted once."""
    real = consumer_module.write_batch
    lost: list[int] = []

    def commit_then_lose(writer: BatchWriter, batch: Batch) -> WriteResult:
        result = real(writer, batch)
        if not lost and "cr-1" in devices_of(batch):
            lost.append(len(batch.rows.events))
            terminate(db_url, writer)
            raise psycopg.OperationalError("the connection was lost after COMMIT (test)")
        return result

    monkeypatch.setattr(consumer_module, "write_batch", commit_then_lose)
    with running(settings(mosquitto, db_url)) as server:
        for seq in range(1, 11):
            for d in DEVICES:
                publisher.send(up(d), uplink(d, [tap(seq)]))
        want = len(DEVICES) * 10
        wait_until(lambda: n_stored(db_url) == want, WAIT_S, f"{want} events stored")
        m = server.consumer.metrics
        seen = lambda: m.events_stored.value() + m.events_duplicate.value()  # noqa: E731
        wait_until(lambda: seen() == want, WAIT_S, "every commit recorded")
        assert lost
        # the rows of the lost answer's commit are found stored when written again
        assert m.events_duplicate.value() == lost[0]
        assert m.events_stored.value() == want - lost[0]
    assert stored(db_url) == sorted((d, s) for d in DEVICES for s in range(1, 11))
    assert counters(db_url) == dict.fromkeys(DEVICES, (1, 10, 10, 0))


def test_a_resend_spanning_two_batches_in_flight_is_stored_once_and_acks_wait(
    mosquitto: Mosquitto, db_url: str, publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cr-0's lane is held inside its first part; meanwhile the same message comes again (a
    later batch, behind it on the same lane) and the other lane commits other devices. Nothing
    is acknowledged while the first batch is open; then everything, in arrival order, and
    cr-0's resend is a duplicate, stored once."""
    lane_of = LaneOf(2)
    held, release = threading.Event(), threading.Event()
    real = consumer_module.write_batch

    def hold_cr0(writer: BatchWriter, batch: Batch) -> WriteResult:
        if "cr-0" in devices_of(batch) and not held.is_set():
            held.set()
            assert release.wait(WAIT_S), "the test never released the lane"
        return real(writer, batch)

    acked: list[Inbound] = []
    real_ack = Consumer._ack

    def record_ack(self: Consumer, messages: list[Inbound]) -> None:
        acked.extend(messages)
        real_ack(self, messages)

    monkeypatch.setattr(consumer_module, "write_batch", hold_cr0)
    monkeypatch.setattr(Consumer, "_ack", record_ack)
    other = next(d for d in DEVICES if lane_of(up(d)) != lane_of(up("cr-0")))
    first = uplink("cr-0", [tap(1), tap(2)])
    with running(settings(mosquitto, db_url)) as server:
        m = server.consumer.metrics
        publisher.send(up("cr-0"), first)
        wait_until(held.is_set, WAIT_S, "cr-0's lane to hold its first part")
        publisher.send(up("cr-0"), first)  # the resend, while the first is in flight
        publisher.send(up(other), uplink(other, [tap(1)]))
        publisher.send(up("cr-0"), uplink("cr-0", [tap(3)]))
        wait_until(lambda: m.messages_received.value() == 4, WAIT_S, "all 4 received")
        # the other lane commits its device meanwhile; nothing is acknowledged yet
        wait_until(lambda: n_stored(db_url) == 1, WAIT_S, f"{other}'s event committed")
        assert stored(db_url) == [(other, 1)]
        assert acked == []
        release.set()
        wait_until(lambda: len(acked) == 4, WAIT_S, "all 4 acknowledged")
        assert m.events_duplicate.value() == 2
    assert [msg.topic for msg in acked] == [up("cr-0"), up("cr-0"), up(other), up("cr-0")]
    assert acked[0].payload == acked[1].payload == first
    assert stored(db_url) == [("cr-0", 1), ("cr-0", 2), ("cr-0", 3), (other, 1)]
    assert counters(db_url)["cr-0"] == (1, 3, 3, 0)
