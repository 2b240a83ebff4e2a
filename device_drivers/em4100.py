"""125 kHz EM4100 cards on an RDM6300-style UART reader → ``card.tap``.

Driver type ``em4100``. Options: ``port`` (a device such as ``/dev/ttyUSB0``, a
``/dev/serial/by-id/…`` name, a symlink, any pyserial URL, or ``usb:VID:PID[:SERIAL]`` in hex,
looked up among the USB serial ports at every open), ``baudrate`` (9600), ``reader`` (the name
put in events; default the driver's name), ``hold_ms`` (1000).

Frame, 14 bytes: STX ``0x02``; 10 ASCII hex digits, the 5 data bytes (a version/customer byte,
then the 32-bit card number, big-endian); 2 ASCII hex digits, the XOR of those 5 bytes; ETX
``0x03``. Upper- and lower-case hex are accepted. The UID that is hashed is the 5 data bytes.

While a card stays in the field the reader repeats its frame about every 50 ms. A card is
reported once, and again only after it has been out of the field for longer than ``hold_ms``.

Bad input never stops the driver. Each bad frame or run of line noise is counted as
``em4100.<reason>`` (``garbage``, ``short``, ``overlong``, ``bad_hex``, ``bad_checksum``), logged,
and skipped; the parser resynchronises on the next STX. Repeats of a held card count as
``em4100.repeats``. When the port fails or its device node goes away (or is swapped for another),
the driver reports DISCONNECTED, counts ``em4100.disconnected`` and reopens the same path with
jittered backoff.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, auto
from functools import reduce
from operator import xor
from typing import Annotated, Any, Final, Literal

import msgspec
import serial
from msgspec import Meta
from serial.tools import list_ports

from device_drivers.base import DriverContext, DriverError, Emit, ProbeResult, register_driver
from device_drivers.serial_reader import (
    ByteStream,
    PortLost,
    SerialReader,
    SerialStreamDriver,
    listen,
)
from schemas.reading import Reading

log = logging.getLogger(__name__)

STX: Final = 0x02
ETX: Final = 0x03
BODY_LEN: Final = 12  # 10 data + 2 checksum hex digits
#: Longest run of noise (or tail of an overlong frame) held before it is reported.
MAX_NOISE: Final = 64
_HEX: Final = frozenset(b"0123456789ABCDEFabcdef")

Reason = Literal["garbage", "short", "overlong", "bad_hex", "bad_checksum"]
_SKIPPED: Final[dict[Reason, str]] = {
    "garbage": "skipped line noise between frames",
    "short": "skipped a frame cut short",
    "overlong": "skipped an overlong frame",
    "bad_hex": "skipped a frame with non-hex characters",
    "bad_checksum": "skipped a frame with a wrong checksum",
}


@dataclass(frozen=True, slots=True)
class Em4100Frame:
    """A checksum-verified card read."""

    #: The 5 data bytes: version/customer byte, then the card number.
    uid: bytes

    @property
    def version(self) -> int:
        return self.uid[0]

    @property
    def card_number(self) -> int:
        return int.from_bytes(self.uid[1:], "big")


@dataclass(frozen=True, slots=True)
class FrameError:
    """Bytes the parser threw away, and why."""

    reason: Reason
    raw: bytes


class _State(Enum):
    HUNT = auto()  # between frames: anything but STX is noise
    BODY = auto()  # after STX, collecting the 12 hex digits
    OVERLONG = auto()  # the body was full but no ETX came: skip to the next STX or ETX


class Em4100Parser:
    """Sans-I/O: reader bytes in, frames and errors out. Chunking never changes the result."""

    def __init__(self) -> None:
        self._state = _State.HUNT
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Em4100Frame | FrameError]:
        out: list[Em4100Frame | FrameError] = []
        for byte in data:
            self._step(byte, out)
        return out

    def _step(self, byte: int, out: list[Em4100Frame | FrameError]) -> None:
        buf = self._buf
        if byte == STX:
            if self._state is _State.HUNT and buf:
                out.append(FrameError("garbage", bytes(buf)))
            elif self._state is _State.BODY:
                out.append(FrameError("short", bytes(buf)))
            elif self._state is _State.OVERLONG:
                out.append(FrameError("overlong", bytes(buf)))
            buf[:] = b"\x02"
            self._state = _State.BODY
            return
        buf.append(byte)
        if self._state is _State.HUNT:
            if len(buf) >= MAX_NOISE:
                self._emit(out, FrameError("garbage", bytes(buf)), _State.HUNT)
        elif self._state is _State.BODY:
            if byte == ETX:
                complete = len(buf) == BODY_LEN + 2
                item = decode(bytes(buf[1:-1])) if complete else FrameError("short", bytes(buf))
                self._emit(out, item, _State.HUNT)
            elif len(buf) > BODY_LEN + 1:
                self._state = _State.OVERLONG
        elif byte == ETX or len(buf) >= MAX_NOISE:
            self._emit(out, FrameError("overlong", bytes(buf)), _State.HUNT)

    def _emit(
        self, out: list[Em4100Frame | FrameError], item: Em4100Frame | FrameError, then: _State
    ) -> None:
        out.append(item)
        self._buf.clear()
        self._state = then


def decode(body: bytes) -> Em4100Frame | FrameError:
    """Check the 12 hex digits between STX and ETX."""
    raw = b"\x02" + body + b"\x03"
    if len(body) != BODY_LEN or not _HEX.issuperset(body):
        return FrameError("bad_hex", raw)
    data = bytes.fromhex(body[:10].decode())
    if reduce(xor, data) != int(body[10:], 16):
        return FrameError("bad_checksum", raw)
    return Em4100Frame(data)


class Debouncer:
    """One report per presence of a card: again only after it was unseen for over ``hold_s``.

    Remembers at most ``MAX_CARDS`` recent cards; the least recently seen is forgotten first.
    """

    MAX_CARDS = 256

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def accept(self, uid: bytes, now: float) -> bool:
        last = self._seen.pop(uid, None)
        self._seen[uid] = now
        if len(self._seen) > self.MAX_CARDS:
            self._seen.popitem(last=False)
        return last is None or now - last > self.hold_s


class Em4100Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    port: Annotated[str, Meta(min_length=1)]
    baudrate: Annotated[int, Meta(gt=0)] = 9600
    reader: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    hold_ms: Annotated[int, Meta(ge=0, le=600_000)] = 1000


@dataclass(frozen=True, slots=True)
class UsbMatch:
    """``usb:VID:PID[:SERIAL]``: a USB serial adapter found by its ids, whatever its tty name."""

    vid: int
    pid: int
    serial_number: str | None = None

    @classmethod
    def parse(cls, port: str) -> UsbMatch | None:
        if not port.startswith("usb:"):
            return None
        parts = port[4:].split(":", 2)
        try:
            vid, pid = (int(p, 16) for p in parts[:2])
        except ValueError:
            raise ValueError(f"{port!r} is not usb:VID:PID[:SERIAL] with hex ids") from None
        return cls(vid, pid, parts[2] if len(parts) == 3 else None)

    def find(self) -> str:
        found = sorted(
            str(p.device)
            for p in list_ports.comports()
            if p.vid == self.vid
            and p.pid == self.pid
            and self.serial_number in (None, p.serial_number)
        )
        if len(found) == 1:
            return found[0]
        if not found:
            raise OSError(f"no USB serial device {self} is plugged in")
        raise OSError(f"{len(found)} devices match {self} ({', '.join(found)}): add the serial")

    def __str__(self) -> str:
        tail = f":{self.serial_number}" if self.serial_number else ""
        return f"usb:{self.vid:04x}:{self.pid:04x}{tail}"


def resolve_port(port: str) -> str:
    """The device path to open: ``port`` itself, or the tty a ``usb:`` match finds now."""
    usb = UsbMatch.parse(port)
    return port if usb is None else usb.find()


def open_port(path: str, baudrate: int) -> ByteStream:
    """Open with a short read timeout (the reader thread stops promptly) and an exclusive lock."""
    stream: ByteStream = serial.serial_for_url(path, baudrate=baudrate, timeout=0.1, exclusive=True)
    return stream


def _device_identity(path: str) -> tuple[int, int] | None:
    """Which device node ``path`` leads to now (None for URLs and vanished devices)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_rdev or st.st_ino)


