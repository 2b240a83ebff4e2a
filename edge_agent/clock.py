"""How far this device's clock is off a reference: an HTTP ``/healthz`` or an SNTP server.

The sign is the one ``agent.health`` reports: a positive offset means the device clock is
*ahead* of the reference (its event ``ts`` are late in the future), negative means behind.

The SNTPv4 codec and the offset maths are pure functions; :func:`measure` does the I/O with
asyncio only (cancellable, every wait bounded), and :class:`ClockWatch` measures every interval,
keeping the last good sample through a streak of failures.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import ssl
import struct
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

TIMEOUT_S: Final = 5.0
#: Bytes of an HTTP reply read at most; /healthz is a few hundred.
MAX_REPLY: Final = 64 * 1024
NTP_PORT: Final = 123
#: Seconds from the NTP era (1900-01-01) to the Unix epoch.
NTP_EPOCH_DELTA: Final = 2_208_988_800
#: 48 bytes: flags, stratum, poll, precision, (root delay, dispersion, reference id and time
#: unused), originate, receive and transmit timestamps.
_PACKET: Final = struct.Struct("!BBbb20xQQQ")
PACKET_SIZE: Final = _PACKET.size
_MODE_CLIENT: Final = 3
_MODE_SERVER: Final = 4
_VERSION: Final = 4


class ClockError(Exception):
    """The reference gave no usable time; the message says why in plain words."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed ``[clock] reference``."""

    url: str
    kind: Literal["http", "ntp"]
    host: str
    port: int
    tls: bool = False
    target: str = "/"


def parse_reference(url: str) -> Reference:
    """``http(s)://HOST[:PORT]/PATH`` or ``ntp://HOST[:PORT]``; ValueError says what is wrong."""
    expected = f"expected http(s)://HOST[:PORT]/PATH or ntp://HOST[:PORT], got {url!r}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the port is not a number in {url!r}") from None
    if not parts.hostname or parts.username or parts.password or parts.fragment:
        raise ValueError(expected)
    if parts.scheme in ("http", "https"):
        tls = parts.scheme == "https"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Reference(url, "http", parts.hostname, port or (443 if tls else 80), tls, target)
    if parts.scheme == "ntp" and parts.path in ("", "/") and not parts.query:
        return Reference(url, "ntp", parts.hostname, port or NTP_PORT)
    raise ValueError(expected)


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One measurement: ``offset_s`` > 0 means this device's clock is ahead of ``reference``."""

    offset_s: float
    #: The round trip the measurement took; the offset is uncertain by half of it.
    rtt_s: float
    source: Literal["time", "date", "sntp"]
    reference: str
    #: ``time.monotonic()`` when taken, for its age.
    taken: float

    def age_s(self) -> float:
        return time.monotonic() - self.taken

    def describe(self) -> str:
        """``"2.3 s ahead of URL"`` in plain words."""
        where = "ahead of" if self.offset_s > 0 else "behind"
        return f"{abs(self.offset_s):.3f} s {where} {self.reference}"


# --- offset maths ---------------------------------------------------------------------------


def midpoint_offset(server_time: float, t_send: float, t_recv: float) -> float:
    """Device-ahead offset, taking the server's time as read at the request's midpoint."""
    return (t_send + t_recv) / 2 - server_time


def ntp_offset(t0: float, t1: float, t2: float, t3: float) -> float:
    """Device-ahead offset from NTP's four timestamps (client send, server receive, server
    send, client receive): the negation of NTP's θ = ((t1-t0)+(t2-t3))/2."""
    return ((t0 - t1) + (t3 - t2)) / 2


# --- SNTPv4 codec (RFC 4330) ----------------------------------------------------------------


def to_ntp(unix: float) -> int:
    """Unix seconds → a 64-bit NTP timestamp (32.32 fixed point)."""
    return round((unix + NTP_EPOCH_DELTA) * 2**32) & (2**64 - 1)


