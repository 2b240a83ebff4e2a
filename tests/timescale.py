"""TimescaleDB for tests: PGlite (PostgreSQL 17 in WASM, TimescaleDB built in) behind our own
wire-protocol server (tests/tsdb/server.mjs), on 127.0.0.1 and a port chosen at run time.

One session at a time: a second connection waits until the first closes. No COPY. Background
jobs never run by themselves: call them with ``CALL run_job(id)``.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import psycopg
import pytest

from simulators.harness import free_port, wait_until

HARNESS_DIR = Path(__file__).parent / "tsdb"


class TimescaleServer:
    """``with TimescaleServer() as ts: psycopg.connect(ts.url())``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = b""

    def url(self, dbname: str = "postgres") -> str:
        """``dbname="fresh"`` replaces the database with a new, empty one on connect."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?sslmode=disable"

    def start(self) -> Self:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed: apt-get install nodejs npm")
        if not (HARNESS_DIR / "node_modules" / "@unni-craftsman" / "pglite").is_dir():
            raise RuntimeError(f"run `npm ci` in {HARNESS_DIR} first (./run test does)")
        self.proc = subprocess.Popen(
            [node, str(HARNESS_DIR / "server.mjs"), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(lambda: self._connects() or self.proc.poll() is not None, 60, "pglite")
            if self.proc.poll() is not None:
                raise RuntimeError(f"pglite server exited: {self._stderr()[-2000:]!r}")
        except BaseException:
            self.stop()
            raise
        return self

    def _connects(self) -> bool:
        with (
            contextlib.suppress(psycopg.OperationalError),
            psycopg.connect(self.url(), connect_timeout=2) as conn,
        ):
            conn.execute("SELECT 1")
            return True
        return False

    def _stderr(self) -> bytes:
        if self.proc and self.proc.stderr and self.proc.poll() is not None:
            self.log += self.proc.stderr.read()
        return self.log

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def timescale_server() -> Iterator[TimescaleServer]:
    """One PGlite/TimescaleDB server for the session (it takes seconds to start)."""
    with TimescaleServer() as server:
        yield server


@pytest.fixture
def tsdb_url(timescale_server: TimescaleServer) -> str:
    """A libpq URL of an empty TimescaleDB-capable database (the previous test's is gone)."""
    # A new PGlite instance (~2 s). Dropping and re-creating schema public is faster but leaves
    # PGlite's single backend with a stale search_path: new tables land in pg_catalog.
    with psycopg.connect(timescale_server.url("fresh"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    return timescale_server.url()
