"""Decimal outputs of Wiegand converters (option ``format``) give the same card as ``hex``.

No published specification exists for these outputs (see docs/profiles.md): the vectors are
arithmetic. A W26 read of facility 0x12 card 0xABCD is facility 18, card 43981, and as one
24-bit number 1223629; a W34 read of 0xDEADBEEF is 3735928559 in decimal.
"""

from __future__ import annotations

import pytest

from device_drivers.base import DriverError
from device_drivers.codecs.wiegand import Rejected, WiegandFrame, WiegandParser
from device_drivers.wiegand import parse_options
from simulators.wiegand import frame_line


def test_decimal_formats_give_the_same_uid_as_the_hex_line() -> None:
    (hex_frame,) = WiegandParser().feed(frame_line(0x12ABCD))
    assert isinstance(hex_frame, WiegandFrame)
    assert WiegandParser("decimal").feed(b"0001223629\r\n") == [hex_frame]
    assert WiegandParser("facility-card").feed(b"018,43981\r\n") == [hex_frame]
    assert WiegandParser("facility-card").feed(b"18:43981\r\n") == [hex_frame]
    (w34,) = WiegandParser("decimal", 34).feed(b"3735928559\r\n")
    assert isinstance(w34, WiegandFrame)
    assert (w34.uid, w34.tech) == (bytes.fromhex("DEADBEEF"), "wiegand34")


@pytest.mark.parametrize(
    ("fmt", "line"),
    [
        ("decimal", b"16777216"),  # 2**24 does not fit a W26 payload
        ("decimal", b"12345678901"),
        ("decimal", b"W26:0000001"),
        ("facility-card", b"256,1"),
        ("facility-card", b"1,65536"),
        ("facility-card", b"0001223629"),
    ],
)
def test_out_of_range_and_foreign_lines_are_rejected(fmt: str, line: bytes) -> None:
    items = WiegandParser(fmt, 26).feed(line + b"\r\n")  # type: ignore[arg-type]
    assert items == [Rejected("garbage", line)]


def test_format_option_is_checked() -> None:
    assert parse_options("d", {"port": "x", "format": "decimal", "bits": 34}).bits == 34
    with pytest.raises(DriverError, match="format"):
        parse_options("d", {"port": "x", "format": "octal"})
