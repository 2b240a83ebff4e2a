"""The data API on a real PostgreSQL with known rows: devices, events, readings, export,
rollups, quarantine; pagination under concurrent inserts; errors naming the parameter."""

from __future__ import annotations

import csv
import io
import json
import typing
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from importlib import metadata
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import psycopg
import psycopg.sql
import pydantic_core
import pytest
from psycopg.rows import dict_row
from pydantic import BaseModel, TypeAdapter

from ingest_server.web.api import common, data, rollups, sqljson
from ingest_server.web.api import devices as devices_api
from ingest_server.web.app import HttpServer
from simulators.api_seed import (
    DAY0,
    ROLLUP_ROWS,
    T0,
    TRICKY,
    Seeded,
    _wire,
    api_server,
    get,
    get_json,
    seeded_api,
)
from simulators.harness import Postgres

pytestmark = pytest.mark.integration

RANGE = {"from": (T0 - timedelta(hours=1)).isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()}


class Api:
    def __init__(self, http: HttpServer, tokens: dict[str, str], seeded: Seeded, db_url: str):
        self.base = http.url
        self.tokens = tokens
        self.seeded = seeded
        self.db_url = db_url

    def url(self, path: str, **params: Any) -> str:
        return f"{self.base}{path}?{urlencode(params, doseq=True)}" if params else self.base + path

    def get(self, path: str, scope: str = "read", **params: Any) -> tuple[int, Any]:
        return get_json(self.url(path, **params), self.tokens[scope])


@pytest.fixture(scope="module")
def api(pg_server: Postgres) -> Iterator[Api]:
    """One seeded database and server for the module: tests that insert use their own range."""
    with seeded_api(pg_server, "t_api") as seeded:
        yield Api(seeded.http, seeded.tokens, seeded.seeded, seeded.db_url)


