"""Devices made of parts: card readers built from inner config tables, and a state and last
error summed up over every part (class signage, the access gate, the library terminal)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from device_drivers.base import (
    Driver,
    DriverContext,
    DriverError,
    DriverState,
    Emit,
    build_driver,
)
from schemas.events import CardTap
from schemas.reading import Reading

_SEVERITY: Final = (
    DriverState.FAILED,
    DriverState.DISCONNECTED,
    DriverState.STARTING,
    DriverState.OK,
    DriverState.STOPPED,
)


def worst_state(states: Iterable[DriverState]) -> DriverState:
    """The state to show for a device made of parts: the most severe one."""
    return min(states, key=_SEVERITY.index, default=DriverState.STOPPED)


OnTap = Callable[[Reading, CardTap, Mapping[str, Any]], Awaitable[None]]


class CardSources:
    """The card readers inside a composite device, each built from its own config table.

    Keys named in ``consume`` (e.g. the gate's ``direction``) are taken out of each table before
    the inner driver sees it and handed to ``on_tap`` with every tap of that reader.
    """

    def __init__(
        self,
        owner: str,
        entries: Sequence[Mapping[str, Any]],
        ctx: DriverContext,
        *,
        consume: Sequence[str] = (),
    ) -> None:
        self.parts: list[tuple[Driver, dict[str, Any]]] = []
        for i, entry in enumerate(entries):
            kind = entry.get("type")
            if not isinstance(kind, str):
                raise DriverError(f"driver {owner!r}: cards[{i}] needs a `type`")
            extra = {k: entry[k] for k in consume if k in entry}
            inner = {k: v for k, v in entry.items() if k not in (*consume, "type", "name")}
            default = owner if len(entries) == 1 else f"{owner}-{i + 1}"
            name = str(entry.get("name", default))
            self.parts.append((build_driver(kind, name, inner, ctx), extra))

    @property
    def drivers(self) -> list[Driver]:
        return [d for d, _ in self.parts]

    async def run(self, on_tap: OnTap, emit: Emit) -> None:
        """Run every reader until cancelled; taps go to ``on_tap``, anything else to ``emit``."""

        def route(extra: Mapping[str, Any]) -> Emit:
            async def inner_emit(reading: Reading) -> None:
                if isinstance(reading.data, CardTap):
                    await on_tap(reading, reading.data, extra)
                else:
                    await emit(reading)

            return inner_emit

        async with asyncio.TaskGroup() as tg:
            for driver, extra in self.parts:
                tg.create_task(driver.run(route(extra)), name=f"card:{driver.name}")


class DriverPart(Protocol):
    state: DriverState
    last_error: str | None


class CompositeDriver:
    """A driver made of card sources and other parts: its state is the worst of theirs while
    it runs, and its last error the first one any of them has."""

    cards: CardSources

    def __init__(self) -> None:
        self._state = DriverState.STARTING
        self._error: str | None = None

    def _other_parts(self) -> list[DriverPart]:
        """Parts besides the card readers (a screen, a thermometer)."""
        return []

    @property
    def state(self) -> DriverState:
        parts = [d.state for d in self.cards.drivers] + [p.state for p in self._other_parts()]
        return self._state if self._state != DriverState.OK else worst_state(parts)

    @state.setter
    def state(self, value: DriverState) -> None:
        self._state = value

    @property
    def last_error(self) -> str | None:
        parts = [self._error, *(d.last_error for d in self.cards.drivers)]
        parts += [p.last_error for p in self._other_parts()]
        return next((e for e in parts if e), None)

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self._error = value
