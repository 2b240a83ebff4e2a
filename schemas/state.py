"""Payloads of the ``state``, ``cmd``, ``cmd/ack``, ``config`` and ``config/ack`` channels
(ARCHITECTURE.md section 3; ``config/ack`` and ``state.config_version`` are additive, see
docs/contract.md)."""

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
    #: The version of the remote config document the agent runs on; absent before the first.
    config_version: Annotated[int, Meta(ge=1)] | None = None


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    expires_at: AwareDatetime | None = None


class CommandAck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    id: str
    status: Literal["ok", "error", "rejected"]
    detail: Any = None


class ConfigDocument(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """The device's desired configuration (``config``, retained): the remotely managed parts.

    ``config`` may hold the sections ``drivers`` (the full driver list, each table as in the
    agent's TOML file), ``publish``, ``health`` and ``outbox`` (``max_bytes``, ``max_events``).
    A section given replaces the agent file's; a section left out keeps it. MQTT settings and
    the hashing key are never managed this way: the agent rejects a document that has them.
    """

    version: Annotated[int, Meta(ge=1)]
    issued_at: AwareDatetime | None = None
    config: dict[str, Any] = msgspec.field(default_factory=dict)


class ConfigAck(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """The outcome of a config document (``config/ack``, retained)."""

    version: Annotated[int, Meta(ge=1)]
    #: ``rolled_back``: it passed validation but failed to run; the previous config runs again.
    status: Literal["applied", "rejected", "rolled_back"]
    detail: str | None = None
    ts: AwareDatetime


state_decoder = msgspec.json.Decoder(DeviceState)
command_decoder = msgspec.json.Decoder(Command)
ack_decoder = msgspec.json.Decoder(CommandAck)
config_decoder = msgspec.json.Decoder(ConfigDocument)
config_ack_decoder = msgspec.json.Decoder(ConfigAck)
