"""The ISO 28560-3 basic-block codec: good tags, every problem named, arbitrary bytes safe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.codecs.iso28560 import (
    LibraryItemTag,
    TagProblem,
    block_crc,
    crc16_ccitt,
    decode_basic_block,
)
from simulators.library_tags import book_block, iso28560_2_block, memory_of


def test_crc_is_ccitt_false() -> None:
    # The standard check value of CRC-16/CCITT-FALSE.
    assert crc16_ccitt(b"123456789") == 0x29B1


def test_a_programmed_tag_decodes() -> None:
    block = book_block("T0000123", owner="CN-SCH001", parts=2, part=2)
    assert decode_basic_block(memory_of(block)) == LibraryItemTag(
        item_id="T0000123", usage="circulating", parts=2, part=2, owner="CN-SCH001"
    )
    assert int.from_bytes(block[19:21], "little") == block_crc(block)


def test_usage_is_reported() -> None:
    tag = decode_basic_block(book_block("REF-1", usage=2))
    assert isinstance(tag, LibraryItemTag)
    assert tag.usage == "not_circulating"


@pytest.mark.parametrize(
    ("memory", "kind"),
    [
        (book_block("T1")[:20], "short"),
        (bytes(32), "blank"),
        (iso28560_2_block("T1"), "unknown_model"),
        (book_block("T1", version=2), "unknown_model"),
        (book_block("T1", corrupt_crc=True), "bad_crc"),
        (book_block("T1", parts=1, part=3), "bad_parts"),
    ],
)
def test_problems_are_named(memory: bytes, kind: str) -> None:
    result = decode_basic_block(memory)
    assert isinstance(result, TagProblem)
    assert result.kind == kind
    assert result.counter == f"tag_{kind}"
    assert result.reason


def test_a_flipped_bit_in_the_item_id_fails_the_crc() -> None:
    block = bytearray(book_block("T0000123"))
    block[5] ^= 0x01
    result = decode_basic_block(bytes(block))
    assert isinstance(result, TagProblem)
    assert result.kind == "bad_crc"


def test_an_item_id_with_control_bytes_is_refused() -> None:
    block = bytearray(book_block("T0000123"))
    block[4] = 0x07
    crc = block_crc(bytes(block))
    block[19:21] = crc.to_bytes(2, "little")
    result = decode_basic_block(bytes(block))
    assert isinstance(result, TagProblem)
    assert result.kind == "bad_item_id"


@given(st.binary(max_size=80))
def test_arbitrary_bytes_never_raise(memory: bytes) -> None:
    result = decode_basic_block(memory)
    assert isinstance(result, LibraryItemTag | TagProblem)


@given(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=16),
    st.integers(1, 255),
)
def test_any_programmed_item_round_trips(item_id: str, parts: int) -> None:
    tag = decode_basic_block(book_block(item_id, parts=parts, part=parts))
    assert isinstance(tag, LibraryItemTag)
    assert (tag.item_id, tag.parts) == (item_id, parts)