def from_ntp(stamp: int) -> float:
    """A 64-bit NTP timestamp → Unix seconds, for 1968 to 2104 (RFC 4330 section 3)."""
    # A clear top bit means NTP era 1: the 32-bit seconds wrapped in February 2036.
    era = 0 if stamp >> 63 else 2**32
    return (stamp / 2**32) + era - NTP_EPOCH_DELTA


def sntp_request(t0: float) -> bytes:
    """A client request whose transmit timestamp is ``t0``; the server echoes it back."""
    return _PACKET.pack(_VERSION << 3 | _MODE_CLIENT, 0, 0, 0, 0, 0, to_ntp(t0))


def sntp_offset(request: bytes, reply: bytes, t3: float) -> tuple[float, float]:
    """``(offset_s, rtt_s)`` from a server's reply to ``request``, received at ``t3``."""
    if len(reply) < PACKET_SIZE:
        raise ClockError(f"an SNTP reply of {len(reply)} bytes, expected at least {PACKET_SIZE}")
    flags, stratum, _, _, origin, received, transmit = _PACKET.unpack_from(reply)
    sent = _PACKET.unpack(request)[6]
    if flags & 0x7 != _MODE_SERVER:
        raise ClockError(f"not an SNTP server reply (mode {flags & 0x7}, expected 4)")
    if flags >> 6 == 3 or stratum == 0:
        raise ClockError("the SNTP server is not synchronised (or sent a kiss-o'-death)")
    if origin != sent:
        raise ClockError("the SNTP reply answers another request (originate timestamp differs)")
    if not transmit:
        raise ClockError("the SNTP reply has no transmit timestamp")
    t0, t1, t2 = from_ntp(sent), from_ntp(received), from_ntp(transmit)
    return ntp_offset(t0, t1, t2, t3), max(0.0, (t3 - t0) - (t2 - t1))


def sntp_reply(request: bytes, t1: float, t2: float, *, stratum: int = 2) -> bytes:
    """A server's reply to ``request``, received at ``t1`` and sent at ``t2`` (for tests and
    simulators: the codec's other side)."""
    origin = _PACKET.unpack_from(request)[6]
    flags = _VERSION << 3 | _MODE_SERVER
    return _PACKET.pack(flags, stratum, 0, -20, origin, to_ntp(t1), to_ntp(t2))


# --- HTTP -----------------------------------------------------------------------------------


def http_server_time(headers: dict[str, str], body: bytes) -> tuple[float, Literal["time", "date"]]:
    """The server's time from a reply: the body's ``time`` (ms), else the ``Date`` header (s)."""
    try:
        doc = json.loads(body)
        stamp = doc.get("time") if isinstance(doc, dict) else None
        if isinstance(stamp, str):
            when = datetime.fromisoformat(stamp)
            if when.tzinfo is not None:
                return when.timestamp(), "time"
    except ValueError:
        pass
    date = headers.get("date")
    if not date:
        raise ClockError("the reply has neither a `time` field nor a Date header")
    try:
        # Date has whole seconds, truncated: the server's time lies within the next second.
        return email.utils.parsedate_to_datetime(date).timestamp() + 0.5, "date"
    except (TypeError, ValueError):
        raise ClockError(f"the reply's Date header {date!r} is unreadable") from None


