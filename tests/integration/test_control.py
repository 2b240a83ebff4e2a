"""The control plane on a real Mosquitto and PostgreSQL: commands and config through the API,
a paho client playing the device, acks recorded, expiry, idempotency, faults."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest

from ingest_server.server import IngestServer
from simulators.harness import Mosquitto, wait_until
from tests.api_client import SCHOOL, Api, Device, _now, _settings

pytestmark = pytest.mark.integration


@pytest.fixture
def server(mosquitto: Mosquitto, db_url: str, tmp_path: Path) -> Iterator[IngestServer]:
    cfg = _settings(mosquitto, db_url, tmp_path)
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
        wait_until(lambda: srv.control.health().leader, 30, "the control plane to lead")
        yield srv


@pytest.fixture
def api(server: IngestServer) -> Api:
    return Api(server)


@pytest.fixture
def device(mosquitto: Mosquitto, api: Api) -> Iterator[Device]:
    dev = Device(mosquitto, "cr-0101")
    wait_until(
        lambda: api("GET", f"/api/v1/devices/{dev.device_id}/presence")[0] == 200,
        30,
        "the device registered by its state",
    )
    yield dev
    dev.close()


def quarantined(db_url: str) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT topic, reason, device_id FROM quarantine ORDER BY id"
        ).fetchall()
    return [(str(t), str(r), d) for t, r, d in rows]


def test_command_roundtrip_idempotency_and_errors(api: Api, device: Device) -> None:
    path = f"/api/v1/devices/{device.device_id}/commands"
    status, cmd = api("POST", path, {"name": "flush_outbox", "id": "op-1"})
    assert status == 201, cmd
    assert (cmd["id"], cmd["status"], cmd["device_id"]) == ("op-1", "pending", "cr-0101")
    assert cmd["school_id"] == SCHOOL
    assert cmd["created_by"] == "bootstrap (admin-token)"

    wait_until(lambda: device.got("op-1"), 30, "the command at the device")
    (got,) = device.got("op-1")
    assert got["name"] == "flush_outbox"
    assert got["args"] == {}
    assert datetime.fromisoformat(got["expires_at"]) == datetime.fromisoformat(cmd["expires_at"])
    sent = api.wait_status("op-1", "sent")
    assert sent["sent_at"] is not None
    assert sent["acked_at"] is None

    device.ack("op-1", "ok", {"depth": 3})
    done = api.wait_status("op-1", "ok")
    assert done["detail"] == {"depth": 3}
    assert done["acked_at"] is not None
    device.ack("op-1", "error", "a repeated ack changes nothing")
    # the same idempotency key returns the first command, 200 instead of 201
    status, again = api("POST", path, {"name": "flush_outbox", "id": "op-1"})
    assert status == 200
    assert again["status"] == "ok"
    assert again["detail"] == {"depth": 3}
    assert len(device.got("op-1")) == 1  # and nothing was sent again
    status, body = api("POST", path, {"name": "ping", "id": "op-1"})
    assert status == 409
    assert "already used" in body["detail"]

    # server-chosen id; list, recent first, with a status filter
    status, ping = api("POST", path, {"name": "ping", "args": {"n": 1}, "ttl_s": 60})
    assert status == 201
    wait_until(lambda: device.got(ping["id"]), 20, "the ping at the device")
    status, listed = api("GET", path)
    assert status == 200
    assert [c["id"] for c in listed] == [ping["id"], "op-1"]
    status, only_ok = api("GET", path + "?status=ok")
    assert [c["id"] for c in only_ok] == ["op-1"]

    # errors name what is wrong
    status, body = api("POST", "/api/v1/devices/nope-1/commands", {"name": "ping"})
    assert status == 404
    assert "nope-1" in body["detail"]
    status, body = api("POST", path, {"name": "ping", "ttl_s": 0})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "ttl_s"]
    status, body = api("POST", path, {"name": "Ping!"})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "name"]
    status, body = api("POST", path, {"name": "ping", "args": {"x": "y" * 20_000}})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "args"]
    assert api("GET", "/api/v1/commands/missing")[0] == 404

    # read scope follows, admin scope sends
    status, made = api("POST", "/api/v1/tokens", {"name": "viewer", "scopes": ["read"]})
    reader = made["token"]
    assert api("GET", "/api/v1/commands/op-1", token=reader)[0] == 200
    assert api("GET", path, token=reader)[0] == 200
    status, body = api("POST", path, {"name": "ping"}, token=reader)
    assert status == 403
    assert "needs 'command'" in body["detail"]


def test_expiry(api: Api, device: Device, db_url: str) -> None:
    path = f"/api/v1/devices/{device.device_id}/commands"
    status, _ = api("POST", path, {"name": "ping", "ttl_s": 1, "id": "short"})
    assert status == 201
    expired = api.wait_status("short", "expired")
    assert expired["acked_at"] is None
    # the device's word comes late but is still recorded: it did answer
    device.ack("short", "rejected", "expired at ...")
    assert api.wait_status("short", "rejected")["detail"] == "expired at ..."
    assert quarantined(db_url) == []


def test_config_versions_retained_and_acked(api: Api, device: Device, mosquitto: Mosquitto) -> None:
    path = f"/api/v1/devices/{device.device_id}/config"
    status, body = api("GET", path)
    assert status == 404
    assert "no configuration" in body["detail"]
    status, first = api("PUT", path, {"config": {"sample_s": 10}})
    assert status == 202
    assert first == {"device_id": "cr-0101", "version": 1, "status": "pending"}
    wait_until(lambda: (device.last_config() or {}).get("version") == 1, 20, "config v1")
    status, second = api("PUT", path, {"config": {"sample_s": 5, "drivers": ["gen"]}})
    assert (status, second["version"]) == (202, 2)
    wait_until(lambda: (device.last_config() or {}).get("version") == 2, 20, "config v2")
    doc = device.last_config()
    assert doc is not None
    assert doc["config"] == {"sample_s": 5, "drivers": ["gen"]}
    assert datetime.fromisoformat(doc["issued_at"]).tzinfo is not None

    # retained: a device connecting later gets the newest version at once
    late = Device(mosquitto, device.device_id)
    try:
        wait_until(late.last_config, 20, "the retained config")
        assert late.configs[-1][0]["version"] == 2
        assert late.configs[-1][1] is True
    finally:
        late.close()

    status, info = api("GET", path)
    assert (info["version"], info["status"], info["published_version"]) == (2, "pending", 2)
    device.publish(
        "config/ack", {"version": 1, "status": "applied", "detail": None, "ts": _now()}
    )  # an ack for an older version does not speak for the newest
    device.publish(
        "config/ack",
        {"version": 2, "status": "rolled_back", "detail": "driver gen failed", "ts": _now()},
    )
    wait_until(lambda: api("GET", path)[1]["status"] == "rolled_back", 20, "the config ack")
    info = api("GET", path)[1]
    assert info["detail"] == "driver gen failed"
    assert info["acked_at"] is not None
    assert info["document"]["config"] == {"sample_s": 5, "drivers": ["gen"]}

    status, body = api("PUT", path, {"config": "not an object"})
    assert status == 422
    assert body["detail"][0]["loc"] == ["body", "config"]
    assert api("PUT", "/api/v1/devices/nope-1/config", {"config": {}})[0] == 404


def test_bad_acks_are_kept_and_the_control_plane_goes_on(
    api: Api, device: Device, db_url: str
) -> None:
    device.publish("cmd/ack", b"\xff not json")
    device.publish("cmd/ack", {"id": "never-sent", "status": "ok"})
    device.publish("cmd/ack", {"id": "x", "status": "maybe"})
    device.publish("config/ack", {"version": 1, "status": "applied", "ts": _now()})
    wait_until(lambda: len(quarantined(db_url)) == 4, 20, "four quarantined acks")
    reasons = [r for _, r, _ in quarantined(db_url)]
    assert reasons[0].startswith("cmd/ack refused: payload is not UTF-8")
    assert reasons[1] == "ack for unknown command id 'never-sent'"
    assert "status" in reasons[2]
    assert "no desired configuration" in reasons[3]
    assert {d for _, _, d in quarantined(db_url)} == {"cr-0101"}

    status, cmd = api("POST", f"/api/v1/devices/{device.device_id}/commands", {"name": "ping"})
    assert status == 201
    wait_until(lambda: device.got(cmd["id"]), 20, "a command after the bad acks")
    device.ack(cmd["id"])
    api.wait_status(cmd["id"], "ok")


def _q(path: str, params: dict[str, str]) -> str:
    return f"{path}?{urlencode(params)}"


def test_presence(api: Api, device: Device) -> None:
    """Transitions come from the stored presence history: repeats are no change, range holds."""
    path = f"/api/v1/devices/{device.device_id}/presence"
    status, p = api("GET", path)
    assert status == 200
    assert (p["state"], p["history"], p["agent_version"]) == ("online", "full", "test")
    assert p["transitions"] == [{"time": p["since"], "state": "online"}]
    first = p["since"]
    for state, boot in (("offline", 1), ("online", 2), ("online", 2), ("offline", 2)):
        device.publish(
            "state", {"state": state, "boot": boot, "agent_version": "test", "ts": _now()}
        )
    wait_until(lambda: api("GET", path)[1]["state"] == "offline", 15, "the last offline stored")
    status, p = api("GET", path)
    assert status == 200
    assert [t["state"] for t in p["transitions"]] == ["online", "offline", "online", "offline"]
    times = [t["time"] for t in p["transitions"]]
    assert times == sorted(times)
    assert (times[0], times[-1], p["truncated"]) == (first, p["since"], False)
    with psycopg.connect(api.server.settings.db_url) as conn:
        stored = conn.execute(
            "SELECT count(*) FROM device_presence WHERE device_id = %s", (device.device_id,)
        ).fetchone()
    assert stored is not None
    assert stored[0] >= 5  # the repeated online is stored, but is no transition
    # [from, to] is inclusive on both ends
    status, p = api("GET", _q(path, {"from": times[1], "to": times[2]}))
    assert [t["time"] for t in p["transitions"]] == times[1:3]
    status, p = api("GET", _q(path, {"to": "2000-01-01T00:00:00Z"}))
    assert (status, p["transitions"]) == (200, [])
    status, body = api("GET", _q(path, {"from": times[2], "to": times[1]}))
    assert status == 422
    assert "after" in body["detail"][0]["msg"]  # FastAPI's 422 shape
    status, body = api("GET", f"{path}?from=2000-01-01")
    assert status == 422
    assert "offset" in body["detail"][0]["msg"]
    assert api("GET", "/api/v1/devices/nope-1/presence")[0] == 404


def test_pending_commands_go_after_a_broker_restart(
    api: Api, device: Device, mosquitto: Mosquitto, server: IngestServer
) -> None:
    mosquitto.stop()
    wait_until(lambda: not server.control.health().mqtt_connected, 20, "the broker gone")
    status, cmd = api("POST", f"/api/v1/devices/{device.device_id}/commands", {"name": "ping"})
    assert status == 201
    assert api.command(cmd["id"])["status"] == "pending"
    mosquitto.start()
    wait_until(lambda: device.got(cmd["id"]), 30, "the command after the broker came back")
    api.wait_status(cmd["id"], "sent")
    device.ack(cmd["id"])
    api.wait_status(cmd["id"], "ok")
    assert len(device.got(cmd["id"])) == 1


def test_pending_commands_go_after_a_server_restart(
    mosquitto: Mosquitto, db_url: str, tmp_path: Path
) -> None:
    cfg = _settings(mosquitto, db_url, tmp_path)
    device: Device | None = None
    try:
        with IngestServer(cfg) as srv:
            wait_until(cfg.token_file.exists, 60, "the bootstrap admin token")
            api = Api(srv)
            device = Device(mosquitto, "cr-0202")
            wait_until(
                lambda: api("GET", "/api/v1/devices/cr-0202/presence")[0] == 200, 15, "device"
            )
            mosquitto.stop()
            status, cmd = api("POST", "/api/v1/devices/cr-0202/commands", {"name": "ping"})
            assert status == 201
        # the server stopped with the command pending; the broker comes back, then the server
        mosquitto.start()
        with IngestServer(cfg) as again:
            api = Api(again)
            assert api.command(cmd["id"])["status"] in ("pending", "sent")
            wait_until(lambda: device is not None and device.got(cmd["id"]), 30, "the command")
            device.ack(cmd["id"])
            assert api.wait_status(cmd["id"], "ok")["sent_at"] is not None
            assert len(device.got(cmd["id"])) == 1
    finally:
        if device is not None:
            device.close()
