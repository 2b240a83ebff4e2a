"""HTTP ingest on a real server and PostgreSQL: a device's uplink batches over HTTP stored
exactly once across retries, a bad batch quarantined with its reason, wrong credentials 401
then limited; a made-up vendor's webhook mapped to contract events by a mapping file alone."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest_server.control.broker_auth import hash_password
from ingest_server.server import IngestServer
from ingest_server.settings import Settings
from simulators.harness import Mosquitto, wait_until
from tests.ingest_publish import tap, uplink

pytestmark = pytest.mark.integration

DEVICE, SCHOOL, PASSWORD = "sign-http-1", "s1", "correct horse battery staple"
SECRET = "acme-webhook-secret-0123456789"
UID = "a" * 64

MAPPING = """
[source]
name = "acme"
description = "a made-up vendor cloud for class signage card readers"
auth = "hmac-sha256"
header = "X-Acme-Signature"
signature_prefix = "sha256="
secret_file = "acme.secret"

[[events]]
each = "$.data.items[*]"
when = { path = "$.kind", equals = "swipe" }
device_id = "$.terminal.sn"
device_prefix = "acme-"
school_id = "$$.school"
kind = "card_reader"
type = "card.tap"
ts = "$.time"
timezone = "+08:00"
event_id = "$.id"

