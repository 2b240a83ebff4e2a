"""The modbus_env driver against the pymodbus sensor simulator: TCP on loopback, RTU on a pty."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_drivers.base import DriverContext, DriverState
from device_drivers.modbus_env import ModbusEnvSensor, build, probe
from schemas.events import EnvReading
from simulators.modbus_sensor import Field as SimField
from simulators.modbus_sensor import ModbusSensorSim
from tests.driver_harness import RunningDriver, ctx_fixture, fast_backoff, until

pytestmark = pytest.mark.integration


def running(driver: ModbusEnvSensor) -> RunningDriver:
    return RunningDriver(driver)


fast = fast_backoff(ModbusEnvSensor)
ctx = ctx_fixture("env-0101")


@pytest.fixture
def sim() -> Iterator[ModbusSensorSim]:
    with ModbusSensorSim() as s:
        yield s


def sensor(ctx: DriverContext, **options: Any) -> ModbusEnvSensor:
    return build("room-101", {"poll_s": 0.05, "timeout_s": 0.3, "retries": 0, **options}, ctx)


async def test_tcp_reading_matches_registers(sim: ModbusSensorSim, ctx: DriverContext) -> None:
    sim.set(temperature_c=-3.5, humidity_pct=41.7, co2_ppm=812, pm25_ugm3=35, noise_db=48.2)
    port = sim.start_tcp()
    driver = sensor(ctx, host="127.0.0.1", port=port)
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a reading")
        assert driver.state == DriverState.OK
    assert out.of_type(EnvReading)[0] == EnvReading(
        sensor="room-101",
        temperature_c=-3.5,
        humidity_pct=41.7,
        co2_ppm=812.0,
        pm25_ugm3=35.0,
        noise_db=48.2,
    )
    assert out.readings[0].type == "env.reading"


async def test_float32_word_orders_and_input_registers(ctx: DriverContext) -> None:
    layout = {
        "temperature_c": SimField(10, table="input", dtype="float32", word_order="little"),
        "humidity_pct": SimField(12, table="input", dtype="float32", word_order="big"),
        "co2_ppm": SimField(20, dtype="uint32", word_order="little"),
    }
    registers = {
        "temperature_c": {
            "address": 10,
            "table": "input",
            "type": "float32",
            "word_order": "little",
        },
        "humidity_pct": {"address": 12, "table": "input", "type": "float32"},
        "co2_ppm": {"address": 20, "type": "uint32", "word_order": "little"},
    }
    with ModbusSensorSim(layout) as sim:
        sim.set(temperature_c=23.25, humidity_pct=55.5, co2_ppm=70000)
        # the little-endian float really is stored low word first
        assert sim.registers("input")[10:12] == [0x0000, 0x41BA]
        driver = sensor(ctx, host="127.0.0.1", port=sim.start_tcp(), registers=registers)
        async with running(driver) as out:
            await until(lambda: out.of_type(EnvReading), "a reading")
    got = out.of_type(EnvReading)[0]
    assert (got.temperature_c, got.humidity_pct, got.co2_ppm) == (23.25, 55.5, 70000.0)
    assert got.noise_db is None


async def test_rtu_over_pty_follows_a_script(
    sim: ModbusSensorSim, ctx: DriverContext, tmp_path: Path
) -> None:
    link = tmp_path / "ttyENV"
    sim.set(temperature_c=20.0, humidity_pct=40.0, co2_ppm=450, pm25_ugm3=8, noise_db=35.0)
    sim.start_rtu(link)
    driver = sensor(ctx, port=str(link), baudrate=9600, parity="N")
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a first RTU reading")
        sim.script([(0.0, {"co2_ppm": 900}), (0.5, {"co2_ppm": 1400, "temperature_c": 24.1})])
        await until(lambda: out.of_type(EnvReading)[-1].co2_ppm == 1400, "the scripted CO2 rise")
    co2 = [r.co2_ppm for r in out.of_type(EnvReading)]
    assert co2[0] == 450
    assert 900 in co2
    assert co2.index(900) < co2.index(1400)
    assert out.of_type(EnvReading)[-1].temperature_c == 24.1


async def test_tcp_server_restart_is_survived(sim: ModbusSensorSim, ctx: DriverContext) -> None:
    sim.set(co2_ppm=500)
    port = sim.start_tcp()
    driver = sensor(ctx, host="127.0.0.1", port=port)
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a reading")
        sim.stop()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        assert "127.0.0.1" in (driver.last_error or "")
        before = len(out.of_type(EnvReading))
        await asyncio.sleep(0.3)
        assert len(out.of_type(EnvReading)) == before  # nothing invented while the sensor is away
        sim.set(co2_ppm=600)
        sim.start_tcp(port)
        await until(
            lambda: out.of_type(EnvReading)[-1].co2_ppm == 600, "readings after the restart"
        )
        assert driver.state == DriverState.OK
    assert (
        ctx.counters.get("modbus_env.disconnected", 0) + ctx.counters.get("modbus_env.timeout", 0)
        >= 1
    )


async def test_rtu_unplug_and_replug(
    sim: ModbusSensorSim, ctx: DriverContext, tmp_path: Path
) -> None:
    link = tmp_path / "ttyENV"
    sim.set(pm25_ugm3=10)
    first = sim.start_rtu(link)
    driver = sensor(ctx, port=str(link))
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a reading")
        sim.unplug()
        await out.until_state(DriverState.DISCONNECTED, "DISCONNECTED")
        sim.set(pm25_ugm3=77)
        assert sim.replug() != first
        await until(
            lambda: out.of_type(EnvReading)[-1].pm25_ugm3 == 77, "readings after the re-plug"
        )
        assert driver.state == DriverState.OK


async def test_silent_sensor_times_out_then_recovers(
    sim: ModbusSensorSim, ctx: DriverContext
) -> None:
    sim.set(noise_db=40.0)
    driver = sensor(ctx, host="127.0.0.1", port=sim.start_tcp())
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a reading")
        sim.silent = True
        await until(lambda: ctx.counters.get("modbus_env.timeout"), "a counted timeout")
        assert driver.state == DriverState.DISCONNECTED
        assert "no answer" in (driver.last_error or "")
        sim.silent = False
        sim.set(noise_db=62.5)
        await until(
            lambda: out.of_type(EnvReading)[-1].noise_db == 62.5, "readings after the silence"
        )
        await out.until_state(DriverState.OK, "OK again")


async def test_illegal_address_costs_one_metric(sim: ModbusSensorSim, ctx: DriverContext) -> None:
    sim.set(temperature_c=22.0, humidity_pct=50.0, co2_ppm=700, pm25_ugm3=5, noise_db=40.0)
    sim.illegal = {2}  # the CO2 register
    driver = sensor(ctx, host="127.0.0.1", port=sim.start_tcp())
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a reading")
        assert driver.state == DriverState.OK
    got = out.of_type(EnvReading)[0]
    assert got.co2_ppm is None
    assert (got.temperature_c, got.humidity_pct, got.pm25_ugm3, got.noise_db) == (
        22.0,
        50.0,
        5.0,
        40.0,
    )
    assert ctx.counters["modbus_env.exception"] >= 1
    assert "co2_ppm" in (driver.last_error or "")
    assert "illegal data address" in (driver.last_error or "")


async def test_device_failure_everywhere_emits_nothing(
    sim: ModbusSensorSim, ctx: DriverContext
) -> None:
    sim.exception_code = 4
    driver = sensor(ctx, host="127.0.0.1", port=sim.start_tcp())
    async with running(driver) as out:
        await until(lambda: ctx.counters.get("modbus_env.exception", 0) >= 5, "refusals")
        assert out.readings == []
        assert driver.state == DriverState.OK  # the sensor is there, it just fails
        assert "device failure" in (driver.last_error or "")
        sim.exception_code = None
        await until(lambda: out.of_type(EnvReading), "readings once the sensor heals")


async def test_out_of_range_value_is_dropped(sim: ModbusSensorSim, ctx: DriverContext) -> None:
    sim.set(humidity_pct=40.0)
    sim.set_raw("holding", 1, [1500])  # 150.0 °C: a broken probe, not a classroom
    driver = sensor(ctx, host="127.0.0.1", port=sim.start_tcp())
    async with running(driver) as out:
        await until(lambda: out.of_type(EnvReading), "a reading")
    assert out.of_type(EnvReading)[0].temperature_c is None
    assert out.of_type(EnvReading)[0].humidity_pct == 40.0
    assert ctx.counters["modbus_env.bad_value"] >= 1


async def test_probe(sim: ModbusSensorSim) -> None:
    sim.set(temperature_c=21.0)
    port = sim.start_tcp()
    result = await probe({"host": "127.0.0.1", "port": port, "timeout_s": 0.3})
    assert result.status == "ok"
    assert result.message.startswith(f"Modbus TCP 127.0.0.1:{port} unit 1: OK")
    assert "temperature_c=21.0" in result.message
    sim.stop()
    result = await probe({"host": "127.0.0.1", "port": port, "timeout_s": 0.3})
    assert result.status == "fail"
    assert "cannot open" in result.message
    result = await probe({"host": "127.0.0.1", "port": "x"})
    assert result.status == "fail"
    assert "configuration problem" in result.message
