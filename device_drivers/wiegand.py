"""Wiegand-26 / Wiegand-34 card readers behind a serial Wiegand-to-UART converter → ``card.tap``.

Driver type ``wiegand``. Options: ``port`` (serial device, ``usb:VID:PID[:SERIAL]`` or any
pyserial URL such as ``socket://host:port``), ``baudrate`` (9600), ``debounce_s`` (1.0: the
same card again within this time is one tap; readers that repeat a held card keep extending the
window).

Converter framing (our simulator speaks the same): one ASCII line per card read,
``W26:XXXXXXX`` or ``W34:XXXXXXXXX``, ended by CR, LF or CRLF. The digits are the raw Wiegand
bits as upper- or lower-case hex, the first bit on the wire being the most significant,
left-padded with zeros to 7 (26 bits) or 9 (34 bits) digits. The frame's first bit is even
parity over the first half of the payload, its last bit odd parity over the second half.
Payload: W26 = 8-bit facility code + 16-bit card number, W34 = 32-bit card number. The UID
that is hashed is the payload as big-endian bytes (3 bytes for W26, 4 for W34), so the same
card read by a PC/SC reader hashes differently: Wiegand only carries part of the serial.

Other converters print decimal lines instead (option ``format``): ``decimal`` — the card
number as up to 10 decimal digits (``bits`` = 26: facility+card as one 24-bit number; 34: the
32-bit number) — or ``facility-card`` — ``FFF,CCCCC`` (W26). These outputs vary per vendor and
have no published specification; check the converter's manual. The hashed UID is the same
payload bytes as for ``hex``, so one card hashes the same through either converter.

Lines that are not frames, frames with bad parity and lines over 64 bytes are counted
(``wiegand.garbage``, ``wiegand.bad_parity``, ``wiegand.overlong``) and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DriverContext,
    DriverError,
    Emit,
    ProbeResult,
    convert_options,
    register_driver,
)
from device_drivers.codecs.wiegand import Format, Rejected, WiegandFrame, WiegandParser
from device_drivers.plumbing.link import Link, LinkedDriver
from device_drivers.plumbing.transport import listen, open_transport
from schemas.events import CardTap
from schemas.reading import Reading

log = logging.getLogger(__name__)


_SKIPPED: Final = {
    "garbage": "skipped a line that is not a Wiegand frame",
    "bad_parity": "skipped a frame with bad parity",
    "overlong": "skipped an overlong line",
}


class WiegandOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    port: str
    baudrate: Annotated[int, Meta(gt=0)] = 9600
    debounce_s: Annotated[float, Meta(ge=0)] = 1.0
    format: Format = "hex"
    bits: Literal[26, 34] = 26


class WiegandReader(LinkedDriver):
    """A Wiegand-to-UART converter on a serial port: it only talks, so open means up."""

    counters = "wiegand"

    def __init__(self, name: str, options: WiegandOptions, ctx: DriverContext) -> None:
        opener = partial(open_transport, options.port, baudrate=options.baudrate)
        super().__init__(name, options.port, opener, ctx)
        self.options = options
        self._last: tuple[bytes, float] | None = None

    async def session(self, link: Link, emit: Emit) -> None:
        self.up()
        parser = WiegandParser(self.options.format, self.options.bits)
        while True:
            for item in parser.feed(await link.read()):
                if isinstance(item, Rejected):
                    self._ctx.count(f"wiegand.{item.reason}")
                    self.last_error = _SKIPPED[item.reason]
                    log.warning("%s: %s: %r", self.name, self.last_error, item.line)
                elif tap := self._tap(item):
                    await emit(Reading("card.tap", tap))

    def _tap(self, frame: WiegandFrame) -> CardTap | None:
        now = time.monotonic()
        if (
            self._last
            and self._last[0] == frame.uid
            and now - self._last[1] < self.options.debounce_s
        ):
            self._ctx.count("wiegand.debounced")
            self._last = (frame.uid, now)
            return None
        self._last = (frame.uid, now)
        return self._ctx.hasher.card_tap(frame.uid, tech=frame.tech, reader=self.name)


def parse_options(name: str, options: Mapping[str, Any]) -> WiegandOptions:
    return convert_options(name, options, WiegandOptions)


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> WiegandReader:
    return WiegandReader(name, parse_options(name, options), ctx)


register_driver("wiegand")(build)


async def probe(options: Mapping[str, Any], listen_s: float = 3.0) -> ProbeResult:
    """Open the port and listen briefly; say whether the converter sent anything sensible."""
    try:
        opts = parse_options("probe", options)
        transport = await asyncio.to_thread(open_transport, opts.port, baudrate=opts.baudrate)
    except (DriverError, OSError, ValueError) as exc:
        return ProbeResult.fail(f"cannot open the converter: {exc}")
    try:
        items = WiegandParser(opts.format, opts.bits).feed(await listen(transport, listen_s))
    except Exception as exc:  # noqa: BLE001 - a probe reports any failure as its verdict
        return ProbeResult.fail(f"{opts.port} opened but reading failed: {exc}")
    frames = [i for i in items if isinstance(i, WiegandFrame)]
    rejects = [i.reason for i in items if isinstance(i, Rejected)]
    if not items:  # an idle converter is silent until a card is presented
        return ProbeResult.ok(
            f"{opts.port} open at {opts.baudrate} baud; no data in {listen_s:.0f} s "
            "(present a card while probing)"
        )
    kinds = ", ".join(sorted({f.tech for f in frames})) or "none"
    why = f" ({', '.join(sorted(set(rejects)))})" if rejects else ""
    verdict = f"{opts.port}: {len(frames)} valid frame(s) ({kinds}), {len(rejects)} rejected{why}"
    # Rejected frames point at noise on the line or a converter set to another format.
    return ProbeResult.warn(verdict) if rejects else ProbeResult.ok(verdict)
