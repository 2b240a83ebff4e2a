"""The pcsc driver reading virtual cards through a real pcscd and its vpcd virtual readers.

This module owns one pcscd for its tests (simulators.pcscd): in a private mount namespace where
the kernel allows it, so a pcscd already running on the machine is left alone; elsewhere on the
system socket, failing with a clear message if another pcscd holds it. The client library reads
``PCSCLITE_CSOCK_NAME`` once per process, so the path is fixed for the test process.
Each insert/remove cycle costs ~0.5-0.8 s of pcscd polling: keep them few.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, UidHasher
from device_drivers.pcsc import PcscCardReader, ReaderWatcher, build, probe
from schemas.events import CardTap
from simulators.harness import wait_until
from simulators.pcscd import Pcscd
from simulators.vpcd_card import DESFIRE_ATR, MIFARE_1K_ATR, TYPE_B_ATR, VirtualCard
from tests.driver_harness import HASHER, KEY, RunningDriver, ctx_fixture, fast_backoff
from tests.driver_harness import until as poll
from tests.pcsc import reader_empty

pytestmark = pytest.mark.integration


UID_A = bytes.fromhex("04A1B2C3D4E5F6")
UID_B = bytes.fromhex("DEADBEEF")


@pytest.fixture
def cards(pcscd: Pcscd) -> Iterator[tuple[VirtualCard, VirtualCard]]:
    """A virtual card for each of vpcd's two readers; both readers empty before and after."""
    with VirtualCard(pcscd.port) as first, VirtualCard(pcscd.port + 1) as second:
        for reader in pcscd.readers:
            wait_until(lambda r=reader: reader_empty(r), 10, f"{reader} to be empty")
        yield first, second
    for reader in pcscd.readers:
        wait_until(lambda r=reader: reader_empty(r), 10, f"{reader} to be empty")


@pytest.fixture
def card(cards: tuple[VirtualCard, VirtualCard]) -> VirtualCard:
    return cards[0]


fast = fast_backoff(ReaderWatcher)
ctx = ctx_fixture("cr-0101")


async def until(pred: Callable[[], object], what: str) -> None:
    """pcscd polls slowly: a longer deadline than the harness default."""
    await poll(pred, what, within=10.0)


def running(driver: PcscCardReader) -> RunningDriver:
    return RunningDriver(
        driver,
        ready=DriverState.OK,
        what="the driver to find its reader",
        threads="pcsc-",
        within=10.0,
    )


async def on_reader(card: VirtualCard, uid: bytes, atr: bytes = MIFARE_1K_ATR) -> None:
    await asyncio.to_thread(card.present, uid, atr)


async def off_reader(card: VirtualCard, reader: str) -> None:
    await asyncio.to_thread(card.remove)
    await until(lambda: reader_empty(reader), f"{reader} to see the card go")


def reader(ctx: DriverContext, pcscd: Pcscd, **options: Any) -> PcscCardReader:
    return build("door-1", {"reader": pcscd.readers[0], "poll_ms": 200, **options}, ctx)


async def test_one_tap_per_insertion(pcscd: Pcscd, card: VirtualCard, ctx: DriverContext) -> None:
    driver = reader(ctx, pcscd, reader_name="room-204")
    async with running(driver) as out:
        await on_reader(card, UID_A)
        await until(lambda: out.taps, "the first tap")
        await off_reader(card, pcscd.readers[0])
        await on_reader(card, UID_A, DESFIRE_ATR)
        await out.until_count(2, CardTap, "a second tap for the second insertion")
        await off_reader(card, pcscd.readers[0])
    assert out.taps == [
        CardTap(uid_hash=HASHER.hash(UID_A), tech="mifare_classic", reader="room-204"),
        CardTap(uid_hash=HASHER.hash(UID_A), tech="iso14443a", reader="room-204"),
    ]
    assert card.apdus == [bytes.fromhex("FFCA000000")] * 2
    assert not ctx.counters