class Em4100Reader(SerialStreamDriver):
    """An EM4100 / RDM6300 reader on a serial port."""

    counters = "em4100"
    #: After this long without data, check that the device node is still the one opened.
    PRESENCE_CHECK_S = 1.0

    def __init__(self, name: str, options: Em4100Options, ctx: DriverContext) -> None:
        super().__init__(name, options.port, ctx)
        self.options = options
        self.reader = options.reader or name
        self._debouncer = Debouncer(options.hold_ms / 1000)

    async def open_port(self) -> tuple[ByteStream, str]:
        path = await asyncio.to_thread(resolve_port, self.options.port)
        stream = await asyncio.to_thread(open_port, path, self.options.baudrate)
        log.info("%s: reading %s", self.name, path)
        return stream, path

    def lost(self, exc: PortLost) -> str:
        return f"the reader on {self.port} went away ({exc})"

    async def read(self, reader: SerialReader, path: str, emit: Emit) -> None:
        parser = Em4100Parser()
        device = _device_identity(path)
        while True:
            try:
                # Not wait_for: on 3.11 it can swallow a cancellation that lands with the chunk.
                async with asyncio.timeout(self.PRESENCE_CHECK_S):
                    chunk = await reader.next_chunk()
            except TimeoutError:
                if _device_identity(path) != device:
                    raise PortLost(f"{path} disappeared") from None
                continue
            now = time.monotonic()
            for item in parser.feed(chunk):
                if isinstance(item, FrameError):
                    self._ctx.count(f"em4100.{item.reason}")
                    self.last_error = _SKIPPED[item.reason]
                    log.warning("%s: %s: %r", self.name, self.last_error, item.raw)
                elif self._debouncer.accept(item.uid, now):
                    tap = self._ctx.hasher.card_tap(item.uid, tech="em4100", reader=self.reader)
                    await emit(Reading("card.tap", tap))
                else:
                    self._ctx.count("em4100.repeats")


