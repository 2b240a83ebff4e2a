"""The wiegand driver reading the converter simulator through a real pty and pyserial."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, UidHasher
from device_drivers.wiegand import WiegandReader, build, probe
from schemas.events import CardTap
from simulators.wiegand import WiegandConverter
from tests.driver_harness import KEY, RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration


def running(driver: WiegandReader) -> RunningDriver:
    return RunningDriver(driver, ready=DriverState.OK, what="the port to open", threads="serial-")


fast = fast_backoff(WiegandReader)
ctx = ctx_fixture("cr-0101")


@pytest.fixture
def converter(tmp_path: Path) -> Iterator[WiegandConverter]:
    with WiegandConverter(tmp_path / "ttyWG") as conv:
        yield conv


def reader(ctx: DriverContext, conv: WiegandConverter, **options: Any) -> WiegandReader:
    return build("door-1", {"port": str(conv.link), "debounce_s": 0.5, **options}, ctx)


async def test_w26_and_w34_hashes(converter: WiegandConverter, ctx: DriverContext) -> None:
    driver = reader(ctx, converter)
    async with running(driver) as out:
        uid26 = converter.present(0xABCD, facility=0x12)
        uid34 = converter.present(0xDEADBEEF, bits=34)
        await out.until_count(2, CardTap, "two taps")
    hasher = UidHasher(KEY)
    assert out.taps == [
        CardTap(uid_hash=hasher.hash(b"\x12\xab\xcd"), tech="wiegand26", reader="door-1"),
        CardTap(uid_hash=hasher.hash(b"\xde\xad\xbe\xef"), tech="wiegand34", reader="door-1"),
    ]
    assert (uid26, uid34) == (b"\x12\xab\xcd", b"\xde\xad\xbe\xef")
    assert all(r.type == "card.tap" for r in out.readings)


async def test_raw_uid_only_when_opted_out(converter: WiegandConverter) -> None:
    ctx = DriverContext("cr-0101", UidHasher(KEY, send_raw=True))
    async with running(reader(ctx, converter)) as out:
        converter.present(0x0001, facility=0x02)
        await until(lambda: out.taps, "a tap")
    assert out.taps[0].uid == "020001"


async def test_bad_frames_counted_and_neighbours_read(
    converter: WiegandConverter, ctx: DriverContext
) -> None:
    driver = reader(ctx, converter)
    async with running(driver) as out:
        converter.present(0x000101, facility=0x01)
        converter.present(0x000202, facility=0x02, bad_parity=True)
        converter.send_raw(b"\x00\x7fW26:zz\r\n" + b"#" * 100 + b"\r\n")
        converter.present(0x00C0FFEE, bits=34, bad_parity=True)
        converter.present(0x00C0FFEE, bits=34)
        await out.until_count(2, CardTap, "the two good taps")
        await until(lambda: ctx.counters.get("wiegand.bad_parity") == 2, "bad parity counted")
        assert driver.state == DriverState.OK  # bad frames are not a broken port
        assert driver.last_error == "skipped a frame with bad parity"
    hasher = UidHasher(KEY)
    assert [t.uid_hash for t in out.taps] == [
        hasher.hash(b"\x01\x01\x01"),
        hasher.hash(b"\x00\xc0\xff\xee"),
    ]
    assert ctx.counters["wiegand.garbage"] == 1
    assert ctx.counters["wiegand.overlong"] == 1


async def test_debounce(converter: WiegandConverter, ctx: DriverContext) -> None:
    async with running(reader(ctx, converter, debounce_s=30)) as out:
        for _ in range(3):
            converter.present(0x1234, facility=7)
        converter.present(0x1235, facility=7)
        await out.until_count(2, CardTap, "two distinct cards")
        await until(lambda: ctx.counters.get("wiegand.debounced") == 2, "repeats dropped")


async def test_unplug_and_replug(converter: WiegandConverter, ctx: DriverContext) -> None:
    driver = reader(ctx, converter)
    async with running(driver) as out:
        converter.present(0x0001, facility=1)
        await out.until_count(1, CardTap, "a tap before the unplug")
        first = converter.pts_name
        converter.unplug()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert str(converter.link) in (driver.last_error or "")
        assert converter.replug() != first
        await out.until_state(DriverState.OK, "OK after the re-plug")
        converter.present(0x0002, facility=1)
        await out.until_count(2, CardTap, "a tap after the re-plug")
    assert ctx.counters["wiegand.disconnected"] == 1


async def test_missing_port_at_start_then_plugged(tmp_path: Path, ctx: DriverContext) -> None:
    link = tmp_path / "ttyLATE"
    driver = build("door-2", {"port": str(link)}, ctx)
    async with RunningDriver(driver, check_stopped=False) as out:
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        with WiegandConverter(link) as conv:
            await out.until_state(DriverState.OK, "OK once plugged")
            conv.present(0xBEEF, facility=9)
            await until(lambda: out.taps, "a tap")


async def test_probe(converter: WiegandConverter) -> None:
    async def tap_soon() -> None:
        await asyncio.sleep(0.3)
        converter.present(0x42, facility=1)
        converter.send_raw(b"junk\r\n")

    feeder = asyncio.create_task(tap_soon())
    result = await probe({"port": str(converter.link)}, listen_s=1.0)
    await feeder
    assert result.status == "warn"  # the junk line was rejected
    assert "1 valid frame(s) (wiegand26), 1 rejected (garbage)" in result.message
    result = await probe({"port": "/nonexistent/tty"}, listen_s=0.1)
    assert result.status == "fail"
    assert "cannot open" in result.message
