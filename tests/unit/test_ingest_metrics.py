"""The Prometheus text format, and /healthz + /metrics over real HTTP on loopback."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest_server.ingest.consumer import Health
from ingest_server.metrics import Counter, Gauge, Histogram, IngestMetrics
from ingest_server.web.app import HttpServer, create_app


def test_counter_and_gauge_text() -> None:
    c = Counter("jobs_total", "Jobs done.", ["reason"])
    c.inc(reason="ok")
    c.inc(2, reason='say "hi"\n')
    g = Gauge("depth", "Queue depth.")
    g.set(3.5)
    assert c.render() == (
        "# HELP jobs_total Jobs done.\n"
        "# TYPE jobs_total counter\n"
        'jobs_total{reason="ok"} 1\n'
        'jobs_total{reason="say \\"hi\\"\\n"} 2\n'
    )
    assert g.render() == "# HELP depth Queue depth.\n# TYPE depth gauge\ndepth 3.5\n"
    with pytest.raises(ValueError, match="takes labels"):
        c.inc()
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1, reason="ok")


def test_histogram_text() -> None:
    h = Histogram("lat_seconds", "Latency.", buckets=(0.1, 1.0))
    h.observe(0.05)
    h.observe_many([0.1, 0.5, 7.0])
    lines = h.render().splitlines()
    assert lines[2:5] == [
        'lat_seconds_bucket{le="0.1"} 2',  # le is inclusive
        'lat_seconds_bucket{le="1"} 3',
        'lat_seconds_bucket{le="+Inf"} 4',
    ]
    assert lines[5].startswith("lat_seconds_sum ")
    assert float(lines[5].split()[1]) == pytest.approx(7.65)
    assert lines[6] == "lat_seconds_count 4"


def test_counters_are_thread_safe() -> None:
    c = Counter("n_total", "N.")

    def work() -> None:
        for _ in range(10_000):
            c.inc()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 40_000


def test_every_ingest_metric_is_exported() -> None:
    text = IngestMetrics().render()
    for name in (
        "campus_ingest_messages_received_total",
        "campus_ingest_events_received_total",
        "campus_ingest_events_stored_total",
        "campus_ingest_events_duplicate_total",
        "campus_ingest_quarantined_total",
        "campus_ingest_seq_gaps_detected_total",
        "campus_ingest_seq_missing",
        "campus_ingest_batch_latency_seconds",
        "campus_ingest_event_latency_seconds",
        "campus_ingest_mqtt_connected",
        "campus_ingest_db_connected",
        "campus_control_inbox_messages",
        "campus_control_pending_commands",
        "campus_control_pending_configs",
        "campus_control_inflight",
        "campus_control_retries_total",
        "campus_control_quarantined_total",
        "campus_stuck",
    ):
        assert f"# TYPE {name} " in text


class FakeSource:
    def __init__(self) -> None:
        self.state = Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=None)

    def health(self) -> Health:
        return self.state


@pytest.fixture
def http() -> Iterator[tuple[HttpServer, FakeSource, IngestMetrics]]:
    source, metrics = FakeSource(), IngestMetrics()
    server = HttpServer(create_app(source, metrics), "127.0.0.1", 0)
    server.start()
    try:
        yield server, source, metrics
    finally:
        server.stop()


def fetch(url: str) -> tuple[int, str, str]:
    """GET; the socket listens from construction, so no wait for uvicorn is needed."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310  # http://127.0.0.1
            return resp.status, resp.headers["content-type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read().decode()


def test_healthz_and_metrics(http: tuple[HttpServer, FakeSource, IngestMetrics]) -> None:
    server, source, metrics = http
    status, _, body = fetch(server.url + "/healthz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    source.state = Health(mqtt_connected=True, db_ok=False, queued=7, last_commit_age_s=12.5)
    status, _, body = fetch(server.url + "/healthz")
    assert status == 503
    answer = json.loads(body)
    served_at = datetime.fromisoformat(answer.pop("time"))  # the agents' clock reference
    assert abs((datetime.now(UTC) - served_at).total_seconds()) < 60
    assert answer == {
        "status": "down",
        "mqtt": "connected",
        "db": "down",
        "queued_messages": 7,
        "last_commit_age_s": 12.5,
        "stuck": [],
    }
    # up and connected, but not moving: 503 with the reason
    why = "ingest: the batch in hand has not committed for 31 s"
    source.state = Health(
        mqtt_connected=True, db_ok=True, queued=7, last_commit_age_s=31.0, stuck=(why,)
    )
    status, _, body = fetch(server.url + "/healthz")
    assert status == 503
    answer = json.loads(body)
    assert (answer["status"], answer["stuck"]) == ("down", [why])
    assert "campus_stuck 1\n" in fetch(server.url + "/metrics")[2]
    source.state = Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=0.5)
    assert fetch(server.url + "/healthz")[0] == 200
    metrics.events_stored.inc(42)
    status, ctype, body = fetch(server.url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    assert "campus_ingest_events_stored_total 42\n" in body
    assert "campus_stuck 0\n" in body


@given(
    st.lists(st.integers(-(10**6), 10**8), max_size=60),
    st.integers(0, 10**8),
)
def test_observe_ages_counts_like_one_observation_per_age(stamps: list[int], now: int) -> None:
    """A batch's ages from its sorted stamps (µs) by bisection land in the buckets one
    observation per age would."""
    one = Histogram("a_seconds", "One by one.")
    batch = Histogram("b_seconds", "By bisection.")
    one.observe_many((now - t) * 1e-6 for t in stamps)
    batch.observe_ages(now, sorted(stamps), 1e-6)
    assert batch._counts == one._counts
    assert batch._sum == pytest.approx(one._sum, abs=1e-6)
