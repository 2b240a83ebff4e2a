"""campus-edge wire contract: topics, the uplink batch, event types, presence and commands."""

from schemas.errors import ContractError, TopicError, UplinkError
from schemas.events import REGISTRY, DeviceKind, EventType
from schemas.topics import Channel, Topic
from schemas.uplink import (
    DecodedUplink,
    RejectedEvent,
    UplinkBatch,
    UplinkEvent,
    ValidEvent,
    decode_uplink,
    encode_batch,
    metrics_of,
)

__all__ = [
    "REGISTRY",
    "Channel",
    "ContractError",
    "DecodedUplink",
    "DeviceKind",
    "EventType",
    "RejectedEvent",
    "Topic",
    "TopicError",
    "UplinkBatch",
    "UplinkError",
    "UplinkEvent",
    "ValidEvent",
    "decode_uplink",
    "encode_batch",
    "metrics_of",
]
