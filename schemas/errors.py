"""Errors raised by the contract layer."""

from __future__ import annotations


class ContractError(ValueError):
    """Something does not conform to the wire contract; the message says what and where."""


class TopicError(ContractError):
    """A topic is not of the form ``campus/v1/{school_id}/{device_id}/{channel}``."""


class UplinkError(ContractError):
    """A whole uplink message is unusable (bad JSON, wrong version, wrong device id, too big)."""
