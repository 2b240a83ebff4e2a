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
import sys
import time
from collections.abc import Mapping
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DeviceLost,
    DriverContext,
    DriverError,
    Emit,
    ProbeResult,
    register_driver,
)
from device_drivers.codecs.em4100 import Debouncer, Em4100Frame, Em4100Parser, FrameError, Reason
from device_drivers.plumbing.link import Link, LinkedDriver
from device_drivers.plumbing.transport import (
    PortNotFound,
    Transport,
    UsbId,
    describe,
    listen,
    open_transport,
    usb_ports,
)
from schemas.reading import Reading

log = logging.getLogger(__name__)

_SKIPPED: Final[dict[Reason, str]] = {
    "garbage": "skipped line noise between frames",
    "short": "skipped a frame cut short",
    "overlong": "skipped an overlong frame",
    "bad_hex": "skipped a frame with non-hex characters",
    "bad_checksum": "skipped a frame with a wrong checksum",
}


class Em4100Options(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    port: Annotated[str, Meta(min_length=1)]
    baudrate: Annotated[int, Meta(gt=0)] = 9600
    reader: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    hold_ms: Annotated[int, Meta(ge=0, le=600_000)] = 1000


def resolve_port(port: str) -> str:
    """The device path to open: ``port`` itself, or the tty a ``usb:`` id finds now."""
    if not port.startswith("usb:"):
        return port
    usb = UsbId.parse(port)
    # The shared lookup; the words are the ones this driver's technicians have always seen.
    found = [str(p.device) for p in usb_ports(usb)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise PortNotFound(f"no USB serial device {usb} is plugged in")
    raise PortNotFound(f"{len(found)} devices match {usb} ({', '.join(found)}): add the serial")


def _device_identity(path: str) -> tuple[int, int] | None:
    """Which device node ``path`` leads to now (None for URLs and vanished devices).

    None on Windows: a COM port is no file node to watch; an unplugged adapter shows as
    pyserial's read error instead.
    """
    if sys.platform == "win32":
        return None
    else:  # noqa: RET505 - the else keeps mypy --platform win32 from calling this unreachable
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_rdev or st.st_ino)


class Em4100Reader(LinkedDriver):
    """An EM4100 / RDM6300 reader on a serial port: it only talks, so open means up."""

    counters = "em4100"
    #: After this long without data, check that the device node is still the one opened.
    PRESENCE_CHECK_S = 1.0

    def __init__(self, name: str, options: Em4100Options, ctx: DriverContext) -> None:
        super().__init__(name, options.port, self._open, ctx)
        self.options = options
        self.reader = options.reader or name
        self._debouncer = Debouncer(options.hold_ms / 1000)
        self._path = options.port

    def _open(self) -> Transport:
        """Find and open the port (blocking); remember the path whose device node is watched."""
        path = resolve_port(self.options.port)
        transport = open_transport(path, baudrate=self.options.baudrate)
        self._path = path
        return transport

    def lost(self, exc: DeviceLost) -> str:
        return f"the reader on {self.port} went away ({exc})"

    async def session(self, link: Link, emit: Emit) -> None:
        self.up()
        path = self._path
        parser = Em4100Parser()
        device = _device_identity(path)
        while True:
            chunk = await link.read(self.PRESENCE_CHECK_S)
            if not chunk:
                if _device_identity(path) != device:
                    raise DeviceLost(f"{path} disappeared")
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
        if opts.port.startswith("usb:"):
            UsbId.parse(opts.port)
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
        transport = await asyncio.to_thread(open_transport, path, baudrate=opts.baudrate)
    except (DriverError, OSError, ValueError) as exc:
        why = describe(exc)
        # The shared open errors end in a question of their own; the technician's first check
        # for a listen-only reader is still the cable.
        hint = "" if "plugged in" in why else " — is it plugged in?"
        return ProbeResult.fail(f"cannot open the reader: {why}{hint}")
    try:
        items = Em4100Parser().feed(await listen(transport, listen_s))
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as its verdict
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