def walk(api: Api, path: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paged listing, following ``next`` (bounded)."""
    status, page = api.get(path, **params)
    assert status == 200, page
    items = list(page["items"])
    for _ in range(1000):
        if page["next"] is None:
            return items
        status, _, body = get(page["next"], api.tokens["read"])
        assert status == 200, body
        page = json.loads(body)
        items += page["items"]
    raise AssertionError("pagination did not end")


def test_every_data_endpoint_needs_a_token(api: Api) -> None:
    status, spec = get_json(api.base + "/openapi.json", None)
    assert status == 200
    # /api/v1/enrol is the one open call: the enrolment code in its body authenticates it
    paths = [
        p
        for p, ops in spec["paths"].items()
        if p.startswith("/api/v1/") and "{" not in p and "get" in ops
    ]
    assert len(paths) >= 14
    for path in paths:
        assert get(api.base + path, None)[0] == 401, path


def test_devices_list_and_filters(api: Api) -> None:
    status, devices = api.get("/api/v1/devices")
    assert status == 200
    assert [d["device_id"] for d in devices] == ["cr-0101", "env-0101", "sb-0101", "cr-0201"]
    _, s1 = api.get("/api/v1/devices", school="s001", room="101")
    assert {d["device_id"] for d in s1} == {"cr-0101", "sb-0101"}
    _, readers = api.get("/api/v1/devices", kind="card_reader")
    assert {d["device_id"] for d in readers} == {"cr-0101", "cr-0201"}
    _, offline = api.get("/api/v1/devices", state="offline")
    assert {d["device_id"] for d in offline} == {"sb-0101", "env-0101"}  # never online counts
    status, body = api.get("/api/v1/devices", kind="toaster")
    assert status == 422
    assert body["detail"][0]["loc"] == ["query", "kind"]


def test_devices_list_carries_each_agents_latest_health(api: Api) -> None:
    """The fleet view's one call: every device with what its detail says of its health."""
    status, devices = api.get("/api/v1/devices")
    assert status == 200
    listed = {d["device_id"]: d for d in devices}
    health = listed["sb-0101"]["health"]
    assert health == {
        "time": _wire(T0 + timedelta(minutes=5)),
        "outbox_depth": 17,
        "oldest_unsent_s": 2.5,
        "drivers": {"panel": "running", "camera": "error"},
    }
    assert listed["cr-0101"]["health"] is None
    for device_id, d in listed.items():
        _, detail = api.get(f"/api/v1/devices/{device_id}")
        assert {k: detail[k] for k in d} == d, device_id  # the list is the detail's subset
    _, offline = api.get("/api/v1/devices", state="offline", room="101")
    assert [(d["device_id"], d["health"]["outbox_depth"]) for d in offline] == [("sb-0101", 17)]


def test_devices_list_bytes_are_the_models(api: Api) -> None:
    """The listing is encoded without a validation pass, yet its bytes are those the model
    gave (nulls, health with floats and drivers, none) and a full page keeps its headers."""
    devices = TypeAdapter(list[devices_api.Device])
    status, headers, body = get(api.url("/api/v1/devices", limit=3), api.tokens["read"])
    assert status == 200
    assert body == devices.dump_json(devices.validate_json(body))
    listed = json.loads(body)
    assert [d["device_id"] for d in listed] == ["cr-0101", "env-0101", "sb-0101"]
    assert list(listed[2]) == list(devices_api.Device.model_fields)
    assert listed[2]["health"]["drivers"] == {"panel": "running", "camera": "error"}
    nxt = {k.lower(): v for k, v in headers.items()}
    assert nxt["link"].startswith("<http")
    assert nxt["x-next-cursor"] in nxt["link"]
    status, _, body = get(nxt["link"][1:].split(">", 1)[0], api.tokens["read"])
    assert [d["device_id"] for d in json.loads(body)] == ["cr-0201"]


def test_devices_list_is_one_query_on_the_device_seq_index(api: Api) -> None:
    """Each device's latest health comes from a backward scan of a (device_id, seq) index —
    the agent.health partial index or the unique one — of the partitions in its window (no
    sort of its events, no scan of the others)."""
    query = devices_api._query(psycopg.sql.SQL("true"), devices_api.MAX_DEVICES)
    with psycopg.connect(api.db_url, autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")  # the seeded table is tiny
        plan = "\n".join(r[0] for r in conn.execute(psycopg.sql.SQL("EXPLAIN ") + query))
    assert "Nested Loop Left Join" in plan, plan
    scans = [line for line in plan.splitlines() if "Index Scan Backward using events_" in line]
    assert scans, plan
    assert all("device_id_seq" in line for line in scans), plan
    lines = [line.strip() for line in plan.splitlines()]
    sorts = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line.startswith("->  Sort ")]
    assert all(key.startswith("Sort Key: d.") for key in sorts), plan  # only the devices sorted


def test_devices_page_looks_up_health_for_its_rows_only(api: Api) -> None:
    """A page of one device out of the four runs the health lookup once, not once per device
    in the registry (at district size: 1,000 lookups for a page, not 28,000)."""
    query = devices_api._query(psycopg.sql.SQL("true"), 1)
    with psycopg.connect(api.db_url, autocommit=True) as conn, conn.transaction():
        # without the registry's index (a page ordered by sorting, as before migration 0075):
        # the page must still be cut before the lookups
        conn.execute("SET LOCAL enable_indexscan = off")
        conn.execute("SET LOCAL enable_bitmapscan = off")
        explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) ") + query
        plan = "\n".join(r[0] for r in conn.execute(explain))
    lookups = [line for line in plan.splitlines() if "on events" in line and "loops=" in line]
    assert lookups, plan
    assert all(line.rstrip().endswith("loops=1)") for line in lookups), plan


def test_device_detail(api: Api) -> None:
    status, d = api.get("/api/v1/devices/sb-0101")
    assert status == 200
    assert d["missing"] == 1  # seq 3 never arrived
    assert d["event_count"] == 4
    assert d["state"] == "offline"
    assert d["state_since"].startswith("2026-11-20T08:06:00")
    assert (d["room"], d["class_id"], d["grade"], d["agent_version"]) == (
        "101",
        "c7a",
        "7",
        "1.4.0",
    )
    assert d["health"]["outbox_depth"] == 17
    assert d["health"]["oldest_unsent_s"] == 2.5
    assert d["health"]["drivers"] == {"panel": "running", "camera": "error"}
    _, reader = api.get("/api/v1/devices/cr-0101")
    assert reader["health"] is None
    status, body = api.get("/api/v1/devices/nope-1")
    assert status == 404
    assert "nope-1" in body["detail"]


