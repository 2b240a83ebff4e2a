"""Register decoding and read planning for Modbus sensors, and the gate's decision, without I/O."""

from __future__ import annotations

import math
import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_drivers.base import DriverContext, DriverError, UidHasher, build_driver
from device_drivers.codecs.modbus import (
    DEFAULT_REGISTERS,
    MAX_READ,
    RegisterSpec,
    checked,
    plan_reads,
)
from device_drivers.gate import TEMPERATURE_RANGE, decide
from simulators.modbus_sensor import CLASSROOM_LAYOUT, Field

EXAMPLES = Path(__file__).parents[2] / "deploy" / "examples"


def spec(address: int = 0, **kw: Any) -> RegisterSpec:
    return RegisterSpec(address=address, **kw)


@pytest.mark.parametrize(
    ("kw", "words", "value"),
    [
        ({"type": "uint16"}, [0xFFFF], 65535.0),
        ({"type": "int16"}, [0xFFFF], -1.0),
        ({"type": "int16", "scale": 0.1}, [0xFF9C], -10.0),  # -100 tenths
        ({"type": "uint32"}, [0x0001, 0x0002], 65538.0),
        ({"type": "uint32", "word_order": "little"}, [0x0002, 0x0001], 65538.0),
        ({"type": "int32"}, [0xFFFF, 0xFFFE], -2.0),
        ({"type": "float32"}, [0x41AC, 0x0000], 21.5),  # 0x41AC0000 = 21.5
        ({"type": "float32", "word_order": "little"}, [0x0000, 0x41AC], 21.5),
        ({"type": "uint16", "scale": 0.01}, [2150], 21.5),
    ],
)
def test_decode(kw: dict[str, Any], words: list[int], value: float) -> None:
    assert spec(**kw).decode(words) == pytest.approx(value)


@given(
    st.sampled_from(["int16", "uint16", "int32", "uint32", "float32"]),
    st.sampled_from(["big", "little"]),
    st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2),
)
def test_decode_never_raises(dtype: str, order: str, words: list[int]) -> None:
    s = spec(type=dtype, word_order=order)
    s.decode(words[: s.width])


@given(
    st.sampled_from(["int32", "uint32", "float32"]),
    st.sampled_from(["big", "little"]),
    st.integers(0, 100_000),
)
def test_agrees_with_the_simulated_device(dtype: str, order: str, tenths: int) -> None:
    """The driver reads back what the (independently written) simulator stores."""
    value = tenths / 10
    field = Field(7, dtype=dtype, word_order=order, scale=0.1 if dtype != "float32" else 1.0)  # type: ignore[arg-type]
    driver_side = spec(7, type=dtype, word_order=order, scale=field.scale)
    assert driver_side.decode(field.encode(value)) == pytest.approx(value, rel=1e-6)


def test_default_map_matches_the_simulated_classroom_sensor() -> None:
    for metric, s in DEFAULT_REGISTERS.items():
        f = CLASSROOM_LAYOUT[metric]
        assert (s.address, s.table, s.type, s.scale) == (f.address, f.table, f.dtype, f.scale)


def test_plan_merges_contiguous_registers_of_one_table() -> None:
    (block,) = plan_reads(DEFAULT_REGISTERS)
    assert (block.table, block.start, block.count) == ("holding", 0, 5)
    assert block.decode([402, 215, 800, 12, 455]) == {
        "humidity_pct": 40.2,
        "temperature_c": 21.5,
        "co2_ppm": 800.0,
        "pm25_ugm3": 12.0,
        "noise_db": 45.5,
    }


def test_plan_splits_on_gaps_tables_and_size() -> None:
    blocks = plan_reads(
        {
            "temperature_c": spec(0, type="float32"),
            "humidity_pct": spec(2, type="float32"),
            "co2_ppm": spec(10),  # gap: separate read
            "pm25_ugm3": spec(0, table="input"),  # other table
            "noise_db": spec(MAX_READ + 5),
        }
    )
    assert [(b.table, b.start, b.count) for b in blocks] == [
        ("holding", 0, 4),
        ("holding", 10, 1),
        ("holding", MAX_READ + 5, 1),
        ("input", 0, 1),
    ]


