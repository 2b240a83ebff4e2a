"""Topic names: ``campus/v1/{school_id}/{device_id}/{channel}`` (ARCHITECTURE.md section 3)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from schemas.errors import TopicError
from schemas.patterns import whole

PREFIX: Final = "campus/v1"
ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,63}$"
#: :data:`ID_PATTERN` for Python's ``re`` (its ``$`` as ``\Z``): every id checked in code.
ID_RE: Final = re.compile(whole(ID_PATTERN))


class Channel(StrEnum):
    """The channels a device has, with their direction given in the contract."""

    UP = "up"
    STATE = "state"
    CMD = "cmd"
    CMD_ACK = "cmd/ack"
    CONFIG = "config"
    #: Additive: the agent's outcome for a ``config`` document (docs/contract.md).
    CONFIG_ACK = "config/ack"


#: QoS and retain flag per channel, exactly as the contract's table gives them.
CHANNEL_QOS: Final[dict[Channel, int]] = dict.fromkeys(Channel, 1)
CHANNEL_RETAINED: Final[dict[Channel, bool]] = {
    Channel.UP: False,
    Channel.STATE: True,
    Channel.CMD: False,
    Channel.CMD_ACK: False,
    Channel.CONFIG: True,
    Channel.CONFIG_ACK: True,
}


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid school or device id, else raise :class:`TopicError`."""
    if not ID_RE.match(value):
        raise TopicError(
            f"{what} {value!r} is not a valid id: expected 1-64 characters of a-z, 0-9, '_' "
            "or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topic:
    school_id: str
    device_id: str
    channel: Channel

    def __str__(self) -> str:
        return f"{PREFIX}/{self.school_id}/{self.device_id}/{self.channel.value}"


def build(school_id: str, device_id: str, channel: Channel | str) -> str:
    """Build a topic string, validating both ids."""
    check_id(school_id, "school_id")
    check_id(device_id, "device_id")
    return str(Topic(school_id, device_id, Channel(channel)))


def parse(topic: str) -> Topic:
    """Parse a topic string; raise :class:`TopicError` saying what is wrong."""
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != PREFIX:
        raise TopicError(
            f"topic {topic!r} is not of the form {PREFIX}/{{school_id}}/{{device_id}}/{{channel}}"
        )
    school_id, device_id, channel = parts[2], parts[3], "/".join(parts[4:])
    check_id(school_id, "school_id")
    check_id(device_id, "device_id")
    try:
        ch = Channel(channel)
    except ValueError:
        known = ", ".join(c.value for c in Channel)
        raise TopicError(
            f"topic {topic!r} has unknown channel {channel!r} (known: {known})"
        ) from None
    return Topic(school_id, device_id, ch)


def subscription(channel: Channel, *, school_id: str = "+", share_group: str | None = None) -> str:
    """A subscription filter for ``channel`` across devices, optionally as an MQTT 5 shared one."""
    base = f"{PREFIX}/{school_id}/+/{channel.value}"
    return f"$share/{share_group}/{base}" if share_group else base
