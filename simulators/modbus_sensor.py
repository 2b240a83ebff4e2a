"""A scripted all-in-one classroom sensor: a pymodbus 3.16 server over Modbus TCP or RTU on a pty.

The server runs on its own event loop in a thread, so tests and the fleet runner drive it with
plain calls: set values in engineering units (encoded by the sensor's register layout), script a
sequence over time, answer with Modbus exceptions, fall silent, stop and restart, and (RTU)
unplug and re-plug the serial end under a new pts name.

Register layout of the simulated sensor (holding registers, big-endian words):

=====  ==============  =======  =====
addr   metric          type     scale
=====  ==============  =======  =====
0      humidity_pct    uint16   0.1
1      temperature_c   int16    0.1
2      co2_ppm         uint16   1
3      pm25_ugm3       uint16   1
4      noise_db        uint16   0.1
=====  ==============  =======  =====
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import struct
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.pty import close_fds, open_pty, point_link

Table = Literal["holding", "input"]
T = TypeVar("T")

_STRUCT = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}
_TABLE_OF_FC = {3: "holding", 6: "holding", 16: "holding", 23: "holding", 4: "input"}


@dataclass(frozen=True, slots=True)
class Field:
    """Where and how the sensor stores one metric."""

    address: int
    table: Table = "holding"
    dtype: Literal["int16", "uint16", "int32", "uint32", "float32"] = "uint16"
    word_order: Literal["big", "little"] = "big"
    scale: float = 1.0

    def encode(self, value: float) -> list[int]:
        """Engineering units → register words, as the device firmware would store them."""
        fmt = _STRUCT[self.dtype]
        raw = value / self.scale
        packed = struct.pack(f">{fmt}", raw if fmt == "f" else round(raw))
        words = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2)]
        return words[::-1] if self.word_order == "little" else words


CLASSROOM_LAYOUT: Mapping[str, Field] = {
    "humidity_pct": Field(0, dtype="uint16", scale=0.1),
    "temperature_c": Field(1, dtype="int16", scale=0.1),
    "co2_ppm": Field(2, dtype="uint16"),
    "pm25_ugm3": Field(3, dtype="uint16"),
    "noise_db": Field(4, dtype="uint16", scale=0.1),
}


class _Pty:
    """One pty pair; the simulator keeps the slave open so the master never reads EIO."""

    def __init__(self, avoid: str | None = None) -> None:
        self.master, self.slave, self.name = open_pty(avoid)

    def close(self) -> None:
        close_fds((self.master, self.slave))


class PtyBridge:
    """Two ptys joined back to back like a null-modem cable; the ``link`` end can be unplugged."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self._inner = _Pty()
        self._outer: _Pty | None = None
        self._last_name: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.replug()
        self._thread = threading.Thread(target=self._pump, name="pty-bridge", daemon=True)
        self._thread.start()

    @property
    def inner_path(self) -> str:
        """The end the simulated device opens."""
        return self._inner.name

    @property
    def outer_name(self) -> str | None:
        return self._outer.name if self._outer else None

    def unplug(self) -> None:
        with self._lock:
            if self._outer:
                self._outer.close()
                self._outer = None
            self.link.unlink(missing_ok=True)

    def replug(self) -> str:
        """Plug the outer end back in under a pts name different from the last one."""
        with self._lock:
            if self._outer:
                self._outer.close()
            fresh = _Pty(avoid=self._last_name)
            self._outer = fresh
            self._last_name = fresh.name
            point_link(self.link, fresh.name)
            return fresh.name

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.unplug()
        self._inner.close()

    def _pump(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                fds = [self._inner.master] + ([self._outer.master] if self._outer else [])
            try:
                ready, _, _ = select.select(fds, [], [], 0.05)
            except (OSError, ValueError):
                continue
            with self._lock:
                for fd in ready:
                    outer = self._outer.master if self._outer else None
                    if fd not in (self._inner.master, outer):
                        continue  # unplugged while we waited
                    try:
                        data = os.read(fd, 4096)
                    except OSError:
                        continue
                    target = outer if fd == self._inner.master else self._inner.master
                    if target is not None and data:
                        with contextlib.suppress(OSError):
                            os.write(target, data)


class ModbusSensorSim:
    """A Modbus sensor whose registers, faults and presence a test controls."""

    def __init__(
        self, layout: Mapping[str, Field] = CLASSROOM_LAYOUT, *, unit: int = 1, size: int = 64
    ) -> None:
        self.layout = dict(layout)
        self.unit = unit
        self.size = size
        self._regs: dict[str, list[int]] = {"holding": [0] * size, "input": [0] * size}
        self._lock = threading.Lock()
        #: When set, every request is answered with this Modbus exception code.
        self.exception_code: int | None = None
        #: Register addresses that answer "illegal data address" (both tables).
        self.illegal: set[int] = set()
        #: When true the sensor receives requests but never answers.
        self.silent = False
        #: Requests seen (answered or not).
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="modbus-sensor-sim", daemon=True
        )
        self._thread.start()
        self._server: ModbusBaseServer | None = None
        self._bridge: PtyBridge | None = None
        self.port: int | None = None

    # -- registers ---------------------------------------------------------------------------

    def set(self, **values: float) -> None:
        """Set metrics in engineering units, e.g. ``set(temperature_c=21.5, co2_ppm=800)``."""
        with self._lock:
            for metric, value in values.items():
                f = self.layout[metric]
                self._store(f.table, f.address, f.encode(value))

    def set_raw(self, table: Table, address: int, words: Sequence[int]) -> None:
        with self._lock:
            self._store(table, address, words)

    def _store(self, table: Table, address: int, words: Sequence[int]) -> None:
        if not 0 <= address <= address + len(words) <= self.size:
            raise IndexError(f"registers {address}..{address + len(words) - 1} beyond {self.size}")
        self._regs[table][address : address + len(words)] = [w & 0xFFFF for w in words]

    def registers(self, table: Table) -> list[int]:
        with self._lock:
            return list(self._regs[table])

    def script(self, steps: Iterable[tuple[float, Mapping[str, float]]]) -> None:
        """Apply ``{metric: value}`` sets at the given offsets (seconds from now)."""
        for delay, values in steps:
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._apply, values)

    def _apply(self, values: Mapping[str, float]) -> None:
        self.set(**values)

    # -- serving -----------------------------------------------------------------------------

    def start_tcp(self, port: int = 0) -> int:
        """Serve Modbus TCP on 127.0.0.1 (port 0: pick a free one); return the port."""
        self.stop()
        self._call(self._start_tcp(port))
        assert self.port is not None
        return self.port

    def start_rtu(self, link: str | Path, *, baudrate: int = 9600) -> str:
        """Serve Modbus RTU behind a pty; ``link`` becomes a symlink to the device-facing pts."""
        self.stop()
        if self._bridge is not None:
            self._bridge.close()
        self._bridge = PtyBridge(Path(link))
        inner = self._bridge.inner_path
        self._call(self._start_rtu(inner, baudrate))
        return str(self._bridge.outer_name)

    def stop(self) -> None:
        """Stop answering and close the listener (a TCP restart keeps the same port)."""
        if self._server is not None:
            self._call(self._server.shutdown())  # type: ignore[no-untyped-call]
            self._server = None

    def unplug(self) -> None:
        if self._bridge is None:
            raise RuntimeError("unplug() needs start_rtu()")
        self._bridge.unplug()

    def replug(self) -> str:
        """Re-plug the serial end; return its new pts name."""
        if self._bridge is None:
            raise RuntimeError("replug() needs start_rtu()")
        return self._bridge.replug()

    def close(self) -> None:
        self.stop()
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ModbusSensorSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _device(self) -> SimDevice:
        block = [SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)]
        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        return SimDevice(
            self.unit, simdata=(bits, list(bits), block, list(block)), action=self._on_request
        )

    async def _start_tcp(self, port: int) -> None:
        server = ModbusTcpServer(
            self._device(), address=("127.0.0.1", port), trace_packet=self._trace
        )
        await server.serve_forever(background=True)
        self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._server = server

    async def _start_rtu(self, path: str, baudrate: int) -> None:
        server = ModbusSerialServer(
            self._device(), port=path, baudrate=baudrate, trace_packet=self._trace
        )
        await server.serve_forever(background=True)
        self._server = server

    def _trace(self, sending: bool, packet: bytes) -> bytes:
        return b"" if sending and self.silent else packet

    async def _on_request(  # noqa: PLR0917 - pymodbus calls actions positionally
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        self.requests += 1
        if self.exception_code is not None:
            return ExcCodes(self.exception_code)
        if self.illegal.intersection(range(address, address + count)):
            return ExcCodes.ILLEGAL_ADDRESS
        table = _TABLE_OF_FC.get(function_code)
        if table is None:
            return None
        with self._lock:
            store = self._regs[table]
            if set_values:
                store[address : address + len(set_values)] = [int(v) for v in set_values]
            registers[: self.size] = store[start_address : start_address + self.size]
        return None