def test_plan_never_exceeds_one_request() -> None:
    blocks = plan_reads({"temperature_c": spec(0), "humidity_pct": spec(MAX_READ)})
    assert [(b.start, b.count) for b in blocks] == [(0, 1), (MAX_READ, 1)]


def test_overlapping_registers_share_a_read() -> None:
    (block,) = plan_reads({"temperature_c": spec(0, type="uint32"), "humidity_pct": spec(1)})
    assert (block.start, block.count) == (0, 2)


@pytest.mark.parametrize(
    ("metric", "value", "ok"),
    [
        ("temperature_c", 21.5, True),
        ("temperature_c", -61.0, False),
        ("humidity_pct", 100.1, False),
        ("co2_ppm", 0.0, True),
        ("noise_db", math.nan, False),
        ("pm25_ugm3", math.inf, False),
    ],
)
def test_checked_follows_the_contract(metric: str, value: float, ok: bool) -> None:
    assert (checked(metric, value) is not None) is ok


@pytest.fixture
def ctx() -> DriverContext:
    import device_drivers.gate
    import device_drivers.modbus_env  # noqa: F401 - registers the driver types

    return DriverContext("env-0101", UidHasher(b"k" * 32))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "serial device"),
        ({"host": "127.0.0.1", "port": "/dev/ttyUSB0"}, "TCP port"),
        ({"port": "/dev/ttyUSB0", "pol_s": 1}, "unknown field"),
        ({"port": "/dev/ttyUSB0", "registers": {"co3": {"address": 1}}}, "unknown: co3"),
        (
            {"port": "/dev/ttyUSB0", "registers": {"co2_ppm": {"address": 1, "type": "int8"}}},
            "type",
        ),
        ({"port": "/dev/ttyUSB0", "parity": "X"}, "parity"),
        ({"port": "/dev/ttyUSB0", "poll_s": 0}, "poll_s"),
    ],
)
def test_bad_env_options(ctx: DriverContext, options: dict[str, object], message: str) -> None:
    with pytest.raises(DriverError, match=message):
        build_driver("modbus_env", "env", options, ctx)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "cards"),
        ({"cards": []}, "cards"),
        ({"cards": [{"type": "wiegand", "port": "/x", "direction": "up"}]}, "direction"),
        ({"cards": [{"type": "wiegand", "port": "/x"}], "fever_c": 20}, "fever_c"),
        ({"cards": [{"type": "wiegand", "port": "/x"}], "thermometer": {"address": 1}}, "serial"),
    ],
)
def test_bad_gate_options(ctx: DriverContext, options: dict[str, object], message: str) -> None:
    import device_drivers.wiegand  # noqa: F401 - the inner reader type

    with pytest.raises(DriverError, match=message):
        build_driver("gate", "gate-1", options, ctx)


@pytest.mark.parametrize(
    ("temperature", "on_missing", "expected"),
    [
        (36.6, "grant", ("granted", None)),
        (37.29, "deny", ("granted", None)),
        (37.3, "grant", ("denied", "fever")),  # the threshold itself is fever
        (39.0, "grant", ("denied", "fever")),
        (None, "grant", ("granted", "no_temperature")),
        (None, "deny", ("denied", "no_temperature")),
    ],
)
def test_gate_decision(
    temperature: float | None, on_missing: str, expected: tuple[str, str]
) -> None:
    assert decide(temperature, 37.3, on_missing) == expected  # type: ignore[arg-type]


def test_gate_temperature_range_comes_from_the_schema() -> None:
    assert TEMPERATURE_RANGE == (25.0, 45.0)


def test_float32_reference_value() -> None:
    # guard for the hand-written vector above
    assert struct.unpack(">f", bytes.fromhex("41AC0000"))[0] == 21.5


@pytest.mark.parametrize("example", ["env_sensor.toml", "access_gate.toml"])
def test_example_configs_build(ctx: DriverContext, example: str) -> None:
    import device_drivers.wiegand  # noqa: F401 - the gate example's readers

    config = tomllib.loads((EXAMPLES / example).read_text())
    for table in config["drivers"]:
        build_driver(table["type"], table["name"], table, ctx)
