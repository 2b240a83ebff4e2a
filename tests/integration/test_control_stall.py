"""One device's bad acks cannot stall the control plane, and /healthz tells the truth, on the
real stack: PostgreSQL, and Mosquitto or the embedded amqtt broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from ingest_server.control import plane as control_mod
from ingest_server.control.plane import ControlPlane
from ingest_server.ingest.batch import QUARANTINE_KEEP_BYTES
from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, wait_until
from tests.api_client import Api, Device, _now
from tests.ingest_publish import Publisher, get, tap, up, uplink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WAIT_S = 30.0
BAD, GOOD = "cr-0666", "cr-0101"


@dataclass(frozen=True)
class Where:
    """Where a device finds the broker (the embedded one is known only once it runs)."""

    host: str
    port: int


def _ack(cmd_id: str, detail: Any) -> bytes:
    return json.dumps({"id": cmd_id, "status": "ok", "detail": detail}).encode()


def _config_ack(detail: str) -> bytes:
    return json.dumps({"version": 1, "status": "applied", "detail": detail, "ts": _now()}).encode()


#: (channel, payload, what its reason says, its quarantined_total reason)
BAD_ACKS: list[tuple[str, bytes, str, str]] = [
    ("cmd/ack", _ack("c-nul", "a\u0000b"), "\\u0000 character", "nul"),
    ("cmd/ack", _ack("c-big", "x" * 1_000_000), "over the limit of 32768", "oversize"),
    (
        "cmd/ack",
        b'{"id": "c-deep", "status": "ok", "detail": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "nested deeper than the limit",
        "depth",
    ),
    ("config/ack", _config_ack("a\u0000b"), "\\u0000 character", "nul"),
    ("config/ack", _config_ack("y" * 1_000_000), "over the limit of 32768", "oversize"),
    (
        "config/ack",
        b'{"version": 1, "status": "applied", "ts": "2026-01-01T00:00:00Z", "x": '
        + b"{" * 3000
        + b"}" * 3000
        + b"}",
        "nested deeper than the limit",
        "depth",
    ),
]


def quarantine_rows(db_url: str) -> list[tuple[str, str, str | None, int]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT topic, reason, device_id, length(payload) FROM quarantine"
            " WHERE topic LIKE '%/ack' ORDER BY id"
        ).fetchall()
    return [(str(t), str(r), d, int(n)) for t, r, d, n in rows]


@pytest.fixture(params=["mosquitto", "embedded"])
def stack(
    request: pytest.FixtureRequest, db_url: str, tmp_path: Path
) -> Iterator[tuple[IngestServer, Where]]:
    settings = Settings(
        db_url=db_url,
        http_port=0,
        client_id=f"ingest-stall-{uuid.uuid4().hex[:8]}",
        admin_token_file=tmp_path / "admin-token",
        data_dir=tmp_path,
        embedded_broker_port=0,
    )
    if request.param == "mosquitto":
        mosquitto: Mosquitto = request.getfixturevalue("mosquitto")
        settings = replace(settings, broker_url=mosquitto.url)
    else:  # the devices here are not enrolled: the embedded broker's demo mode admits them
        settings = replace(settings, embedded_allow_anonymous=True)
    with IngestServer(settings) as server:
        wait_until(settings.token_file.exists, 60, "the bootstrap admin token")
        wait_until(lambda: server.control.health().leader, WAIT_S, "the control plane to lead")
        b = server.control.broker
        yield server, Where(b.host, b.port)


def _device(where: Where, api: Api, device_id: str) -> Device:
    dev = Device(cast(Mosquitto, where), device_id)
    wait_until(
        lambda: api("GET", f"/api/v1/devices/{device_id}/presence")[0] == 200,
        WAIT_S,
        f"{device_id} registered by its state",
    )
    return dev


def _command_and_config_go_through(api: Api, good: Device, tag: str) -> None:
    """A command to ``good`` completes ok and a config to it is acked."""
    status, cmd = api(
        "POST", f"/api/v1/devices/{good.device_id}/commands", {"name": "ping", "id": tag}
    )
    assert status == 201, cmd
    wait_until(lambda: good.got(tag), WAIT_S, f"command {tag} at {good.device_id}")
    good.ack(tag, "ok", {"pong": tag})
    assert api.wait_status(tag, "ok")["detail"] == {"pong": tag}

    path = f"/api/v1/devices/{good.device_id}/config"
    status, cfg = api("PUT", path, {"config": {"sample_s": 7, "tag": tag}})
    assert status == 202, cfg
    version = cfg["version"]
    wait_until(lambda: (good.last_config() or {}).get("version") == version, WAIT_S, "the config")
    good.publish(
        "config/ack", {"version": version, "status": "applied", "detail": tag, "ts": _now()}
    )
    wait_until(lambda: api("GET", path)[1]["status"] == "applied", WAIT_S, "the config ack")


def test_bad_acks_are_quarantined_acknowledged_and_hold_nobody_up(
    stack: tuple[IngestServer, Where], db_url: str
) -> None:
    server, where = stack
    api = Api(server)
    bad, good = _device(where, api, BAD), _device(where, api, GOOD)
    try:
        # the bad device has a command and a config out, so its acks would be recorded
        for cmd_id in ("c-nul", "c-big", "c-deep"):
            status, _ = api(
                "POST", f"/api/v1/devices/{BAD}/commands", {"name": "ping", "id": cmd_id}
            )
            assert status == 201
        assert api("PUT", f"/api/v1/devices/{BAD}/config", {"config": {"a": 1}})[0] == 202
        wait_until(lambda: len(bad.commands) == 3, WAIT_S, "the bad device's commands")

        for channel, payload, _, _ in BAD_ACKS:
            bad.publish(channel, payload)
        _command_and_config_go_through(api, good, "after-bad-acks")

        wait_until(lambda: len(quarantine_rows(db_url)) == len(BAD_ACKS), WAIT_S, "quarantine")
        rows = quarantine_rows(db_url)
        for (topic, reason, device_id, kept), (channel, payload, says, _kind) in zip(
            rows, BAD_ACKS, strict=True
        ):
            assert topic == f"campus/v1/s001/{BAD}/{channel}"
            assert device_id == BAD
            assert says in reason, reason
            assert len(reason) < 500, reason  # readable: no device payload echoed whole
            assert kept == min(len(payload), QUARANTINE_KEEP_BYTES)
            if len(payload) > QUARANTINE_KEEP_BYTES:
                assert f"only its first {QUARANTINE_KEEP_BYTES} bytes" in reason
        m = server.metrics.control_quarantined
        assert [m.value(reason=k) for k in ("nul", "oversize", "depth")] == [2, 2, 2]
        # nothing of the bad acks reached the commands (their detail would be the proof)
        for cmd_id in ("c-nul", "c-big", "c-deep"):
            assert api.command(cmd_id)["status"] == "sent"

        # acknowledged to the broker: a new session of the same client gets none of them again
        server.control.stop()
        again = ControlPlane(
            server.settings, server.control.broker, server.control.db_url, server.metrics
        )
        again.start()
        try:
            wait_until(lambda: again.health().leader, WAIT_S, "the new control plane to lead")
            status, _ = api(
                "POST", f"/api/v1/devices/{GOOD}/commands", {"name": "ping", "id": "after-2"}
            )
            assert status == 201
            wait_until(lambda: good.got("after-2"), WAIT_S, "a command from the new session")
            good.ack("after-2")
            api.wait_status("after-2", "ok")
            assert len(quarantine_rows(db_url)) == len(BAD_ACKS)
        finally:
            again.stop()
    finally:
        bad.close()
        good.close()


def test_an_ack_the_database_itself_refuses_is_quarantined_not_retried(
    stack: tuple[IngestServer, Where], db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the limits out of the way, PostgreSQL's own refusal (a NUL in jsonb and in text)
    is the backstop: quarantined with its reason at once, not retried."""
    monkeypatch.setattr(control_mod, "check_json", lambda _p, _l: None)
    server, where = stack
    api = Api(server)
    bad, good = _device(where, api, BAD), _device(where, api, GOOD)
    try:
        assert api("POST", f"/api/v1/devices/{BAD}/commands", {"name": "ping", "id": "c1"})[0]
        assert api("PUT", f"/api/v1/devices/{BAD}/config", {"config": {"a": 1}})[0] == 202
        bad.publish("cmd/ack", _ack("c1", {"k": "a\u0000b"}))
        bad.publish("config/ack", _config_ack("a\u0000b"))
        _command_and_config_go_through(api, good, "after-refused")
        wait_until(lambda: len(quarantine_rows(db_url)) == 2, WAIT_S, "two quarantined acks")
        reasons = [r for _, r, _, _ in quarantine_rows(db_url)]
        assert all(r.startswith("the database refused this ack: ") for r in reasons), reasons
        assert "Unicode" in reasons[0] or "NUL" in reasons[0]
        assert "NUL" in reasons[1]
        assert server.metrics.control_quarantined.value(reason="database") == 2
        assert server.metrics.control_retries.value() == 0
    finally:
        bad.close()
        good.close()