def test_events_filters_and_order(api: Api) -> None:
    items = walk(api, "/api/v1/events", **RANGE)
    assert len(items) == len(api.seeded.events)
    keys = [(i["time"], i["device_id"], i["seq"]) for i in items]
    assert keys == sorted(keys)
    _, page = api.get("/api/v1/events", school="s002", **RANGE)
    assert {i["device_id"] for i in page["items"]} == {"cr-0201"}
    _, page = api.get("/api/v1/events", device="sb-0101", type="board.power", **RANGE)
    assert [i["seq"] for i in page["items"]] == [1, 2, 4]
    _, page = api.get("/api/v1/events", device="cr-0101", limit=1, **RANGE)
    assert page["items"][0]["data"] == {**TRICKY, "n": 0}
    # the default range is the last 24 h: the seeded rows are older
    _, page = api.get("/api/v1/events")
    assert page["items"] == []


def _insert(db_url: str, school: str, device: str, start: datetime, seqs: range) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
            " SELECT %s::timestamptz + g * interval '1 ms', %s, %s, 'card_reader', g,"
            " 'card.tap', jsonb_build_object('n', g) FROM unnest(%s::bigint[]) g",
            (start, school, device, list(seqs)),
        )


def test_events_pagination_is_stable_under_inserts(api: Api) -> None:
    t1 = T0 + timedelta(days=10)  # a range of its own: the module's other tests share the db
    own = {"from": t1.isoformat(), "to": (t1 + timedelta(hours=1)).isoformat()}
    _insert(api.db_url, "s008", "pg-0001", t1, range(100, 120))
    status, page = api.get("/api/v1/events", limit=5, **own)
    assert status == 200
    seen = list(page["items"])
    assert page["next"] is not None
    cut = seen[-1]["time"]
    # rows before the cursor (must not shift the pages) and after it (must appear)
    _insert(api.db_url, "s008", "pg-0001", t1 - timedelta(microseconds=1000), range(1, 3))
    _insert(api.db_url, "s008", "pg-0001", t1, range(200, 203))
    for _ in range(100):
        if page["next"] is None:
            break
        page = json.loads(get(page["next"], api.tokens["read"])[2])
        seen += page["items"]
    keys = [(i["device_id"], i["seq"]) for i in seen]
    assert len(keys) == len(set(keys))  # nothing twice
    expected = {("pg-0001", q) for q in [*range(100, 120), *range(200, 203)]}
    assert set(keys) == expected  # nothing skipped; the late row before the cursor not mixed in
    assert all(i["time"] >= cut for i in seen[5:])


def test_readings_paged(api: Api) -> None:
    items = walk(api, "/api/v1/readings", limit=3, **RANGE)
    assert len(items) == len(api.seeded.readings)
    _, page = api.get("/api/v1/readings", metric="co2_ppm", **RANGE)
    assert [i["value"] for i in page["items"]] == [600.0, 601.0, 602.0, 603.0, 604.0]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"from": "2026-11-21T00:00:00Z", "to": "2026-11-20T00:00:00Z"}, "from"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-11-20T08:00:00"}, "to"),  # no offset
        ({"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "from"),  # too wide
        ({"limit": 5000}, "limit"),
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor"),
        ({"device": "Robert'); DROP TABLE events;--"}, "device"),
    ],
)
def test_bad_parameters_are_named(api: Api, params: dict[str, Any], name: str) -> None:
    status, body = api.get("/api/v1/events", **params)
    assert status == 422, body
    assert body["detail"][0]["loc"] == ["query", name]
    assert body["detail"][0]["msg"]


def test_a_cursor_of_another_listing_is_refused(api: Api) -> None:
    _, page = api.get("/api/v1/readings", limit=1, **RANGE)
    status, body = api.get("/api/v1/events", cursor=page["cursor"], **RANGE)
    assert status == 422
    assert "cursor" in body["detail"][0]["loc"]