def _split_reply(raw: bytes) -> tuple[dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not sep or not lines[0].startswith("HTTP/"):
        raise ClockError("the reply is not HTTP")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


async def _measure_http(ref: Reference, timeout_s: float) -> ClockSample:
    ctx = ssl.create_default_context() if ref.tls else None
    host = f"[{ref.host}]" if ":" in ref.host else ref.host
    default = 443 if ref.tls else 80
    request = (
        f"GET {ref.target} HTTP/1.0\r\nHost: {host}{'' if ref.port == default else f':{ref.port}'}"
        "\r\nAccept: application/json\r\nUser-Agent: campus-edge-clock\r\n\r\n"
    ).encode()
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(ref.host, ref.port, ssl=ctx)
        try:
            # Timed from the request, not the connect: handshakes would skew the midpoint.
            t_send = time.time()
            writer.write(request)
            await writer.drain()
            first = await reader.read(MAX_REPLY)
            t_recv = time.time()
            raw = first
            while len(raw) < MAX_REPLY and (more := await reader.read(MAX_REPLY - len(raw))):
                raw += more
        finally:
            writer.close()
    # Any status will do: an unhealthy server (503) still tells the time.
    headers, body = _split_reply(raw)
    server, source = http_server_time(headers, body)
    return ClockSample(
        midpoint_offset(server, t_send, t_recv), t_recv - t_send, source, ref.url, time.monotonic()
    )


# --- SNTP -----------------------------------------------------------------------------------


class _SntpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[tuple[bytes, float]] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if not self.reply.done():
            self.reply.set_result((data, time.time()))

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _measure_sntp(ref: Reference, timeout_s: float) -> ClockSample:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        transport, protocol = await loop.create_datagram_endpoint(
            _SntpProtocol, remote_addr=(ref.host, ref.port)
        )
        try:
            request = sntp_request(time.time())
            transport.sendto(request)
            reply, t3 = await protocol.reply
        finally:
            transport.close()
    offset, rtt = sntp_offset(request, reply, t3)
    return ClockSample(offset, rtt, "sntp", ref.url, time.monotonic())


async def measure(ref: Reference | str, timeout_s: float = TIMEOUT_S) -> ClockSample:
    """One measurement against ``ref``; :class:`ClockError` says in plain words why not."""
    if isinstance(ref, str):
        try:
            ref = parse_reference(ref)
        except ValueError as exc:
            raise ClockError(str(exc)) from None
    try:
        if ref.kind == "ntp":
            return await _measure_sntp(ref, timeout_s)
        return await _measure_http(ref, timeout_s)
    except TimeoutError:
        raise ClockError(f"no answer from {ref.url} within {timeout_s:g} s") from None
    except ssl.SSLError as exc:
        raise ClockError(f"the TLS handshake with {ref.url} failed: {exc.reason or exc}") from None
    except OSError as exc:
        why = exc.strerror.lower() if exc.strerror else (str(exc) or type(exc).__name__)
        raise ClockError(f"cannot reach {ref.url}: {why}") from None
    except ClockError as exc:
        raise ClockError(f"{ref.url}: {exc}") from None
    except ValueError as exc:  # whatever else a broken reply trips: report it, crash nothing
        raise ClockError(f"{ref.url}: an unusable reply: {exc}") from None


class ClockWatch:
    """Measures the offset against one reference every ``interval_s``, from the start.

    A failure keeps the last good sample (see :attr:`last` and its age) and is logged once per
    streak of failures, with a line when the reference answers again.
    """

    def __init__(self, reference: str, interval_s: float, timeout_s: float = TIMEOUT_S) -> None:
        self.reference = parse_reference(reference)
        self.interval_s = interval_s
        self.timeout_s = min(timeout_s, interval_s)
        self.last: ClockSample | None = None
        self.failures = 0

    @property
    def offset_s(self) -> float | None:
        return None if self.last is None else round(self.last.offset_s, 3)

    async def measure_once(self) -> ClockSample | None:
        try:
            sample = await measure(self.reference, self.timeout_s)
        except ClockError as exc:
            if not self.failures:
                kept = (
                    f"keeping the offset measured {self.last.age_s():.0f} s ago"
                    if self.last
                    else "the clock offset stays unknown"
                )
                log.warning("cannot measure the clock offset: %s; %s", exc, kept)
            self.failures += 1
            return None
        if self.failures:
            log.info("the clock reference answers again after %d failure(s)", self.failures)
        self.failures = 0
        self.last = sample
        log.debug("clock %s (round trip %.3f s)", sample.describe(), sample.rtt_s)
        return sample

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            await self.measure_once()
            due = max(due + self.interval_s, loop.time())
            await asyncio.sleep(due - loop.time())
