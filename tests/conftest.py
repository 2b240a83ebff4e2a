"""Fixtures: real Mosquitto and PostgreSQL on loopback with ports chosen at run time."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest

from tests.services import Mosquitto, Postgres, shared_tmpdir
from tests.timescale import timescale_server, tsdb_url  # noqa: F401  # fixtures


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test: .url, .port, .stop(), .start(), .restart(), .kill()."""
    workdir = shared_tmpdir("campus-mosq-")
    broker = Mosquitto(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    """One PostgreSQL server for the session; tests get their own database from ``db_url``."""
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
def db_url(pg_server: Postgres) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL, as a libpq URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)
