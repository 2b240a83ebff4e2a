"""Access gates: a card pass plus a body-temperature reading → ``access.pass``.

Driver type ``gate``. Options:

- ``cards``: a list of inner card-reader tables (``type`` = any card driver, optional ``name``,
  ``direction`` = ``in`` | ``out`` (default ``in``), plus that driver's own options). Their
  ``card.tap`` events become passes and are not forwarded themselves.
- ``thermometer``: the IR thermometer module on Modbus, read right after each card pass:
  ``host``/``port``/``unit`` and the serial options as for ``modbus_env``, plus the register:
  ``address`` (0), ``table`` (holding), ``type`` (int16), ``word_order`` (big), ``scale`` (0.1).
- ``fever_c`` (37.3): at or above this the pass is ``denied`` with reason ``fever``.
- ``on_missing_temperature`` (``grant``): when the thermometer gives no usable temperature
  (no answer, a Modbus exception, or a value outside the contract's 25-45 °C, e.g. ambient
  air), ``grant`` lets the person through with ``temperature_c`` null and reason
  ``no_temperature``; ``deny`` refuses with the same reason. Both count
  ``gate.temperature_missing``. The default keeps a broken thermometer from locking a school
  out; sites that screen strictly choose ``deny``. Without a ``thermometer`` table there is no
  screening: every pass is granted with no temperature and no reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    ProbeResult,
    register_driver,
)
from device_drivers.codecs.modbus import DataType, RegisterSpec, Table
from device_drivers.modbus_env import DeviceRefused, Endpoint, LinkDown, ModbusLink, parse_options
from device_drivers.plumbing.composite import CardSources, CompositeDriver, DriverPart
from schemas.events import AccessPass, CardTap
from schemas.reading import Reading

log = logging.getLogger(__name__)

Result = Literal["granted", "denied"]


def _schema_bounds() -> tuple[float, float]:
    """The body temperatures the contract accepts, read from the schema itself."""
    info = msgspec.inspect.type_info(AccessPass)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        if field.name == "temperature_c" and isinstance(field.type, msgspec.inspect.UnionType):
            for t in field.type.types:
                if isinstance(t, msgspec.inspect.FloatType):
                    return float(t.ge or 0.0), float(t.le or 100.0)
    return 0.0, 100.0


TEMPERATURE_RANGE: Final = _schema_bounds()


def decide(
    temperature_c: float | None, fever_c: float, on_missing: Literal["grant", "deny"]
) -> tuple[Result, str | None]:
    """Grant or deny a pass: fever denies; a missing reading follows ``on_missing``."""
    if temperature_c is None:
        return ("granted" if on_missing == "grant" else "denied"), "no_temperature"
    if temperature_c >= fever_c:
        return "denied", "fever"
    return "granted", None


class ThermometerOptions(Endpoint, kw_only=True, forbid_unknown_fields=True, frozen=True):
    address: Annotated[int, Meta(ge=0, le=65535)] = 0
    table: Table = "holding"
    type: DataType = "int16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 0.1

    @property
    def register(self) -> RegisterSpec:
        return RegisterSpec(
            address=self.address,
            table=self.table,
            type=self.type,
            word_order=self.word_order,
            scale=self.scale,
        )


class GateOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    cards: Annotated[list[dict[str, Any]], Meta(min_length=1)]
    thermometer: ThermometerOptions | None = None
    fever_c: Annotated[float, Meta(ge=30, le=45)] = 37.3
    on_missing_temperature: Literal["grant", "deny"] = "grant"


class Thermometer:
    """The gate's IR thermometer: one register read on demand, one read at a time."""

    def __init__(self, options: ThermometerOptions) -> None:
        self.spec = options.register
        self.describe = options.describe()
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self._link = ModbusLink(options)
        self._lock = asyncio.Lock()

    async def read(self) -> float | None:
        """Degrees Celsius, or None (with :attr:`last_error` saying why)."""
        async with self._lock:
            try:
                words = await self._link.read(self.spec.table, self.spec.address, self.spec.width)
            except LinkDown as exc:
                self.state, self.last_error = DriverState.DISCONNECTED, str(exc)
                return None
            except DeviceRefused as exc:
                self.state, self.last_error = DriverState.OK, f"thermometer refused: {exc}"
                return None
        self.state = DriverState.OK
        value = self.spec.decode(words)
        low, high = TEMPERATURE_RANGE
        if not low <= value <= high:
            self.last_error = f"thermometer read {value} °C, outside {low}-{high} °C"
            return None
        return value

    def close(self) -> None:
        self._link.close()