def test_export_csv_and_ndjson(api: Api) -> None:
    status, headers, body = get(api.url("/api/v1/export/events.csv", **RANGE), api.tokens["read"])
    assert status == 200
    assert headers["content-type"].startswith("text/csv")
    assert headers["content-disposition"] == (
        'attachment; filename="events-20261120T070000Z-20261120T090000Z.csv"'
    )
    header = body.decode().split("\n", 1)[0]
    assert header == (
        "time,school_id,device_id,device_kind,seq,type,data,received_at,synced,replay"
    )  # replay appended last: the earlier columns keep their positions
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == len(api.seeded.events)
    assert {r["replay"] for r in rows} == {"false"}
    first = next(r for r in rows if r["device_id"] == "cr-0101")
    assert json.loads(first["data"]) == {**TRICKY, "n": 0}  # quoted comma, quote, newline
    assert first["seq"] == "1"
    assert first["time"] == T0.isoformat()

    status, headers, body = get(
        api.url("/api/v1/export/events.ndjson", device="sb-0101", **RANGE), api.tokens["read"]
    )
    assert status == 200
    assert headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [x["seq"] for x in lines] == [1, 2, 4, 5, 6, 7]
    assert lines[3]["data"]["drivers"]["panel"] == "running"

    status, _, body = get(
        api.url("/api/v1/export/readings.csv", metric="temperature_c", **RANGE),
        api.tokens["read"],
    )
    assert status == 200
    got = list(csv.reader(io.StringIO(body.decode())))
    assert got[0] == ["time", "school_id", "device_id", "metric", "value"]
    assert [float(r[4]) for r in got[1:]] == [21.0, 22.0, 23.0, 24.0, 25.0]
    assert get(api.url("/api/v1/export/events.xml"), api.tokens["read"])[0] == 422


def test_replay_is_listed_filtered_and_exported(api: Api) -> None:
    """Backlog rows (replay true) and live ones in one range: the listing shows the flag and
    ``?replay=`` picks either; the exports carry it as the last CSV column / an NDJSON field
    and take the same filter."""
    t3 = T0 + timedelta(days=30)
    own = {"from": t3.isoformat(), "to": (t3 + timedelta(hours=1)).isoformat()}
    _insert(api.db_url, "s010", "cr-1001", t3, range(1, 6))
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        conn.execute("UPDATE events SET replay = true WHERE device_id = 'cr-1001' AND seq <= 2")
    items = walk(api, "/api/v1/events", **own)
    assert [(i["seq"], i["replay"]) for i in items] == [
        (1, True), (2, True), (3, False), (4, False), (5, False)
    ]  # fmt: skip
    assert [i["seq"] for i in walk(api, "/api/v1/events", replay="true", **own)] == [1, 2]
    assert [i["seq"] for i in walk(api, "/api/v1/events", replay="false", **own)] == [3, 4, 5]
    status, body = api.get("/api/v1/events", replay="maybe", **own)
    assert status == 422
    assert body["detail"][0]["loc"] == ["query", "replay"]

    status, _, raw = get(api.url("/api/v1/export/events.csv", **own), api.tokens["read"])
    assert status == 200
    got = list(csv.reader(io.StringIO(raw.decode())))
    assert got[0][-1] == "replay"
    assert [(r[4], r[-1]) for r in got[1:]] == [
        ("1", "true"), ("2", "true"), ("3", "false"), ("4", "false"), ("5", "false")
    ]  # fmt: skip
    status, _, raw = get(
        api.url("/api/v1/export/events.ndjson", replay="true", **own), api.tokens["read"]
    )
    assert status == 200
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert [(x["seq"], x["replay"]) for x in lines] == [(1, True), (2, True)]
    status, _, raw = get(
        api.url("/api/v1/export/events.csv", replay="false", **own), api.tokens["read"]
    )
    assert [r[4] for r in list(csv.reader(io.StringIO(raw.decode())))[1:]] == ["3", "4", "5"]


def test_export_larger_than_one_chunk(api: Api) -> None:
    n = 12_000  # more than two chunks of the server-side cursor
    t2 = T0 + timedelta(days=20)
    _insert(api.db_url, "s009", "bulk-1", t2, range(1, n + 1))
    own = {"from": t2.isoformat(), "to": (t2 + timedelta(hours=1)).isoformat()}
    status, _, body = get(
        api.url("/api/v1/export/events.ndjson", school="s009", **own), api.tokens["read"], 30
    )
    assert status == 200
    seqs = [json.loads(line)["seq"] for line in body.decode().splitlines()]
    assert seqs == list(range(1, n + 1))


