"""Roles and school scopes on the real HTTP server and PostgreSQL: two schools with devices,
events, readings, quarantine rows, commands, configs and enrolment codes. A school admin of A,
a reader of B, the data platform's service token and a district admin ask every route of
``access.ROUTES``; each sees only its schools, another school's device is a 404 everywhere."""

from __future__ import annotations

import csv
import http.client
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import msgspec
import psycopg
import pytest

from ingest_server.control.enrolment import create_code
from ingest_server.ingest.batch import EventRow
from ingest_server.web.api import access, auth
from ingest_server.web.app import HttpServer
from ingest_server.web.live import LiveHub
from schemas.uplink import ValidEvent
from simulators.api_seed import DAY0, T0, seeded_api
from simulators.harness import Postgres
from tests.api_client import call

pytestmark = pytest.mark.integration

A, B = "s001", "s002"
DEVICE = {A: "cr-0101", B: "cr-0201"}
#: The registry's school of each seeded device (quarantine rows are judged by it).
REGISTRY = {"cr-0101": A, "sb-0101": A, "env-0101": A, "cr-0201": B}
TIMES = {"from": (T0 - timedelta(hours=1)).isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()}
DAYS = {"from": DAY0.isoformat(), "to": DAY0.isoformat()}
B_REASON = "only in school B"
UNKNOWN = "nope-0000"

