"""The API's queries on TimescaleDB (PGlite harness): hypertables, continuous aggregates.

The same seeded rows and hand-worked rollup numbers as test_api_data.py (real PostgreSQL). The
harness serves one connection at a time, so everything is seeded before the API starts and the
tests then talk to the API alone (its pool reuses one connection for sequential requests).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from simulators.api_seed import (
    DAY0,
    ROLLUP_ROWS,
    T0,
    _wire,
    api_server,
    get,
    get_json,
    make_tokens,
    seed,
)
from tests.timescale import TimescaleServer

pytestmark = pytest.mark.integration
EXPECTED_CR0101: list[int] = []


@pytest.fixture(scope="module")
def tsdb_api(timescale_server: TimescaleServer) -> Iterator[tuple[str, dict[str, str]]]:
    with psycopg.connect(timescale_server.url("fresh"), autocommit=True) as conn:
        conn.execute("SELECT 1")
    db_url = timescale_server.url()
    seeded = seed(db_url)
    global EXPECTED_CR0101  # noqa: PLW0603  # the module's one seeded database
    EXPECTED_CR0101 = sorted(
        e[4] for e in seeded.events if e[2] == "cr-0101" and T0 <= e[0] < T0 + timedelta(hours=1)
    )
    tokens = make_tokens(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        kinds = conn.execute(
            "SELECT count(*) FROM timescaledb_information.hypertables"
            " WHERE hypertable_name IN ('events', 'readings')"
        ).fetchone()
    assert kinds == (2,)  # really the TimescaleDB layout, not the plain-PostgreSQL one
    with api_server(db_url) as http:
        yield http.url, tokens


def call(api: tuple[str, dict[str, str]], path: str, **params: Any) -> tuple[int, Any]:
    base, tokens = api
    return get_json(f"{base}{path}?{urlencode(params)}", tokens["read"])


def test_devices_and_event_pages(tsdb_api: tuple[str, dict[str, str]]) -> None:
    status, devices = call(tsdb_api, "/api/v1/devices")
    assert status == 200
    assert {"cr-0101", "sb-0101", "cr-0201"} <= {d["device_id"] for d in devices}
    rng = {"from": T0.isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()}
    seqs: list[int] = []
    params: dict[str, Any] = {**rng, "device": "cr-0101", "limit": 3}
    for _ in range(10):
        status, page = call(tsdb_api, "/api/v1/events", **params)
        assert status == 200, page
        seqs += [e["seq"] for e in page["items"]]
        if not page["cursor"]:
            break
        params["cursor"] = page["cursor"]
    assert len(EXPECTED_CR0101) > 3  # several pages
    assert seqs == EXPECTED_CR0101


def test_export_streams_from_a_hypertable(tsdb_api: tuple[str, dict[str, str]]) -> None:
    base, tokens = tsdb_api
    rng = f"from={T0.isoformat()}&to={(T0 + timedelta(hours=1)).isoformat()}".replace("+", "%2B")
    status, _, body = get(f"{base}/api/v1/export/events.ndjson?{rng}&school=s002", tokens["read"])
    assert status == 200
    assert [json.loads(line)["seq"] for line in body.decode().splitlines()] == [1, 2, 3, 4]
    assert {json.loads(line)["replay"] for line in body.decode().splitlines()} == {False}
    status, _, body = get(
        f"{base}/api/v1/export/events.ndjson?{rng}&school=s002&replay=true", tokens["read"]
    )
    assert (status, body) == (200, b"")  # migration 0070's column on the hypertable, filtered


@pytest.mark.parametrize(
    ("path", "relation", "params"),
    [
        ("card-taps", "card_taps_daily", {"school": "s001"}),
        ("attendance", "attendance_daily", {"school": "s001"}),
        ("board-power", "board_power_daily", {}),
        ("device-online", "device_online_daily", {}),
        ("library", "library_daily", {"school": "s001"}),
    ],
)
def test_rollups_match_the_hand_worked_numbers(
    tsdb_api: tuple[str, dict[str, str]], path: str, relation: str, params: dict[str, Any]
) -> None:
    days = {"from": DAY0.isoformat(), "to": (DAY0 + timedelta(days=6)).isoformat()}
    status, body = call(tsdb_api, f"/api/v1/rollups/{path}", **{**days, **params})
    assert status == 200, body
    expected = [r for r in ROLLUP_ROWS[relation] if params.get("school", r[1]) == r[1]]
    assert expected
    assert [tuple(i.values()) for i in body["items"]] == [
        tuple(_wire(v) for v in r) for r in expected
    ]
