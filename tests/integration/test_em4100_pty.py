"""The em4100 driver reading the RDM6300 simulator through a real pty and pyserial."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from serial.tools import list_ports

from device_drivers.base import DriverContext, DriverState, UidHasher
from device_drivers.em4100 import Em4100Reader, build, probe
from schemas.events import CardTap
from simulators.em4100 import Em4100Simulator
from tests.driver_harness import HASHER, KEY, RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def present(sim: Em4100Simulator, card: bytes, repeats: int = 1) -> bytes:
    """Hold a card in the field without blocking the loop the driver runs on."""
    return await asyncio.to_thread(sim.present, card, repeats)


def running(driver: Em4100Reader) -> RunningDriver:
    return RunningDriver(driver, ready=DriverState.OK, what="the port to open", threads="serial-")


fast = fast_backoff(Em4100Reader, PRESENCE_CHECK_S=0.2)
ctx = ctx_fixture("cr-0101")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Em4100Simulator]:
    with Em4100Simulator(tmp_path / "ttyRFID") as s:
        yield s


def reader(ctx: DriverContext, sim: Em4100Simulator, **options: Any) -> Em4100Reader:
    return build("em-1", {"port": str(sim.link), "reader": "door-1", **options}, ctx)


def card(n: int) -> bytes:
    return bytes([0x1E, 0, 0, n >> 8, n & 0xFF])


async def test_taps_become_hashed_card_taps(sim: Em4100Simulator, ctx: DriverContext) -> None:
    async with running(reader(ctx, sim, hold_ms=200)) as out:
        uids = [await present(sim, card(n)) for n in range(10)]
        await out.until_count(10, CardTap, "ten taps")
    assert out.taps == [
        CardTap(uid_hash=HASHER.hash(uid), tech="em4100", reader="door-1") for uid in uids
    ]
    assert {r.type for r in out.readings} == {"card.tap"}


async def test_raw_uid_only_when_opted_out(sim: Em4100Simulator) -> None:
    ctx = DriverContext("cr-0101", UidHasher(KEY, send_raw=True))
    async with running(reader(ctx, sim)) as out:
        await present(sim, bytes.fromhex("62E3086CED"))
        await until(lambda: out.taps, "a tap")
    assert out.taps[0].uid == "62E3086CED"


async def test_a_held_card_is_one_tap(sim: Em4100Simulator, ctx: DriverContext) -> None:
    async with running(reader(ctx, sim, hold_ms=400)) as out:
        await present(sim, card(1), repeats=12)  # ~600 ms in the field, a frame every 50 ms
        await present(sim, card(2), repeats=3)
        await out.until_count(2, CardTap, "one tap per card")
        await until(lambda: ctx.counters.get("em4100.repeats") == 13, "repeats absorbed")
        await asyncio.sleep(0.6)  # the card stays away longer than hold_ms: a new presence
        await present(sim, card(1), repeats=2)
        await out.until_count(3, CardTap, "the returning card")
    assert [t.uid_hash for t in out.taps] == [HASHER.hash(card(n)) for n in (1, 2, 1)]


async def test_bad_frames_counted_and_neighbours_read(
    sim: Em4100Simulator, ctx: DriverContext
) -> None:
    driver = reader(ctx, sim, hold_ms=0)
    async with running(driver) as out:
        await present(sim, card(1))
        sim.send_raw(b"\x0262E3086CED09\x03")  # wrong checksum
        await asyncio.to_thread(sim.present, card(2), 1, bad_checksum=True)
        sim.send_raw(b"\xff\xfe line noise \x03")
        sim.send_raw(b"\x0262E3")  # cut short by the next frame
        await present(sim, card(3))
        sim.send_raw(b"\x0262E3086CEDXY\x03")
        await present(sim, card(4))
        await out.until_count(3, CardTap, "the three good taps")
        await until(lambda: ctx.counters.get("em4100.bad_hex") == 1, "all bad frames counted")
        assert driver.state == DriverState.OK  # bad frames are not a broken port
        assert driver.last_error == "skipped a frame with non-hex characters"
    assert [t.uid_hash for t in out.taps] == [HASHER.hash(card(n)) for n in (1, 3, 4)]
    assert {k: v for k, v in ctx.counters.items() if k != "em4100.repeats"} == {
        "em4100.bad_checksum": 2,
        "em4100.garbage": 1,
        "em4100.short": 1,
        "em4100.bad_hex": 1,
    }


async def test_unplug_and_replug_under_another_name(
    sim: Em4100Simulator, ctx: DriverContext
) -> None:
    driver = reader(ctx, sim)
    async with running(driver) as out:
        await present(sim, card(1))
        await out.until_count(1, CardTap, "a tap before the unplug")
        first = sim.pts_name
        sim.unplug()
        assert sim.link.is_symlink()
        assert not sim.link.exists()  # dangling, like a by-id name of an unplugged adapter
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert str(sim.link) in (driver.last_error or "")
        assert sim.replug() != first
        await out.until_state(DriverState.OK, "OK after the re-plug")
        await present(sim, card(2))
        await out.until_count(2, CardTap, "a tap after the re-plug")
    assert ctx.counters["em4100.disconnected"] == 1


async def test_silent_swap_of_the_device_is_noticed(
    sim: Em4100Simulator, ctx: DriverContext, tmp_path: Path
) -> None:
    """The link moves to another device while the old one stays open and silent."""
    driver = reader(ctx, sim)
    other = Em4100Simulator(tmp_path / "ttyOther")
    try:
        async with running(driver) as out:
            other.link.replace(sim.link)  # sim.link now leads to the other reader's pty
            await until(lambda: ctx.counters.get("em4100.disconnected") == 1, "the swap noticed")
            await out.until_state(DriverState.OK, "reading the new device")
            await present(other, card(9))
            await until(lambda: out.taps, "a tap from the new device")
        assert "disappeared" in (driver.last_error or "")
    finally:
        other.close()


async def test_usb_ids_found_again_after_replug(
    sim: Em4100Simulator, ctx: DriverContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``usb:VID:PID:SERIAL`` is looked up at every open (ptys are not listed: fake the list)."""
    adapter = SimpleNamespace(device=str(sim.link), vid=0x1A86, pid=0x7523, serial_number="R1")
    monkeypatch.setattr(list_ports, "comports", lambda: [adapter])
    driver = build("em-1", {"port": "usb:1a86:7523:R1"}, ctx)
    async with running(driver) as out:
        sim.unplug()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        sim.replug()
        await out.until_state(DriverState.OK, "OK again")
        await present(sim, card(5))
        await until(lambda: out.taps, "a tap")
    assert out.taps[0].reader == "em-1"


