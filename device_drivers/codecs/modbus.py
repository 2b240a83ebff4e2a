"""Modbus register maps: where each metric lives, how registers decode to engineering units,
and reads grouped into as few requests as the protocol allows; for ``device_drivers.modbus_env``
and ``device_drivers.gate``."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from schemas.events import EnvReading

METRICS: Final = ("temperature_c", "humidity_pct", "co2_ppm", "pm25_ugm3", "noise_db")
#: Modbus allows at most 125 registers in one read.
MAX_READ: Final = 125
Table = Literal["holding", "input"]
DataType = Literal["int16", "uint16", "int32", "uint32", "float32"]
_FORMATS: Final = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}


class RegisterSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Where a value lives and how to turn its registers into engineering units."""

    address: Annotated[int, Meta(ge=0, le=65535)]
    table: Table = "holding"
    type: DataType = "uint16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0

    @property
    def width(self) -> int:
        return 1 if self.type in ("int16", "uint16") else 2

    def decode(self, words: Sequence[int]) -> float:
        """Registers (exactly :attr:`width` of them) → value * scale."""
        ordered = words if self.word_order == "big" else list(reversed(words))
        raw = b"".join(w.to_bytes(2, "big") for w in ordered)
        value: float = struct.unpack(f">{_FORMATS[self.type]}", raw)[0]
        return round(value * self.scale, 4)


#: A typical all-in-one classroom sensor (temperature, humidity, CO2, PM2.5, noise on RS-485):
#: holding registers from 0, one 16-bit word per value, tenths where a decimal is needed.
DEFAULT_REGISTERS: Final[Mapping[str, RegisterSpec]] = {
    "humidity_pct": RegisterSpec(address=0, type="uint16", scale=0.1),
    "temperature_c": RegisterSpec(address=1, type="int16", scale=0.1),
    "co2_ppm": RegisterSpec(address=2, type="uint16"),
    "pm25_ugm3": RegisterSpec(address=3, type="uint16"),
    "noise_db": RegisterSpec(address=4, type="uint16", scale=0.1),
}


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request covering the registers of one or more metrics."""

    table: Table
    start: int
    count: int
    fields: tuple[tuple[str, RegisterSpec], ...]

    def decode(self, words: Sequence[int]) -> dict[str, float]:
        out = {}
        for metric, spec in self.fields:
            offset = spec.address - self.start
            out[metric] = spec.decode(words[offset : offset + spec.width])
        return out


def plan_reads(registers: Mapping[str, RegisterSpec]) -> list[ReadBlock]:
    """Group metrics into as few reads as possible: same table, contiguous or overlapping."""
    blocks: list[ReadBlock] = []
    ordered = sorted(registers.items(), key=lambda kv: (kv[1].table, kv[1].address))
    for metric, spec in ordered:
        end = spec.address + spec.width
        last = blocks[-1] if blocks else None
        if (
            last is not None
            and last.table == spec.table
            and spec.address <= last.start + last.count
            and max(end, last.start + last.count) - last.start <= MAX_READ
        ):
            count = max(end, last.start + last.count) - last.start
            blocks[-1] = ReadBlock(last.table, last.start, count, (*last.fields, (metric, spec)))
        else:
            blocks.append(ReadBlock(spec.table, spec.address, spec.width, ((metric, spec),)))
    return blocks


def checked(metric: str, value: float) -> float | None:
    """The value if the contract accepts it for ``metric`` (finite, within range), else None."""
    if not math.isfinite(value):
        return None
    try:
        msgspec.convert({metric: value}, EnvReading)
    except msgspec.ValidationError:
        return None
    return value
