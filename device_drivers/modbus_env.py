"""Modbus environment sensors (RTU on a serial port, or Modbus TCP) → ``env.reading`` per poll.

Driver type ``modbus_env``. Options: ``host`` (Modbus TCP; ``port`` is then the TCP port,
default 502) or, without ``host``, ``port`` as the serial device or ``usb:VID:PID[:SERIAL]``
(RTU) with ``baudrate`` (9600), ``parity`` (N/E/O), ``bytesize`` (8), ``stopbits`` (1);
``unit`` (1), ``timeout_s`` (1.0), ``retries`` (1), ``poll_s`` (30), and ``registers``: a table
``metric → {address, table (holding|input), type (int16|uint16|int32|uint32|float32),
word_order (big|little), scale}``.
Without ``registers`` the map of a typical all-in-one classroom sensor is used
(:data:`DEFAULT_REGISTERS`); with it, exactly the metrics listed are read.

Contiguous registers are read in one request. A Modbus exception reply (e.g. illegal data
address) makes the driver read that block's metrics one by one, so one bad register costs one
metric, not the reading. A timeout or a lost port/connection closes the client; the driver
reconnects with jittered backoff. Counters: ``modbus_env.timeout``, ``.disconnected``,
``.exception``, ``.bad_value``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from msgspec import Meta
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from device_drivers.base import (
    DeviceLost,
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    ProbeResult,
    UidHasher,
    convert_options,
    register_driver,
)
from device_drivers.codecs.modbus import (
    DEFAULT_REGISTERS,
    METRICS,
    ReadBlock,
    RegisterSpec,
    Table,
    checked,
    plan_reads,
)
from device_drivers.plumbing.transport import UsbId, resolve_usb
from schemas.events import EnvReading
from schemas.reading import Reading

log = logging.getLogger(__name__)
_EXCEPTIONS: Final = {
    0: "short or malformed answer",
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge (busy with a long command)",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target did not respond",
}
S = TypeVar("S", bound=msgspec.Struct)


class Endpoint(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """How to reach a Modbus device: TCP with ``host``, RTU on serial ``port`` without."""

    host: str | None = None
    port: str | int | None = None
    unit: Annotated[int, Meta(ge=0, le=247)] = 1
    baudrate: Annotated[int, Meta(gt=0)] = 9600
    parity: Literal["N", "E", "O"] = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout_s: Annotated[float, Meta(gt=0)] = 1.0
    retries: Annotated[int, Meta(ge=0, le=5)] = 1

    def __post_init__(self) -> None:
        if self.host is not None and not isinstance(self.port, int | None):
            raise ValueError("with `host` (Modbus TCP), `port` must be a TCP port number")
        if self.host is None and not isinstance(self.port, str):
            raise ValueError("give `host` for Modbus TCP, or `port` as a serial device for RTU")

    def describe(self) -> str:
        if self.host is not None:
            return f"Modbus TCP {self.host}:{self.port or 502} unit {self.unit}"
        return f"Modbus RTU {self.port} unit {self.unit}"


class ModbusEnvOptions(Endpoint, kw_only=True, forbid_unknown_fields=True, frozen=True):
    poll_s: Annotated[float, Meta(gt=0)] = 30.0
    registers: dict[str, RegisterSpec] | None = None


def parse_options(name: str, options: Mapping[str, Any], kind: type[S]) -> S:
    """Config table → typed options, or a :class:`DriverError` naming the bad field."""
    return convert_options(name, options, kind)


class LinkDown(DeviceLost):
    """The device cannot be reached: port gone, connection refused (``disconnected``) or no
    answer (``timeout``)."""

    def __init__(self, message: str, kind: Literal["disconnected", "timeout"]) -> None:
        super().__init__(message)
        self.kind = kind


class DeviceRefused(Exception):
    """The device answered with a Modbus exception."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"exception {code} ({_EXCEPTIONS.get(code, 'unknown')})")


