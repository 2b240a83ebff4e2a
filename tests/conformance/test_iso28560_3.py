"""ISO 28560-3 / Danish data model basic block, against published vectors.

Sources:
- [DDM] "RFID Data model for libraries" (Danish Standards / biblstandard.dk), the basic block
  layout adopted as ISO 28560-3 Table 2; its reference CRC check string.
- [LDR] github.com/GallusMax/libdanrfid, a public reference implementation of the Danish data
  model: src/test/java/org/rfid/libdanrfid/DDMDataTest.java (the 32-byte block below, CRC
  0x3E51, item "11223344", country "DE", library "705"), src/main/java/.../CRC.java
  (the check string "RFID tag data model" -> 0x1AEE; two zero bytes appended after the block
  with the CRC bytes left out), DDMData.java (usage nibbles 0, 1, 2, 7, 8, 9).
- [CLAR] biblstandard.dk/rfid/docs/clarification_28560-3.htm (ISO 28560-3:2011 clarification by
  its editor): an item id over 16 bytes is marked 01 in byte 3 and kept in an extension block.
- [ISIL] ISO 15511 as summarised at biblstandard.dk/isil/structure.htm: an ISIL is a prefix
  (a 2-letter ISO 3166-1 country code) and a library identifier joined by a hyphen.
"""

from __future__ import annotations

import pytest

from device_drivers.codecs.iso28560 import (
    LibraryItemTag,
    TagProblem,
    block_crc,
    crc16_ccitt,
    decode_basic_block,
)
from simulators.library_tags import book_block, crc_ccitt

# [LDR] DDMDataTest.java: the block every test there starts from.
PUBLISHED = bytes.fromhex("11010131313232333334340000000000000000513e4445373035000000000000")


def test_reference_crc_check_string() -> None:
    """[DDM]/[LDR] CRC.java: "RFID tag data model" has CRC 0x1AEE (driver and simulator)."""
    assert crc16_ccitt(b"RFID tag data model") == 0x1AEE
    assert crc_ccitt(b"RFID tag data model") == 0x1AEE


def test_ccitt_false_check_value() -> None:
    """CRC-16/CCITT-FALSE catalogue check value: "123456789" -> 0x29B1 (both sides)."""
    assert crc16_ccitt(b"123456789") == crc_ccitt(b"123456789") == 0x29B1


def test_published_block_decodes() -> None:
    """[LDR] DDMDataTest.testGetCRC/testBarcode: CRC 0x3E51 low byte first, item 11223344."""
    assert PUBLISHED[19:21] == b"\x51\x3e"
    assert block_crc(PUBLISHED) == 0x3E51
    assert decode_basic_block(PUBLISHED) == LibraryItemTag(
        item_id="11223344", usage="circulating", parts=1, part=1, owner="DE-705"
    )


def test_simulator_encodes_the_published_block() -> None:
    """[LDR] the same block, produced by the simulator's own encoder byte for byte."""
    assert book_block("11223344", owner="DE-705") == PUBLISHED


def test_published_block_with_its_crc_over_30_bytes_is_refused() -> None:
    """The old reading (no appended zero bytes) gives 0x2272: a tag carrying it is damaged."""
    wrong = bytearray(PUBLISHED)
    wrong[19:21] = crc16_ccitt(PUBLISHED[:19] + PUBLISHED[21:]).to_bytes(2, "little")
    assert wrong[19:21] == b"\x72\x22"
    result = decode_basic_block(bytes(wrong))
    assert isinstance(result, TagProblem)
    assert result.kind == "bad_crc"


@pytest.mark.parametrize(
    ("nibble", "usage"),
    [
        (0x0, "acquisition"),
        (0x1, "circulating"),
        (0x2, "not_circulating"),
        (0x7, "discarded"),
        (0x8, "patron_card"),
        (0x9, "library_equipment"),
    ],
)
def test_usage_nibbles(nibble: int, usage: str) -> None:
    """[DDM] byte 0 low nibble = type of usage; [LDR] DDMData.java V1NEU..V1EQUIPMENT."""
    block = book_block("11223344", owner="DE-705", usage=nibble)
    assert block[0] == 0x10 | nibble  # version 1 in the high nibble
    tag = decode_basic_block(block)
    assert isinstance(tag, LibraryItemTag)
    assert tag.usage == usage


def test_set_information_bytes_1_and_2() -> None:
    """[DDM] byte 1 parts in item, byte 2 part number (ISO 28560-1 4.2.4 set information)."""
    block = book_block("11223344", owner="DE-705", parts=3, part=2)
    assert block[1:3] == b"\x03\x02"
    tag = decode_basic_block(block)
    assert isinstance(tag, LibraryItemTag)
    assert (tag.parts, tag.part) == (3, 2)


def test_field_offsets() -> None:
    """[DDM] item id bytes 3-18 (16, NUL padded), country 21-22, library 23-31 (9, NUL padded)."""
    block = book_block("ABCDEFGHIJKLMNOP", owner="DK-710100")
    assert block[3:19] == b"ABCDEFGHIJKLMNOP"
    assert block[21:23] == b"DK"
    assert block[23:32] == b"710100\x00\x00\x00"
    tag = decode_basic_block(block)
    assert isinstance(tag, LibraryItemTag)
    assert (tag.item_id, tag.owner) == ("ABCDEFGHIJKLMNOP", "DK-710100")


def test_bytes_after_the_basic_block_do_not_change_it() -> None:
    """[DDM] optional (extension) blocks follow byte 31; the basic block's CRC covers 0-31 only."""
    tail = bytes([0x06, 0x01, 0x41, 0x42, 0x43, 0x44]).ljust(32, b"\x00")
    assert decode_basic_block(PUBLISHED + tail) == decode_basic_block(PUBLISHED)


def test_a_long_item_id_marker_is_named() -> None:
    """[CLAR] Table 1 entry 1: byte 3 = 01, the id is in the library extension block."""
    block = bytearray(PUBLISHED)
    block[3:19] = b"\x01".ljust(16, b"\x00")
    block[19:21] = block_crc(bytes(block)).to_bytes(2, "little")
    result = decode_basic_block(bytes(block))
    assert isinstance(result, TagProblem)
    assert result.kind == "bad_item_id"
    assert "extension block" in result.reason
