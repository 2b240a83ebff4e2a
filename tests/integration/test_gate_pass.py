"""The gate driver: Wiegand readers on ptys plus a Modbus TCP thermometer, both simulated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState, UidHasher
from device_drivers.gate import AccessGate, build, probe
from device_drivers.wiegand import WiegandReader
from schemas.events import AccessPass
from simulators.modbus_sensor import Field, ModbusSensorSim
from simulators.wiegand import WiegandConverter
from tests.driver_harness import KEY, RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration

THERMOMETER = {"body": Field(0, dtype="int16", scale=0.1)}


def running(gate: AccessGate) -> RunningDriver:
    return RunningDriver(
        gate,
        ready=lambda: all(d.state == DriverState.OK for d in gate.cards.drivers),
        what="readers",
    )


fast = fast_backoff(WiegandReader)
ctx = ctx_fixture("gate-0001")


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
        await until(lambda: out.of_type(AccessPass), "a pass")
    assert out.of_type(AccessPass) == [
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
        await until(lambda: out.of_type(AccessPass), "a pass")
        thermometer.set(body=37.3)
        readers[0].present(0x0303, facility=0x20)
        await out.until_count(2, AccessPass, "a second pass")
    first, second = out.of_type(AccessPass)
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
        await until(lambda: out.of_type(AccessPass), "a pass")
        p = out.of_type(AccessPass)[0]
        assert (p.result, p.temperature_c, p.reason) == ("granted", None, "no_temperature")
        assert ctx.counters["gate.temperature_missing"] == 1
        assert g.state == DriverState.DISCONNECTED
        assert "127.0.0.1" in (g.last_error or "")
        assert thermometer.port is not None
        thermometer.start_tcp(thermometer.port)
        readers[0].present(0x0505, facility=0x20)
        await out.until_count(2, AccessPass, "a second pass")
        assert out.of_type(AccessPass)[1].temperature_c == 36.9
        await out.until_state(DriverState.OK, "OK again")


async def test_strict_site_denies_without_temperature(
    ctx: DriverContext,
    readers: tuple[WiegandConverter, WiegandConverter],
    thermometer: ModbusSensorSim,
) -> None:
    thermometer.set(body=22.0)  # nobody in front of the sensor: ambient, not a person
    async with running(gate(ctx, readers, thermometer, on_missing_temperature="deny")) as out:
        readers[0].present(0x0606, facility=0x20)
        await until(lambda: out.of_type(AccessPass), "a pass")
    p = out.of_type(AccessPass)[0]
    assert (p.result, p.temperature_c, p.reason) == ("denied", None, "no_temperature")


async def test_no_thermometer_configured(
    ctx: DriverContext, readers: tuple[WiegandConverter, WiegandConverter]
) -> None:
    async with running(gate(ctx, readers, None, on_missing_temperature="deny")) as out:
        readers[1].present(0x0707, facility=0x20)
        await until(lambda: out.of_type(AccessPass), "a pass")
    p = out.of_type(AccessPass)[0]
    assert (p.result, p.direction, p.temperature_c, p.reason) == ("granted", "out", None, None)
    assert "gate.temperature_missing" not in ctx.counters


async def test_probe(thermometer: ModbusSensorSim, tmp_path: Path) -> None:
    thermometer.set(body=36.4)
    options = {
        "cards": [{"type": "wiegand", "port": str(tmp_path / "x")}],
        "thermometer": {"host": "127.0.0.1", "port": thermometer.port, "unit": 3},
    }
    result = await probe(options)
    assert result.status == "ok"
    assert result.message.endswith(f"127.0.0.1:{thermometer.port} unit 3: 36.4 °C")
