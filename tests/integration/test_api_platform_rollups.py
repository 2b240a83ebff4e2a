"""Campus-card payments and morning health checks in their daily rollups, against numbers
worked by hand, on plain PostgreSQL and on TimescaleDB (the PGlite harness); the health rollup
never shows a class of fewer than MIN_HEALTH_GROUP students, and a school's token sees its own.

Days are district-local (Asia/Shanghai): T0 is 16:00 there on DAY0, T0 + 9 h is 01:00 on the
next day.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from ingest_server.storage.migrate import migrate
from ingest_server.web.api import auth
from ingest_server.web.api.rollups import MIN_HEALTH_GROUP
from simulators.api_seed import DAY0, T0, api_server, get_json

pytestmark = pytest.mark.integration
DAY1 = DAY0 + timedelta(days=1)


def student(i: int) -> str:
    return f"{i:064x}"


def purchase(card: int, fen: int, merchant: str) -> dict[str, Any]:
    return {"card_hash": student(card), "amount_fen": fen, "terminal": f"pos-{merchant}",
            "merchant": merchant, "balance_after_fen": 10_000 - fen}  # fmt: skip


def check(i: int, class_id: str, temp: float | None, *symptoms: str) -> dict[str, Any]:
    return {"student_hash": student(i), "class_id": class_id, "temperature_c": temp,
            "symptoms": list(symptoms), "station": "gate"}  # fmt: skip


# (minutes after T0, school, type, data)
EVENTS: list[tuple[int, str, str, dict[str, Any]]] = [
    (0, "s001", "card.purchase", purchase(1, 1250, "canteen-1/w1")),
    (1, "s001", "card.purchase", purchase(2, 800, "canteen-1/w1")),
    (2, "s001", "card.purchase", purchase(1, 1500, "canteen-1/w1")),
    (3, "s001", "card.purchase", purchase(3, 399, "shop")),
    (9 * 60, "s001", "card.purchase", purchase(4, 600, "canteen-1/w1")),  # the next local day
    (4, "s002", "card.purchase", purchase(5, 700, "canteen-2/w1")),
    # class g7c2: 6 students, 7 checks (student 11 again at noon), fevers 37.5 and 38.1
    (0, "s001", "health.check", check(11, "g7c2", 36.5)),
    (1, "s001", "health.check", check(12, "g7c2", 36.8)),
    (2, "s001", "health.check", check(13, "g7c2", 37.5)),
    (3, "s001", "health.check", check(14, "g7c2", 36.6, "cough")),
    (4, "s001", "health.check", check(15, "g7c2", 38.1, "fever", "cough")),
    (5, "s001", "health.check", check(16, "g7c2", 36.9)),
    (60, "s001", "health.check", check(11, "g7c2", 36.7)),
    # class g7c3: 3 students, under the minimum: withheld
    *((10 + i, "s001", "health.check", check(30 + i, "g7c3", 37.9)) for i in range(3)),
    # s002 g1c1: exactly the minimum, no fever
    *((i, "s002", "health.check", check(50 + i, "g1c1", 36.5)) for i in range(5)),
    # vision screenings (not morning checks): g7c2 five students, g7c3 two (withheld)
    (7, "s001", "health.vision", {"student_hash": student(11), "class_id": "g7c2",
                                  "left_acuity": 4.8, "right_acuity": 5.0}),
    (8, "s001", "health.vision", {"student_hash": student(12), "class_id": "g7c2",
                                  "left_acuity": 5.0, "right_acuity": 5.0}),
    (9, "s001", "health.vision", {"student_hash": student(13), "class_id": "g7c2",
                                  "left_acuity": 4.5, "right_acuity": 4.6, "corrected": True}),
    (10, "s001", "health.vision", {"student_hash": student(14), "class_id": "g7c2",
                                   "left_acuity": 5.1, "right_acuity": 5.0}),
    (11, "s001", "health.vision", {"student_hash": student(15), "class_id": "g7c2",
                                   "left_acuity": 4.9, "right_acuity": 5.2}),
    *((20 + i, "s001", "health.vision", {"student_hash": student(30 + i), "class_id": "g7c3",
                                         "left_acuity": 4.0, "right_acuity": 4.0})
      for i in range(2)),
]  # fmt: skip

PURCHASES = [
    {"day": str(DAY0), "school_id": "s001", "merchant": "canteen-1/w1", "purchases": 3,
     "amount_fen": 1250 + 800 + 1500},
    {"day": str(DAY0), "school_id": "s001", "merchant": "shop", "purchases": 1, "amount_fen": 399},
    {"day": str(DAY0), "school_id": "s002", "merchant": "canteen-2/w1", "purchases": 1,
     "amount_fen": 700},
    {"day": str(DAY1), "school_id": "s001", "merchant": "canteen-1/w1", "purchases": 1,
     "amount_fen": 600},
]  # fmt: skip
G7C2 = {"day": str(DAY0), "school_id": "s001", "class_id": "g7c2", "students": 6, "checks": 7,
        "fevers": 2, "symptoms": {"cough": 2, "fever": 1}}  # fmt: skip
# worked by hand: either eye below 5.0 for students 11 (4.8), 13 (4.5/4.6) and 15 (4.9);
# left (4.8 + 5.0 + 4.5 + 5.1 + 4.9) / 5 = 4.86, right (5.0 + 5.0 + 4.6 + 5.0 + 5.2) / 5 = 4.96
VISION_G7C2 = {"day": str(DAY0), "school_id": "s001", "class_id": "g7c2", "students": 5,
               "screenings": 5, "reduced": 3, "mean_left": 4.86, "mean_right": 4.96}  # fmt: skip
G1C1 = {"day": str(DAY0), "school_id": "s002", "class_id": "g1c1", "students": 5, "checks": 5,
        "fevers": 0, "symptoms": {}}  # fmt: skip


def seed(db_url: str) -> dict[str, str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        with conn.transaction():
            conn.cursor().executemany(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, 'gateway', %s, %s, %s::jsonb)",
                [
                    (T0 + timedelta(minutes=m), school, f"pf-{school}", seq, kind, json.dumps(d))
                    for seq, (m, school, kind, d) in enumerate(EVENTS, start=1)
                ],
            )
        return {
            "reader": auth.create_token(conn, "bureau", "reader")[1],
            "school_a": auth.create_token(conn, "school-a", "reader", ["s001"])[1],
        }


@pytest.fixture(params=["postgres", "timescaledb"])
def api(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    db_url: str = request.getfixturevalue("db_url" if request.param == "postgres" else "tsdb_url")
    tokens = seed(db_url)  # before the API: the PGlite harness serves one connection at a time
    if request.param == "timescaledb":
        with psycopg.connect(db_url, autocommit=True) as conn:
            hypertables = conn.execute(
                "SELECT count(*) FROM timescaledb_information.hypertables"
                " WHERE hypertable_name = 'events'"
            ).fetchone()
        assert hypertables == (1,)  # really the TimescaleDB layout
    with api_server(db_url) as http:
        yield http.url, tokens


def call(api: tuple[str, dict[str, str]], path: str, who: str = "reader", **params: Any) -> Any:
    base, tokens = api
    query = {"from": DAY0.isoformat(), "to": DAY1.isoformat(), **params}
    status, body = get_json(f"{base}/api/v1/rollups/{path}?{urlencode(query)}", tokens[who])
    assert status == 200, body
    return body


def test_card_purchases_per_school_merchant_and_day(api: tuple[str, dict[str, str]]) -> None:
    got = call(api, "card-purchases")
    assert got == {"items": PURCHASES, "truncated": False}
    assert call(api, "card-purchases", merchant="shop")["items"] == [PURCHASES[1]]
    one_day = call(api, "card-purchases", to=DAY0.isoformat())["items"]
    assert sum(r["amount_fen"] for r in one_day) == 1250 + 800 + 1500 + 399 + 700
    # a school's token: its own school's rows alone
    mine = call(api, "card-purchases", who="school_a")["items"]
    assert mine == [r for r in PURCHASES if r["school_id"] == "s001"]


def test_health_checks_per_class_with_small_classes_withheld(
    api: tuple[str, dict[str, str]],
) -> None:
    assert MIN_HEALTH_GROUP == 5
    got = call(api, "health-checks")
    assert got == {"items": [G7C2, G1C1], "truncated": False, "suppressed": 1}
    mine = call(api, "health-checks", who="school_a")
    assert mine == {"items": [G7C2], "truncated": False, "suppressed": 1}
    assert call(api, "health-checks", who="school_a", school="s002")["items"] == []
    # no student's hash is anywhere in an answer
    text = json.dumps([got, mine])
    assert not any(student(i) in text for i in range(60))


def test_vision_screenings_per_class_with_small_classes_withheld(
    api: tuple[str, dict[str, str]],
) -> None:
    got = call(api, "health-vision")
    assert got == {"items": [VISION_G7C2], "truncated": False, "suppressed": 1}
    assert call(api, "health-vision", who="school_a", school="s002")["items"] == []
    assert call(api, "health-vision", **{"class": "g7c3"})["items"] == []
    assert not any(student(i) in json.dumps(got) for i in range(60))
