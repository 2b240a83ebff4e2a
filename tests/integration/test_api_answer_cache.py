"""Rollup answers kept while their table is unchanged (web/api/answer_cache.py), on a real
PostgreSQL: every way a table changes — the maintenance refresh, a hand-made INSERT in psql,
UPDATE, DELETE, TRUNCATE, a trigger disabled and enabled again — is seen by the next request,
a repeated request is served without rendering, ``If-None-Match`` gets a 304, and callers with
different schools never share an answer."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from email.message import Message
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest

from ingest_server.web.api import auth, rollups
from ingest_server.web.app import HttpServer
from simulators.api_seed import DAY0, get, seeded_api
from simulators.harness import Postgres

pytestmark = pytest.mark.integration

DAYS = {"from": DAY0.isoformat(), "to": (DAY0 + timedelta(days=6)).isoformat()}
CARD_TAPS = "/api/v1/rollups/card-taps"


class Api:
    def __init__(self, http: HttpServer, db_url: str, tokens: dict[str, str]) -> None:
        self.http = http
        self.db_url = db_url
        self.tokens = tokens

    @property
    def counts(self) -> Any:
        return self.http.app.state.metrics.api_answer_cache

    def get(
        self, path: str = CARD_TAPS, token: str = "read",  # noqa: S107  # a token's name
        headers: dict[str, str] | None = None,
        **params: Any,
    ) -> tuple[int, Message, bytes]:  # fmt: skip
        """Status, headers (any case) and body."""
        url = f"{self.http.url}{path}?{urlencode({**DAYS, **params})}"
        req = urllib.request.Request(  # noqa: S310  # http://127.0.0.1
            url, headers={"Authorization": f"Bearer {self.tokens[token]}", **(headers or {})}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, exc.read()

    def taps(self, **params: Any) -> dict[tuple[str, str], int]:
        status, _, body = self.get(**params)
        assert status == 200, body
        return {(i["day"], i["device_id"]): i["taps"] for i in json.loads(body)["items"]}

    def sql(self, query: str, params: Any = None) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(query, params)


@pytest.fixture(scope="module")
def api(pg_server: Postgres) -> Iterator[Api]:
    def readers(conn: psycopg.Connection[Any]) -> dict[str, str]:
        return {s: auth.create_token(conn, f"tech-{s}", "reader", [s])[1] for s in ("s001", "s002")}

    with seeded_api(pg_server, "t_cache", readers) as seeded:
        yield Api(seeded.http, seeded.db_url, seeded.tokens)


@pytest.fixture
def api_fresh(api: Api) -> Iterator[Api]:
    """The module's server with its answers forgotten and the seeded rows restored after."""
    api.http.app.state.answer_cache.__init__()
    yield api
    days = (DAY0 - timedelta(days=1), DAY0 + timedelta(days=7))
    api.sql("SELECT campus_refresh_rollups(%s, %s)", days)


def test_a_repeated_request_is_served_kept_and_the_same(api_fresh: Api) -> None:
    api = api_fresh
    before = {r: api.counts.value(result=r) for r in ("hit", "miss")}
    first = api.get()
    second = api.get()
    assert first[0] == second[0] == 200
    assert first[2] == second[2]
    assert json.loads(first[2])["items"]
    assert api.counts.value(result="miss") == before["miss"] + 1
    assert api.counts.value(result="hit") == before["hit"] + 1
    assert first[1]["ETag"] == second[1]["ETag"]
    assert first[1]["Cache-Control"] == "private, no-cache"


@pytest.mark.parametrize(
    "change",
    [
        # a technician's hand-made row in psql
        "INSERT INTO card_taps_daily VALUES ('{day}', 's001', 'cr-hand', 7)",
        "UPDATE card_taps_daily SET taps = taps + 100 WHERE device_id = 'cr-0101'",
        "DELETE FROM card_taps_daily WHERE device_id = 'cr-0101'",
        "TRUNCATE card_taps_daily",
        # the maintenance loop's own refresh, after an event arrived
        "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
        " VALUES ('{day} 09:00+08', 's001', 'cr-0101', 'card_reader', 999, 'card.tap', '{{}}');"
        " SELECT campus_refresh_rollups('{day}', '{day}')",
    ],
)
def test_every_change_to_the_table_is_seen_by_the_next_request(api_fresh: Api, change: str) -> None:
    api = api_fresh
    kept = api.taps()
    assert api.taps() == kept  # now served from what was kept
    with psycopg.connect(api.db_url, autocommit=True) as conn:
        for statement in change.format(day=DAY0.isoformat()).split(";"):
            conn.execute(statement)  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT day::text, device_id, taps FROM card_taps_daily WHERE day BETWEEN %s AND %s",
            (DAY0, DAY0 + timedelta(days=6)),
        ).fetchall()
        truth = {(d, dev): n for d, dev, n in rows}
    assert truth != kept
    assert api.taps() == truth


def test_a_change_in_an_open_transaction_is_not_seen_until_it_commits(api_fresh: Api) -> None:
    api = api_fresh
    kept = api.taps()
    with psycopg.connect(api.db_url) as conn:
        conn.execute("UPDATE card_taps_daily SET taps = 0")
        assert api.taps() == kept  # not committed: the kept answer is still the truth
        conn.commit()
    assert set(api.taps().values()) == {0}


