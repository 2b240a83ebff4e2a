"""The API at district size: 28,000 devices over 805 schools, the device listing walked by
keyset to the end (no 10,000 cap), per-school summaries in one call, both cut to a school
token's schools. (How fast: ``python -m bench district_api``, never timed here.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from ingest_server.web.api import auth
from simulators.api_seed import DISTRICT_TAPS as TAPS
from simulators.api_seed import api_server, get, make_tokens, seed_district
from simulators.harness import Postgres

pytestmark = pytest.mark.integration
SCHOOLS = 805
DEVICES = 28_000


class Api:
    def __init__(self, base: str, tokens: dict[str, str]) -> None:
        self.base, self.tokens = base, tokens

    def get(self, path: str, who: str = "read", **params: Any) -> tuple[int, dict[str, str], Any]:
        url = f"{self.base}{path}?{urlencode(params)}" if params else self.base + path
        status, headers, body = get(url, self.tokens[who], timeout=30)
        return (
            status,
            {k.lower(): v for k, v in headers.items()},
            json.loads(body) if body else None,
        )

    def walk(self, path: str, who: str = "read", **params: Any) -> tuple[list[Any], int]:
        """Every device, following ``X-Next-Cursor`` (bounded); and the number of pages."""
        items: list[Any] = []
        for pages in range(1, 1000):
            status, headers, body = self.get(path, who, **params)
            assert status == 200, body
            items += body
            cursor = headers.get("x-next-cursor")
            if cursor is None:
                assert "link" not in headers
                return items, pages
            assert headers["link"].endswith('>; rel="next"')
            params = {**params, "cursor": cursor}
        raise AssertionError("pagination did not end")


@pytest.fixture(scope="module")
def api(pg_server: Postgres) -> Iterator[Api]:
    name = f"t_district_{uuid.uuid4().hex[:8]}"
    db_url = pg_server.create_database(name)
    try:
        seed_district(db_url, SCHOOLS, DEVICES)
        tokens = make_tokens(db_url)
        with psycopg.connect(db_url, autocommit=True) as conn:
            tokens["school"] = auth.create_token(conn, "s001-reader", "reader", ["s001"])[1]
        with api_server(db_url) as http:
            yield Api(http.url, tokens)
    finally:
        pg_server.drop_database(name)


def test_device_listing_walks_past_ten_thousand(api: Api) -> None:
    devices, pages = api.walk("/api/v1/devices", limit=5000)
    ids = [d["device_id"] for d in devices]
    assert len(ids) == len(set(ids)) == DEVICES
    assert pages == 6
    keys = [(d["school_id"], d["device_id"]) for d in devices]
    assert keys == sorted(keys)
    # without a limit: the first 10,000 and the way on
    status, headers, first = api.get("/api/v1/devices")
    assert status == 200
    assert len(first) == 10_000
    assert "x-next-cursor" in headers


def test_device_listing_pages_filtered(api: Api) -> None:
    online, _ = api.walk("/api/v1/devices", limit=1000, state="online", kind="card_reader")
    assert len(online) == DEVICES // 3 + (DEVICES % 3 > 0)
    assert {d["kind"] for d in online} == {"card_reader"}
    assert {d["state"] for d in online} == {"online"}
    school, pages = api.walk("/api/v1/devices", limit=10, school="s001")
    assert len(school) == len([i for i in range(DEVICES) if i % SCHOOLS == 0])
    assert pages == 4


def test_device_listing_bad_cursor_and_limit_are_named(api: Api) -> None:
    status, _, body = api.get("/api/v1/devices", cursor="not-a-cursor")
    assert status == 422
    assert body["detail"][0]["loc"][-1] == "cursor"
    status, _, body = api.get("/api/v1/devices", limit=10_001)
    assert status == 422
    assert body["detail"][0]["loc"][-1] == "limit"


def test_school_token_pages_only_its_school(api: Api) -> None:
    devices, _ = api.walk("/api/v1/devices", "school", limit=7)
    assert devices
    assert {d["school_id"] for d in devices} == {"s001"}
    _, _, other = api.get("/api/v1/devices", "school", school="s002")
    assert other == []


def test_school_summary_in_one_call(api: Api) -> None:
    status, _, rows = api.get("/api/v1/schools/summary")
    assert status == 200
    assert len(rows) == SCHOOLS
    by = {r["school_id"]: r for r in rows}
    assert sum(r["devices"] for r in rows) == DEVICES
    assert all(r["online"] + r["offline"] == r["devices"] for r in rows)
    assert sum(r["online"] for r in rows) == DEVICES // 3 + 1
    assert by["s001"]["attendance_today"] == TAPS  # the env reading does not count
    assert by["s011"]["attendance_today"] == 0
    assert by["s001"]["open_alerts"] == 2  # open and acknowledged; s002's is resolved
    assert by["s002"]["open_alerts"] == 0


def test_school_summary_scoped_to_the_token(api: Api) -> None:
    status, _, rows = api.get("/api/v1/schools/summary", "school")
    assert status == 200
    assert [r["school_id"] for r in rows] == ["s001"]
    status, _, _ = get(api.base + "/api/v1/schools/summary", None)
    assert status == 401