async def test_missing_port_at_start_then_plugged(tmp_path: Path, ctx: DriverContext) -> None:
    link = tmp_path / "ttyLATE"
    driver = build("em-2", {"port": str(link)}, ctx)
    async with RunningDriver(driver, check_stopped=False) as out:
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        with Em4100Simulator(link) as late:
            await out.until_state(DriverState.OK, "OK once plugged")
            await present(late, card(7))
            await until(lambda: out.taps, "a tap")


async def test_random_demo_feeds_the_driver(sim: Em4100Simulator, ctx: DriverContext) -> None:
    cards = [card(n) for n in range(3)]
    async with running(reader(ctx, sim, hold_ms=0)) as out:
        sim.start_random(rate_hz=20, cards=cards, max_repeats=2, seed=1)
        await until(lambda: len(out.taps) >= 5, "taps from the demo thread")
        sim.stop_random()
    assert {t.uid_hash for t in out.taps} <= {HASHER.hash(c) for c in cards}


async def test_probe(sim: Em4100Simulator) -> None:
    async def tap_soon() -> None:
        await asyncio.sleep(0.3)
        await present(sim, card(1), repeats=2)
        sim.send_raw(b"\x02junk\x03")

    feeder = asyncio.create_task(tap_soon())
    result = await probe({"port": str(sim.link)}, listen_s=1.0)
    await feeder
    assert result.status == "warn"  # the junk frame was bad
    assert result.message.endswith("1 card(s) seen, 1 bad frame(s) (short)")
    result = await probe({"port": "/nonexistent/tty"}, listen_s=0.1)
    assert result.status == "fail"
    assert "cannot open" in result.message
