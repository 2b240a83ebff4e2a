"""Fixtures: real Mosquitto and PostgreSQL on loopback with ports chosen at run time.

They are the installed pytest plugin's (``simulators/pytest_plugin.py``, the one QA use in their
own CI) under the short names these tests grew up with: one PostgreSQL server per session.
"""

from __future__ import annotations

import pytest

from simulators.harness import Mosquitto, Postgres

#: Helper modules shared by test modules: loaded as plugins so their fixtures are everywhere and
#: no test module imports another (the camera helper is imported by the camera tests themselves,
#: after their check that OpenCV is installed).
pytest_plugins = [
    "tests.agent_helpers",
    "tests.agent_server",
    "tests.alert_receivers",
    "tests.api_client",
    "tests.broker_tls",
    "tests.driver_harness",
    "tests.ingest_publish",
    "tests.ingest_rows",
    "tests.pcsc",
    "tests.timescale",
]


@pytest.fixture
def mosquitto(campus_broker: Mosquitto) -> Mosquitto:
    """A fresh Mosquitto per test: .url, .port, .stop(), .start(), .restart(), .kill()."""
    return campus_broker


@pytest.fixture(scope="session")
def pg_server(campus_pg: Postgres) -> Postgres:
    """One PostgreSQL server for the session; tests get their own database from ``db_url``."""
    return campus_pg


@pytest.fixture
def db_url(campus_db_url: str) -> str:
    """A fresh, empty database on the session's PostgreSQL, as a libpq URL."""
    return campus_db_url
