"""The clock offset in ``agent.health``: a real agent against a skewed HTTP reference, an SNTP
responder on loopback UDP, and the ingest server's own ``/healthz``."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.clock import ClockError, ClockWatch, measure
from edge_agent.config import load_config
from edge_agent.doctor import Status, check_clock
from ingest_server.ingest.consumer import Health
from ingest_server.metrics import IngestMetrics
from ingest_server.web.app import HttpServer, create_app
from simulators.harness import Mosquitto
from tests.agent_helpers import Collector, health_events, until, with_health

SKEW_S = 42.5
NTP_DELTA = 2_208_988_800

pytestmark = pytest.mark.usefixtures("no_task_left_behind")


class SkewedHealthz:
    """A /healthz on 127.0.0.1 whose ``time`` runs ``skew_s`` ahead of this machine's clock."""

    def __init__(self, skew_s: float) -> None:
        skew = skew_s

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                now = datetime.fromtimestamp(time.time() + skew, UTC)
                body = json.dumps({"status": "ok", "time": now.isoformat()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/healthz"
        self._thread = threading.Thread(target=self.server.serve_forever, name="healthz")
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(5)


@pytest.fixture
def skewed() -> Iterator[SkewedHealthz]:
    server = SkewedHealthz(SKEW_S)
    try:
        yield server
    finally:
        server.close()


class SntpResponder:
    """SNTPv4 on 127.0.0.1 UDP, ``skew_s`` ahead; packed here by hand, apart from our codec."""

    def __init__(self, skew_s: float) -> None:
        self.skew_s = skew_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"ntp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sntp")
        self._thread.start()

    def _stamp(self) -> int:
        return int((time.time() + self.skew_s + NTP_DELTA) * 2**32)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                request, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            received = self._stamp()
            header = bytes([0x24, 1, 6, 0xEC]) + bytes(8) + b"GPS\0"  # LI 0, VN 4, mode 4
            origin = request[40:48]  # the client's transmit timestamp, echoed
            reply = header + struct.pack("!Q", received) + origin
            reply += struct.pack("!QQ", received, self._stamp())
            self.sock.sendto(reply, peer)
            self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def sntp() -> Iterator[SntpResponder]:
    responder = SntpResponder(-7.25)  # the reference is behind: this device is 7.25 s ahead
    try:
        yield responder
    finally:
        responder.close()


def with_clock(tmp_path: Path, mosquitto: Mosquitto, reference: str) -> Path:
    path = with_health(tmp_path, mosquitto, "0.5")
    path.write_text(
        path.read_text() + f'[clock]\nreference = "{reference}"\ninterval_s = 1\ntimeout_s = 1\n'
    )
    return path


def offsets(c: Collector) -> list[float | None]:
    return [h.clock_offset_s for h in health_events(c)]


@pytest.mark.integration
async def test_a_device_behind_its_reference_reports_a_negative_offset(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, skewed: SkewedHealthz
) -> None:
    cfg = load_config(with_clock(tmp_path, mosquitto, skewed.url))
    async with Agent(cfg):
        await until(lambda: any(o is not None for o in offsets(collector)), "an offset")
        measured = next(o for o in offsets(collector) if o is not None)
        assert measured == pytest.approx(-SKEW_S, abs=0.2)
        # The reference goes away: later reports keep the last offset, nothing stops.
        skewed.close()
        seen = len(offsets(collector))
        await until(lambda: len(offsets(collector)) >= seen + 4, "four more health events")
    later = offsets(collector)[seen:]
    assert all(o == pytest.approx(-SKEW_S, abs=0.2) for o in later), later


@pytest.mark.integration
async def test_no_reference_leaves_the_offset_null(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    cfg = load_config(with_health(tmp_path, mosquitto, "0.5"))
    assert cfg.clock.reference == ""
    async with Agent(cfg):
        await until(lambda: len(offsets(collector)) >= 2, "two health events")
    assert offsets(collector)[:2] == [None, None]


@pytest.mark.integration
async def test_sntp_reference_gives_the_known_offset(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, sntp: SntpResponder
) -> None:
    sample = await measure(sntp.url, 2.0)
    assert sample.source == "sntp"
    assert abs(sample.offset_s - 7.25) <= sample.rtt_s / 2 + 1e-6
    assert 0 <= sample.rtt_s < 1
    cfg = load_config(with_clock(tmp_path, mosquitto, sntp.url))
    async with Agent(cfg):
        await until(lambda: any(o is not None for o in offsets(collector)), "an offset")
    measured = next(o for o in offsets(collector) if o is not None)
    assert measured == pytest.approx(7.25, abs=0.2)


@pytest.mark.integration
async def test_a_silent_sntp_server_times_out_plainly() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))  # bound, never answers
        url = f"ntp://127.0.0.1:{mute.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ClockError, match=rf"no answer from {url} within 0.3 s"):
            await measure(url, 0.3)
        assert time.monotonic() - started < 2
        watch = ClockWatch(url, interval_s=1, timeout_s=0.3)
        assert await watch.measure_once() is None
        assert watch.offset_s is None


class _Healthy:
    def health(self) -> Health:
        return Health(mqtt_connected=True, db_ok=True, queued=0, last_commit_age_s=0.0)


@pytest.fixture
def ingest_http() -> Iterator[str]:
    """The real ingest server's HTTP app (no database): its /healthz tells the time."""
    http = HttpServer(create_app(_Healthy(), IngestMetrics()), "127.0.0.1", 0)
    http.start()
    try:
        yield f"{http.url}/healthz"
    finally:
        http.stop()


@pytest.mark.integration
async def test_the_ingest_servers_healthz_is_a_zero_offset_reference(ingest_http: str) -> None:
    # The socket listens before uvicorn starts: an early request waits in the backlog.
    sample = await measure(ingest_http, 5.0)
    assert sample.source == "time"  # the body's millisecond time, not the Date header
    # Off by at most half the round trip, plus the millisecond the server's time truncates.
    assert abs(sample.offset_s) <= sample.rtt_s / 2 + 0.0011
    assert sample.rtt_s < 2
    check = await check_clock(ingest_http)
    assert check.status is Status.OK
    assert f"within 2 s of {ingest_http}" in check.message


@pytest.mark.integration
async def test_doctor_flags_a_skewed_clock(skewed: SkewedHealthz) -> None:
    check = await check_clock(None, skewed.url)  # the config's reference, no --server
    assert check.status is Status.WARN
    assert f"this machine's clock is 42.5 s behind {skewed.url}" in check.message


@pytest.mark.integration
async def test_a_reply_that_is_not_http_is_a_clear_error() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/healthz"
        with pytest.raises(ClockError, match=rf"^{url}: the reply is not HTTP$"):
            await measure(url, 2.0)
