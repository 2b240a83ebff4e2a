"""Wiegand-26 / Wiegand-34 frames as a Wiegand-to-UART converter prints them, sans-I/O (the driver:
``device_drivers.wiegand``).

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from device_drivers.codecs.lines import LineSplitter, Overlong

MAX_LINE: Final = 64


_FRAME = re.compile(rb"W(26|34):([0-9A-Fa-f]+)")


_DIGITS: Final = {26: 7, 34: 9}
_DECIMAL = re.compile(rb"\d{1,10}")
_FACILITY_CARD = re.compile(rb"(\d{1,3})[,:/ ](\d{1,5})")


@dataclass(frozen=True, slots=True)
class WiegandFrame:
    """A parity-checked Wiegand read."""

    bits: Literal[26, 34]
    #: The payload between the parity bits: facility+card (W26) or card (W34).
    payload: int

    @property
    def facility(self) -> int | None:
        return self.payload >> 16 if self.bits == 26 else None

    @property
    def card(self) -> int:
        return self.payload & 0xFFFF if self.bits == 26 else self.payload

    @property
    def uid(self) -> bytes:
        return self.payload.to_bytes((self.bits - 2) // 8, "big")

    @property
    def tech(self) -> Literal["wiegand26", "wiegand34"]:
        return "wiegand26" if self.bits == 26 else "wiegand34"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A line the parser threw away, and why."""

    reason: Literal["garbage", "bad_parity", "overlong"]
    line: bytes


def check_parity(bits: int, raw: int) -> int | None:
    """The payload of a raw ``bits``-long frame if both parity bits are right, else None."""
    half = (bits - 2) // 2
    payload = (raw >> 1) & ((1 << (bits - 2)) - 1)
    first, second = payload >> half, payload & ((1 << half) - 1)
    leading, trailing = raw >> (bits - 1), raw & 1
    even_ok = (leading + first.bit_count()) % 2 == 0
    odd_ok = (trailing + second.bit_count()) % 2 == 1
    return payload if even_ok and odd_ok else None


Format = Literal["hex", "decimal", "facility-card"]


class WiegandParser:
    """Sans-I/O: converter bytes in, frames and rejects out.

    ``format``: ``hex`` (ours: ``W26:`` + raw bits, parity checked here), ``decimal`` (the
    card number as up to 10 decimal digits, the common "10-digit" output of Wiegand-to-USB /
    RS-232 converters; ``bits`` says whether it is a W26 24-bit or W34 32-bit payload) or
    ``facility-card`` (``FFF,CCCCC``: W26 facility code and card number in decimal). In the
    decimal formats the converter has checked parity already; they carry no parity bits.
    """

    def __init__(self, format: Format = "hex", bits: Literal[26, 34] = 26) -> None:
        self._lines = LineSplitter(MAX_LINE)
        self.format, self.bits = format, bits

    def feed(self, data: bytes) -> list[WiegandFrame | Rejected]:
        return [
            Rejected("overlong", line.raw[:MAX_LINE])
            if isinstance(line, Overlong)
            else self._parse(line)
            if self.format == "hex"
            else self._parse_decimal(line)
            for line in self._lines.feed(data)
        ]

    def _parse_decimal(self, line: bytes) -> WiegandFrame | Rejected:
        text = line.strip(b" \t")
        if self.format == "decimal" and _DECIMAL.fullmatch(text):
            payload = int(text)
            if payload >> (self.bits - 2):
                return Rejected("garbage", line)
            return WiegandFrame(self.bits, payload)
        if self.format == "facility-card" and (m := _FACILITY_CARD.fullmatch(text)):
            facility, card = int(m[1]), int(m[2])
            if facility > 0xFF or card > 0xFFFF:
                return Rejected("garbage", line)
            return WiegandFrame(26, facility << 16 | card)
        return Rejected("garbage", line)

    @staticmethod
    def _parse(line: bytes) -> WiegandFrame | Rejected:
        m = _FRAME.fullmatch(line.strip(b" \t"))
        if m is None:
            return Rejected("garbage", line)
        bits: Literal[26, 34] = 26 if m[1] == b"26" else 34
        if len(m[2]) != _DIGITS[bits] or (raw := int(m[2], 16)) >> bits:
            return Rejected("garbage", line)
        payload = check_parity(bits, raw)
        if payload is None:
            return Rejected("bad_parity", line)
        return WiegandFrame(bits, payload)