#: Every guarded GET that lists rows: its URL and query. The ``school`` filter is added by tests.
LISTS: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
    ("GET", "/api/v1/devices"): ("/api/v1/devices", {}),
    ("GET", "/api/v1/events"): ("/api/v1/events", TIMES),
    ("GET", "/api/v1/readings"): ("/api/v1/readings", TIMES),
    ("GET", "/api/v1/export/events.{fmt}"): ("/api/v1/export/events.ndjson", TIMES),
    ("GET", "/api/v1/export/readings.{fmt}"): ("/api/v1/export/readings.csv", TIMES),
    **{
        ("GET", f"/api/v1/rollups/{name}"): (
            f"/api/v1/rollups/{name}",
            TIMES if name == "env" else {} if name == "library-top-items" else DAYS,
        )
        for name in (
            "card-taps",
            "attendance",
            "board-power",
            "board-input",
            "env",
            "device-online",
            "library",
            "library-top-items",
            "card-purchases",
            "health-checks",
            "health-vision",
        )
    },
    ("GET", "/api/v1/quarantine"): ("/api/v1/quarantine", TIMES),
    ("GET", "/api/v1/quarantine/reasons"): ("/api/v1/quarantine/reasons", TIMES),
    ("GET", "/api/v1/enrolment-codes"): ("/api/v1/enrolment-codes", {}),
    ("GET", "/api/v1/tokens"): ("/api/v1/tokens", {}),
    ("GET", "/api/v1/meta"): ("/api/v1/meta", {}),
}
#: Routes with ``{device_id}``: method, a body for writes, and the status for one's own device.
DEVICE_ROUTES: dict[tuple[str, str], tuple[Any, int]] = {
    ("GET", "/api/v1/devices/{device_id}"): (None, 200),
    ("GET", "/api/v1/devices/{device_id}/commands"): (None, 200),
    ("POST", "/api/v1/devices/{device_id}/commands"): ({"name": "ping"}, 201),
    ("GET", "/api/v1/devices/{device_id}/config"): (None, 200),
    ("PUT", "/api/v1/devices/{device_id}/config"): ({"config": {"drivers": []}}, 202),
    ("GET", "/api/v1/devices/{device_id}/presence"): (None, 200),
    ("GET", "/api/v1/devices/{device_id}/tags"): (None, 200),
    ("PUT", "/api/v1/devices/{device_id}/tags"): ({"tags": ["floor-2"]}, 200),
}
#: The other guarded routes, tested on their own below.
OTHERS = {
    ("GET", "/metrics"),
    ("GET", "/api/v1/live"),
    ("GET", "/api/v1/commands/{command_id}"),
    ("POST", "/api/v1/tokens"),
    ("DELETE", "/api/v1/tokens/{token_id}"),
    ("POST", "/api/v1/enrolment-codes"),
    # rollouts, alerts and releases: test_rollouts_alerts_and_releases_are_scoped
    ("POST", "/api/v1/targets/resolve"),
    ("POST", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts/{rollout_id}"),
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"),
    ("GET", "/api/v1/alerts"),
    ("GET", "/api/v1/alerts/{alert_id}"),
    ("POST", "/api/v1/alerts/{alert_id}/acknowledge"),
    ("POST", "/api/v1/alerts/{alert_id}/resolve"),
    ("GET", "/api/v1/releases"),
    # per-school summaries: test_api_district.py::test_school_summary_scoped_to_the_token
    ("GET", "/api/v1/schools/summary"),
}


@dataclass
class Stack:
    http: HttpServer
    tokens: dict[str, str]
    db_url: str

    def url(self, path: str, params: dict[str, str] | None = None) -> str:
        return self.http.url + path + (f"?{urlencode(params)}" if params else "")

    def raw(self, who: str, path: str, params: dict[str, str] | None = None) -> tuple[int, str]:
        status, body = call(self.url(path, params), self.tokens[who])
        if body is None:  # an empty export
            return status, ""
        return status, body if isinstance(body, str) else json.dumps(body)

    def call(self, who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return call(self.url(path), self.tokens[who], method, body)


@pytest.fixture(scope="module")
def stack(pg_server: Postgres) -> Iterator[Stack]:
    def more(conn: psycopg.Connection[Any]) -> dict[str, str]:
        _seed_school_b(conn)
        return {
            "school_a": auth.create_token(conn, "tech-a", "school_admin", [A])[1],
            "reader_b": auth.create_token(conn, "bureau-b", "reader", [B])[1],
            "service": auth.create_token(conn, "platform", "service")[1],
        }

    with seeded_api(pg_server, "t_roles", more) as api:
        api.tokens["district"] = api.tokens.pop("admin")
        yield Stack(api.http, api.tokens, api.db_url)


def _seed_school_b(conn: psycopg.Connection[Any]) -> None:
    """What the shared seed lacks: B's readings, quarantine, commands, configs and codes."""
    conn.execute(
        "INSERT INTO readings (time, school_id, device_id, metric, value)"
        " VALUES (%s, %s, 'cr-0201', 'temperature_c', 19.5)",
        (T0, B),
    )
    rows = [
        # B's device, B's topic
        ("campus/v1/s002/cr-0201/up", "cr-0201", B_REASON),
        # a device the registry does not know: its topic's school
        ("campus/v1/s002/ghost-1/up", "ghost-1", B_REASON),
        # B's device on A's topic: the registry, not the topic, decides (B)
        ("campus/v1/s001/cr-0201/up", "cr-0201", B_REASON),
        # no device id at all: A's by its topic
        ("campus/v1/s001/x/up", None, "not JSON: A's topic"),
    ]
    conn.cursor().executemany(
        "INSERT INTO quarantine (received_at, topic, payload, reason, device_id)"
        " VALUES (%s, %s, 'x', %s, %s)",
        [(T0 + timedelta(seconds=10 + i), t, r, d) for i, (t, d, r) in enumerate(rows)],
    )
    # payments and morning checks in both schools (five students: the health rollup's minimum)
    platform = [
        (device, 1000 + i, kind, json.dumps(data))
        for device in ("cr-0101", "cr-0201")
        for i, (kind, data) in enumerate(
            [("card.purchase", {"card_hash": "ab" * 32, "amount_fen": 500, "terminal": "pos",
                                "merchant": "canteen"})]
            + [("health.check", {"student_hash": f"{n:064x}", "class_id": "c7a",
                                 "temperature_c": 36.6}) for n in range(5)]
            + [("health.vision", {"student_hash": f"{n:064x}", "class_id": "c7a",
                                  "left_acuity": 5.0, "right_acuity": 4.9}) for n in range(5)]
        )
    ]  # fmt: skip
    conn.cursor().executemany(
        "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
        " VALUES (%s, %s, %s, 'card_reader', %s, %s, %s::jsonb)",
        [(T0, REGISTRY[d], d, seq, kind, data) for d, seq, kind, data in platform],
    )
    for school, device in DEVICE.items():
        conn.execute(
            "INSERT INTO commands (id, device_id, school_id, name, expires_at)"
            " VALUES (%s, %s, %s, 'ping', now() + interval '1 hour')",
            (f"cmd-{school}", device, school),
        )
        conn.execute(
            "INSERT INTO device_config (device_id, school_id, version, document)"
            ' VALUES (%s, %s, 1, \'{"version": 1, "config": {}}\')',
            (device, school),
        )
    create_code(conn, A)
    create_code(conn, B)


def schools_of(path: str, text: str) -> list[str]:
    """The school of each row a listing returned (quarantine: its device's, else its topic's)."""
    if path.endswith(".csv"):
        return [r["school_id"] for r in csv.DictReader(io.StringIO(text))]
    if path.endswith(".ndjson"):
        return [json.loads(line)["school_id"] for line in text.splitlines()]
    body = json.loads(text)
    items = body["items"] if isinstance(body, dict) else body
    if path == "/api/v1/quarantine":
        return [REGISTRY.get(i["device_id"]) or i["topic"].split("/")[2] for i in items]
    return [i["school_id"] for i in items]


def test_every_guarded_route_is_covered_here() -> None:
    guarded = {k for k, r in access.ROUTES.items() if r.permission is not None}
    assert set(LISTS) | set(DEVICE_ROUTES) | OTHERS == guarded


SCOPED_LISTS = sorted(
    k for k in LISTS if k[1] not in {"/api/v1/tokens", "/api/v1/meta", "/api/v1/quarantine/reasons"}
)


@pytest.mark.parametrize("route", SCOPED_LISTS, ids="{0[1]}".format)
def test_school_admin_lists_only_its_school(stack: Stack, route: tuple[str, str]) -> None:
    path, params = LISTS[route]
    status, text = stack.raw("school_a", path, params)
    assert status == 200, text
    seen = schools_of(path, text)
    assert seen, f"{path}: A has rows here, none came"
    assert set(seen) == {A}, f"{path} showed {set(seen)}"
    # the district admin sees both where both have rows: the filter above did the cutting
    status, text = stack.raw("district", path, params)
    assert status == 200
    assert A in set(schools_of(path, text))
    if path.startswith(("/api/v1/quarantine", "/api/v1/enrolment-codes")):
        return  # no school= filter on these
    # asking for another school's rows gives nothing (not an error, not B's rows)
    status, text = stack.raw("school_a", path, {**params, "school": B})
    assert status == 200, text
    assert schools_of(path, text) == []


@pytest.mark.parametrize("route", SCOPED_LISTS, ids="{0[1]}".format)
def test_reader_of_b_lists_only_b(stack: Stack, route: tuple[str, str]) -> None:
    path, params = LISTS[route]
    status, text = stack.raw("reader_b", path, params)
    if path.startswith(("/api/v1/quarantine", "/api/v1/enrolment-codes")):
        assert status == 403, text  # not a reader's: raw payloads, enrolment
        return
    assert status == 200, text
    assert set(schools_of(path, text)) <= {B}


def test_both_schools_have_rows_for_the_district(stack: Stack) -> None:
    """The cut is the token's: the same listings hold B's rows for a district-wide token."""
    for path, params in (
        ("/api/v1/devices", {}),
        ("/api/v1/events", TIMES),
        ("/api/v1/readings", TIMES),
        ("/api/v1/export/events.ndjson", TIMES),
        ("/api/v1/export/readings.csv", TIMES),
        ("/api/v1/rollups/card-taps", DAYS),
        ("/api/v1/enrolment-codes", {}),
    ):
        for who in ("district", "service") if "enrolment" not in path else ("district",):
            status, text = stack.raw(who, path, params)
            assert status == 200, (who, path, text)
            assert set(schools_of(path, text)) == {A, B}, (who, path)
    # B's reader sees B's rows where the shared seed has them
    assert set(schools_of("/api/v1/events", stack.raw("reader_b", "/api/v1/events", TIMES)[1]))
    status, text = stack.raw("district", "/api/v1/quarantine", TIMES)
    assert set(schools_of("/api/v1/quarantine", text)) == {A, B}


def test_quarantine_reasons_and_meta_are_scoped(stack: Stack) -> None:
    _, text = stack.raw("school_a", "/api/v1/quarantine/reasons", TIMES)
    reasons = {r["reason"] for r in json.loads(text)}
    assert "not JSON: A's topic" in reasons
    assert B_REASON not in reasons
    _, text = stack.raw("district", "/api/v1/quarantine/reasons", TIMES)
    assert B_REASON in {r["reason"] for r in json.loads(text)}
    status, meta = stack.call("school_a", "GET", "/api/v1/meta")
    assert status == 200
    assert (meta["role"], meta["schools"], meta["scopes"]) == ("school_admin", [A], ["read"])
    assert "command" in meta["permissions"]
    assert "metrics" not in meta["permissions"]
    _, meta = stack.call("service", "GET", "/api/v1/meta")
    assert (meta["role"], meta["schools"]) == ("service", None)


@pytest.mark.parametrize("route", sorted(DEVICE_ROUTES), ids="{0[0]} {0[1]}".format)
def test_other_schools_device_is_404_like_an_unknown_one(
    stack: Stack, route: tuple[str, str]
) -> None:
    method, template = route
    body, own_status = DEVICE_ROUTES[route]
    unknown = stack.call("school_a", method, template.format(device_id=UNKNOWN), body)
    other = stack.call("school_a", method, template.format(device_id=DEVICE[B]), body)
    assert unknown[0] == 404
    assert other[0] == 404
    # the same body but for the id: nothing says the device exists
    assert json.dumps(other[1]).replace(DEVICE[B], "ID") == json.dumps(unknown[1]).replace(
        UNKNOWN, "ID"
    )
    status, own = stack.call("school_a", method, template.format(device_id=DEVICE[A]), body)
    assert status == own_status, own
    if isinstance(own, dict) and "school_id" in own:
        assert own["school_id"] == A
    # B's reader: B's device readable, A's a 404
    if method == "GET":
        assert stack.call("reader_b", method, template.format(device_id=DEVICE[B]))[0] == 200
        assert stack.call("reader_b", method, template.format(device_id=DEVICE[A]))[0] == 404


def test_commands_by_id_are_scoped(stack: Stack) -> None:
    status, cmd = stack.call("school_a", "GET", f"/api/v1/commands/cmd-{A}")
    assert (status, cmd["school_id"]) == (200, A)
    other = stack.call("school_a", "GET", f"/api/v1/commands/cmd-{B}")
    unknown = stack.call("school_a", "GET", "/api/v1/commands/cmd-none")
    assert other[0] == unknown[0] == 404
    assert other[1]["detail"].replace(f"cmd-{B}", "X") == unknown[1]["detail"].replace(
        "cmd-none", "X"
    )
    assert stack.call("reader_b", "GET", f"/api/v1/commands/cmd-{B}")[0] == 200


WRITES: list[tuple[str, str, Any]] = [
    ("POST", f"/api/v1/devices/{DEVICE[A]}/commands", {"name": "ping"}),
    ("PUT", f"/api/v1/devices/{DEVICE[A]}/config", {"config": {}}),
    ("POST", "/api/v1/tokens", {"name": "x", "role": "reader"}),
    ("DELETE", "/api/v1/tokens/1", None),
    ("POST", "/api/v1/enrolment-codes", {"school_id": A}),
]


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[f"{m} {p}" for m, p, _ in WRITES])
@pytest.mark.parametrize("who", ["service", "reader_b"])
def test_service_and_reader_write_nothing(
    stack: Stack, who: str, method: str, path: str, body: Any
) -> None:
    status, answer = stack.call(who, method, path, body)
    assert status == 403, answer
    assert f"role '{stack_role(who)}'" in answer["detail"]


def stack_role(who: str) -> str:
    return {"service": "service", "reader_b": "reader"}[who]


def test_service_reads_exports_and_metrics_everything(stack: Stack) -> None:
    for path, params in LISTS.values():
        status, text = stack.raw("service", path, params)
        if path.startswith(("/api/v1/quarantine", "/api/v1/enrolment-codes", "/api/v1/tokens")):
            assert status == 403, (path, text)
        else:
            assert status == 200, (path, text)
    status, text = stack.raw("service", "/metrics")
    assert status == 200
    assert "campus_ingest" in text
    for who in ("school_a", "reader_b"):
        assert stack.raw(who, "/metrics")[0] == 403


def test_school_admin_grants_only_within_its_schools(stack: Stack) -> None:
    status, made = stack.call(
        "school_a", "POST", "/api/v1/tokens", {"name": "a-view", "role": "reader", "schools": [A]}
    )
    assert (status, made["role"], made["schools"]) == (201, "reader", [A])
    for body, why in (
        ({"name": "x", "role": "reader", "schools": [B]}, "only for its schools"),
        ({"name": "x", "role": "reader"}, "only for its schools"),
        ({"name": "x", "role": "district_admin"}, "district_admin"),
        ({"name": "x", "role": "service"}, "service"),
        ({"name": "x", "scopes": ["admin"]}, "district_admin"),
    ):
        status, answer = stack.call("school_a", "POST", "/api/v1/tokens", body)
        assert status == 403, (body, answer)
        assert why in answer["detail"]
    status, answer = stack.call("school_a", "POST", "/api/v1/tokens", {"name": "x", "role": "x"})
    assert status == 422
    _, listed = stack.call("school_a", "GET", "/api/v1/tokens")
    assert {t["name"] for t in listed} == {"tech-a", "a-view"}
    _, every = stack.call("district", "GET", "/api/v1/tokens")
    b_token = next(t["id"] for t in every if t["name"] == "bureau-b")
    assert stack.call("school_a", "DELETE", f"/api/v1/tokens/{b_token}")[0] == 404
    assert stack.call("school_a", "DELETE", f"/api/v1/tokens/{made['id']}")[0] == 204


def test_school_admin_enrols_only_for_its_schools(stack: Stack) -> None:
    status, made = stack.call("school_a", "POST", "/api/v1/enrolment-codes", {"school_id": A})
    assert status == 201, made
    status, answer = stack.call("school_a", "POST", "/api/v1/enrolment-codes", {"school_id": B})
    assert status == 403
    assert "not for 's002'" in answer["detail"]
    status, answer = stack.call(
        "school_a", "POST", "/api/v1/enrolment-codes", {"school_id": A, "replaces": DEVICE[B]}
    )
    assert status == 404
    assert answer["detail"] == auth.NO_DEVICE.format(DEVICE[B])


def _event(school: str, device: str, seq: int) -> EventRow:
    event = ValidEvent(
        seq=seq,
        ts=datetime.now(UTC),
        type="card.tap",
        data_json=msgspec.json.encode({"uid_hash": "ab" * 32, "tech": "em4100"}),
        data=None,  # type: ignore[arg-type]  # not read by the hub
        synced=True,
        replay=False,
    )
    return EventRow(school, device, "card_reader", datetime.now(UTC), event)


def _sse(stack: Stack, who: str, query: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(stack.http.host, stack.http.port, timeout=30)
    conn.request(
        "GET", f"/api/v1/live{query}", headers={"Authorization": f"Bearer {stack.tokens[who]}"}
    )
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.readline() == b": connected\n"  # subscribed from here on
    return resp


def _devices_until(resp: http.client.HTTPResponse, last: str) -> list[str]:
    """Device ids of the stream's events up to and including the one of ``last``."""
    seen: list[str] = []
    for _ in range(1000):
        line = resp.readline()
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            seen.append(json.loads(line[6:])["device_id"])
            if seen[-1] == last:
                return seen
    raise AssertionError(f"no {last} within 1000 lines: {seen}")


def test_live_stream_is_cut_server_side(stack: Stack) -> None:
    hub: LiveHub = stack.http.app.state.live
    a_all = _sse(stack, "school_a", "")
    a_asks_b = _sse(stack, "school_a", f"?school={B}&school={A}")
    service = _sse(stack, "service", "")
    b_reader = _sse(stack, "reader_b", "")
    try:
        # B's events first, then A's marker: a leak would arrive before the marker
        hub.publish([_event(B, "cr-0201", 1), _event(B, "ghost-2", 2)])
        hub.publish([_event(A, "cr-0101", 3)])
        hub.publish([_event(B, "end-b", 4)])
        assert _devices_until(a_all, "cr-0101") == ["cr-0101"]
        assert _devices_until(a_asks_b, "cr-0101") == ["cr-0101"]
        assert _devices_until(service, "end-b") == ["cr-0201", "ghost-2", "cr-0101", "end-b"]
        assert _devices_until(b_reader, "end-b") == ["cr-0201", "ghost-2", "end-b"]
    finally:
        for resp in (a_all, a_asks_b, service, b_reader):
            resp.close()


def _alert(conn: psycopg.Connection[Any], school: str, device: str) -> int:
    row = conn.execute(
        "INSERT INTO alerts (rule, severity, school_id, device_id, message)"
        " VALUES ('device_offline', 'warning', %s, %s, 'offline') RETURNING id",
        (school, device),
    ).fetchone()
    assert row is not None
    conn.execute("INSERT INTO alert_events (alert_id, transition) VALUES (%s, 'opened')", row)
    return int(row[0])


def test_rollouts_alerts_and_releases_are_scoped(stack: Stack) -> None:
    """Targets resolve within the caller's schools; a rollout reaching another school is not
    found; alerts are cut like every other row; only admins change rollouts and alerts."""
    both = {"schools": [A, B]}
    status, got = stack.call("school_a", "POST", "/api/v1/targets/resolve", both)
    assert status == 200, got
    assert got["devices"]
    assert all(REGISTRY[d] == A for d in got["devices"])
    status, got = stack.call("district", "POST", "/api/v1/targets/resolve", both)
    assert {REGISTRY[d] for d in got["devices"]} == {A, B}
    # school A's admin cannot reach B's devices, not even by naming them
    status, got = stack.call(
        "school_a", "POST", "/api/v1/rollouts", {"target": {"devices": [DEVICE[B]]},
                                                  "config": {"drivers": []}}
    )  # fmt: skip
    assert status == 422, got
    strategy = {"canary": 1, "batch_size": 1}
    status, own = stack.call(
        "school_a", "POST", "/api/v1/rollouts",
        {"target": {"schools": [A]}, "config": {"drivers": []}, "strategy": strategy},
    )  # fmt: skip
    assert status == 201, own
    status, wide = stack.call(
        "district", "POST", "/api/v1/rollouts",
        {"target": both, "command": {"name": "ping"}, "strategy": strategy},
    )  # fmt: skip
    assert status == 201, wide
    ids = {r["id"] for r in stack.call("school_a", "GET", "/api/v1/rollouts")[1]}
    assert own["id"] in ids
    assert wide["id"] not in ids
    assert stack.call("school_a", "GET", f"/api/v1/rollouts/{wide['id']}")[0] == 404
    assert stack.call("school_a", "POST", f"/api/v1/rollouts/{wide['id']}/pause")[0] == 404
    assert stack.call("school_a", "POST", f"/api/v1/rollouts/{own['id']}/pause")[0] == 200
    assert stack.call("district", "GET", f"/api/v1/rollouts/{own['id']}")[0] == 200
    for who in ("service", "reader_b"):
        status, got = stack.call(who, "POST", "/api/v1/rollouts", {"target": both,
                                                                    "config": {}})  # fmt: skip
        assert status == 403, got
        assert stack.call(who, "POST", f"/api/v1/rollouts/{own['id']}/abort")[0] == 403

    with psycopg.connect(stack.db_url, autocommit=True) as conn:
        alert_a, alert_b = _alert(conn, A, DEVICE[A]), _alert(conn, B, DEVICE[B])
    listed = stack.call("school_a", "GET", "/api/v1/alerts")[1]["items"]
    assert {a["school_id"] for a in listed} == {A}
    assert stack.call("school_a", "GET", f"/api/v1/alerts/{alert_b}")[0] == 404
    assert stack.call("school_a", "POST", f"/api/v1/alerts/{alert_b}/acknowledge")[0] == 404
    status, got = stack.call("school_a", "POST", f"/api/v1/alerts/{alert_a}/acknowledge")
    assert (status, got["state"], got["acknowledged_by"]) == (200, "acknowledged", "tech-a")
    assert stack.call("reader_b", "POST", f"/api/v1/alerts/{alert_b}/resolve")[0] == 403
    seen_b = stack.call("reader_b", "GET", "/api/v1/alerts")[1]["items"]
    assert {a["school_id"] for a in seen_b} == {B}
    assert stack.call("service", "GET", "/api/v1/releases")[0] == 200