class ModbusLink:
    """A pymodbus async client opened on demand and dropped on any transport failure."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        client = await self._connected()
        call = client.read_holding_registers if table == "holding" else client.read_input_registers
        try:
            reply: ModbusPDU = await call(address, count=count, device_id=self.endpoint.unit)
        except ConnectionException as exc:
            self.close()
            raise LinkDown(f"lost {self.endpoint.describe()}", "disconnected") from exc
        except ModbusException as exc:
            self.close()
            raise LinkDown(f"no answer from {self.endpoint.describe()}", "timeout") from exc
        if reply.isError():
            raise DeviceRefused(int(getattr(reply, "exception_code", 0)))
        words = list(reply.registers)
        if len(words) < count:
            raise DeviceRefused(0)
        return words[:count]

    async def _connected(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is not None and self._client.connected:
            return self._client
        self.close()
        ep = self.endpoint
        client: AsyncModbusTcpClient | AsyncModbusSerialClient
        if ep.host is not None:
            port = ep.port if isinstance(ep.port, int) else 502
            client = AsyncModbusTcpClient(
                ep.host, port=port, timeout=ep.timeout_s, retries=ep.retries, reconnect_delay=0
            )
        else:
            device = str(ep.port)
            if device.startswith("usb:"):  # looked up at every connect: the tty name may change
                try:
                    device = await asyncio.to_thread(resolve_usb, UsbId.parse(device))
                except (OSError, ValueError) as exc:
                    raise LinkDown(f"cannot open {ep.describe()}: {exc}", "disconnected") from exc
            client = AsyncModbusSerialClient(
                device,
                baudrate=ep.baudrate,
                parity=ep.parity,
                bytesize=ep.bytesize,
                stopbits=ep.stopbits,
                timeout=ep.timeout_s,
                retries=ep.retries,
                reconnect_delay=0,
            )
        if not await client.connect():
            client.close()
            raise LinkDown(f"cannot open {ep.describe()}", "disconnected")
        self._client = client
        return client

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


class ModbusEnvSensor:
    """Polls one Modbus environment sensor and emits ``env.reading``."""

    BACKOFF_MIN_S = 0.5
    BACKOFF_MAX_S = 30.0

    def __init__(self, name: str, options: ModbusEnvOptions, ctx: DriverContext) -> None:
        self.name = name
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self.options = options
        self._ctx = ctx
        registers = options.registers if options.registers is not None else DEFAULT_REGISTERS
        unknown = sorted(set(registers) - set(METRICS))
        if unknown or not registers:
            raise DriverError(
                f"driver {name!r}: registers must name some of {', '.join(METRICS)}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        self.plan = plan_reads(registers)
        self._link = ModbusLink(options)

    async def run(self, emit: Emit) -> None:
        backoff = self.BACKOFF_MIN_S
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    reading = await self.poll_once()
                except LinkDown as exc:
                    self._problem(str(exc), exc.kind)
                    self.state = DriverState.DISCONNECTED
                    await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
                    backoff = min(backoff * 2, self.BACKOFF_MAX_S)
                    continue
                backoff = self.BACKOFF_MIN_S
                self.state = DriverState.OK
                if reading is not None:
                    await emit(Reading("env.reading", reading))
                await asyncio.sleep(max(0.0, started + self.options.poll_s - loop.time()))
        finally:
            self._link.close()
            self.state = DriverState.STOPPED

    async def poll_once(self) -> EnvReading | None:
        """Read every configured metric once; None when none could be read."""
        values: dict[str, float] = {}
        for block in self.plan:
            try:
                values.update(
                    block.decode(await self._link.read(block.table, block.start, block.count))
                )
            except DeviceRefused as exc:
                if len(block.fields) == 1:
                    self._refused(block.fields[0], exc)
                else:
                    values.update(await self._one_by_one(block))
        good: dict[str, object] = {"sensor": self.name}
        for metric, value in values.items():
            if (ok := checked(metric, value)) is None:
                self._problem(
                    f"{metric} = {value} is outside what the sensor can measure", "bad_value"
                )
            else:
                good[metric] = ok
        if len(good) == 1:
            return None
        return msgspec.convert(good, EnvReading)

    async def _one_by_one(self, block: ReadBlock) -> dict[str, float]:
        """After a refused block read: each metric alone, so one bad register costs one metric."""
        values = {}
        for field in block.fields:
            metric, spec = field
            try:
                words = await self._link.read(spec.table, spec.address, spec.width)
            except DeviceRefused as exc:
                self._refused(field, exc)
                continue
            values[metric] = spec.decode(words)
        return values

    def _refused(self, field: tuple[str, RegisterSpec], exc: DeviceRefused) -> None:
        metric, spec = field
        self._problem(f"{metric} ({spec.table} register {spec.address}): {exc}", "exception")

    def _problem(self, message: str, counter: str) -> None:
        self._ctx.count(f"modbus_env.{counter}")
        if message != self.last_error:
            log.warning("%s: %s", self.name, message)
        self.last_error = message


def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> ModbusEnvSensor:
    return ModbusEnvSensor(name, parse_options(name, options, ModbusEnvOptions), ctx)


register_driver("modbus_env")(build)


async def probe(options: Mapping[str, Any]) -> ProbeResult:
    """Read the sensor once and say what came back, for ``edge-agent doctor``."""
    try:
        opts = parse_options("probe", options, ModbusEnvOptions)
        sensor = ModbusEnvSensor("probe", opts, DriverContext("probe", UidHasher(bytes(16))))
    except DriverError as exc:
        return ProbeResult.fail(f"configuration problem: {exc}")
    try:
        reading = await sensor.poll_once()
    except LinkDown as exc:
        return ProbeResult.fail(f"{opts.describe()}: {exc}")
    finally:
        sensor._link.close()
    if reading is None:
        return ProbeResult.warn(
            f"{opts.describe()}: answered, but no metric could be read ({sensor.last_error})"
        )
    got = ", ".join(
        f"{m}={getattr(reading, m)}" for m in METRICS if getattr(reading, m) is not None
    )
    tail = f"; last problem: {sensor.last_error}" if sensor.last_error else ""
    verdict = f"{opts.describe()}: OK, {got}{tail}"
    # A problem beside good metrics is one register refused or out of range.
    return ProbeResult.warn(verdict) if sensor.last_error else ProbeResult.ok(verdict)
