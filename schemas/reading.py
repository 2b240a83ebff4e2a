"""One event as a device produces it, before the agent's outbox gives it a ``seq``.

Drivers make it, the agent's outbox stores it and the fleet simulator generates it: it crosses
package boundaries, so it lives with the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from schemas import events as registry
from schemas.errors import ContractError


class ReadingError(ContractError):
    """A reading names an unregistered event type or carries the wrong data struct."""


def _now() -> datetime:
    return datetime.now(UTC).astimezone()


@dataclass(frozen=True, slots=True)
class Reading:
    """An event's type, typed data, device time and whether that time was synchronised."""

    type: str
    data: msgspec.Struct
    ts: datetime = field(default_factory=_now)
    synced: bool = True

    def __post_init__(self) -> None:
        etype = registry.get(self.type)
        if etype is None:
            raise ReadingError(f"driver produced unregistered event type {self.type!r}")
        if not isinstance(self.data, etype.data):
            raise ReadingError(
                f"event type {self.type!r} needs data of {etype.data.__name__}, "
                f"got {type(self.data).__name__}"
            )
