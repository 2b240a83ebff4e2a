"""ATR → card technology, from bytes alone.

Every ATR here is built the way PC/SC part 3 (3.1.3.2.3) says a contactless reader builds it,
``3B 8n 80 01 <n historical bytes> TCK``, and most are ATRs real readers report:

* storage cards: historical bytes ``80 4F 0C A0 00 00 03 06 SS C0 C1 00 00 00 00`` (RID of the
  PC/SC Workgroup, SS the standard, C0 C1 the card name from the part 3 supplement);
* ISO 14443-4 type A: the ATS historical bytes; type B: ATQB application data (4 bytes),
  protocol info (3 bytes), MBLI in the high nibble of the last byte.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.codecs.pcsc import card_tech, contactless_historical

TECHS = {"iso14443a", "iso14443b", "felica", "iso15693", "mifare_classic", "unknown"}


def atr(hexstr: str) -> bytes:
    raw = bytes.fromhex(hexstr)
    tck = 0
    for b in raw[1:-1]:
        tck ^= b
    assert tck == raw[-1], f"bad TCK in test data {hexstr}: want {tck:02X}"
    return raw


def storage(ss: str, name: str) -> bytes:
    body = bytes.fromhex(f"3B 8F 80 01 80 4F 0C A0 00 00 03 06 {ss} {name} 00 00 00 00")
    tck = 0
    for b in body[1:]:
        tck ^= b
    return body + bytes([tck])


@pytest.mark.parametrize(
    ("hexstr", "tech"),
    [
        ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A", "mifare_classic"),  # 1K
        ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 02 00 00 00 00 69", "mifare_classic"),  # 4K
        ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 03 00 00 00 00 68", "iso14443a"),  # UL
        ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 11 00 3B 00 00 00 00 42", "felica"),
        ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 0B 00 14 00 00 00 00 77", "iso15693"),  # ICODE
        ("3B 8F 80 01 80 4F 0C A0 00 00 03 06 0B 00 0E 00 00 00 00 6D", "iso15693"),  # Infineon
        ("3B 81 80 01 80 80", "iso14443a"),  # MIFARE DESFire: ATS historical byte 80
        ("3B 86 80 01 06 75 77 81 02 80 00", "iso14443a"),  # a reader passing the whole ATS
        ("3B 87 80 01 80 31 C0 73 D6 21 C0 33", "iso14443a"),  # GeldKarte: compact-TLV
        ("3B 88 80 01 1C 2D 94 11 F7 71 85 00 BE", "iso14443b"),  # EZ-Link (CEPAS)
        ("3B 88 80 01 00 00 00 00 33 81 81 00 3A", "iso14443b"),
        ("3B 88 80 01 00 00 00 00 91 81 C1 00 D8", "iso14443b"),  # Japanese My Number card
        ("3B 88 80 01 00 00 00 00 00 71 71 00 09", "iso14443b"),  # OPUS (Montreal)
        ("3B 8C 80 01 50 12 23 45 56 12 53 54 4E 33 81 C3 55", "iso14443b"),  # whole ATQB
        ("3B 88 80 01 00 00 00 00 00 00 00 00 09", "unknown"),  # protocol info zeroed
    ],
)
def test_real_world_atrs(hexstr: str, tech: str) -> None:
    assert card_tech(atr(hexstr)) == tech


@pytest.mark.parametrize(
    ("ss", "name", "tech"),
    [
        ("03", "00 26", "mifare_classic"),  # MIFARE Mini
        ("03", "00 36", "mifare_classic"),  # MIFARE Plus SL1 2K answers as a Classic
        ("03", "00 39", "mifare_classic"),  # MIFARE Plus SL2 4K
        ("03", "00 3A", "iso14443a"),  # MIFARE Ultralight C
        ("03", "00 30", "iso14443a"),  # Topaz / Jewel
        ("03", "FF 28", "iso14443a"),  # JCOP 30 reported as a storage card
        ("01", "00 00", "iso14443a"),  # ISO 14443 A part 1, no card name
        ("02", "00 01", "mifare_classic"),
        ("07", "00 07", "iso14443b"),  # SRIX4K on ISO 14443 B part 3
        ("05", "00 00", "iso14443b"),
        ("09", "00 00", "iso15693"),
        ("0C", "00 17", "iso15693"),  # PicoPass on ISO 15693 part 4
        ("00", "00 3B", "felica"),  # FeliCa by card name alone
        ("00", "00 00", "unknown"),  # "no information given"
        ("0D", "00 00", "unknown"),  # contact (ISO 7816-10) storage card in a dual reader
        ("04", "00 01", "unknown"),  # RFU standard
    ],
)
def test_storage_card_standards_and_names(ss: str, name: str, tech: str) -> None:
    assert card_tech(storage(ss, name)) == tech


def test_eight_historical_bytes_decided_by_their_structure() -> None:
    # compact-TLV (tag 3 len 1, tag 6 len 4) that is no ATQB: protocol type nibble is 2
    assert card_tech(atr("3B 88 80 01 80 31 C0 64 11 22 33 44 58")) == "iso14443a"
    # both a valid compact-TLV and a plausible ATQB: say so rather than guess
    assert card_tech(atr("3B 88 80 01 80 31 C0 64 11 21 33 40 5F")) == "unknown"


def test_14443_4_without_historical_bytes_is_type_a() -> None:
    assert card_tech(atr("3B 80 80 01 01")) == "iso14443a"


@pytest.mark.parametrize(
    "hexstr",
    [
        "",
        "3B",
        "3B 8F 80 01 80 4F 0C A0",  # cut short
        "3B 02 14 50",  # a contact card
        "3B 9F 96 80 1F C7 80 31 E0 73 FE 21 1B 63 3A 20 4E 83 00 90 00 31",  # contact SIM
        "3F 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A",  # inverse convention
    ],
)
def test_not_contactless(hexstr: str) -> None:
    assert card_tech(bytes.fromhex(hexstr)) == "unknown"


def test_historical_bytes_extracted() -> None:
    assert contactless_historical(atr("3B 81 80 01 80 80")) == b"\x80"
    assert contactless_historical(bytes.fromhex("3B 82 80 01 80")) is None


@given(st.binary(max_size=40))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    assert card_tech(raw) in TECHS


@given(st.binary(max_size=15))
def test_any_contactless_atr_gets_a_tech(hist: bytes) -> None:
    raw = bytes([0x3B, 0x80 | len(hist), 0x80, 0x01]) + hist + b"\x00"
    assert card_tech(raw) in TECHS
