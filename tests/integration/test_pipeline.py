"""End to end through real processes: edge agents → broker → ingest server → PostgreSQL.

The contract's promise is checked the hard way: every (device_id, seq) stored exactly once,
through Mosquitto and through the embedded broker, and across crashes and restarts of every
part on the way.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from simulators.harness import Mosquitto, Postgres, free_port, shared_tmpdir, wait_until
from simulators.harness_pipeline import Agent, IngestServer, assert_exactly_once, count_stored

pytestmark = pytest.mark.integration

AGENTS = 3
COUNT = 10_000


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = shared_tmpdir("campus-e2e-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_fleet(
    workdir: Path,
    broker_url: str,
    db_url: str,
    server: IngestServer,
    *,
    protocol: str = "5",
    rate: int = 0,
    fault: Callable[[list[Agent]], None] | None = None,
    fault_at: int = COUNT,
    timeout: float = 150,
) -> None:
    """Start AGENTS agents of COUNT events each; inject ``fault`` once ``fault_at`` are stored."""
    agents = [
        Agent(workdir, f"env-{i:03d}", broker_url, count=COUNT, rate=rate, protocol=protocol)
        for i in range(AGENTS)
    ]
    try:
        for a in agents:
            a.start()
        if fault is not None:
            wait_until(lambda: count_stored(db_url) >= fault_at, timeout, f"{fault_at} stored")
            fault(agents)
        total = AGENTS * COUNT

        def done() -> bool:
            for a in agents:
                if not a.running:
                    raise AssertionError(f"agent {a.device_id} exited:\n{a.tail()}")
            return count_stored(db_url) >= total

        try:
            wait_until(done, timeout, f"{total} events stored", interval=0.25)
        except TimeoutError:
            raise AssertionError(
                f"stored {count_stored(db_url)} of {total}\n"
                f"server:\n{server.tail()}\nagent:\n{agents[0].tail()}"
            ) from None
        assert_exactly_once(db_url, {a.device_id: COUNT for a in agents})
        for a in agents:  # every outbox drains once its events are acknowledged
            wait_until(lambda a=a: a.status()["depth"] == 0, 30, f"{a.device_id} outbox empty")
    finally:
        for a in agents:
            a.terminate()


@pytest.fixture
def ingest(workdir: Path, mosquitto: Mosquitto, db_url: str) -> Iterator[IngestServer]:
    """A healthy ingest server process on the test's Mosquitto and database."""
    server = IngestServer(workdir, mosquitto.url, db_url)
    server.start()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.terminate()


def test_three_agents_through_mosquitto_stored_exactly_once(
    workdir: Path, mosquitto: Mosquitto, db_url: str, ingest: IngestServer
) -> None:
    run_fleet(workdir, mosquitto.url, db_url, ingest)
    assert ingest.metric("campus_ingest_events_stored_total") == AGENTS * COUNT
    assert ingest.metric("campus_ingest_quarantined_total") == 0


def test_three_agents_through_embedded_broker_stored_exactly_once(
    workdir: Path, db_url: str
) -> None:
    port = free_port()
    # the agents here are not enrolled: the embedded broker's demo mode admits them
    server = IngestServer(
        workdir, None, db_url, "--embedded-broker-port", str(port), "--embedded-anonymous"
    )
    server.start()
    try:
        server.wait_healthy()
        run_fleet(workdir, f"mqtt://127.0.0.1:{port}", db_url, server, protocol="3.1.1")
    finally:
        server.terminate()


def _fault_mid_stream(
    workdir: Path,
    mosquitto: Mosquitto,
    db_url: str,
    ingest: IngestServer,
    fault: Callable[[list[Agent]], None],
) -> None:
    """Agents at a paced 2,000 events/s each; ``fault`` strikes once a third is stored."""
    run_fleet(
        workdir, mosquitto.url, db_url, ingest, rate=2000, fault=fault, fault_at=AGENTS * COUNT // 3
    )


@pytest.mark.chaos
def test_broker_restarted_mid_stream(
    workdir: Path, mosquitto: Mosquitto, db_url: str, ingest: IngestServer
) -> None:
    _fault_mid_stream(workdir, mosquitto, db_url, ingest, lambda _agents: mosquitto.restart())


@pytest.mark.chaos
def test_ingest_server_sigkilled_mid_batch_and_restarted(
    workdir: Path, mosquitto: Mosquitto, db_url: str, ingest: IngestServer
) -> None:
    def crash(_agents: list[Agent]) -> None:
        ingest.kill()
        ingest.start()

    _fault_mid_stream(workdir, mosquitto, db_url, ingest, crash)


@pytest.mark.chaos
def test_postgres_restarted_mid_stream(
    workdir: Path, mosquitto: Mosquitto, pg_server: Postgres, db_url: str, ingest: IngestServer
) -> None:
    _fault_mid_stream(
        workdir, mosquitto, db_url, ingest, lambda _agents: pg_server.restart("immediate")
    )
    assert ingest.healthy()


@pytest.mark.chaos
def test_agent_sigkilled_mid_publish_and_restarted(
    workdir: Path, mosquitto: Mosquitto, db_url: str, ingest: IngestServer
) -> None:
    def crash(agents: list[Agent]) -> None:
        for a in agents:
            a.kill()
        for a in agents:
            a.start()

    _fault_mid_stream(workdir, mosquitto, db_url, ingest, crash)
