"""A device's whole life through the product's own front doors, on the production stack: real
Mosquitto (the shipped TLS config, per-device credentials and ACL from the registry), real
PostgreSQL, and the ``ingest-server`` and ``edge-agent`` programs as processes.

An admin makes an enrolment code through the API; ``edge-agent enroll`` spends it and writes the
config; ``edge-agent run`` comes online and its events are stored; a config PUT through the API
adds a driver; ping and flush_outbox are acked ok; a bad config is rejected while the old one
keeps running; SIGKILL leaves the device offline by its will.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from simulators.harness import shared_tmpdir, wait_until
from simulators.harness_pipeline import BIN, IngestServer, Proc
from tests.api_client import call

pytestmark = pytest.mark.integration

GEN = {"type": "synthetic", "name": "gen", "event_type": "env.reading", "rate": 20}
BOARD = {"type": "synthetic", "name": "board", "event_type": "board.power", "rate": 20}


@pytest.fixture
def workdir() -> Iterator[Path]:
    # a directory of its own: pytest may prune old basetemps while other sessions run
    path = shared_tmpdir("campus-fleet-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Api:
    def __init__(self, server: IngestServer) -> None:
        self.base = f"http://127.0.0.1:{server.http_port}/api/v1"
        self.token = server.token_file.read_text().strip()

    def __call__(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return call(self.base + path, self.token if token is None else token, method, body)

    def get(self, path: str) -> dict[str, Any]:
        status, body = self("GET", path)
        assert status == 200, (path, body)
        result: dict[str, Any] = body
        return result


def counts(db_url: str, device_id: str) -> dict[str, int]:
    """Stored events of the device by type."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT type, count(*) FROM events WHERE device_id = %s GROUP BY type", (device_id,)
        ).fetchall()
    return {str(t): int(n) for t, n in rows}


