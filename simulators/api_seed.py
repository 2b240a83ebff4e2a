"""Known rows for the API tests and benchmarks, and a running API over them; all take a db URL.

The rollups are the real ones: ``seed`` stores events, readings and presence rows, then has the
database refresh the rollups for their days; :data:`ROLLUP_ROWS` are the numbers worked out by
hand from those rows (days are district-local, Asia/Shanghai: T0 is 16:00 there on DAY0).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

from ingest_server.control.enrolment import Offer
from ingest_server.ingest.consumer import Health
from ingest_server.metrics import IngestMetrics
from ingest_server.storage.maintenance import maintain
from ingest_server.storage.migrate import migrate
from ingest_server.web.api import auth
from ingest_server.web.api.common import utc_now
from ingest_server.web.api.enrol import EnrolmentState
from ingest_server.web.app import HttpServer, create_app
from simulators.harness import Postgres

T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
DAY0 = date(2026, 11, 20)
#: DAY0 ends at local midnight, 16:00 UTC: an interval still open then is cut there.
DAY0_END = datetime(2026, 11, 20, 16, 0, tzinfo=UTC)


def _minutes(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() / 60


#: Rollup relation → its rows for the seeded data, in the API's order.
ROLLUP_ROWS: dict[str, list[tuple[Any, ...]]] = {
    "card_taps_daily": [(DAY0, "s001", "cr-0101", 10), (DAY0, "s002", "cr-0201", 4)],
    # c7a: on time, on time, late, outside period, no status (counts as on time); c7b: 2 on time
    "attendance_daily": [(DAY0, "s001", "c7a", 5, 3, 1, 1), (DAY0, "s001", "c7b", 2, 2, 0, 0)],
    # on at +1:30, on again at +2:30, off at +4:30
    "board_power_daily": [(DAY0, "s001", "sb-0101", 3.0)],
    # hdmi1 at +6, ops at +8 until the end of the local day
    "board_input_daily": [
        (DAY0, "s001", "sb-0101", "hdmi1", 2.0),
        (DAY0, "s001", "sb-0101", "ops", _minutes(T0 + timedelta(minutes=8), DAY0_END)),
    ],
    # co2 600..604 and temperature 21..25 over minutes 0..4: one 5-minute bucket each
    "env_5min": [
        (T0, "s001", "env-0101", "co2_ppm", 602.0, 600.0, 604.0, 5),
        (T0, "s001", "env-0101", "temperature_c", 23.0, 21.0, 25.0, 5),
    ],
    # presence: cr-0101 online 30 min, sb-0101 online 6 min
    "device_online_daily": [(DAY0, "s001", "cr-0101", 30.0), (DAY0, "s001", "sb-0101", 6.0)],
    # loans and a return at cr-0101's terminal, whose registry grade is 7
    "library_daily": [(DAY0, "s001", "7", 3, 1)],
    "library_top_items": [
        ("s001", "isbn-978", 2, T0 + timedelta(minutes=22)),
        ("s001", "isbn-111", 1, T0 + timedelta(minutes=21)),
    ],
}
#: (time, school, device, state) rows of device_presence.
PRESENCE: list[tuple[Any, ...]] = [
    (T0, "s001", "cr-0101", "online"),
    (T0, "s001", "sb-0101", "online"),
    (T0 + timedelta(minutes=6), "s001", "sb-0101", "offline"),
    (T0 + timedelta(minutes=30), "s001", "cr-0101", "offline"),
]
# data with the characters CSV must quote: comma, quote, newline
TRICKY = {"reader": 'door "A", east\nwing', "uid_hash": "5f1c", "tech": "iso14443a"}


@dataclass(frozen=True)
class Seeded:
    events: list[tuple[Any, ...]]  # (time, school, device, kind, seq, type, data)
    readings: list[tuple[Any, ...]]  # (time, school, device, metric, value)


def prepare(conn: psycopg.Connection[Any]) -> None:
    """Migrate: the storage, registry columns and rollups the API reads all come from there."""
    migrate(conn)


def seed(db_url: str) -> Seeded:
    """Known devices, events, readings, presence and quarantine rows; the rollups refreshed."""
    events: list[tuple[Any, ...]] = []
    for i in range(10):
        events.append(
            (T0 + timedelta(minutes=i), "s001", "cr-0101", "card_reader", i + 1, "card.tap",
             {**TRICKY, "n": i})
        )  # fmt: skip
    # seq 3 of sb-0101 never arrived: missing = 1
    for seq, state in ((1, "on"), (2, "on"), (4, "off")):
        events.append(
            (T0 + timedelta(minutes=seq, seconds=30), "s001", "sb-0101", "smart_board", seq,
             "board.power", {"state": state})
        )  # fmt: skip
    for seq, minute, source in ((6, 6, "hdmi1"), (7, 8, "ops")):
        events.append(
            (T0 + timedelta(minutes=minute), "s001", "sb-0101", "smart_board", seq,
             "board.input", {"source": source})
        )  # fmt: skip
    checkins = [
        ("c7a", "on_time"),
        ("c7a", "on_time"),
        ("c7a", "late"),
        ("c7a", "outside_period"),
        ("c7a", None),
        ("c7b", "on_time"),
        ("c7b", "on_time"),
    ]
    for i, (class_id, status) in enumerate(checkins):
        checkin = {"uid_hash": f"s{i}", "reader": "door", "class_id": class_id}
        events.append(
            (T0 + timedelta(minutes=i), "s001", "sg-0101", "signage", i + 1,
             "attendance.checkin", checkin if status is None else {**checkin, "status": status})
        )  # fmt: skip
    library = [
        (11, "library.loan", "isbn-978"),
        (12, "library.loan", "isbn-111"),
        (13, "library.loan", "isbn-978"),
        (14, "library.return", "isbn-222"),
    ]
    for seq, kind, item in library:
        loan = {"student_hash": None, "item_id": item, "source": "rfid", "terminal": "desk"}
        events.append(
            (T0 + timedelta(minutes=9 + seq), "s001", "cr-0101",
             "card_reader", seq, kind, loan)
        )  # fmt: skip
    health = {
        "cpu_pct": 3.5,
        "rss_mb": 40.0,
        "outbox_depth": 17,
        "oldest_unsent_s": 2.5,
        "drivers": {"panel": "running", "camera": "error"},
    }
    events.append((T0 + timedelta(minutes=5), "s001", "sb-0101", "smart_board", 5,
                   "agent.health", health))  # fmt: skip
    for i in range(4):
        tap = {"uid_hash": f"h{i}", "tech": "em4100", "reader": "gate"}
        events.append(
            (T0 + timedelta(minutes=i), "s002", "cr-0201", "card_reader", i + 1, "card.tap", tap)
        )
    readings = [
        (T0 + timedelta(minutes=i), "s001", "env-0101", m, v + i)
        for i in range(5)
        for m, v in (("co2_ppm", 600.0), ("temperature_c", 21.0))
    ]
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare(conn)
        with conn.transaction():
            conn.cursor().executemany(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
                [(*e[:6], json.dumps(e[6])) for e in events],
            )
            conn.cursor().executemany(
                "INSERT INTO readings (time, school_id, device_id, metric, value)"
                " VALUES (%s, %s, %s, %s, %s)",
                readings,
            )
            conn.cursor().executemany(
                "INSERT INTO devices (device_id, school_id, kind, first_seen, last_seen, min_seq,"
                " max_seq, event_count, state, state_at, agent_version, room, class_id, grade,"
                " name) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    ("cr-0101", "s001", "card_reader", T0, T0 + timedelta(minutes=9), 1, 10, 10,
                     "online", T0, "1.4.0", "101", "c7a", "7", "door reader"),
                    ("sb-0101", "s001", "smart_board", T0, T0 + timedelta(minutes=5), 1, 5, 4,
                     "offline", T0 + timedelta(minutes=6), "1.4.0", "101", "c7a", "7", None),
                    ("cr-0201", "s002", "card_reader", T0, T0 + timedelta(minutes=3), 1, 4, 4,
                     "online", T0, "1.3.9", "gate", None, None, None),
                    ("env-0101", "s001", None, T0, T0, None, None, 0, None, None, None, "102",
                     None, None, None),
                ],
            )  # fmt: skip
            conn.cursor().executemany(
                "INSERT INTO quarantine (received_at, topic, payload, reason, device_id, seq)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (T0 + timedelta(seconds=i), "campus/v1/s001/cr-0101/up", payload, reason,
                     "cr-0101", None)
                    for i, (payload, reason) in enumerate(
                        [
                            (b"{not json", "not JSON: expecting property name"),
                            (b'{"v": 9}', "unsupported version 9"),
                            (b"\xff\xfe binary", "not JSON: invalid UTF-8"),
                            (b'{"v": 1}', "missing field device_id"),
                        ]
                    )
                ],
            )  # fmt: skip
            conn.cursor().executemany(
                "INSERT INTO device_presence (time, school_id, device_id, state)"
                " VALUES (%s, %s, %s, %s)",
                PRESENCE,
            )
        # the server's own upkeep pass: DAY0 was touched, so its rollups are computed
        assert maintain(conn).days_refreshed >= 1
    return Seeded(events=events, readings=readings)


def make_tokens(db_url: str) -> dict[str, str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        migrate(conn)
        return {
            scope: auth.create_token(conn, f"test-{scope}", [scope])[1]
            for scope in ("read", "admin")
        }


class _Healthy:
    def health(self) -> Health:
        return Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=0.0)


@contextmanager
def api_server(db_url: str, now: Callable[[], datetime] | None = None) -> Iterator[HttpServer]:
    """The HTTP API alone (no MQTT) on 127.0.0.1 and a port chosen now; ``now`` pins its clock."""
    app = create_app(_Healthy(), IngestMetrics(), db_url)
    if now is not None:
        app.dependency_overrides[utc_now] = now
    # enrolment set up as a server with a district key would have it (the fuzzer spends codes)
    app.state.enrolment = EnrolmentState(
        Offer(mqtt_url="mqtt://127.0.0.1:1883", hash_key_hex="00" * 32), ""
    )
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    try:
        yield http
    finally:
        http.stop()
        app.state.pool.close()


@dataclass
class SeededApi:
    http: HttpServer
    tokens: dict[str, str]
    seeded: Seeded
    db_url: str


@contextmanager
def seeded_api(
    pg: Postgres,
    prefix: str,
    more_tokens: Callable[[psycopg.Connection[Any]], dict[str, str]] | None = None,
) -> Iterator[SeededApi]:
    """A database of its own on ``pg``, seeded, with the ``read`` and
    ``admin`` tokens (and whatever ``more_tokens`` makes), and the API over it; dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    db_url = pg.create_database(name)
    try:
        seeded = seed(db_url)
        tokens = make_tokens(db_url)
        if more_tokens is not None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                tokens.update(more_tokens(conn))
        with api_server(db_url) as http:
            yield SeededApi(http, tokens, seeded, db_url)
    finally:
        pg.drop_database(name)


