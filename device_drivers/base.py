"""The interface every driver implements, and the registry the agent builds drivers from.

A driver reads its hardware (through a real library stack: pyserial, pyscard, OpenCV, pymodbus)
and hands :class:`Reading` objects to an ``emit`` callback. It never blocks the event loop:
blocking library calls run in a thread (``asyncio.to_thread``) or a reader thread of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, Self, TypeVar

import msgspec

from schemas.events import CardTap, CardTech
from schemas.reading import Reading

log = logging.getLogger(__name__)


class DriverError(Exception):
    """A driver cannot be built or cannot run; the message is meant for a technician."""


class DeviceLost(DriverError):
    """The device (its port, feed or video source) went away while in use.

    Raised inside a driver's session and caught by its own reopen loop, which reports
    DISCONNECTED with the message and tries again; it never reaches the agent.
    """


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """A module's ``probe(options)`` verdict: how bad it is, and plain words for a technician."""

    status: Literal["ok", "warn", "fail"]
    message: str

    @classmethod
    def ok(cls, message: str) -> Self:
        return cls("ok", message)

    @classmethod
    def warn(cls, message: str) -> Self:
        return cls("warn", message)

    @classmethod
    def fail(cls, message: str) -> Self:
        return cls("fail", message)


class DriverState(StrEnum):
    STARTING = "starting"
    OK = "ok"
    DISCONNECTED = "disconnected"
    FAILED = "failed"
    STOPPED = "stopped"


Emit = Callable[[Reading], Awaitable[None]]

_Options = TypeVar("_Options")


def convert_options(name: str, options: Mapping[str, Any], kind: type[_Options]) -> _Options:
    """A driver's config table (less ``type`` and ``name``) → its typed options, or a
    :class:`DriverError` naming the driver and the bad field."""
    raw = {k: v for k, v in options.items() if k not in ("type", "name")}
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        raise DriverError(f"driver {name!r}: {exc}") from exc


class UidHasher:
    """Turns a card UID into the keyed hash that is all that leaves the device."""

    def __init__(self, key: bytes, *, send_raw: bool = False) -> None:
        if len(key) < 16:
            raise DriverError("the district hashing key must be at least 16 bytes")
        self._key = key
        #: Explicit opt-out of the privacy default: also send the raw UID.
        self.send_raw = send_raw

    def hash(self, uid: bytes) -> str:
        return hmac.new(self._key, uid, hashlib.sha256).hexdigest()

    def card_tap(self, uid: bytes, *, tech: CardTech, reader: str) -> CardTap:
        """A ``card.tap`` for ``uid``: its keyed hash, and the raw UID only where opted out."""
        raw = uid.hex().upper() if self.send_raw else None
        return CardTap(uid_hash=self.hash(uid), tech=tech, reader=reader, uid=raw)

    def __repr__(self) -> str:  # never show the key
        return f"UidHasher(send_raw={self.send_raw})"


@dataclass(frozen=True, slots=True)
class DriverContext:
    """What the agent gives every driver it builds."""

    device_id: str
    hasher: UidHasher
    counters: dict[str, int] = field(default_factory=dict)
    #: How many events this device has handed its agent over its whole life, across restarts:
    #: the outbox's highest seq plus readings queued for it (load generators stop at a count).
    accepted_events: Callable[[], int] = field(default=lambda: 0)

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n


class DriverStatus:
    """A driver's ``state`` and ``last_error``, its counters, and the one policy for going down."""

    #: Counter names are ``{counters}.{what}``.
    counters = "driver"

    def __init__(self, name: str, ctx: DriverContext) -> None:
        self.name = name
        self.state = DriverState.STARTING
        self.last_error: str | None = None
        self._ctx = ctx

    def count(self, what: str) -> None:
        self._ctx.count(f"{self.counters}.{what}")

    def down(self, message: str) -> None:
        """DISCONNECTED: counted once per outage, logged again only when the reason changes."""
        if self.state != DriverState.DISCONNECTED:
            self.count("disconnected")
        if self.state != DriverState.DISCONNECTED or message != self.last_error:
            log.warning("%s: %s", self.name, message)
        self.state = DriverState.DISCONNECTED
        self.last_error = message


class Driver(Protocol):
    """A running hardware driver."""

    name: str
    state: DriverState
    #: A plain-language word on the last problem, for `edge-agent status` and health events.
    last_error: str | None

    async def run(self, emit: Emit) -> None:
        """Read the hardware until cancelled, recovering from unplug and bad frames by itself."""
        ...


DriverFactory = Callable[[str, Mapping[str, Any], DriverContext], Driver]

DRIVERS: dict[str, DriverFactory] = {}


def register_driver(type_name: str) -> Callable[[DriverFactory], DriverFactory]:
    def deco(factory: DriverFactory) -> DriverFactory:
        if type_name in DRIVERS:
            raise ValueError(f"driver type {type_name!r} registered twice")
        DRIVERS[type_name] = factory
        return factory

    return deco


#: Built-in driver modules; each registers its types on import. Some need an optional extra.
BUILTIN_MODULES: tuple[str, ...] = (
    "device_drivers.synthetic",
    "device_drivers.em4100",
    "device_drivers.wiegand",
    "device_drivers.signage",
    "device_drivers.modbus_env",
    "device_drivers.gate",
    "device_drivers.pcsc",
    "device_drivers.camera",
    "device_drivers.panel",
    "device_drivers.recorder",
    "device_drivers.board_os",
    "device_drivers.library",
    "device_drivers.onvif",
)
#: Modules that could not be imported, with the reason (usually a missing optional extra).
UNAVAILABLE: dict[str, str] = {}


def load_builtin_drivers() -> None:
    """Import the built-in drivers lazily, so a gateway without OpenCV or pyscard still runs."""
    for module in BUILTIN_MODULES:
        if module in UNAVAILABLE or module in sys.modules:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            UNAVAILABLE[module] = str(exc)


#: Where each built-in driver type lives: building one imports only its module, so an agent
#: without a camera never loads OpenCV (tens of MB of RSS).
BUILTIN_TYPES: dict[str, str] = {
    "synthetic": "device_drivers.synthetic",
    "em4100": "device_drivers.em4100",
    "wiegand": "device_drivers.wiegand",
    "signage": "device_drivers.signage",
    "modbus_env": "device_drivers.modbus_env",
    "gate": "device_drivers.gate",
    "pcsc": "device_drivers.pcsc",
    "camera": "device_drivers.camera",
    "panel": "device_drivers.panel",
    "recorder": "device_drivers.recorder",
    "board_os": "device_drivers.board_os",
    "library_terminal": "device_drivers.library",
    "onvif": "device_drivers.onvif",
}


def build_driver(
    type_name: str, name: str, options: Mapping[str, Any], ctx: DriverContext
) -> Driver:
    """Build a driver from its config section; raise :class:`DriverError` saying what is wrong."""
    module = BUILTIN_TYPES.get(type_name)
    if type_name not in DRIVERS and module is not None and module not in UNAVAILABLE:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            UNAVAILABLE[module] = str(exc)
    if type_name not in DRIVERS:
        load_builtin_drivers()
    factory = DRIVERS.get(type_name)
    if factory is None:
        known = ", ".join(sorted(DRIVERS))
        hint = "".join(f"; {m} is unavailable: {why}" for m, why in sorted(UNAVAILABLE.items()))
        raise DriverError(f"unknown driver type {type_name!r} (known: {known}){hint}")
    return factory(name, options, ctx)