class AccessGate(CompositeDriver):
    """A gate made of card readers and an optional thermometer."""

    def __init__(self, name: str, options: GateOptions, ctx: DriverContext) -> None:
        self.name = name
        self.options = options
        self._ctx = ctx
        super().__init__()
        for i, entry in enumerate(options.cards):
            if entry.get("direction", "in") not in ("in", "out"):
                raise DriverError(f"driver {name!r}: cards[{i}].direction must be in or out")
        self.cards = CardSources(name, options.cards, ctx, consume=("direction",))
        self.thermometer = Thermometer(options.thermometer) if options.thermometer else None
        self._emit: Emit | None = None

    def _other_parts(self) -> list[DriverPart]:
        return [self.thermometer] if self.thermometer is not None else []

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        self.state = DriverState.OK
        if self.thermometer is not None:
            # One read at start, so a dead thermometer shows in status before the first pass.
            await self.thermometer.read()
        try:
            await self.cards.run(self._on_tap, emit)
        except ExceptionGroup as group:
            first = group.exceptions[0]
            self.state, self.last_error = DriverState.FAILED, str(first)
            raise first from group
        finally:
            self._emit = None
            if self.thermometer is not None:
                self.thermometer.close()
            if self.state != DriverState.FAILED:
                self.state = DriverState.STOPPED

    async def _on_tap(self, reading: Reading, tap: CardTap, extra: Mapping[str, Any]) -> None:
        temperature: float | None = None
        result: Result = "granted"
        reason: str | None = None
        if self.thermometer is not None:
            temperature = await self.thermometer.read()
            result, reason = decide(
                temperature, self.options.fever_c, self.options.on_missing_temperature
            )
            if temperature is None:
                self._ctx.count("gate.temperature_missing")
                log.warning(
                    "%s: pass without a temperature (%s)", self.name, self.thermometer.last_error
                )
        passed = AccessPass(
            uid_hash=tap.uid_hash,
            gate=self.name,
            direction=extra.get("direction", "in"),
            result=result,
            temperature_c=temperature,
            reason=reason,
        )
        if self._emit is not None:
            await self._emit(Reading("access.pass", passed, reading.ts, reading.synced))


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> AccessGate:
    return AccessGate(name, parse_options(name, options, GateOptions), ctx)


register_driver("gate")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Read the thermometer once; the card readers have probes of their own."""
    try:
        opts = parse_options("probe", options, GateOptions)
    except DriverError as exc:
        return ProbeResult.fail(f"configuration problem: {exc}")
    readers = ", ".join(str(c.get("type")) for c in opts.cards)
    if opts.thermometer is None:
        return ProbeResult.ok(
            f"readers: {readers}; no thermometer configured (passes carry no temperature)"
        )
    thermometer = Thermometer(opts.thermometer)
    try:
        value = await thermometer.read()
    finally:
        thermometer.close()
    seen = f"{value} °C" if value is not None else f"no reading ({thermometer.last_error})"
    verdict = f"readers: {readers}; thermometer {thermometer.describe}: {seen}"
    if value is not None:
        return ProbeResult.ok(verdict)
    # Unreachable fails; a thermometer that answered (refused, or out of range) only warns.
    if thermometer.state == DriverState.DISCONNECTED:
        return ProbeResult.fail(verdict)
    return ProbeResult.warn(verdict)