def get(url: str, token: str | None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, headers=headers)  # noqa: S310  # http://127.0.0.1
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(url: str, token: str | None) -> tuple[int, Any]:
    status, _, body = get(url, token)
    return status, json.loads(body) if body else None


def _wire(value: Any) -> Any:
    """A seeded value as the API writes it in JSON."""
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    return value


#: Attendance events today at each of s001..s010 in :func:`seed_district`.
DISTRICT_TAPS = 40


def seed_district(db_url: str, schools: int = 805, devices: int = 28_000) -> None:
    """``devices`` round-robin over ``schools`` (``s001``…), a third online; at s001..s010
    ``DISTRICT_TAPS`` attendance events today and one env reading; alerts at s001 (open,
    acknowledged) and s002 (resolved). For the API at district size (test and bench)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        prepare(conn)
        conn.execute(
            """
            INSERT INTO devices (device_id, school_id, kind, state, event_count)
            SELECT format('s%%s-dev-%%s', lpad((i %% %(n)s + 1)::text, 3, '0'), i),
                   format('s%%s', lpad((i %% %(n)s + 1)::text, 3, '0')),
                   (ARRAY['card_reader', 'env_sensor', 'smart_board'])[i %% 3 + 1],
                   CASE WHEN i %% 3 = 0 THEN 'online' ELSE 'offline' END, 0
            FROM generate_series(0, %(d)s - 1) AS i
            """,
            {"n": schools, "d": devices},
        )
        # today's attendance at s001..s010: TAPS each, of three counted types; one env reading
        conn.execute(
            """
            INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)
            SELECT now() - interval '1 minute', format('s%%s', lpad(s::text, 3, '0')),
                   format('s%%s-dev-%%s', lpad(s::text, 3, '0'), s - 1), 'card_reader', k,
                   (ARRAY['card.tap', 'attendance.checkin', 'access.pass', 'env.reading'])
                       [CASE WHEN k > %(t)s THEN 4 ELSE k %% 3 + 1 END],
                   '{}'::jsonb
            FROM generate_series(1, 10) AS s, generate_series(1, %(t)s + 1) AS k
            """,
            {"t": DISTRICT_TAPS},
        )
        for state, school in (("open", "s001"), ("acknowledged", "s001"), ("resolved", "s002")):
            conn.execute(
                "INSERT INTO alerts (rule, severity, state, school_id, device_id, message)"
                " VALUES ('device_offline', 'warning', %s, %s, %s, 'test')",
                (state, school, f"{school}-dev-{uuid.uuid4().hex[:6]}"),
            )
