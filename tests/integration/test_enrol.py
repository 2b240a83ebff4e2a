"""Enrolment API and CLI on a real server and PostgreSQL: codes single-use, expiring, hashed at
rest; clear 400/404/410 bodies; failed attempts rate-limited per address."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest_server.control import enrolment
from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, wait_until
from tests.api_client import call

pytestmark = pytest.mark.integration

BODY = {
    "kind": "card_reader",
    "room": "203",
    "hardware_ids": {"serial": "X1"},
    "agent_version": "0.1.0",
}


@pytest.fixture
def server(mosquitto: Mosquitto, db_url: str, tmp_path: Path) -> Iterator[IngestServer]:
    key = tmp_path / "hash-key"
    key.write_text("cd" * 16)
    cfg = Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        client_id="ingest-enrol",
        admin_token_file=tmp_path / "admin-token",
        hash_key_file=key,
        enrol_broker_url="mqtts://broker.district.example:8883",
    )
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
        yield srv


def new_code(base: str, admin: str, **body: Any) -> str:
    status, made = call(base + "/api/v1/enrolment-codes", admin, "POST", body)
    assert status == 201, made
    return str(made["code"])


def test_enrol_flow_and_errors(server: IngestServer, db_url: str) -> None:
    base = server.http.url
    admin = server.settings.token_file.read_text().strip()
    assert call(base + "/api/v1/enrolment-codes", None, "POST", {"school_id": "s1"})[0] == 401
    status, body = call(
        base + "/api/v1/enrolment-codes", admin, "POST", {"school_id": "s1", "replaces": "nope"}
    )
    assert status == 400
    assert "no device 'nope'" in body["detail"]
    status, _ = call(
        base + "/api/v1/enrolment-codes", admin, "POST", {"school_id": "s1", "ttl_s": 31 * 86400}
    )
    assert status == 422  # over 30 days

    code = new_code(base, admin, school_id="s1", room="203", kind="card_reader")
    # typed sloppily: lower case, spaces instead of dashes
    status, got = call(
        base + "/api/v1/enrol", None, "POST", {**BODY, "code": code.lower().replace("-", " ")}
    )
    assert status == 201, got
    assert got["school_id"] == "s1"
    assert got["mqtt_url"] == "mqtts://broker.district.example:8883"
    assert got["mqtt_username"] == got["device_id"]
    assert got["hash_key_hex"] == "cd" * 16
    assert got["ca_cert_pem"] is None
    assert got["config"] is None
    assert got["seq_floor"] == 0
    assert enrolment.ID_RE.match(got["device_id"])

    status, body = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": code})
    assert (status, "used already" in body["detail"]) == (410, True)
    status, body = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": "ABCD-EFGH-JKMN"})
    assert (status, "not known" in body["detail"]) == (404, True)
    status, body = call(base + "/api/v1/enrol", None, "POST", {"code": code})
    assert status == 400
    assert "kind" in body["detail"]
    other = new_code(base, admin, school_id="s1", kind="smart_board")
    status, body = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": other})
    assert status == 400
    assert "for a smart_board" in body["detail"]

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE enrolment_codes SET expires_at = created_at + interval '1 ms'"
            " WHERE used_at IS NULL"
        )
        dev = conn.execute(
            "SELECT school_id, kind, room FROM devices WHERE device_id = %s", (got["device_id"],)
        ).fetchone()
        stored_hashes = [
            bytes(r[0]) for r in conn.execute("SELECT code_sha256 FROM enrolment_codes")
        ]
        cred = conn.execute("SELECT password_hash, hardware_ids FROM device_credentials").fetchone()
    assert dev == ("s1", "card_reader", "203")
    assert hashlib.sha256(code.replace("-", "").encode()).digest() in stored_hashes
    assert cred is not None
    assert cred[0].startswith("$7$")
    assert got["mqtt_password"] not in cred[0]
    assert cred[1] == {"serial": "X1"}
    status, body = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": other})
    assert (status, "expired" in body["detail"]) == (410, True)

    status, listed = call(base + "/api/v1/enrolment-codes", admin)
    assert status == 200
    assert [c["device_id"] for c in listed] == [got["device_id"], None]
    assert all("code" not in c for c in listed)


def test_a_replacement_gets_its_predecessors_desired_config(server: IngestServer) -> None:
    """A technician swapping a broken unit: the new one enrols under the old id and comes up
    with the configuration an admin set for that id."""
    base = server.http.url
    admin = server.settings.token_file.read_text().strip()
    code = new_code(base, admin, school_id="s1")
    status, first = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": code})
    assert status == 201, first
    device = first["device_id"]
    desired = {"health": {"interval_s": 30}, "publish": {"backoff_max_s": 20.0}}
    status, body = call(f"{base}/api/v1/devices/{device}/config", admin, "PUT", {"config": desired})
    assert status in (200, 202), body
    code = new_code(base, admin, school_id="s1", replaces=device)
    status, second = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": code})
    assert status == 201, second
    assert (second["device_id"], second["config"]) == (device, desired)
    assert first["config"] is None  # nothing was set for the id then


def test_failed_codes_are_rate_limited(server: IngestServer) -> None:
    base = server.http.url
    limit = enrolment.FailureLimiter().limit
    for _ in range(limit):
        assert call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": "WRONG-CODE"})[0] == 404
    status, body = call(base + "/api/v1/enrol", None, "POST", {**BODY, "code": "WRONG-CODE"})
    assert status == 429
    assert "too many wrong enrolment codes" in body["detail"]


def test_enrol_code_cli(db_url: str) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingest_server", "enrol-code", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    made = cli(
        "create",
        "--school",
        "s9",
        "--room",
        "1",
        "--kind",
        "env_sensor",
        "--ttl",
        "2h",
        "--db",
        db_url,
    )
    assert made.returncode == 0, made.stderr
    code = made.stdout.split()[-1]
    assert len(enrolment.normalise_code(code)) == enrolment.CODE_LEN
    listed = cli("list", "--db", db_url)
    assert "s9" in listed.stdout
    assert "env_sensor" in listed.stdout
    assert code not in listed.stdout
    bad = cli("create", "--school", "s9", "--ttl", "40d", "--db", db_url)
    assert bad.returncode == 1
    assert "30 days" in bad.stderr
