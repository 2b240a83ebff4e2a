"""pytest plugin ``campus_edge``: real services and simulated devices for QA's own test suites.

Installed with campus-edge (entry point ``pytest11``), so ``pip install 'campus-edge[dev]'``
is all a project needs. Fixtures (``campus_`` prefixed so they never clash with a project's own):

- ``campus_broker``: a fresh Mosquitto on a free loopback port (``.url``, ``.kill()``, ``.start()``)
- ``campus_pg``: one PostgreSQL 15 server per session; ``campus_db_url``: a fresh database on it
- ``campus_ingest``: an ingest-server process on both, healthy (``.metric(name)``, ``.kill()``)
- ``campus_stack``: the three as a :class:`~simulators.fleet.runner.Services`
- ``campus_fleet``: ``campus_fleet(scenario_toml) -> Report`` runs a scenario on the stack
- ``campus_device``: ``campus_device(kind, events_per_hour=..., seconds=...) -> Report``, one
  simulated device of any kind (``card_reader``, ``env_sensor``, …) through the whole pipeline

Markers: ``slow`` and ``chaos`` (deselect with ``-m "not chaos"``).
"""

# ruff: noqa: PLC0415 - the services are imported only when a fixture is used, so loading the
# plugin costs nothing in projects (or test runs) that never touch them

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from simulators.fleet.report import Report
    from simulators.fleet.runner import Services
    from simulators.harness import Mosquitto, Postgres
    from simulators.harness_pipeline import IngestServer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "chaos: kills or restarts real services mid-stream")


@pytest.fixture
def campus_broker() -> Iterator[Mosquitto]:
    from simulators.harness import Mosquitto, shared_tmpdir

    workdir = shared_tmpdir("campus-broker-")
    broker = Mosquitto(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def campus_pg() -> Iterator[Postgres]:
    from simulators.harness import Postgres, shared_tmpdir

    workdir = shared_tmpdir("campus-pg-")
    server = Postgres(workdir)
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def campus_db_url(campus_pg: Postgres) -> Iterator[str]:
    name = f"c_{uuid.uuid4().hex[:12]}"
    url = campus_pg.create_database(name)
    try:
        yield url
    finally:
        campus_pg.drop_database(name)


@pytest.fixture
def campus_ingest(
    campus_broker: Mosquitto, campus_db_url: str, tmp_path: Path
) -> Iterator[IngestServer]:
    from simulators.harness_pipeline import IngestServer

    server = IngestServer(tmp_path, campus_broker.url, campus_db_url)
    server.start()
    try:
        server.wait_healthy(90)
        yield server
    finally:
        server.terminate()


@pytest.fixture
def campus_stack(
    campus_broker: Mosquitto, campus_pg: Postgres, campus_db_url: str, campus_ingest: IngestServer
) -> Services:
    from simulators.fleet.runner import Services

    return Services(campus_broker.url, campus_db_url, campus_broker, campus_pg, campus_ingest, None)


@pytest.fixture
def campus_fleet(campus_stack: Services, tmp_path: Path) -> Callable[..., Report]:
    from simulators.fleet import scenario as sc
    from simulators.fleet.runner import Fleet

    def run(scenario: str | sc.Scenario, **kw: Any) -> Report:
        s = sc.parse(scenario) if isinstance(scenario, str) else scenario
        workdir = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}"
        workdir.mkdir()
        return asyncio.run(Fleet(s, campus_stack, workdir, **kw).run())

    return run


@pytest.fixture
def campus_device(campus_fleet: Callable[..., Report]) -> Callable[..., Report]:
    def run(kind: str, *, events_per_hour: float = 3600, seconds: float = 3) -> Report:
        school = f"q{uuid.uuid4().hex[:6]}"
        from schemas.events import DeviceKind
        from simulators.fleet.scenario import DEFAULT_KINDS

        types = json.dumps(DEFAULT_KINDS[DeviceKind(kind)].event_types)
        end = f"10:{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"
        return campus_fleet(
            f'name = "one {kind}"\nstart = "10:00"\nend = "{end}"\nspeed = 1\ntick_s = 0.1\n'
            f'[[schools]]\nid = "{school}"\nrooms = 1\ndevices = {{ {kind} = 1 }}\n'
            f"[kinds.{kind}]\nevent_types = {types}\nper_hour = {events_per_hour}\n"
        )

    return run