@pytest.mark.parametrize(
    ("path", "relation", "params"),
    [
        ("card-taps", "card_taps_daily", {"school": "s001"}),
        ("attendance", "attendance_daily", {"school": "s001"}),
        ("board-power", "board_power_daily", {}),
        # the last source stays selected until the next event: its later days grow with the clock
        ("board-input", "board_input_daily", {"device": "sb-0101", "to": DAY0.isoformat()}),
        ("env", "env_5min", RANGE),
        ("device-online", "device_online_daily", {}),
        ("library", "library_daily", {"school": "s001"}),
    ],
)
def test_rollups(api: Api, path: str, relation: str, params: dict[str, Any]) -> None:
    """Each endpoint answers the real rollup's rows, which match the hand-worked numbers."""
    days = {"from": DAY0.isoformat(), "to": (DAY0 + timedelta(days=6)).isoformat()}
    query = params if path == "env" else {**days, **params}
    status, _, raw = get(api.url(f"/api/v1/rollups/{path}", **query), api.tokens["read"])
    assert status == 200, raw
    body = json.loads(raw)
    assert body["truncated"] is False
    # rendered by PostgreSQL, yet the JSON value the model gives: its fields, values, types
    spec = next(s for s in rollups.ROLLUPS if s.relation == relation)
    model = rollups.Rollup[spec.model]  # type: ignore[name-defined]
    assert _strict(body) == _strict(json.loads(common.reply(model, body).body))
    expected = [
        r
        for r in ROLLUP_ROWS[relation]
        if params.get("school", r[1]) == r[1] and params.get("device", r[2]) == r[2]
    ]
    assert expected
    got = [tuple(item.values()) for item in body["items"]]
    assert got == [tuple(_wire(v) for v in r) for r in expected]


