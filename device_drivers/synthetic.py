"""A load generator: valid events of one type at a set rate, for tests, demos and benchmarks.

Driver type ``synthetic``. Options:

- ``event_type`` (``env.reading``): one of :data:`GENERATORS` (``card.tap`` hashes a made-up
  UID with the district key, like a real reader).
- ``rate`` (0): events per second; 0 emits as fast as the agent accepts them.
- ``count`` (none): the device's total number of events over its whole life. The driver stops
  once the agent has accepted that many (restarts included), so an agent killed and restarted
  ends with exactly seqs 1..count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from device_drivers.base import (
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    UidHasher,
    register_driver,
)
from schemas.events import (
    AttendanceCheckin,
    BoardApp,
    BoardInput,
    BoardPower,
    BoardTouch,
    CameraActivity,
    EnvReading,
    RecorderStatus,
)
from schemas.reading import Reading

#: Readings emitted back to back before yielding to the event loop when unpaced.
_YIELD_EVERY: Final = 64
_POWER: Final[tuple[Literal["on", "standby", "off"], ...]] = ("on", "standby", "off")
_INPUTS: Final = ("hdmi1", "hdmi2", "ops", "usb-c")
_CLASSES: Final = ("c7a", "c7b")
_STATUS: Final[tuple[Literal["on_time", "late", "outside_period"], ...]] = (
    "on_time", "on_time", "late", "outside_period"
)  # fmt: skip


def _card(i: int, name: str, hasher: UidHasher) -> msgspec.Struct:
    uid = (0x04000000 + i % 5000).to_bytes(4, "big")
    return hasher.card_tap(uid, tech="iso14443a", reader=name)


def _checkin(i: int, name: str, hasher: UidHasher) -> msgspec.Struct:
    """Students of two classes; every fourth is late, every fourth outside a period."""
    uid = (0x05000000 + i % 800).to_bytes(4, "big")
    status = _STATUS[i % 4]
    return AttendanceCheckin(
        uid_hash=hasher.hash(uid),
        reader=name,
        class_id=_CLASSES[i % 2],
        period=None if status == "outside_period" else f"p{1 + i // 40 % 8}",
        status=status,
    )


def _env(i: int, name: str, _h: UidHasher) -> msgspec.Struct:
    return EnvReading(
        sensor=name,
        temperature_c=round(18 + (i % 100) / 10, 1),
        humidity_pct=float(40 + i % 30),
        co2_ppm=float(400 + (i * 7) % 1600),
    )


def _power(i: int, _n: str, _h: UidHasher) -> msgspec.Struct:
    return BoardPower(state=_POWER[i % 3], previous=_POWER[(i - 1) % 3])


#: Event type → data for the i-th event of the driver called ``name``.
GENERATORS: Final[dict[str, Callable[[int, str, UidHasher], msgspec.Struct]]] = {
    "env.reading": _env,
    "card.tap": _card,
    "attendance.checkin": _checkin,
    "board.power": _power,
    "board.input": lambda i, _n, _h: BoardInput(source=_INPUTS[i % 4], previous=_INPUTS[i % 3]),
    "board.app": lambda i, _n, _h: BoardApp(app=f"app-{i % 7}"),
    "board.touch": lambda i, _n, _h: BoardTouch(touches=i % 50, window_s=60.0),
    "recorder.status": lambda i, n, _h: RecorderStatus(
        state="record", free_space_mb=float(100_000 - i % 1000), recorder=n
    ),
    "camera.activity": lambda i, n, _h: CameraActivity(
        camera=n, motion=(i % 100) / 100, people=i % 40
    ),
}


class SyntheticOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    event_type: str = "env.reading"
    rate: Annotated[float, Meta(ge=0)] = 0.0
    count: Annotated[int, Meta(ge=0)] | None = None


class SyntheticDriver:
    """Emits generated events; needs no hardware."""

    def __init__(self, name: str, options: SyntheticOptions, ctx: DriverContext) -> None:
        self.name = name
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self.options = options
        self.emitted = 0
        self._ctx = ctx
        self._make = GENERATORS[options.event_type]

    async def run(self, emit: Emit) -> None:
        """Emit until ``count`` is reached (then return) or until cancelled."""
        opts, loop = self.options, asyncio.get_running_loop()
        self.state = DriverState.OK
        start, sent = loop.time(), 0
        try:
            while opts.count is None or self._ctx.accepted_events() < opts.count:
                if opts.rate:
                    await asyncio.sleep(max(0.0, start + sent / opts.rate - loop.time()))
                elif sent % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                i = self._ctx.accepted_events()
                await emit(Reading(opts.event_type, self._make(i, self.name, self._ctx.hasher)))
                sent += 1
                self.emitted += 1
        finally:
            self.state = DriverState.STOPPED


@register_driver("synthetic")
def build(name: str, options: Mapping[str, Any], ctx: DriverContext) -> SyntheticDriver:
    raw = {k: v for k, v in options.items() if k not in ("type", "name")}
    try:
        opts = msgspec.convert(raw, SyntheticOptions)
    except msgspec.ValidationError as exc:
        raise DriverError(f"driver {name!r}: {exc}") from exc
    if opts.event_type not in GENERATORS:
        known = ", ".join(sorted(GENERATORS))
        raise DriverError(
            f"driver {name!r}: event_type {opts.event_type!r} is not generated (known: {known})"
        )
    return SyntheticDriver(name, opts, ctx)
