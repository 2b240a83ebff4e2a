"""No HTTP client can hold what others wait on: through uvicorn, the real API and PostgreSQL.

Careless and hostile clients are raw sockets: exports whose clients never read, enrol bodies
trickled a byte at a time, bodies far over their cap (declared or chunked), and one token
opening every live stream and export it can. Meanwhile retention drops a partition, the ingest
writer commits, and other clients are answered.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import msgspec
import psutil
import psycopg
import pytest

from ingest_server.control.enrolment import Offer
from ingest_server.ingest.batch import Inbound, rows_of
from ingest_server.ingest.writer import BatchWriter
from ingest_server.metrics import IngestMetrics
from ingest_server.storage.maintenance import StorageMaintenance, set_policy
from ingest_server.storage.migrate import migrate
from ingest_server.web.api import auth, export, limits
from ingest_server.web.api.data import where
from ingest_server.web.api.enrol import EnrolmentState
from ingest_server.web.api.limits import SlotLimiter
from ingest_server.web.app import HttpServer, create_app
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch
from simulators.api_seed import _Healthy, get_json
from simulators.harness import Postgres

pytestmark = pytest.mark.integration

#: Rows of about 1 KB each: an export of them is far more than the sockets' buffers hold.
BULK_ROWS = 40_000
NOW = datetime.now(UTC)
RANGE = {
    "from": (NOW - timedelta(hours=3)).isoformat(),
    "to": (NOW + timedelta(hours=1)).isoformat(),
}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


class Server:
    def __init__(self, http: HttpServer, app: Any, db_url: str, tokens: dict[str, str]) -> None:
        self.http = http
        self.app = app
        self.db_url = db_url
        self.tokens = tokens

    def raw(self, rcvbuf: int = 4096) -> socket.socket:
        """A client socket with a small receive buffer (so a server's writes stall early)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.connect(("127.0.0.1", self.http.port))
        return s

    def request(self, method: str, path: str, token: str | None, extra: str = "") -> bytes:
        auth_line = f"Authorization: Bearer {token}\r\n" if token else ""
        return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{auth_line}{extra}\r\n".encode()

    def export_path(self, fmt: str = "ndjson") -> str:
        return f"/api/v1/export/events.{fmt}?{urlencode(RANGE)}"

    def stalled_export(self, token: str) -> socket.socket:
        """An export whose client sends the request and never reads."""
        s = self.raw()
        s.sendall(self.request("GET", self.export_path(), token))
        return s

    def get(self, path: str, token: str) -> tuple[int, Any]:
        return get_json(self.http.url + path, token)


def status_of(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and what of the body came with them, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


def body_json(s: socket.socket, headers: dict[str, str], rest: bytes) -> Any:
    n = int(headers["content-length"])
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return json.loads(rest[:n])


def abort(s: socket.socket) -> None:
    """Close with a reset, as a client that crashed or lost its network would."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@contextmanager
def serve(db_url: str) -> Iterator[tuple[HttpServer, Any]]:
    app = create_app(_Healthy(), IngestMetrics(), db_url)
    app.state.enrolment = EnrolmentState(
        Offer(mqtt_url="mqtt://127.0.0.1:1883", hash_key_hex="00" * 32), ""
    )
    http = HttpServer(app, "127.0.0.1", 0)
    http.start()
    try:
        yield http, app
    finally:
        http.stop()
        app.state.pool.close()


@pytest.fixture(scope="module")
def server(pg_server: Postgres) -> Iterator[Server]:
    """A database with ``BULK_ROWS`` events in the last hours and tokens for four clients."""
    name = f"t_limits_{uuid.uuid4().hex[:8]}"
    db_url = pg_server.create_database(name)
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            migrate(conn)
            conn.execute(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " SELECT now() - interval '2 hours' + g * interval '10 milliseconds', 's1',"
                " 'bulk-1', 'card_reader', g, 'card.tap',"
                " jsonb_build_object('pad', repeat('x', 1000), 'n', g)"
                " FROM generate_series(1, %s) g",
                (BULK_ROWS,),
            )
            tokens = {
                name: auth.create_token(conn, f"t-{name}", [scope])[1]
                for name, scope in (("a", "read"), ("b", "read"), ("c", "read"), ("admin", "admin"))
            }
        with serve(db_url) as (http, app):
            yield Server(http, app, db_url, tokens)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def srv(server: Server) -> Iterator[Server]:
    """The module's server, with every export and live stream of the test over at its end."""
    wait_for(lambda: server.app.state.export_slots.in_use == 0, 30, "exports of earlier tests end")
    yield server
    wait_for(lambda: server.app.state.export_slots.in_use == 0, 30, "exports of this test end")


def api_in_transaction(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'campus-edge-api'"
            " AND state LIKE 'idle in transaction%%'"
        ).fetchone()
    return int(row[0]) if row else -1


TAP = msgspec.json.encode({"uid_hash": "5f" * 32, "tech": "iso14443a", "reader": "door-1"})


def uplink(device: str, seqs: range) -> Inbound:
    events = [
        UplinkEvent(
            seq=n,
            ts=datetime.now(UTC),
            type="card.tap",
            data=msgspec.Raw(TAP),
        )
        for n in seqs
    ]
    batch = UplinkBatch(
        device_id=device, kind="card_reader", sent_at=datetime.now(UTC), events=events
    )
    return Inbound(
        topic=f"campus/v1/s1/{device}/up",
        payload=encode_batch(batch),
        mid=1,
        qos=1,
        received_at=datetime.now(UTC),
    )


def test_stalled_exports_hold_nothing_retention_and_ingest_go_on(srv: Server) -> None:
    """(a) Two exports whose clients never read; retention drops a partition and the ingest
    writer commits, both within a deadline; a client that goes away frees its slot at once."""
    old = datetime.now(UTC) - timedelta(days=40)
    day = old.replace(hour=0, minute=0, second=0, microsecond=0)
    with psycopg.connect(srv.db_url, autocommit=True) as conn:
        conn.execute(
            "SELECT campus_ensure_partitions('events', %s, %s)", (day, day + timedelta(days=1))
        )
        conn.execute(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
            " VALUES (%s, 's1', 'old-1', 'card_reader', 1, 'card.tap', '{}')",
            (day + timedelta(hours=12),),
        )
        set_policy(conn, "events", compress_after=None, retain_for="30 days")
    with ExitStack() as stack:
        clients = [srv.stalled_export(srv.tokens[t]) for t in ("a", "b")]
        for s in clients:
            stack.callback(s.close)
        wait_for(lambda: srv.app.state.export_slots.in_use == 2, 10, "both exports running")
        assert status_of(clients[0])[0] == 200  # reads a little; the rest stays unread
        wait_for(lambda: api_in_transaction(srv.db_url) == 0, 10, "no API transaction open")

        maintenance = StorageMaintenance(srv.db_url, interval_s=3600)
        maintenance.start()
        stack.callback(maintenance.stop)
        written: list[int] = []

        def ingest() -> None:
            with psycopg.connect(srv.db_url, autocommit=True) as conn:
                writer = BatchWriter(conn)
                written.append(writer.write(rows_of(uplink("cr-new", range(1, 4)))[0]).inserted)

        writer = threading.Thread(target=ingest, name="test-ingest")
        writer.start()
        writer.join(15)
        assert written == [3], "the ingest writer did not commit within 15 s"
        wait_for(lambda: maintenance.last is not None, 15, "a maintenance pass")
        assert maintenance.last is not None
        assert maintenance.last.dropped >= 1
        assert maintenance.last.busy == ()
        with psycopg.connect(srv.db_url) as conn:
            gone = conn.execute("SELECT to_regclass(%s)", (f"events_p{day:%Y%m%d}",)).fetchone()
        assert gone == (None,)
        assert maintenance.lock_retries == 0
        assert srv.app.state.export_slots.in_use == 2  # both still mid-stream, holding nothing

        abort(clients[0])
        wait_for(lambda: srv.app.state.export_slots.in_use == 1, 10, "a gone client's slot freed")
        abort(clients[1])


def test_maintenance_gives_up_on_a_lock_and_ingest_goes_on(srv: Server) -> None:
    """A reader holding events in an open transaction (as a psql session might): the pass gives
    up on that table after its lock timeout, says so, and ingest commits meanwhile."""
    with psycopg.connect(srv.db_url) as reader:
        reader.execute("SELECT count(*) FROM events WHERE device_id = 'nobody'")  # stays open
        maintenance = StorageMaintenance(srv.db_url, interval_s=3600)
        maintenance.start()
        try:
            with psycopg.connect(srv.db_url, autocommit=True) as conn:
                writer = BatchWriter(conn)
                t0 = time.monotonic()
                assert writer.write(rows_of(uplink("cr-lock", range(1, 3)))[0]).inserted == 2
                assert time.monotonic() - t0 < 10
            wait_for(lambda: maintenance.last is not None, 20, "a maintenance pass")
        finally:
            maintenance.stop()
    assert maintenance.last is not None
    # Creating tomorrow's partitions needs the events lock only if some are missing; with all
    # present the pass may not need it. Either it finished, or it gave up on events and said so.
    assert maintenance.last.busy in ((), ("partitions:events",))
    assert maintenance.lock_retries == len(maintenance.last.busy)


def test_slow_enrol_bodies_do_not_starve_the_api(
    srv: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(b) More slow unauthenticated enrol bodies than the pool has connections: another
    client's calls are still answered at once, and each slow body ends with 408."""
    monkeypatch.setattr(limits, "BODY_TIMEOUT_S", 3.0)
    with psycopg.connect(srv.db_url, autocommit=True) as conn:
        migrate(conn)
    with serve(srv.db_url) as (http, _app):
        own = Server(http, _app, srv.db_url, srv.tokens)
        slow = []
        try:
            for _ in range(8):  # the pool holds 4
                s = own.raw()
                s.sendall(
                    own.request("POST", "/api/v1/enrol", None, "Content-Length: 1000\r\n") + b'{"co'
                )
                slow.append(s)
            for _ in range(3):
                t0 = time.monotonic()
                code, _ = own.get("/api/v1/devices", srv.tokens["a"])
                assert code == 200
                assert time.monotonic() - t0 < 2.0
                for s in slow:
                    s.send(b" ")  # trickle
            for s in slow:
                code, headers, rest = status_of(s)
                assert code == 408
                assert "did not arrive within 3 s" in body_json(s, headers, rest)["detail"]
        finally:
            for s in slow:
                s.close()


def test_a_declared_oversized_body_is_refused_unread(srv: Server) -> None:
    rss = psutil.Process().memory_info().rss
    s = srv.raw()
    try:
        s.sendall(srv.request("POST", "/api/v1/enrol", None, f"Content-Length: {200 * 2**20}\r\n"))
        code, headers, rest = status_of(s)
        assert code == 413
        detail = body_json(s, headers, rest)["detail"]
        assert "/api/v1/enrol takes at most 16384 bytes" in detail
        assert f"declares {200 * 2**20} bytes" in detail
    finally:
        s.close()
    assert psutil.Process().memory_info().rss - rss < 4 * 2**20


def test_a_chunked_body_is_cut_at_its_cap(srv: Server) -> None:
    """No length given: the server counts as the chunks arrive, answers 413 past the cap and
    reads no more; memory does not grow with what the client tries to send."""
    rss = psutil.Process().memory_info().rss
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    s = srv.raw()
    sent = 0
    try:
        s.sendall(srv.request("POST", "/api/v1/enrol", None, "Transfer-Encoding: chunked\r\n"))
        for _ in range(3200):  # up to 200 MB
            if select.select([s], [], [], 0)[0]:
                break
            try:
                s.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        assert sent < 20 * 2**20, "the server kept reading a body far past its cap"
        code, headers, rest = status_of(s)
        assert code == 413
        assert (
            "takes at most 16384 bytes; this one sent more" in body_json(s, headers, rest)["detail"]
        )
    finally:
        s.close()
    assert psutil.Process().memory_info().rss - rss < 4 * 2**20


def test_token_routes_check_the_token_before_the_body(srv: Server) -> None:
    """A body to an admin route with no or a wrong token is refused before it is read."""
    for token in (None, "cet_" + "x" * 43):
        s = srv.raw()
        try:
            s.sendall(srv.request("POST", "/api/v1/tokens", token, "Content-Length: 4000\r\n"))
            code, headers, rest = status_of(s)  # no body sent: the answer cannot wait for it
            assert code == 401
            assert "token" in body_json(s, headers, rest)["detail"]
        finally:
            s.close()


def test_exports_per_token_and_an_admin_always_gets_in(srv: Server) -> None:
    """(c) Four export slots, two per token, the last for administrators."""
    with ExitStack() as stack:

        def hold(token: str) -> socket.socket:
            s = srv.stalled_export(srv.tokens[token])
            stack.callback(abort, s)
            return s

        def refused(token: str) -> tuple[dict[str, str], str]:
            s = srv.raw()
            stack.callback(s.close)
            s.sendall(srv.request("GET", srv.export_path(), srv.tokens[token]))
            code, headers, rest = status_of(s)
            assert code == 429
            return headers, body_json(s, headers, rest)["detail"]

        hold("a")
        hold("a")
        wait_for(lambda: srv.app.state.export_slots.in_use == 2, 10, "a's two exports")
        headers, detail = refused("a")
        assert headers["retry-after"].isdigit()
        assert "has 2 exports open already (at most 2 per token)" in detail
        hold("b")
        wait_for(lambda: srv.app.state.export_slots.in_use == 3, 10, "b's export")
        _, detail = refused("c")
        assert "kept for administrators" in detail
        admin = hold("admin")
        assert status_of(admin)[0] == 200


def test_live_streams_per_token_and_an_admin_always_gets_in(srv: Server) -> None:
    """(c) The live stream's slots, made small here: one per token of three, one reserved."""
    srv.app.state.live_slots = SlotLimiter("live streams", 3, 1, reserved=1)
    with ExitStack() as stack:

        def open_(token: str) -> tuple[int, dict[str, str], bytes, socket.socket]:
            s = srv.raw()
            stack.callback(s.close)
            s.sendall(srv.request("GET", "/api/v1/live", srv.tokens[token]))
            return (*status_of(s), s)

        assert open_("a")[0] == 200
        code, headers, rest, s = open_("a")
        assert code == 429
        assert headers["retry-after"].isdigit()
        assert "at most 1 per token" in body_json(s, headers, rest)["detail"]
        assert open_("b")[0] == 200
        code, headers, rest, s = open_("c")
        assert code == 429
        assert "kept for administrators" in body_json(s, headers, rest)["detail"]
        assert open_("admin")[0] == 200
    wait_for(lambda: srv.app.state.live_slots.in_use == 0, 10, "live slots freed")


@pytest.mark.parametrize("what", ["events", "readings"])
@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_export_pages_render_what_one_query_renders(srv: Server, what: str, fmt: str) -> None:
    """Pages of 3 rows (readings sharing a key across a page's end included) give the rows of
    one query, once each and in order; ties of a readings key in any order among themselves."""
    t = datetime(2026, 1, 5, 10, tzinfo=UTC)
    with psycopg.connect(srv.db_url, autocommit=True) as conn:
        conn.execute("DELETE FROM readings WHERE school_id = 's7'")  # each parameter's own
        conn.execute(
            "INSERT INTO readings (time, school_id, device_id, metric, value)"
            " SELECT %s + (g / 4) * interval '1 s', 's7', 'env-7', 'temperature_c', g"
            " FROM generate_series(0, 22) g ON CONFLICT DO NOTHING",
            (t,),
        )
        conn.execute(
            "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
            " SELECT %s + (g / 2) * interval '1 s', 's7', 'cr-7', 'card_reader', g, 'x.y',"
            ' \'{"a": "b,\\"c"}\' FROM generate_series(1, 17) g ON CONFLICT DO NOTHING',
            (t,),
        )
    everyone = auth.Principal(0, "test", "district_admin")
    cond, params = where(t, t + timedelta(minutes=1), {"school_id": "s7"}, everyone)
    q = export.export_query(what, fmt, cond, params)
    pool = srv.app.state.pool
    rows = export._fetch(pool, q.first, [*params, 10_000])
    if fmt == "csv":
        paged = "".join(export._csv(page) for page in export.pages(pool, q, limit=3))
        whole = export._csv(rows)
    else:  # NDJSON pages are the lines' bytes as PostgreSQL sent them
        paged = b"".join(export.ndjson_pages(pool, q, limit=3)).decode()
        whole = "".join(r[export._KEY_COLS] + "\n" for r in rows)
    assert len(whole.splitlines()) == (23 if what == "readings" else 17)
    if what == "events":
        assert paged == whole
    else:
        assert sorted(paged.splitlines()) == sorted(whole.splitlines())
        time_of = [
            line.split(",")[0] if fmt == "csv" else json.loads(line)["time"]
            for line in paged.splitlines()
        ]
        assert time_of == sorted(time_of)


def test_a_flood_of_wrong_tokens_cannot_take_the_pool(srv: Server) -> None:
    """Concurrent requests with well-formed unknown tokens (each a database lookup until the
    address is limited): a known token from the same address is still answered at once, and
    the flood gets 429 with Retry-After once it has failed often enough."""
    with serve(srv.db_url) as (http, _app):
        own = Server(http, _app, srv.db_url, srv.tokens)
        assert own.get("/api/v1/devices", srv.tokens["a"])[0] == 200  # known before the flood
        codes: list[int] = []

        def flood() -> None:
            for _ in range(20):
                codes.append(own.get("/api/v1/devices", "cet_" + secrets.token_urlsafe(32))[0])

        threads = [threading.Thread(target=flood, name=f"flood-{i}") for i in range(8)]
        for t in threads:
            t.start()
        try:
            for _ in range(5):
                t0 = time.monotonic()
                assert own.get("/api/v1/devices", srv.tokens["a"])[0] == 200
                assert time.monotonic() - t0 < 2.0
        finally:
            for t in threads:
                t.join(60)
        assert set(codes) <= {401, 429}
        assert codes.count(401) <= auth.MAX_FAILED + len(threads)  # a few in flight at the limit
        assert 429 in codes
        code, body = own.get("/api/v1/devices", "cet_" + secrets.token_urlsafe(32))
        assert code == 429
        assert "too many invalid API tokens" in body["detail"]


def send_json(srv: Server, method: str, path: str, body: bytes) -> tuple[int, Any]:
    """``body`` as sent (bytes, so a test controls every escape), with the admin token."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(  # noqa: S310  # http://127.0.0.1
        srv.http.url + path,
        data=body,
        method=method,
        headers={
            "Authorization": f"Bearer {srv.tokens['admin']}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        ("POST", "/api/v1/tokens", b'{"name": "a\\u0000b", "scopes": ["read"]}', "\\u0000"),
        (
            "POST",
            "/api/v1/enrolment-codes",
            b'{"school_id": "s1", "room": "2\\u00003"}',
            "\\u0000",
        ),
        ("POST", "/api/v1/devices/cr-1/commands", b'{"name": "ping", "args": {"x": '
         + b"[" * 40 + b"]" * 40 + b"}}", "nested deeper than the limit of 32"),
        ("POST", "/api/v1/tokens", b'{"name": "' + b"x" * 70_000 + b'"}', "over the limit"),
        ("POST", "/api/v1/tokens", b'{"name": "\xff\xfe"}', "not UTF-8"),
    ],
)  # fmt: skip
def test_bodies_the_database_would_refuse_are_refused_first(
    srv: Server, method: str, path: str, body: bytes, words: str
) -> None:
    """NUL escapes, deep nesting, long strings and broken UTF-8 get 422 naming the problem
    before any route runs (they were 500s: PostgreSQL refused the NUL inside the route)."""
    code, answer = send_json(srv, method, path, body)
    if len(body) > limits.body_cap(path):
        assert code == 413
        return
    assert code == 422, answer
    ((problem,),) = [answer["detail"]]  # FastAPI's own 422 shape
    assert problem["loc"] == ["body"]
    assert words in problem["msg"], answer


def test_a_nul_in_the_url_is_refused(srv: Server) -> None:
    code, answer = srv.get("/api/v1/events?type=card.tap%00x", srv.tokens["a"])
    assert code == 400
    assert "NUL" in answer["detail"]
    assert srv.get("/api/v1/devices", srv.tokens["a"])[0] == 200  # the API goes on


def test_a_value_the_database_refuses_is_a_422_not_a_500(srv: Server) -> None:
    """What gets past the byte checks and still is refused by PostgreSQL (here a number JSON
    can write and jsonb cannot hold) answers 422 with the database's reason."""
    with psycopg.connect(srv.db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO devices (device_id, school_id, kind) VALUES ('cr-9', 's1', 'card_reader')"
            " ON CONFLICT DO NOTHING"
        )
    code, answer = send_json(
        srv, "POST", "/api/v1/devices/cr-9/commands", b'{"name": "ping", "args": {"x": 1e999}}'
    )
    assert code == 422, answer
    assert "the database refuses" in answer["detail"][0]["msg"]
