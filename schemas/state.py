"""Payloads of the ``state``, ``cmd`` and ``cmd/ack`` channels (ARCHITECTURE.md section 3)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

AwareDatetime = Annotated[datetime, Meta(tz=True)]


class DeviceState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Retained presence of a device; the MQTT will publishes ``offline``."""

    state: Literal["online", "offline"]
    boot: Annotated[int, Meta(ge=0)]
    agent_version: str
    ts: AwareDatetime


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_at: AwareDatetime | None = None


class CommandAck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    id: str
    status: Literal["ok", "error", "rejected"]
    detail: Any = None


state_decoder = msgspec.json.Decoder(DeviceState)
command_decoder = msgspec.json.Decoder(Command)
ack_decoder = msgspec.json.Decoder(CommandAck)
