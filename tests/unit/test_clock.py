"""The clock offset: SNTPv4 codec, offset maths, /healthz time parsing and the [clock] config."""

from __future__ import annotations

import email.utils
import logging
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.clock import (
    PACKET_SIZE,
    ClockError,
    ClockWatch,
    from_ntp,
    http_server_time,
    midpoint_offset,
    ntp_offset,
    parse_reference,
    sntp_offset,
    sntp_reply,
    sntp_request,
    to_ntp,
)
from edge_agent.config import ConfigError, load_config
from tests.agent_helpers import MINIMAL

NOW = 1_790_000_000.0  # 2026-09
unix = st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False)  # 1970 to 2096
offsets = st.floats(min_value=-86_400, max_value=86_400, allow_nan=False)
delays = st.floats(min_value=0, max_value=5, allow_nan=False)


@given(unix)
def test_ntp_timestamps_round_trip_across_the_2036_wrap(t: float) -> None:
    assert abs(from_ntp(to_ntp(t)) - t) < 1e-6


def test_the_request_is_48_bytes_version_4_client_mode() -> None:
    req = sntp_request(NOW)
    assert len(req) == PACKET_SIZE == 48
    assert req[0] == 0b00_100_011  # LI 0, VN 4, mode 3
    assert struct.unpack("!Q", req[40:48])[0] == to_ntp(NOW)


@given(offsets, delays, delays, delays)
def test_sntp_offset_is_the_device_clock_minus_the_server_clock(
    device_ahead: float, up: float, serve: float, down: float
) -> None:
    """Symmetric paths give the offset exactly; asymmetry errs by at most half the round trip."""
    t0 = NOW
    t1 = t0 + up - device_ahead  # the server's clock reads device time minus the offset
    t2 = t1 + serve
    t3 = t0 + up + serve + down
    req = sntp_request(t0)
    offset, rtt = sntp_offset(req, sntp_reply(req, t1, t2), t3)
    assert abs(offset - (device_ahead + (down - up) / 2)) < 1e-5
    assert abs(offset - device_ahead) <= rtt / 2 + 1e-5
    assert abs(rtt - (up + down)) < 1e-5


@given(offsets, delays, delays)
def test_midpoint_offset_matches_ntp_with_a_zero_serving_time(
    device_ahead: float, up: float, down: float
) -> None:
    t_send, server = NOW, NOW + up - device_ahead
    t_recv = NOW + up + down
    assert midpoint_offset(server, t_send, t_recv) == pytest.approx(
        ntp_offset(t_send, server, server, t_recv), abs=1e-6
    )


def test_offset_signs() -> None:
    assert midpoint_offset(server_time=100.0, t_send=142.0, t_recv=143.0) == 42.5  # ahead
    assert ntp_offset(100.0, 142.5, 142.5, 101.0) == -42.0  # behind


@pytest.mark.parametrize(
    ("mangle", "why"),
    [
        (lambda r: r[:40], "SNTP reply of 40 bytes"),
        (lambda r: bytes([0b00_100_011]) + r[1:], "not an SNTP server reply"),
        (lambda r: r[:1] + b"\x00" + r[2:], "not synchronised"),
        (lambda r: bytes([0b11_100_100]) + r[1:], "not synchronised"),
        (lambda r: r[:24] + bytes(8) + r[32:], "answers another request"),
        (lambda r: r[:40] + bytes(8), "no transmit timestamp"),
    ],
)
def test_bad_sntp_replies_say_what_is_wrong(mangle: object, why: str) -> None:
    req = sntp_request(NOW)
    reply = sntp_reply(req, NOW, NOW)
    assert callable(mangle)
    with pytest.raises(ClockError, match=why):
        sntp_offset(req, mangle(reply), NOW)


def test_healthz_time_wins_over_the_date_header() -> None:
    body = b'{"status": "ok", "time": "2026-09-21T12:00:00.250+00:00"}'
    headers = {"date": "Mon, 21 Sep 2026 12:00:07 GMT"}
    when, source = http_server_time(headers, body)
    assert source == "time"
    assert when == pytest.approx(1_789_992_000.25)


def test_a_body_without_time_falls_back_to_date_mid_second() -> None:
    date = email.utils.formatdate(NOW, usegmt=True)
    assert http_server_time({"date": date}, b"ok") == (NOW + 0.5, "date")
    assert http_server_time({"date": date}, b'{"time": "yesterday"}')[1] == "date"
    assert http_server_time({"date": date}, b'{"time": "2026-09-21T12:00:00"}')[1] == "date"


def test_no_time_at_all_is_a_clear_error() -> None:
    with pytest.raises(ClockError, match="neither a `time` field nor a Date header"):
        http_server_time({}, b"{}")
    with pytest.raises(ClockError, match="Date header 'soon' is unreadable"):
        http_server_time({"date": "soon"}, b"{}")


def test_references_parse() -> None:
    r = parse_reference("https://ingest.example/healthz?x=1")
    assert (r.kind, r.host, r.port, r.tls, r.target) == (
        "http",
        "ingest.example",
        443,
        True,
        "/healthz?x=1",
    )
    r = parse_reference("http://10.0.0.5:8080")
    assert (r.port, r.tls, r.target) == (8080, False, "/")
    r = parse_reference("ntp://pool.example")
    assert (r.kind, r.port) == ("ntp", 123)
    assert parse_reference("ntp://[::1]:1123").port == 1123


@pytest.mark.parametrize(
    "url", ["pool.example", "ftp://x/", "ntp://x/path", "http://", "http://u:p@x/", "ntp://x:y"]
)
def test_bad_references_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"expected http|port is not a number"):
        parse_reference(url)


def test_clock_section_defaults_to_no_reference(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(MINIMAL)
    c = load_config(tmp_path / "agent.toml").clock
    assert (c.reference, c.interval_s, c.timeout_s) == ("", 300.0, 5.0)


def test_clock_section_is_read(tmp_path: Path) -> None:
    text = MINIMAL + '[clock]\nreference = "ntp://pool.example"\ninterval_s = 60\n'
    (tmp_path / "agent.toml").write_text(text)
    c = load_config(tmp_path / "agent.toml").clock
    assert (c.reference, c.interval_s) == ("ntp://pool.example", 60.0)


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ('reference = "ingest.example"', r"clock\.reference: expected http\(s\)://HOST"),
        ('reference = "http://x:port/"', r"clock\.reference: the port is not a number"),
        ("interval_s = 0.5", r"clock\.interval_s: expected `float` >= 1"),
        ("timeout_s = 0", r"clock\.timeout_s: expected `float` > 0"),
        ("server = 1", r"clock\.server: unknown key \(known here: reference, interval_s"),
    ],
)
def test_clock_config_errors_name_the_key(tmp_path: Path, section: str, error: str) -> None:
    (tmp_path / "agent.toml").write_text(MINIMAL + f"[clock]\n{section}\n")
    with pytest.raises(ConfigError, match=error):
        load_config(tmp_path / "agent.toml")


async def test_a_failing_reference_is_logged_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Port 9 on loopback: nothing listens, so every attempt is refused at once.
    watch = ClockWatch("http://127.0.0.1:9/healthz", interval_s=1, timeout_s=1)
    with caplog.at_level(logging.WARNING, logger="edge_agent.clock"):
        for _ in range(3):
            assert await watch.measure_once() is None
    assert watch.failures == 3
    assert watch.offset_s is None
    [record] = caplog.records
    assert "cannot reach http://127.0.0.1:9/healthz" in record.getMessage()
    assert "the clock offset stays unknown" in record.getMessage()
