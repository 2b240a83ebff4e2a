"""The recorder driver against the SMP-style simulator, over a real pty and over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, Reading, UidHasher
from device_drivers.recorder import RecorderPoller, build, probe
from schemas.events import RecorderStatus
from simulators.recorder import SmpRecorder

pytestmark = pytest.mark.integration


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def __call__(self, reading: Reading) -> None:
        assert reading.type == "recorder.status"
        self.readings.append(reading)

    @property
    def statuses(self) -> list[RecorderStatus]:
        return [r.data for r in self.readings if isinstance(r.data, RecorderStatus)]


async def until(pred: Callable[[], object], what: str, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(driver: RecorderPoller) -> AsyncIterator[Collector]:
    out = Collector()
    task = asyncio.create_task(driver.run(out), name="recorder-driver")
    try:
        yield out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert driver.state == DriverState.STOPPED
    assert not [t for t in threading.enumerate() if t.name == f"link-{driver.name}"]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RecorderPoller, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(RecorderPoller, "BACKOFF_MAX_S", 0.2)


@pytest.fixture
def ctx() -> DriverContext:
    return DriverContext("ru-0101", UidHasher(b"district-test-key-0123456789"))


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
        await until(lambda: len(out.statuses) == 1, "the first status")
        assert driver.state == DriverState.OK
        smp.set_free_mb(2000)
        smp.set_state("record")
        await until(lambda: len(out.statuses) == 2, "record")
        smp.set_free_mb(1500)
        smp.set_state("pause")
        await until(lambda: len(out.statuses) == 3, "pause")
        smp.set_state("stop")
        await until(lambda: len(out.statuses) == 4, "stop")
        await polls(smp, 6)  # no change, no event (report_s is 60 s)
    assert out.statuses == [
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
        await until(lambda: len(out.statuses) >= 2, "two reports")
        smp.set_free_mb(512)
        await until(lambda: out.statuses[-1] == status("stop", 512.0), "the new free space")


async def test_malformed_and_refused_replies_are_counted(
    smp: SmpRecorder, ctx: DriverContext, via: str
) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await until(lambda: len(out.statuses) == 1, "the first status")
        smp.corrupt(2)
        await until(lambda: ctx.counters.get("recorder.malformed") == 2, "two malformed replies")
        smp.set_state("record")
        await until(lambda: len(out.statuses) == 2, "the change after them")
        smp.endpoint.send(b"E14\r\n")
        await until(lambda: ctx.counters.get("recorder.refused") == 1, "an error reply")
        assert driver.state == DriverState.OK
    assert out.statuses[-1] == status("record", 2048.0)


async def test_silent_unit_is_disconnected_then_recovers(
    smp: SmpRecorder, ctx: DriverContext, via: str
) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await until(lambda: len(out.statuses) == 1, "the first status")
        smp.mute()
        await until(lambda: driver.state == DriverState.DISCONNECTED, "DISCONNECTED")
        assert "no reply from the recorder" in (driver.last_error or "")
        smp.set_state("pause")
        smp.mute(False)
        await until(lambda: len(out.statuses) == 2, "status once it answers again")
        assert driver.state == DriverState.OK
    assert out.statuses[-1] == status("pause", 2048.0)


async def test_unplug_and_replug(smp: SmpRecorder, ctx: DriverContext, via: str) -> None:
    driver = recorder(ctx, smp, via)
    async with running(driver) as out:
        await until(lambda: len(out.statuses) == 1, "the first status")
        before = smp.pts_name
        smp.unplug()
        await until(lambda: driver.state == DriverState.DISCONNECTED, "DISCONNECTED")
        assert driver.port in (driver.last_error or "")
        smp.set_state("record")
        assert smp.replug() != before
        await until(lambda: len(out.statuses) == 2, "status after the re-plug")
        assert driver.state == DriverState.OK
    assert out.statuses == [status("stop", 2048.0), status("record", 2048.0)]
    assert ctx.counters["recorder.disconnected"] == 1
    assert "recorder.malformed" not in ctx.counters  # the power-up banner is not an error


async def test_probe(smp: SmpRecorder, via: str) -> None:
    port = smp.port if via == "pty" else smp.url
    smp.set_state("record")
    assert await probe({"port": port}) == f"recorder on {port}: record, 2048 MB free on internal"
    smp.mute()
    assert "no reply" in await probe({"port": port, "timeout_s": 0.2})
    assert "cannot open" in await probe({"port": "tcp://127.0.0.1:1"})