@pytest.mark.parametrize("cap", [1, 2, 3])
def test_rollups_rendered_by_postgresql_truncate_like_the_others(
    api: Api, cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """card-taps (rendered by PostgreSQL, as every rollup) cut at the cap, ``truncated`` set
    only past it, the JSON value the model gives; an empty range is an empty list."""
    assert all(sqljson.renders(spec.model) for spec in rollups.ROLLUPS)
    monkeypatch.setattr(rollups, "MAX_ROWS", cap)  # the server runs in this process
    days = {"from": DAY0.isoformat(), "to": (DAY0 + timedelta(days=6)).isoformat()}
    status, _, raw = get(api.url("/api/v1/rollups/card-taps", **days), api.tokens["read"])
    assert status == 200
    body = json.loads(raw)
    assert [i["device_id"] for i in body["items"]] == ["cr-0101", "cr-0201"][:cap]
    assert body["truncated"] is (cap < 2)
    model = rollups.Rollup[rollups.CardTaps]
    assert _strict(body) == _strict(json.loads(common.reply(model, body).body))
    _, _, raw = get(
        api.url("/api/v1/rollups/card-taps", **{"from": "2027-01-01", "to": "2027-01-02"}),
        api.tokens["read"],
    )
    assert raw == b'{"items":[],"truncated":false}'


def test_rollup_filters(api: Api) -> None:
    _, body = api.get(
        "/api/v1/rollups/card-taps", **{"from": DAY0.isoformat(), "to": DAY0.isoformat()}
    )
    assert {(i["device_id"], i["taps"]) for i in body["items"]} == {("cr-0101", 10), ("cr-0201", 4)}
    _, body = api.get(
        "/api/v1/rollups/card-taps",
        **{"from": (DAY0 + timedelta(days=1)).isoformat(), "to": "2026-11-22"},
    )
    assert body["items"] == []  # nothing happened the next local days
    _, body = api.get("/api/v1/rollups/attendance", **{"from": DAY0.isoformat(), "class": "c7a"})
    assert [(i["checkins"], i["on_time"], i["late"]) for i in body["items"]] == [(5, 3, 1)]
    _, body = api.get("/api/v1/rollups/library-top-items", school="s001", limit=1)
    assert body == {
        "items": [
            {"school_id": "s001", "item_id": "isbn-978", "loans": 2,
             "last_loan": _wire(T0 + timedelta(minutes=22))}
        ],
        "truncated": True,
    }  # fmt: skip
    status, body = api.get(
        "/api/v1/rollups/card-taps", **{"from": "2026-12-01", "to": "2026-11-01"}
    )
    assert status == 422
    assert body["detail"][0]["loc"] == ["query", "from"]


@pytest.mark.parametrize(
    ("now", "days"),
    [
        # 01:00 on DAY0 in Beijing, still the day before in UTC: today is DAY0
        (datetime(2026, 11, 19, 17, 0, tzinfo=UTC), [DAY0.isoformat()]),
        # 07:59 in Beijing 31 days on: the default 30 days back no longer reach DAY0
        (datetime(2026, 12, 20, 23, 59, tzinfo=UTC), []),
        # 23:59 in Beijing, the UTC date the same: DAY0 is the default range's first day
        (datetime(2026, 12, 20, 15, 59, tzinfo=UTC), [DAY0.isoformat()]),
    ],
)
def test_rollup_days_default_to_the_district_day(api: Api, now: datetime, days: list[str]) -> None:
    """Without ``from``/``to`` a rollup covers the 30 days up to today in the district
    (Asia/Shanghai), whatever the UTC date is at the time."""
    with api_server(api.db_url, now=lambda: now) as http:
        for path in ("card-taps", "attendance", "device-online"):
            status, body = get_json(f"{http.url}/api/v1/rollups/{path}", api.tokens["read"])
            assert status == 200, body
            assert sorted({i["day"] for i in body["items"]}) == days, (path, now)


def test_quarantine_is_admin_only(api: Api) -> None:
    status, body = api.get("/api/v1/quarantine", "read", **RANGE)
    assert status == 403
    assert "admin" in body["detail"]
    status, page = api.get("/api/v1/quarantine", "admin", limit=3, **RANGE)
    assert status == 200
    assert [i["reason"] for i in page["items"]] == [
        "missing field device_id",
        "not JSON: invalid UTF-8",
        "unsupported version 9",
    ]  # newest first
    binary = page["items"][1]
    assert binary["payload_bytes"] == len(b"\xff\xfe binary")
    assert binary["payload_text"] == "\\377\\376 binary"
    status, _, raw = get(page["next"], api.tokens["admin"])
    assert [i["payload_text"] for i in json.loads(raw)["items"]] == ["{not json"]

    _, page = api.get("/api/v1/quarantine", "admin", reason="not JSON", **RANGE)
    assert len(page["items"]) == 2
    assert page["next"] is None
    status, counts = api.get("/api/v1/quarantine/reasons", "admin", **RANGE)
    assert status == 200
    assert sum(c["count"] for c in counts) == 4
    assert {c["reason"] for c in counts} >= {"unsupported version 9"}


def test_timestamps_are_utc_iso(api: Api) -> None:
    _, page = api.get("/api/v1/events", device="cr-0201", limit=1, **RANGE)
    when = datetime.fromisoformat(page["items"][0]["time"])
    assert when == T0.astimezone(UTC)


def test_meta_gives_district_today_and_scopes(api: Api) -> None:
    """Today is the district's local day (that of the rollups); scopes are the caller's."""
    local = "SELECT (now() AT TIME ZONE district_tz)::date FROM storage_config"
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        for tz in ("Asia/Shanghai", "America/Los_Angeles"):
            conn.execute("UPDATE storage_config SET district_tz = %s", (tz,))
            before = conn.execute(local).fetchone()
            status, meta = api.get("/api/v1/meta")
            after = conn.execute(local).fetchone()
            assert status == 200, meta
            assert before is not None
            assert after is not None
            assert meta["timezone"] == tz
            assert meta["today"] in {before[0].isoformat(), after[0].isoformat()}
            start = datetime.fromisoformat(meta["today_start"]).astimezone(ZoneInfo(tz))
            assert (start.date().isoformat(), start.time()) == (meta["today"], time(0, 0))
        conn.execute("UPDATE storage_config SET district_tz = 'Asia/Shanghai'")
    assert (meta["scopes"], meta["token_name"]) == (["read"], "test-read")
    assert meta["server_version"] == metadata.version("campus-edge")
    status, admin = api.get("/api/v1/meta", "admin")
    assert (status, admin["scopes"]) == (200, ["admin"])
    status, body = get_json(api.url("/api/v1/meta"), None)
    assert status == 401
    assert "token" in body["detail"]


# Awkward stored values: unicode (and the line separators JSON allows raw), nested JSON,
# nulls, numbers JSON spells several ways, microsecond and whole-second times, replay both ways.
_AWKWARD: list[tuple[int, bool, str]] = [
    (0, False, '{"name": "\u674e\u96f7 \U0001f600 \u2028", "q": "a\\"b\\\\c\\u0001/"}'),
    (1, True, '{"nested": {"list": [1, 2.5, null, {"x": []}], "empty": {}}, "n": null}'),
    (2, False, '{"f": 1.10, "e": 1e-7, "big": 12345678901234567890, "neg": -0.0, "t": true}'),
    (3, True, "{}"),
]


def _awkward_rows(db_url: str, start: datetime) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        for seq, replay, data in _AWKWARD:
            conn.execute(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data,"
                " replay) VALUES (%s, 's007', 'aw-0001', 'card_reader', %s, 'odd.thing',"
                " %s::jsonb, %s)",
                (start + timedelta(seconds=seq, microseconds=seq * 250_001), seq, data, replay),
            )
        for i, value in enumerate([float("nan"), float("inf"), -1.5, 0.1, 1e300, 42.0]):
            conn.execute(
                "INSERT INTO readings (time, school_id, device_id, metric, value)"
                " VALUES (%s, 's007', 'aw-0001', 'odd_metric', %s)",
                (start + timedelta(milliseconds=i * 1500), value),
            )


def _strict(value: Any) -> Any:
    """``value`` (parsed JSON) with each scalar paired with its type, so an equality check
    also tells ``1`` from ``1.0`` and ``True`` from ``1``."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return (type(value).__name__, value)


def test_fast_pages_are_the_models_json(api: Api) -> None:
    """The events page (rendered by PostgreSQL) and the readings page (pydantic-core encoding
    the rows unchecked) are the JSON value the models give (validated, then dumped): the same
    fields, values and types, page and cursor included, over awkward stored rows."""
    t4 = T0 + timedelta(days=40)
    _awkward_rows(api.db_url, t4)
    own = {"from": t4.isoformat(), "to": (t4 + timedelta(hours=1)).isoformat(), "school": "s007"}
    cases: list[tuple[str, type[BaseModel], str, str, tuple[str, str, str]]] = [
        ("/api/v1/events", data.EventPage, data.EVENT_COLUMNS, "events",
         ("time", "device_id", "seq")),
        ("/api/v1/readings", data.ReadingPage, data.READING_COLUMNS, "readings",
         ("time", "device_id", "metric")),
    ]  # fmt: skip
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        for path, model, columns, table, key in cases:
            order = ", ".join(key)

            def s007(tail: str, columns: str = columns, table: str = table) -> list[dict[str, Any]]:
                """The rows of school s007, as psycopg gives them."""
                sql = f"SELECT {columns} FROM {table} WHERE school_id = 's007' {tail}"  # noqa: S608
                return conn.cursor(row_factory=dict_row).execute(sql).fetchall()  # type: ignore[arg-type]

            status, _, body = get(api.url(path, limit=3, **own), api.tokens["read"])
            assert status == 200, body
            page = json.loads(body)
            rows = s007(f"ORDER BY {order} LIMIT 3")
            assert len(rows) == 3
            # the cursor is the third row's key, and `next` this URL with it
            cursor = common.encode_cursor(table, tuple(rows[-1][k] for k in key))
            assert page["cursor"] == cursor, path
            assert page["next"] == api.url(path, limit=3, **own, cursor=cursor), path
            ref = {"items": rows, "next": page["next"], "cursor": cursor}
            assert _strict(page) == _strict(json.loads(common.reply(model, ref).body)), path
            # and the next page too (the last rows: NaN and infinity as null, the nested JSON)
            status, _, body = get(page["next"], api.tokens["read"])
            assert status == 200, body
            rest = s007(f"ORDER BY {order} OFFSET 3")
            assert rest
            ref = {"items": rest, "next": None, "cursor": None}
            assert _strict(json.loads(body)) == _strict(json.loads(common.reply(model, ref).body))
    # the device's own spelling of a number comes back (jsonb keeps 1.10's digits)
    status, _, body = get(api.url("/api/v1/events", limit=3, **own), api.tokens["read"])
    assert b'"f": 1.10' in body


@pytest.mark.parametrize("zone", ["UTC", "Asia/Shanghai", "America/St_Johns", "Asia/Kolkata"])
def test_event_times_rendered_in_sql_are_pydantics(api: Api, zone: str) -> None:
    """``sqljson.iso_time`` writes a time as pydantic writes it in UTC (the API's sessions' zone),
    whatever the session's zone (whole and half-hour offsets, DST), with and without
    microseconds."""
    times = [
        datetime(2026, 11, 20, 8, 0, tzinfo=UTC),
        datetime(2026, 7, 1, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        datetime(8999, 12, 31, 12, 30, 5, 120_000, tzinfo=UTC),
    ]
    query = psycopg.sql.SQL("SELECT t.time, {} FROM unnest(%s::timestamptz[]) AS t(time)").format(
        sqljson.iso_time(psycopg.sql.SQL("t.time"))
    )
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("SET TimeZone = {}").format(psycopg.sql.Literal(zone)))
        for typed, text in conn.execute(query, (times,)).fetchall():
            utc = typed.astimezone(UTC)
            assert json.dumps(text) == pydantic_core.to_json(utc).decode(), (zone, typed)


@pytest.mark.parametrize(
    ("pg_type", "annotation", "values"),
    [
        ("float8", float | None,
         [float("nan"), float("inf"), float("-inf"), -0.0, 1e300, 0.1, 3.0, 1e-7, -2.5e-300,
          123456789012345.0, 1e16, None]),
        ("text", str | None,
         ["", "\u674e\u96f7 \U0001f600 \u2028\u2029", 'a"b\\c\x01\x1f\n\t/', "</script>", None]),
        ("bigint", int | None, [0, -1, 2**63 - 1, -(2**63), None]),
        ("boolean", bool | None, [True, False, None]),
        ("date", date | None, [date(1970, 1, 1), date(2026, 2, 28), date(8999, 12, 31), None]),
    ],
)  # fmt: skip
def test_values_rendered_in_sql_are_pydantics(
    api: Api, pg_type: str, annotation: Any, values: list[Any]
) -> None:
    """``sqljson.value_sql`` writes each value as the JSON value pydantic gives for the value
    psycopg reads (``inf_nan_mode="null"``): the same value and type once parsed."""
    query = psycopg.sql.SQL("SELECT v, {} FROM unnest(%s::{}[]) AS t(v)").format(
        sqljson.value_sql(psycopg.sql.SQL("v"), annotation), psycopg.sql.SQL(pg_type)
    )
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        rows = conn.execute(query, (values,)).fetchall()
    assert len(rows) == len(values)
    for typed, text in rows:
        want = json.loads(pydantic_core.to_json(typed, inf_nan_mode="null"))
        assert _strict(json.loads(text)) == _strict(want), (pg_type, typed, text)
    # the same values under the required annotation (no coalesce): the same text
    required = next(a for a in typing.get_args(annotation) if a is not type(None))
    query = psycopg.sql.SQL("SELECT {} FROM unnest(%s::{}[]) AS t(v)").format(
        sqljson.value_sql(psycopg.sql.SQL("v"), required), psycopg.sql.SQL(pg_type)
    )
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        texts = [t for (t,) in conn.execute(query, (values,)).fetchall()]
    assert texts == [text if typed is not None else None for typed, text in rows]


def test_answers_are_in_utc_whatever_the_servers_zone(api: Api) -> None:
    """A database whose sessions default to Asia/Shanghai: the API's sessions still run in UTC,
    so the times PostgreSQL renders and the ones pydantic writes both end in ``Z``."""
    shanghai = psycopg.conninfo.make_conninfo(api.db_url, options="-c TimeZone=Asia/Shanghai")
    with psycopg.connect(shanghai) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Shanghai",)
    with api_server(shanghai) as server:
        token = api.tokens["read"]
        _, _, raw = get(f"{server.url}/api/v1/events?{urlencode(RANGE)}&limit=5", token)
        items = json.loads(raw)["items"]
        assert items, "the seeded range has events"
        assert all(i["time"].endswith("Z") and i["received_at"].endswith("Z") for i in items)
        assert {i["time"] for i in items} <= {_wire(e[0]) for e in api.seeded.events}
        _, _, raw = get(f"{server.url}/api/v1/meta", token)
        assert json.loads(raw)["today_start"].endswith("Z")


class _Pair(BaseModel):
    name: str
    note: str | None


def test_a_row_with_null_in_a_required_field_is_refused_not_left_out(api: Api) -> None:
    """A NULL optional field is ``null``; a NULL required one makes the row NULL, and
    ``sqljson.lines`` refuses the answer (as the model would) instead of dropping the row."""
    line = sqljson.object_sql(_Pair)
    query = psycopg.sql.SQL("SELECT {} FROM (VALUES ('a', NULL), (%s, 'n')) AS t(name, note)")
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        cur = conn.execute(query.format(line), ["b"], binary=True)
        items, n = sqljson.lines(cur, 10)
        assert (json.loads(sqljson.wrapped(b"[", items, b"]")), n) == (
            [{"name": "a", "note": None}, {"name": "b", "note": "n"}],
            2,
        )
        cur = conn.execute(query.format(line), [None], binary=True)
        with pytest.raises(sqljson.RenderError, match="row 1 of the answer has NULL"):
            sqljson.lines(cur, 10)