def parse_options(name: str, options: Mapping[str, Any]) -> Em4100Options:
    raw = {k: v for k, v in options.items() if k not in ("type", "name")}
    try:
        opts = msgspec.convert(raw, Em4100Options)
        UsbMatch.parse(opts.port)
    except (msgspec.ValidationError, ValueError) as exc:
        raise DriverError(f"driver {name!r}: {exc}") from exc
    return opts


@register_driver("em4100")
def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> Em4100Reader:
    return Em4100Reader(name, parse_options(name, options), ctx)


async def probe(options: Mapping[str, Any], listen_s: float = 3.0) -> ProbeResult:
    """Open the port and listen briefly; say whether the reader sent anything sensible."""
    try:
        opts = parse_options("probe", options)
        path = await asyncio.to_thread(resolve_port, opts.port)
        stream = await asyncio.to_thread(open_port, path, opts.baudrate)
    except (DriverError, OSError, ValueError) as exc:
        return ProbeResult.fail(f"cannot open the reader: {exc}")
    try:
        items = Em4100Parser().feed(await listen(stream, listen_s))
    except Exception as exc:  # report whatever the port says
        return ProbeResult.fail(f"{path} opened but reading failed: {exc}")
    cards = {i.uid for i in items if isinstance(i, Em4100Frame)}
    errors = sorted({i.reason for i in items if isinstance(i, FrameError)})
    if not items:  # an idle reader is silent until a card comes near
        return ProbeResult.ok(
            f"{path} open at {opts.baudrate} baud; no data in {listen_s:.0f} s (hold a card)"
        )
    why = f" ({', '.join(errors)})" if errors else ""
    bad = sum(isinstance(i, FrameError) for i in items)
    verdict = f"{path}: {len(cards)} card(s) seen, {bad} bad frame(s){why}"
    # Bad frames point at noise on the line or a wrong baud rate.
    return ProbeResult.warn(verdict) if bad else ProbeResult.ok(verdict)