async def test_6c_reissues_with_le(pcscd: Pcscd, card: VirtualCard) -> None:
    ctx = DriverContext("cr-0101", UidHasher(KEY, send_raw=True))
    async with running(reader(ctx, pcscd)) as out:
        card.set_response(b"\x6c\x07")
        await on_reader(card, UID_A, TYPE_B_ATR)
        await until(lambda: out.taps, "a tap after the re-issued GET UID")
    assert out.taps == [
        CardTap(
            uid_hash=HASHER.hash(UID_A), tech="iso14443b", reader="door-1", uid=UID_A.hex().upper()
        )
    ]
    assert card.apdus == [bytes.fromhex("FFCA000000"), bytes.fromhex("FFCA000007")]
    assert ctx.counters == {"pcsc.uid_retry": 1}


async def test_failed_reads_counted_and_next_card_read(
    pcscd: Pcscd, cards: tuple[VirtualCard, VirtualCard], ctx: DriverContext
) -> None:
    first, second = cards
    driver = reader(ctx, pcscd, reader="campus vpcd")  # both slots, matched case-insensitively
    async with running(driver) as out:
        first.set_response(b"\x63\x00")
        second.set_response(b"\x6a\x81")
        await on_reader(first, UID_A)
        await on_reader(second, UID_B)
        await until(lambda: ctx.counters.get("pcsc.read_failed") == 2, "two failed reads")
        assert driver.last_error is not None
        assert "operation failed" in driver.last_error or "not supported" in driver.last_error
        await off_reader(first, pcscd.readers[0])
        await on_reader(first, UID_B)
        await until(lambda: out.taps, "the next card's tap")
        await off_reader(second, pcscd.readers[1])
        second.set_response(b"\x6f\x00")
        await on_reader(second, UID_A)
        await until(lambda: ctx.counters.get("pcsc.read_error") == 1, "an error counted")
        assert driver.state == DriverState.OK
        assert "6F 00" in (driver.last_error or "")
    assert out.taps == [
        CardTap(uid_hash=HASHER.hash(UID_B), tech="mifare_classic", reader="door-1")
    ]
    assert ctx.counters == {"pcsc.read_failed": 2, "pcsc.read_error": 1}


async def test_pcscd_restart(pcscd: Pcscd, card: VirtualCard, ctx: DriverContext) -> None:
    driver = reader(ctx, pcscd)
    async with running(driver) as out:
        await on_reader(card, UID_A)
        await until(lambda: out.taps, "a tap before the restart")
        await asyncio.to_thread(pcscd.kill)
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        await until(lambda: "cannot reach pcscd" in (driver.last_error or ""), "the reason")
        result = await probe({"reader": pcscd.readers[0]})
        assert result.status == "fail"
        assert "cannot reach pcscd" in result.message
        await asyncio.to_thread(pcscd.start)
        await out.until_state(DriverState.OK, "OK after the restart")
        # the card lay there all along: seen again, but no second tap
        await until(lambda: ctx.counters.get("pcsc.still_present") == 1, "the card seen again")
        await off_reader(card, pcscd.readers[0])
        await on_reader(card, UID_B)
        await out.until_count(2, CardTap, "a tap after the restart")
    assert [t.uid_hash for t in out.taps] == [HASHER.hash(UID_A), HASHER.hash(UID_B)]
    assert ctx.counters["pcsc.disconnected"] == 1


async def test_no_matching_reader(pcscd: Pcscd, ctx: DriverContext) -> None:
    driver = build("door-9", {"reader": "no such reader"}, ctx)
    async with RunningDriver(driver, check_stopped=False, within=10.0) as out:
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert driver.last_error == "no PC/SC reader whose name contains 'no such reader'"


async def test_probe(pcscd: Pcscd, card: VirtualCard) -> None:
    await on_reader(card, UID_B)
    await until(lambda: not reader_empty(pcscd.readers[0]), "the card on the reader")
    result = await probe({"reader": "Campus vpcd"})
    assert result.status == "ok"
    assert f"{pcscd.readers[0]}: mifare_classic card, UID read (4 bytes)" in result.message
    assert f"{pcscd.readers[1]}: no card" in result.message
    result = await probe({"reader": "nothing"})
    assert result.status == "fail"
    assert "no PC/SC reader whose name contains 'nothing'" in result.message