def test_enrol_run_configure_command_and_die(
    tls_mosquitto: dict[str, Any],
    tls_files: dict[str, Path],
    db_url: str,
    workdir: Path,
) -> None:
    port, ca = tls_mosquitto["port"], tls_files["ca"]
    # no --ca-cert nor --enrol-broker-url: devices are given the server's own broker and CA
    server = IngestServer(
        workdir,
        f"mqtts://ingest:ingest-secret@127.0.0.1:{port}?ca={ca}",
        db_url,
        "--hash-key-file",
        str(tls_files["hash_key"]),
        "--mosquitto-passwd",
        str(tls_mosquitto["passwd"]),
        "--mosquitto-acl",
        str(tls_mosquitto["acl"]),
        "--mosquitto-pid-file",
        str(tls_mosquitto["pid"]),
        "--broker-auth-interval",
        "0.5",
        name="fleet",
    )
    agent: Proc | None = None
    server.start()
    try:
        server.wait_healthy(60)
        wait_until(server.token_file.exists, 30, "the admin token")
        api = Api(server)

        # 1. an admin makes a code; the device spends it with the real enrolment client
        status, made = api(
            "POST", "/enrolment-codes", {"school_id": "s01", "room": "101", "kind": "env_sensor"}
        )
        assert status == 201, made
        config = workdir / "device" / "agent.toml"
        enrolled = subprocess.run(
            [
                str(BIN / "edge-agent"),
                "enroll",
                "--server",
                f"http://127.0.0.1:{server.http_port}",
                "--code",
                made["code"],
                "--kind",
                "env_sensor",
                "--config",
                str(config),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        assert made["code"] not in enrolled.stdout + enrolled.stderr
        written = tomllib.loads(config.read_text())
        device_id = written["device"]["id"]
        assert f"enrolled as {device_id}" in enrolled.stdout
        assert written["mqtt"]["url"] == f"mqtts://127.0.0.1:{port}"
        assert (config.parent / written["mqtt"]["ca_file"]).read_text() == ca.read_text()
        secret = config.parent / written["mqtt"]["password_file"]
        assert secret.stat().st_mode & 0o777 == 0o600
        password = secret.read_text().strip()
        # the technician describes the hardware (docs/install.md step 3)
        with config.open("a") as f:
            f.write(
                "\n[publish]\nbackoff_initial_s = 0.2\nbackoff_max_s = 1\n"
                "\n[health]\ninterval_s = 0\n"
                '\n[[drivers]]\ntype = "synthetic"\nname = "gen"\nevent_type = "env.reading"\n'
                f"rate = {GEN['rate']}\n"
            )

        # 2. it runs, comes online over TLS with its own credentials, and its events are stored
        agent = Proc([str(BIN / "edge-agent"), "run", "--config", str(config)], workdir / "a.log")
        agent.start()

        def state() -> str | None:
            assert agent is not None
            assert agent.running, agent.tail()
            return api.get(f"/devices/{device_id}")["state"]

        wait_until(lambda: state() == "online", 30, "the device online")
        wait_until(lambda: counts(db_url, device_id).get("env.reading", 0) >= 10, 20, "events")
        assert "board.power" not in counts(db_url, device_id)

        # 3. a config change through the API adds a driver
        status, put = api(
            "PUT", f"/devices/{device_id}/config", {"config": {"drivers": [GEN, BOARD]}}
        )
        assert status == 202, put
        cfg_path = f"/devices/{device_id}/config"
        wait_until(lambda: api.get(cfg_path)["status"] != "pending", 20, "the config ack")
        got = api.get(cfg_path)
        assert (got["version"], got["status"], got["detail"]) == (put["version"], "applied", None)
        wait_until(lambda: counts(db_url, device_id).get("board.power", 0) >= 5, 20, "new driver")

        # 4. commands through the API are acked ok
        cmds = f"/devices/{device_id}/commands"
        for name in ("ping", "flush_outbox"):
            status, cmd = api("POST", cmds, {"name": name, "id": f"fleet-{name}"})
            assert status == 201, cmd
            wait_until(
                lambda c=cmd: api.get(f"/commands/{c['id']}")["status"] not in ("pending", "sent"),
                20,
                f"{name} acked",
            )
            acked = api.get(f"/commands/{cmd['id']}")
            assert acked["status"] == "ok", acked
        assert isinstance(acked["detail"]["depth"], int)

        # 5. a bad config is rejected; the agent keeps running on the old one
        bad = {"drivers": [GEN, {"type": "teleporter", "name": "beam"}]}
        status, put = api("PUT", cfg_path, {"config": bad})
        assert status == 202, put
        wait_until(lambda: api.get(cfg_path)["status"] != "pending", 20, "the bad config's ack")
        got = api.get(cfg_path)
        assert (got["version"], got["status"]) == (put["version"], "rejected"), got
        assert "unknown driver type 'teleporter'" in got["detail"]
        before = counts(db_url, device_id)
        wait_until(
            lambda: all(counts(db_url, device_id)[t] >= before[t] + 5 for t in before),
            20,
            "events of both old drivers still flowing",
        )
        assert state() == "online"

        # 6. killed without a word, the device goes offline by its will
        agent.kill()
        agent = None
        wait_until(lambda: api.get(f"/devices/{device_id}")["state"] == "offline", 20, "offline")
        # every uplink, ack and state message of the run fitted the contract
        with psycopg.connect(db_url) as conn:
            quarantined = conn.execute("SELECT topic, reason FROM quarantine").fetchall()
        assert quarantined == []
        for log in (server.log, workdir / "a.log"):
            assert password not in log.read_text(), f"the MQTT password in {log.name}"
    except BaseException:
        print("--- server log ---\n" + server.tail(6000))
        if agent is not None:
            print("--- agent log ---\n" + agent.tail(6000))
        raise
    finally:
        if agent is not None:
            agent.terminate()
        server.terminate()
