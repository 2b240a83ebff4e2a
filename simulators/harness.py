"""Real services for tests, benchmarks and the fleet runner: Mosquitto and PostgreSQL on loopback.

Each service is a small object with start/stop/restart/kill so fault tests can break it on
purpose. Nothing here listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

PG_BINDIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/17/bin",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``pred`` until it is truthy or ``timeout`` passes; then fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def shared_tmpdir(prefix: str) -> Path:
    """A temp dir other local users (mosquitto, postgres) may enter."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


class Mosquitto:
    """A real Mosquitto broker on 127.0.0.1, configured never to drop queued QoS 1 messages."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        (workdir / "data").mkdir(exist_ok=True)
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"user {user}\n"
            "persistence true\n"
            f"persistence_location {workdir / 'data'}/\n"
            "autosave_interval 1\n"
            # Never silently drop QoS 1 messages queued for a slow or offline subscriber.
            "max_queued_messages 0\n"
            "max_queued_bytes 0\n"
            "max_inflight_messages 0\n"
            "max_keepalive 120\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n" + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        self.proc = proc
        wait_until(lambda: port_open(self.port) or proc.poll() is not None, 10, "mosquitto")
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Graceful stop: the broker saves its persistent sessions."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Postgres:
    """A real PostgreSQL server (Debian's postgresql-15) in a private data directory."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        bindir = next((d for d in PG_BINDIRS if Path(d, "initdb").exists()), None)
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found: apt-get install postgresql-15"
            )
        self.bindir = Path(bindir)
        self.workdir = workdir
        self.datadir = workdir / "pgdata"
        self.sockdir = workdir / "sock"
        self.port = port or free_port()
        self.log = workdir / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the packaged 'postgres' user.
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.sockdir.mkdir(exist_ok=True)
        self.datadir.mkdir(exist_ok=True)
        if self._as_user:
            shutil.chown(self.workdir, "postgres")
            for p in (self.sockdir, self.datadir):
                shutil.chown(p, "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        )

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self._as_user, str(self.bindir / tool), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.log), "-o", opts, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