def test_a_change_committed_while_an_answer_renders_is_not_hidden_by_it(
    api_fresh: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validator is read before rendering: a change that commits just after the rendering
    (before the answer is stored) still moves the validator past the stored one, so the next
    request renders afresh. (Read after rendering, the old answer would be stored under the new
    generation and served until the next change.)"""
    api = api_fresh
    render = rollups._fetch_json
    changed: list[bool] = []

    def render_then_commit_a_change(*args: Any) -> bytes:
        body = render(*args)
        if not changed:  # the server runs in this process: the change lands right here
            api.sql("UPDATE card_taps_daily SET taps = taps + 1000")
            changed.append(True)
        return body

    monkeypatch.setattr(rollups, "_fetch_json", render_then_commit_a_change)
    before = api.taps()
    after = api.taps()
    assert changed
    assert after == {k: v + 1000 for k, v in before.items()}


def test_rows_written_while_the_trigger_was_disabled_are_not_missed(api_fresh: Api) -> None:
    """Disabling the trigger (a restore with --disable-triggers does) stops answers being kept;
    enabling it again changes its catalogue row, so nothing kept from before is served."""
    api = api_fresh
    kept = api.taps()
    api.sql("ALTER TABLE card_taps_daily DISABLE TRIGGER campus_rollup_generation")
    api.sql("UPDATE card_taps_daily SET taps = 1")
    uncacheable = api.counts.value(result="uncacheable")
    assert set(api.taps().values()) == {1}
    assert api.counts.value(result="uncacheable") == uncacheable + 1
    api.sql("UPDATE card_taps_daily SET taps = 2")
    api.sql("ALTER TABLE card_taps_daily ENABLE ALWAYS TRIGGER campus_rollup_generation")
    assert set(api.taps().values()) == {2}
    assert kept


def test_if_none_match_gets_304_until_the_table_changes(api_fresh: Api) -> None:
    api = api_fresh
    status, headers, body = api.get()
    tag = headers["ETag"]
    assert status == 200
    assert tag.startswith('"')
    status, headers304, body304 = api.get(headers={"If-None-Match": tag})
    assert (status, body304, headers304["ETag"]) == (304, b"", tag)
    assert api.get(headers={"If-None-Match": f'"other", W/{tag}'})[0] == 304
    # another request's answer has another tag
    assert api.get(headers={"If-None-Match": tag}, device="cr-0101")[0] == 200
    api.sql("UPDATE card_taps_daily SET taps = taps + 1")
    status, headers, changed = api.get(headers={"If-None-Match": tag})
    assert status == 200
    assert headers["ETag"] != tag
    assert changed != body


def test_no_cache_renders_afresh(api_fresh: Api) -> None:
    api = api_fresh
    api.get()
    hits, bypassed = api.counts.value(result="hit"), api.counts.value(result="bypass")
    status, _, body = api.get(headers={"Cache-Control": "no-cache"})
    assert status == 200
    assert json.loads(body)["items"]
    assert api.counts.value(result="hit") == hits
    assert api.counts.value(result="bypass") == bypassed + 1


def test_callers_of_different_schools_never_share_an_answer(api_fresh: Api) -> None:
    api = api_fresh
    everyone = api.taps()
    assert {d for _, d in everyone} == {"cr-0101", "cr-0201"}
    assert {d for _, d in api.taps(token="s001")} == {"cr-0101"}
    assert {d for _, d in api.taps(token="s002")} == {"cr-0201"}
    # and a school-scoped tag is not the district's
    tags = {api.get(token=t)[1]["ETag"] for t in ("read", "s001", "s002")}
    assert len(tags) == 3


def test_views_are_always_rendered(api_fresh: Api) -> None:
    """A rollup that is a view (as on TimescaleDB) has no generation: never kept."""
    api = api_fresh
    api.sql("ALTER TABLE card_taps_daily RENAME TO card_taps_daily_t")
    try:
        api.sql("CREATE VIEW card_taps_daily AS SELECT * FROM card_taps_daily_t")
        kept = api.taps()
        api.sql("UPDATE card_taps_daily_t SET taps = taps + 5")
        assert api.taps() == {k: v + 5 for k, v in kept.items()}
        status, headers, _ = api.get()
        assert status == 200
        assert "ETag" not in headers
    finally:
        api.sql("DROP VIEW IF EXISTS card_taps_daily")
        api.sql("ALTER TABLE card_taps_daily_t RENAME TO card_taps_daily")


def test_the_cache_keeps_to_its_bound(api_fresh: Api) -> None:
    api = api_fresh
    cache = api.http.app.state.answer_cache
    answers = {dev: api.get(device=dev)[2] for dev in ("cr-0101", "cr-0201", "cr-9999")}
    bound = sum(map(len, answers.values())) - 1  # one byte short of holding all three
    cache.__init__(max_bytes=bound)
    for dev in answers:
        api.get(device=dev)
    assert 0 < cache.size <= bound
    assert len(cache) == 2
    for dev, body in answers.items():  # evicted or not, each answer is still its own
        assert api.get(device=dev)[2] == body
    status, _, metrics = get(f"{api.http.url}/metrics", api.tokens["admin"])
    assert status == 200
    assert b'campus_api_answer_cache_total{result="hit"}' in metrics
    assert b"campus_api_answer_cache_bytes " in metrics
