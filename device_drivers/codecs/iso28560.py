"""ISO 28560-3 library RFID tags (the fixed-length "Danish" data model), sans-I/O.

The basic block is the first 32 bytes of the tag's user memory:

====== ======================================================================
bytes  content
====== ======================================================================
0      high nibble: data model version (1); low nibble: type of usage
1      parts in the item (1 for a single book, n for an n-volume set)
2      this part's number (1..parts)
3-18   primary item identifier: ASCII, padded with NUL bytes
19-20  CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no final XOR) over bytes
       0-18, then 21-31, then two zero bytes (where the CRC itself would be had it
       been moved to the end), least significant byte first
21-22  owner library country (ISO 3166-1 alpha-2)
23-31  owner library (the ISIL's library identifier, no country prefix, no
       hyphen), padded with NUL bytes
====== ======================================================================

The two appended zero bytes are what the Danish data model's reference CRC does (the CRC is
taken over all 32 bytes with the two CRC bytes moved out of the way and replaced by zeros at
the end): the published block ``11 01 01 "11223344" … 51 3E "DE" "705"`` carries CRC 0x3E51.
A CRC over the 30 bytes alone (this module's first version) refused every real tag.

:func:`decode_basic_block` never raises: anything it cannot trust comes back as a
:class:`TagProblem` whose ``reason`` is a sentence for the terminal's screen and ``counter`` a
short name for ``ctx.count``. An ISO 28560-2 tag (object identifiers, compacted) or any other
layout is reported as an unknown data model, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

BLOCK_LEN: Final = 32
VERSION: Final = 1
ITEM_ID: Final = slice(3, 19)
CRC: Final = slice(19, 21)
COUNTRY: Final = slice(21, 23)
LIBRARY: Final = slice(23, 32)

USAGE: Final = {
    0x0: "acquisition",
    0x1: "circulating",
    0x2: "not_circulating",
    0x7: "discarded",
    0x8: "patron_card",
    0x9: "library_equipment",
}

ProblemKind = Literal["short", "blank", "unknown_model", "bad_crc", "bad_item_id", "bad_parts"]


@dataclass(frozen=True, slots=True)
class LibraryItemTag:
    """What an ISO 28560-3 basic block says about the item it is stuck in."""

    item_id: str
    usage: str
    parts: int
    part: int
    owner: str
    """The owner library's ISIL, ``country-library`` (``""`` when the tag leaves it blank)."""


@dataclass(frozen=True, slots=True)
class TagProblem:
    kind: ProblemKind
    reason: str

    @property
    def counter(self) -> str:
        return f"tag_{self.kind}"


def crc16_ccitt(data: bytes, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE: polynomial 0x1021, MSB first, no final XOR."""
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def block_crc(block: bytes) -> int:
    """The CRC a 32-byte basic block should carry in bytes 19-20.

    The CRC bytes are left out and two zero bytes appended after byte 31, as in the Danish
    data model's reference implementation (see the module docstring).
    """
    return crc16_ccitt(bytes(block[:19]) + bytes(block[21:32]) + b"\x00\x00")


def _owner(block: bytes) -> str:
    """The ISIL ``country-library`` from bytes 21-22 and 23-31 (either may be blank)."""
    country = _text(block[COUNTRY]) or ""
    library = _text(block[LIBRARY]) or ""
    return f"{country}-{library}" if country and library else country or library


def _text(field: bytes) -> str | None:
    """A NUL-padded ASCII field, or None if it holds anything else (or a NUL in the middle)."""
    body = field.rstrip(b"\x00")
    if b"\x00" in body or any(not 0x20 < b < 0x7F for b in body):
        return None
    return body.decode("ascii")


def decode_basic_block(memory: bytes) -> LibraryItemTag | TagProblem:
    """The item a tag's user memory (at least its first 32 bytes) describes, or why not."""
    if len(memory) < BLOCK_LEN:
        return TagProblem(
            "short", f"only {len(memory)} bytes of tag memory were read, the layout needs 32"
        )
    block = bytes(memory[:BLOCK_LEN])
    if not any(block):
        return TagProblem("blank", "the tag is blank: it was never programmed for this library")
    version = block[0] >> 4
    if version != VERSION:
        return TagProblem(
            "unknown_model",
            f"unknown tag data model (first byte {block[0]:02X}, not ISO 28560-3 version 1): "
            "the book needs a desk check",
        )
    stored = int.from_bytes(block[CRC], "little")
    if stored != (want := block_crc(block)):
        return TagProblem(
            "bad_crc",
            f"the tag's data is damaged (CRC {stored:04X}, expected {want:04X}): "
            "lay the book down again or take it to the desk",
        )
    item_id = _text(block[ITEM_ID])
    if block[3] == 0x01 and not item_id:
        # ISO 28560-3 (biblstandard.dk clarification, Table 1 entry 1): an id over 16 bytes
        # is marked 01 here and kept in the library extension block, which is not read.
        return TagProblem(
            "bad_item_id",
            "the tag keeps its item identifier in an extension block: the book needs a desk check",
        )
    if not item_id:
        return TagProblem("bad_item_id", "the tag holds no readable item identifier")
    parts, part = block[1], block[2]
    if not 1 <= part <= parts:
        return TagProblem("bad_parts", f"the tag says part {part} of {parts}")
    return LibraryItemTag(
        item_id=item_id,
        usage=USAGE.get(block[0] & 0x0F, f"usage_{block[0] & 0x0F}"),
        parts=parts,
        part=part,
        owner=_owner(block),
    )
