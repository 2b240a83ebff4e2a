"""Wiegand 26 (HID H10301) and 34 bit frames: the converter line, parity, payload.

Sources:
- [HID] HID "Tech Tip #5, The Standard 26 Bit Format" (identisource.net/26_bit_format_layout.cfm
  and RF IDeas' proximity card formats page): ``PAAAAAAAABBBBBBBBBBBBBBBBP``, bit 1 even parity
  over bits 2-13, bit 26 odd parity over bits 14-25; facility 8 bits, card number 16 bits.
- [CIV] CIVINTEC CN56X0B-X reader user manual, 6.4.2 / 6.4.5: W26 data D4 1B 81 ->
  ``1 11010100 00011011 10000001 0``; W34 data 89 D4 1B 81 -> ``1 … 1``.
- [HIK] Hikvision Wiegand camera operation manual, "Coding process": W34 card 1234567890 =
  0x499602D2 -> even bit 1, odd bit 0.
"""

from __future__ import annotations

import pytest

from device_drivers.codecs.wiegand import Rejected, WiegandFrame, WiegandParser, check_parity
from simulators.wiegand import frame_bits, frame_line


def bits_of(text: str) -> int:
    return int(text.replace(" ", ""), 2)


VECTORS = [
    # (bits, payload, the document's frame)
    (26, 0xD41B81, "1 11010100 00011011 10000001 0"),  # [CIV] 6.4.2
    (34, 0x89D41B81, "1 10001001 11010100 00011011 10000001 1"),  # [CIV] 6.4.5
    (34, 0x499602D2, "1 0100 1001 1001 0110 0000 0010 1101 0010 0"),  # [HIK]
]


@pytest.mark.parametrize(("bits", "payload", "wire"), VECTORS)
def test_driver_checks_the_documents_frames(bits: int, payload: int, wire: str) -> None:
    """[CIV]/[HIK] the parity of each published frame is right and the payload comes out."""
    assert check_parity(bits, bits_of(wire)) == payload


@pytest.mark.parametrize(("bits", "payload", "wire"), VECTORS)
def test_simulator_produces_the_documents_frames(bits: int, payload: int, wire: str) -> None:
    """[CIV]/[HIK] the simulator's converter sets both parity bits as the documents do."""
    assert frame_bits(payload, bits) == bits_of(wire)


@pytest.mark.parametrize(("bits", "payload", "wire"), VECTORS)
def test_either_parity_bit_flipped_is_refused(bits: int, payload: int, wire: str) -> None:
    """[HID] a frame whose first (even) or last (odd) bit is wrong is refused."""
    raw = bits_of(wire)
    assert check_parity(bits, raw ^ (1 << (bits - 1))) is None
    assert check_parity(bits, raw ^ 1) is None


def test_h10301_facility_and_card_fields() -> None:
    """[HID] facility = bits 2-9, card number = bits 10-25 of the 26-bit frame."""
    (item,) = WiegandParser().feed(frame_line(0xD41B81))
    assert isinstance(item, WiegandFrame)
    assert (item.facility, item.card) == (0xD4, 0x1B81)
    assert item.uid == bytes.fromhex("D41B81")


def test_converter_line_of_a_published_frame() -> None:
    """[CIV] the 26-bit frame as a converter line: 7 hex digits, bit 1 most significant."""
    line = frame_line(0xD41B81)
    assert line == f"W26:{bits_of(VECTORS[0][2]):07X}\r\n".encode()
    assert line == b"W26:3A83702\r\n"
    (item,) = WiegandParser().feed(b"W26:3A83703\r\n")  # odd parity bit flipped
    assert isinstance(item, Rejected)
    assert item.reason == "bad_parity"
