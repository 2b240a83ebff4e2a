"""The whole pipeline as real processes: ingest servers and edge agents, to start, kill and count.

Used by the end-to-end and chaos tests and by bench/. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import psycopg

from simulators.harness import free_port, wait_until

BIN = Path(sys.executable).parent
HASH_KEY_HEX = "00112233445566778899aabbccddeeff"


def _bin(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


class Proc:
    """A child process with its output in a log file, stopped gracefully or killed on purpose."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, env=self.env)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no last words: the crash case."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def terminate(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        return code

    def tail(self, n: int = 3000) -> str:
        """The log's last ``n`` characters (for a failure's message)."""
        return self.text()[-n:]

    def text(self) -> str:
        """The whole log so far (for what it must or must not say anywhere)."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class IngestServer(Proc):
    def __init__(
        self,
        workdir: Path,
        broker_url: str | None,
        db_url: str | None,
        *extra: str,
        name: str = "ingest",
    ) -> None:
        self.http_port = free_port()
        self.token_file = workdir / f"{name}-data" / "admin-token"
        argv = [
            _bin("ingest-server"),
            "run",
            "--http",
            f"127.0.0.1:{self.http_port}",
            "--client-id",
            f"campus-{name}",
            "--data-dir",
            str(workdir / f"{name}-data"),
        ]
        if broker_url:
            argv += ["--broker", broker_url]
        if db_url:
            argv += ["--db", db_url]
        super().__init__([*argv, *extra], workdir / f"{name}.log")

    def get(self, path: str) -> tuple[int, str]:
        """GET with the server's bootstrap admin token once it has written it."""
        headers = {}
        if self.token_file.exists():
            headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            req = urllib.request.Request(url, headers=headers)  # loopback
            with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def healthy(self) -> bool:
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 60) -> None:
        def ok() -> bool:
            if not self.running:
                raise RuntimeError(f"ingest server exited:\n{self.tail()}")
            return self.healthy()

        wait_until(ok, timeout, "ingest server /healthz")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets)."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name)] in " {":
                total += float(line.rsplit(" ", 1)[1])
        return total


class Agent(Proc):
    """An edge agent process with a synthetic load-generating driver."""

    def __init__(
        self,
        workdir: Path,
        device_id: str,
        broker_url: str,
        *,
        count: int,
        rate: int = 0,
        protocol: str = "5",
        school_id: str = "s001",
        event_type: str = "env.reading",
        publish: dict[str, int] | None = None,
    ) -> None:
        self.device_id = device_id
        self.dir = workdir / device_id
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "district.key").write_text(HASH_KEY_HEX)
        pub = {
            "max_batch_events": 200,
            "inflight": 8,
            "linger_ms": 20,
            "replay_rate": 20000,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 2,
            **(publish or {}),
        }
        self.config = self.dir / "agent.toml"
        self.config.write_text(
            f'[device]\nid = "{device_id}"\nschool_id = "{school_id}"\nkind = "env_sensor"\n'
            f'[outbox]\npath = "outbox.db"\n'
            f'[mqtt]\nurl = "{broker_url.split("?", maxsplit=1)[0]}"\nprotocol = "{protocol}"\n'
            "[publish]\n"
            + "".join(f"{k} = {v}\n" for k, v in pub.items())
            + '[privacy]\nhash_key_file = "district.key"\n'
            # exact seq accounting: only the load generator's events, no periodic health events
            + "[health]\ninterval_s = 0\n"
            f'[[drivers]]\ntype = "synthetic"\nname = "gen"\nevent_type = "{event_type}"\n'
            f"rate = {rate}\ncount = {count}\n"
        )
        super().__init__(
            [_bin("edge-agent"), "run", "--config", str(self.config)], self.dir / "agent.log"
        )

    def status(self) -> dict[str, object]:
        out = subprocess.run(
            [_bin("edge-agent"), "status", "--config", str(self.config), "--json"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        result: dict[str, object] = json.loads(out.stdout)
        return result


def stored(db_url: str, device_ids: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Every stored (device_id, seq), duplicates included, so a double store would show."""
    with psycopg.connect(db_url) as conn:
        if device_ids is None:
            rows = conn.execute("SELECT device_id, seq FROM events").fetchall()
        else:
            rows = conn.execute(
                "SELECT device_id, seq FROM events WHERE device_id = ANY(%s)", (list(device_ids),)
            ).fetchall()
    return [(str(d), int(s)) for d, s in rows]


def count_stored(db_url: str) -> int:
    try:
        with psycopg.connect(db_url, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM events").fetchone()
    except psycopg.Error:
        return -1
    return int(row[0]) if row else 0


def assert_exactly_once(db_url: str, expected: dict[str, int]) -> None:
    """Each device's seqs 1..count are stored once each, and nothing else."""
    rows = stored(db_url, expected)
    assert len(rows) == len(set(rows)), "some (device_id, seq) is stored twice"
    want = {(d, s) for d, n in expected.items() for s in range(1, n + 1)}
    got = set(rows)
    missing, extra = want - got, got - want
    assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:5]}"
    assert not extra, f"{len(extra)} unexpected events, e.g. {sorted(extra)[:5]}"