[events.data]
uid_hash = "$.card"
reader = { path = "$.door", default = "main" }
tech = { path = "$.cardType", map = { "1" = "mifare_classic", "2" = "em4100" } }
"""


@pytest.fixture
def server(mosquitto: Mosquitto, db_url: str, tmp_path: Path) -> Iterator[IngestServer]:
    (tmp_path / "acme.secret").write_text(SECRET + "\n")
    mapping = tmp_path / "acme.toml"
    mapping.write_text(MAPPING)
    cfg = Settings(
        broker_url=mosquitto.url,
        db_url=db_url,
        http_port=0,
        client_id="ingest-http",
        admin_token_file=tmp_path / "admin-token",
        webhook_mappings=(mapping,),
    )
    with IngestServer(cfg) as srv:
        wait_until(cfg.token_file.exists, 60, "the bootstrap admin token (migrations done)")
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO device_credentials (device_id, school_id, password_hash)"
                " VALUES (%s, %s, %s)",
                (DEVICE, SCHOOL, hash_password(PASSWORD)),
            )
        yield srv


def post(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method="POST")  # noqa: S310
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:  # noqa: S310  # http://127.0.0.1
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null"), dict(exc.headers)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def stored(db_url: str, device: str) -> list[int]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT seq FROM events WHERE device_id = %s ORDER BY seq", (device,)
        ).fetchall()
    return [r[0] for r in rows]


def test_device_batches_are_stored_once_across_retries(server: IngestServer, db_url: str) -> None:
    url = f"{server.http.url}/api/v1/devices/{DEVICE}/up"
    auth = basic(DEVICE, PASSWORD)
    first = uplink(DEVICE, [tap(s) for s in range(1, 6)])
    for attempt in range(3):  # the same batch three times: a device retrying after a timeout
        status, body, _ = post(url, first, auth)
        assert status == 200, body
        want = {"stored": 5, "duplicates": 0, "quarantined": 0} if attempt == 0 else {
            "stored": 0, "duplicates": 5, "quarantined": 0}  # fmt: skip
        assert body == want
    # overlapping the previous batch: 4 and 5 again, 6..8 new
    status, body, _ = post(url, uplink(DEVICE, [tap(s) for s in range(4, 9)]), auth)
    assert (status, body) == (200, {"stored": 3, "duplicates": 2, "quarantined": 0})
    assert stored(db_url, DEVICE) == list(range(1, 9))
    with psycopg.connect(db_url) as conn:
        dev = conn.execute(
            "SELECT school_id, event_count, max_seq FROM devices WHERE device_id = %s", (DEVICE,)
        ).fetchone()
    assert dev == (SCHOOL, 8, 8)  # the school from its credential, counted once


def test_a_bad_batch_is_quarantined_with_its_reason(server: IngestServer, db_url: str) -> None:
    url = f"{server.http.url}/api/v1/devices/{DEVICE}/up"
    auth = basic(DEVICE, PASSWORD)
    # one bad event among good ones: the bad one quarantined, the rest stored
    good = json.loads(uplink(DEVICE, [tap(1), tap(2)]))
    good["events"][1]["data"]["tech"] = "punched-card"
    status, body, _ = post(url, json.dumps(good).encode(), auth)
    assert (status, body) == (200, {"stored": 1, "duplicates": 0, "quarantined": 1})
    # a batch claiming another device: quarantined whole (the path's device is authenticated)
    other = uplink("someone-else", [tap(3)])
    status, body, _ = post(url, other, auth)
    assert (status, body) == (200, {"stored": 0, "duplicates": 0, "quarantined": 1})
    # not JSON at all
    status, body, _ = post(url, b"\x00not json", auth)
    assert (status, body) == (200, {"stored": 0, "duplicates": 0, "quarantined": 1})
    with psycopg.connect(db_url) as conn:
        reasons = [
            r[0]
            for r in conn.execute(
                "SELECT reason FROM quarantine WHERE device_id = %s ORDER BY id", (DEVICE,)
            ).fetchall()
        ]
    assert len(reasons) == 3, reasons
    assert "tech" in reasons[0]
    assert "someone-else" in reasons[1]
    assert stored(db_url, DEVICE) == [1]


def test_wrong_credentials_are_refused_then_limited(server: IngestServer, db_url: str) -> None:
    url = f"{server.http.url}/api/v1/devices/{DEVICE}/up"
    batch = uplink(DEVICE, [tap(1)])
    admin = server.settings.token_file.read_text().strip()
    # an API token is not a device's credential
    status, body, _ = post(url, batch, {"Authorization": f"Bearer {admin}"})
    assert status == 401, body
    status, body, headers = post(url, batch, basic(DEVICE, "wrong"))
    assert (status, body["detail"]) == (401, "wrong device credentials")
    assert headers["www-authenticate"].startswith("Basic")
    # another device's name with this device's password: refused alike
    assert post(url, batch, basic("sign-http-2", PASSWORD))[0] == 401
    limit = server.http.app.state.http_ingest.failures.limit  # per client address
    codes = [post(url, batch, basic(DEVICE, "wrong"))[0] for _ in range(limit)]
    assert codes[-1] == 429
    assert set(codes) <= {401, 429}
    # limited per address before any database work: even the right password waits now
    status, body, headers = post(url, batch, basic(DEVICE, PASSWORD))
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    assert stored(db_url, DEVICE) == []


def _sign(body: bytes) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Acme-Signature": f"sha256={digest}"}


def test_a_vendor_webhook_is_mapped_by_its_file(server: IngestServer, db_url: str) -> None:
    url = f"{server.http.url}/api/v1/ingest/webhooks/acme"
    delivery = {
        "school": "s7",
        "data": {
            "items": [
                {"id": "ev-1", "kind": "swipe", "terminal": {"sn": "t100"}, "card": UID,
                 "cardType": 1, "door": "east", "time": "2024-05-06 07:58:00"},
                {"id": "ev-2", "kind": "heartbeat", "terminal": {"sn": "t100"}},
                {"id": "ev-3", "kind": "swipe", "terminal": {"sn": "t100"}, "card": UID,
                 "cardType": 2, "time": "2024-05-06T08:01:30+08:00"},
            ]
        },
    }  # fmt: skip
    body = json.dumps(delivery).encode()
    assert post(url, body, {"X-Acme-Signature": "sha256=" + "0" * 64})[0] == 401
    assert post(f"{url}-nope", body, _sign(body))[0] == 401
    for attempt in range(2):  # delivered twice (the vendor retries): stored once
        status, got, _ = post(url, body, _sign(body))
        assert status == 200, got
        assert got == {"stored": 0 if attempt else 2, "duplicates": 2 if attempt else 0,
                       "quarantined": 0}  # fmt: skip
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT school_id, device_kind, seq, type, data, time AT TIME ZONE 'UTC'"
            " FROM events WHERE device_id = 'acme-t100' ORDER BY seq"
        ).fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("s7", "card_reader", 0, "card.tap"),
        ("s7", "card_reader", 1, "card.tap"),
    ]
    assert rows[0][4] == {"uid_hash": UID, "reader": "east", "tech": "mifare_classic"}
    assert rows[1][4] == {"uid_hash": UID, "reader": "main", "tech": "em4100"}
    assert str(rows[0][5]) == "2024-05-05 23:58:00"  # +08:00 from the mapping's timezone
    # a new delivery with one old and one new event id: the new one gets the next seq
    delivery["data"]["items"] = [delivery["data"]["items"][2],  # type: ignore[index]
                                 {**delivery["data"]["items"][0], "id": "ev-4"}]  # type: ignore[index]  # fmt: skip
    body = json.dumps(delivery).encode()
    status, got, _ = post(url, body, _sign(body))
    assert (status, got) == (200, {"stored": 1, "duplicates": 1, "quarantined": 0})
    assert stored(db_url, "acme-t100") == [0, 1, 2]


def test_a_delivery_that_does_not_fit_is_refused_naming_the_path(
    server: IngestServer, db_url: str
) -> None:
    url = f"{server.http.url}/api/v1/ingest/webhooks/acme"

    def refused(items: Any, school: Any = "s7") -> str:
        body = json.dumps({"school": school, "data": {"items": items}}).encode()
        status, got, _ = post(url, body, _sign(body))
        assert status == 422, got
        return str(got["detail"][0]["msg"])

    ok = {"id": "e1", "kind": "swipe", "terminal": {"sn": "t1"}, "card": UID, "cardType": 1,
          "time": "2024-05-06T08:00:00+08:00"}  # fmt: skip
    assert refused({"not": "a list"}).startswith("$.data.items: is not a list")
    missing = refused([ok, {**ok, "id": "e2", "terminal": {}}])
    assert missing.startswith("$.data.items[1].terminal.sn: is missing"), missing
    unmapped = refused([{**ok, "cardType": 9}])
    assert unmapped.startswith("$.data.items[0].cardType: 9 is not in data.tech's map"), unmapped
    bad_hash = refused([{**ok, "card": "nothex"}])
    assert bad_hash.startswith("$.data.items[0]:"), bad_hash
    assert "uid_hash" in bad_hash, bad_hash
    bad_school = refused([ok], school="Bad School!")
    assert bad_school.startswith("$.data.items[0]:"), bad_school
    assert "school_id" in bad_school, bad_school
    naive = [{**ok, "time": 1714953600}]
    assert "iso8601" in refused(naive)
    assert stored(db_url, "acme-t1") == []  # nothing of a refused delivery is written
