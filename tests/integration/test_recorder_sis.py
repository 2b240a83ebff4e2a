"""The recorder driver against the SMP-style simulator, over a real pty and over TCP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, ProbeResult
from device_drivers.recorder import RecorderPoller, build, probe
from schemas.events import RecorderStatus
from schemas.reading import Reading
from simulators.recorder import SmpRecorder
from tests.driver_harness import RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration


class Running(RunningDriver):
    async def __call__(self, reading: Reading) -> None:
        assert reading.type == "recorder.status"
        await super().__call__(reading)


def running(driver: RecorderPoller) -> RunningDriver:
    return Running(driver, threads=f"link-{driver.name}".__eq__)


fast = fast_backoff(RecorderPoller)
ctx = ctx_fixture("ru-0101")


@pytest.fixture(params=["pty", "tcp"])
def via(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def smp(tmp_path: Path) -> Iterator[SmpRecorder]:
    with SmpRecorder(tmp_path / "ttySMP", free_mb=2048) as sim:
        yield sim


def recorder(ctx: DriverContext, sim: SmpRecorder, via: str, **options: Any) -> RecorderPoller:
    port = sim.port if via == "pty" else sim.url
    return build("rec-1", {"port": port, "poll_s": 0.05, "timeout_s": 0.25, **options}, ctx)


def status(state: str, free_mb: float | None) -> RecorderStatus:
    return RecorderStatus(state=state, free_space_mb=free_mb, recorder="rec-1")  # type: ignore[arg-type]


async def polls(sim: SmpRecorder, n: int) -> None:
    start = len(sim.received)
    await until(lambda: len(sim.received) >= start + n, f"{n} more commands")


async def test_stop_record_pause_transitions_with_free_space(
    smp: SmpRecorder, ctx: DriverContext, via: str
) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await out.until_count(1, RecorderStatus, "the first status")
        assert driver.state == DriverState.OK
        smp.set_free_mb(2000)
        smp.set_state("record")
        await out.until_count(2, RecorderStatus, "record")
        smp.set_free_mb(1500)
        smp.set_state("pause")
        await out.until_count(3, RecorderStatus, "pause")
        smp.set_state("stop")
        await out.until_count(4, RecorderStatus, "stop")
        await polls(smp, 6)  # no change, no event (report_s is 60 s)
    assert out.of_type(RecorderStatus) == [
        status("stop", 2048.0),
        status("record", 2000.0),
        status("pause", 1500.0),
        status("stop", 1500.0),
    ]
    assert smp.received[0] == b"\x1b0CV"  # terse mode first
    assert smp.verbose == 0
    assert set(smp.received[1:]) == {b"\x1bYRCDR", b"I"}


async def test_periodic_report_carries_free_space(smp: SmpRecorder, ctx: DriverContext) -> None:
    driver = recorder(ctx, smp, "pty", report_s=0)
    async with running(driver) as out:
        await until(lambda: len(out.of_type(RecorderStatus)) >= 2, "two reports")
        smp.set_free_mb(512)
        await until(
            lambda: out.of_type(RecorderStatus)[-1] == status("stop", 512.0), "the new free space"
        )


async def test_malformed_and_refused_replies_are_counted(
    smp: SmpRecorder, ctx: DriverContext, via: str
) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await out.until_count(1, RecorderStatus, "the first status")
        smp.corrupt(2)
        await until(lambda: ctx.counters.get("recorder.malformed") == 2, "two malformed replies")
        smp.set_state("record")
        await out.until_count(2, RecorderStatus, "the change after them")
        smp.endpoint.send(b"E14\r\n")
        await until(lambda: ctx.counters.get("recorder.refused") == 1, "an error reply")
        assert driver.state == DriverState.OK
    assert out.of_type(RecorderStatus)[-1] == status("record", 2048.0)


async def test_silent_unit_is_disconnected_then_recovers(
    smp: SmpRecorder, ctx: DriverContext, via: str
) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await out.until_count(1, RecorderStatus, "the first status")
        smp.mute()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert "no reply from the recorder" in (driver.last_error or "")
        smp.set_state("pause")
        smp.mute(False)
        await out.until_count(2, RecorderStatus, "status once it answers again")
        assert driver.state == DriverState.OK
    assert out.of_type(RecorderStatus)[-1] == status("pause", 2048.0)


async def test_unplug_and_replug(smp: SmpRecorder, ctx: DriverContext, via: str) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await out.until_count(1, RecorderStatus, "the first status")
        before = smp.pts_name
        smp.unplug()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert driver.port in (driver.last_error or "")
        smp.set_state("record")
        assert smp.replug() != before
        await out.until_count(2, RecorderStatus, "status after the re-plug")
        assert driver.state == DriverState.OK
    assert out.of_type(RecorderStatus) == [status("stop", 2048.0), status("record", 2048.0)]
    assert ctx.counters["recorder.disconnected"] == 1
    assert "recorder.malformed" not in ctx.counters  # the power-up banner is not an error


async def test_probe(smp: SmpRecorder, via: str) -> None:
    port = smp.port if via == "pty" else smp.url
    smp.set_state("record")
    assert await probe({"port": port}) == ProbeResult.ok(
        f"recorder on {port}: record, 2048 MB free on internal"
    )
    smp.mute()
    result = await probe({"port": port, "timeout_s": 0.2})
    assert result.status == "fail"
    assert "no reply" in result.message
    result = await probe({"port": "tcp://127.0.0.1:1"})
    assert result.status == "fail"
    assert "cannot open" in result.message