def test_healthz_goes_503_while_the_writer_waits_on_a_lock(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        client_id=f"ingest-lock-{uuid.uuid4().hex[:8]}",
        admin_token_file=tmp_path / "admin-token",
        batch_ms=20,
        stuck_after_s=1.0,
    )
    with IngestServer(settings) as server:
        health = server.http.url + "/healthz"
        wait_until(lambda: get(health)[0] == 200, WAIT_S, "a healthy server")
        publisher = Publisher(mosquitto)
        try:
            with psycopg.connect(db_url) as locker:
                locker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                publisher.send(up("door-1"), uplink("door-1", [tap(1)]))

                def stuck() -> bool:
                    status, body = get(health)
                    return status == 503 and json.loads(body)["stuck"] != []

                wait_until(stuck, WAIT_S, "/healthz to report the stuck writer")
                body = json.loads(get(health)[1])
                assert (body["status"], body["mqtt"], body["db"]) == ("down", "connected", "ok")
                assert any("the batch in hand has not committed" in s for s in body["stuck"])
                assert body["control"]["leader"] is True
                locker.rollback()  # the lock goes
            wait_until(lambda: get(health)[0] == 200, WAIT_S, "/healthz back to 200")
            body = json.loads(get(health)[1])
            assert body["stuck"] == []
            assert body["last_commit_age_s"] is not None
            with psycopg.connect(db_url) as conn:
                row = conn.execute("SELECT count(*) FROM events WHERE device_id = 'door-1'")
                assert row.fetchone() == (1,)
        finally:
            publisher.close()
