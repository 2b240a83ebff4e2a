"""A book tag written straight from the standard is lent through pcscd + vpcd at the terminal.

The tag's bytes come from an encoder written here from the Danish data model / ISO 28560-3
basic block layout (sources as in test_iso28560_3.py: [DDM] the layout, [LDR]
GallusMax/libdanrfid DDMDataTest.java's block and CRC.java's CRC with two appended zero
bytes), not from simulators.library_tags.book_block: the project's simulator and driver once
shared a CRC misreading, so the one the driver must read here is the document's. Only the
vpcd card transport (BookTag, as in tests/integration/test_library_terminal.py) is reused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from device_drivers.base import DriverContext, DriverState
from device_drivers.em4100 import Em4100Reader
from device_drivers.library import build
from device_drivers.pcsc import ReaderWatcher
from device_drivers.plumbing.link import LinkedDriver
from schemas.events import LibraryLoan
from simulators.em4100 import Em4100Simulator
from simulators.harness import wait_until
from simulators.library_tags import BookTag
from simulators.pcscd import Pcscd
from tests.driver_harness import HASHER, RunningDriver, ctx_fixture, fast_backoff, until
from tests.pcsc import reader_empty

pytestmark = pytest.mark.integration

fast = fast_backoff(Em4100Reader, LinkedDriver, ReaderWatcher)
ctx = ctx_fixture("lib-0201")

CARD = bytes.fromhex("1A00C0FFEE")
TAG_UID = bytes.fromhex("E004015087654321")
PUBLISHED = bytes.fromhex("11010131313232333334340000000000000000513e4445373035000000000000")


def ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE, bit by bit from its definition: poly 1021, init FFFF, MSB first."""
    reg = 0xFFFF
    for bit in (byte >> (7 - k) & 1 for byte in data for k in range(8)):
        top = reg >> 15
        reg = (reg << 1) & 0xFFFF
        if top ^ bit:
            reg ^= 0x1021
    return reg


def danish_block(item_id: str, country: str, library: str) -> bytes:
    """[DDM] basic block, version 1, usage 1 (circulating), part 1 of 1."""
    block = bytearray(32)
    block[0] = 0x11
    block[1] = block[2] = 1
    block[3 : 3 + len(item_id)] = item_id.encode("ascii")
    block[21:23] = country.encode("ascii")
    block[23 : 23 + len(library)] = library.encode("ascii")
    # [LDR] CRC.java: bytes 19-20 skipped, two zero bytes after byte 31; stored low byte first.
    crc = ccitt_false(bytes(block[:19]) + bytes(block[21:]) + b"\x00\x00")
    block[19], block[20] = crc & 0xFF, crc >> 8
    return bytes(block)


def test_the_independent_encoder_gives_the_published_block() -> None:
    """[LDR] DDMDataTest.java: the encoder here reproduces the published block exactly."""
    assert danish_block("11223344", "DE", "705") == PUBLISHED


@pytest.fixture
def rdm(tmp_path: Path) -> Iterator[Em4100Simulator]:
    with Em4100Simulator(tmp_path / "ttyCARD") as sim:
        yield sim


@pytest.fixture
def slot(pcscd: Pcscd) -> Iterator[BookTag]:
    tag = BookTag(pcscd.port)
    try:
        yield tag
    finally:
        tag.close()
    for reader in pcscd.readers:
        wait_until(partial(reader_empty, reader), 10, f"{reader} to be empty")


async def test_a_standard_tag_is_lent_at_the_terminal(
    ctx: DriverContext,
    rdm: Em4100Simulator,
    slot: BookTag,
    pcscd: Pcscd,
) -> None:
    """A student taps, the published-layout tag is laid on the pad: one library.loan for it."""
    options = {
        "cards": [{"type": "em4100", "port": str(rdm.link), "hold_ms": 0, "name": "lib-card"}],
        "terminal": "lib-0201",
        "session_s": 30,
        "pad": {"reader": pcscd.label, "poll_ms": 100},
    }
    terminal = build("lib-0201", options, ctx)
    memory = (PUBLISHED + danish_block("B-000042", "DK", "710100")).ljust(112, b"\x00")
    async with RunningDriver(terminal, ready=DriverState.OK, what="the terminal") as out:
        rdm.present(CARD)
        await until(lambda: terminal.handled >= 1, "the card tap")
        await asyncio.to_thread(slot.lay, TAG_UID, memory)
        await out.until_count(1, LibraryLoan)
        await asyncio.to_thread(slot.lift)
    (loan,) = out.of_type(LibraryLoan)
    assert loan.item_id == "11223344"
    assert loan.source == "rfid"
    assert loan.student_hash == HASHER.hash(CARD)
    assert "library.tag_bad_crc" not in ctx.counters
    errors = [m.text for m in terminal.messages if m.level == "error"]
    assert errors == []
