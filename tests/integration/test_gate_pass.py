"""The gate driver: Wiegand readers on ptys plus a Modbus TCP thermometer, both simulated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, Reading, UidHasher
from device_drivers.gate import AccessGate, build, probe
from device_drivers.wiegand import WiegandReader
from schemas.events import AccessPass
from simulators.modbus_sensor import Field, ModbusSensorSim
from simulators.wiegand import WiegandConverter

pytestmark = pytest.mark.integration

KEY = b"district-test-key-0123456789abcdef"
THERMOMETER = {"body": Field(0, dtype="int16", scale=0.1)}


class Collector:
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    async def __call__(self, reading: Reading) -> None:
        self.readings.append(reading)

    @property
    def passes(self) -> list[AccessPass]:
        return [r.data for r in self.readings if isinstance(r.data, AccessPass)]


async def until(pred: Callable[[], object], what: str, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(gate: AccessGate) -> AsyncIterator[Collector]:
    out = Collector()
    task = asyncio.create_task(gate.run(out), name="gate")
    try:
        await until(lambda: all(d.state == DriverState.OK for d in gate.cards.drivers), "readers")
        yield out
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert gate.state == DriverState.STOPPED


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WiegandReader, "BACKOFF_MIN_S", 0.05)
    monkeypatch.setattr(WiegandReader, "BACKOFF_MAX_S", 0.2)


@pytest.fixture
def ctx() -> DriverContext:
    return DriverContext("gate-0001", UidHasher(KEY))


@pytest.fixture
def thermometer() -> Iterator[ModbusSensorSim]:
    with ModbusSensorSim(THERMOMETER, unit=3) as sim:
        sim.start_tcp()
        yield sim


@pytest.fixture
def readers(tmp_path: Path) -> Iterator[tuple[WiegandConverter, WiegandConverter]]:
    with WiegandConverter(tmp_path / "in") as a, WiegandConverter(tmp_path / "out") as b:
        yield a, b


def gate(
    ctx: DriverContext,
    readers: tuple[WiegandConverter, WiegandConverter],
    thermometer: ModbusSensorSim | None,
    **options: Any,
) -> AccessGate:
    config: dict[str, Any] = {
        "cards": [
            {"type": "wiegand", "port": str(readers[0].link), "direction": "in"},
            {"type": "wiegand", "port": str(readers[1].link), "direction": "out", "name": "exit"},
        ],
        **options,
    }
    if thermometer is not None:
        config["thermometer"] = {
            "host": "127.0.0.1",
            "port": thermometer.port,
            "unit": 3,
            "timeout_s": 0.3,
            "retries": 0,
        }
    return build("gate-east", config, ctx)


async def test_normal_temperature_is_granted(
    ctx: DriverContext,
    readers: tuple[WiegandConverter, WiegandConverter],
    thermometer: ModbusSensorSim,
) -> None:
    thermometer.set(body=36.5)
    async with running(gate(ctx, readers, thermometer)) as out:
        uid = readers[0].present(0x0101, facility=0x20)
        await until(lambda: out.passes, "a pass")
    assert out.passes == [
        AccessPass(
            uid_hash=UidHasher(KEY).hash(uid),
            gate="gate-east",
            direction="in",
            result="granted",
            temperature_c=36.5,
        )
    ]
    assert [r.type for r in out.readings] == ["access.pass"]  # the inner card.tap stays inside


async def test_fever_is_denied_and_direction_follows_the_reader(
    ctx: DriverContext,
    readers: tuple[WiegandConverter, WiegandConverter],
    thermometer: ModbusSensorSim,
) -> None:
    thermometer.set(body=38.2)
    async with running(gate(ctx, readers, thermometer)) as out:
        readers[1].present(0x0202, facility=0x20)
        await until(lambda: out.passes, "a pass")
        thermometer.set(body=37.3)
        readers[0].present(0x0303, facility=0x20)
        await until(lambda: len(out.passes) == 2, "a second pass")
    first, second = out.passes
    assert (first.direction, first.result, first.reason, first.temperature_c) == (
        "out",
        "denied",
        "fever",
        38.2,
    )
    assert (second.direction, second.result, second.reason) == ("in", "denied", "fever")


async def test_thermometer_down_grants_without_temperature_then_recovers(
    ctx: DriverContext,
    readers: tuple[WiegandConverter, WiegandConverter],
    thermometer: ModbusSensorSim,
) -> None:
    thermometer.set(body=36.9)
    g = gate(ctx, readers, thermometer)
    async with running(g) as out:
        thermometer.stop()
        readers[0].present(0x0404, facility=0x20)
        await until(lambda: out.passes, "a pass")
        p = out.passes[0]
        assert (p.result, p.temperature_c, p.reason) == ("granted", None, "no_temperature")
        assert ctx.counters["gate.temperature_missing"] == 1
        assert g.state == DriverState.DISCONNECTED
        assert "127.0.0.1" in (g.last_error or "")
        assert thermometer.port is not None
        thermometer.start_tcp(thermometer.port)
        readers[0].present(0x0505, facility=0x20)
        await until(lambda: len(out.passes) == 2, "a second pass")
        assert out.passes[1].temperature_c == 36.9
        await until(lambda: g.state == DriverState.OK, "OK again")


async def test_strict_site_denies_without_temperature(
    ctx: DriverContext,
    readers: tuple[WiegandConverter, WiegandConverter],
    thermometer: ModbusSensorSim,
) -> None:
    thermometer.set(body=22.0)  # nobody in front of the sensor: ambient, not a person
    async with running(gate(ctx, readers, thermometer, on_missing_temperature="deny")) as out:
        readers[0].present(0x0606, facility=0x20)
        await until(lambda: out.passes, "a pass")
    p = out.passes[0]
    assert (p.result, p.temperature_c, p.reason) == ("denied", None, "no_temperature")


async def test_no_thermometer_configured(
    ctx: DriverContext, readers: tuple[WiegandConverter, WiegandConverter]
) -> None:
    async with running(gate(ctx, readers, None, on_missing_temperature="deny")) as out:
        readers[1].present(0x0707, facility=0x20)
        await until(lambda: out.passes, "a pass")
    p = out.passes[0]
    assert (p.result, p.direction, p.temperature_c, p.reason) == ("granted", "out", None, None)
    assert "gate.temperature_missing" not in ctx.counters


async def test_probe(thermometer: ModbusSensorSim, tmp_path: Path) -> None:
    thermometer.set(body=36.4)
    options = {
        "cards": [{"type": "wiegand", "port": str(tmp_path / "x")}],
        "thermometer": {"host": "127.0.0.1", "port": thermometer.port, "unit": 3},
    }
    assert (await probe(options)).endswith(f"127.0.0.1:{thermometer.port} unit 3: 36.4 °C")
