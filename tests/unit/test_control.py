"""The control plane's pure parts: ack topics, ack payloads, command and config documents."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from ingest_server.control.plane import (
    ACK_LIMITS,
    AckKind,
    ConfigAck,
    ControlError,
    ack_filters,
    check_document,
    command_payload,
    decode_ack,
    parse_ack_topic,
)
from schemas.state import CommandAck, command_decoder


def test_ack_topics() -> None:
    assert ack_filters() == ["campus/v1/+/+/cmd/ack", "campus/v1/+/+/config/ack"]
    t = parse_ack_topic("campus/v1/s001/cr-0101/cmd/ack")
    assert (t.school_id, t.device_id, t.kind) == ("s001", "cr-0101", AckKind.COMMAND)
    assert parse_ack_topic("campus/v1/s001/cr-0101/config/ack").kind is AckKind.CONFIG


@pytest.mark.parametrize(
    ("topic", "says"),
    [
        ("campus/v1/s001/cr-0101/cmd", "not a device's cmd/ack"),
        ("campus/v1/s001/cr-0101/state/ack", "not a device's cmd/ack"),
        ("campus/v2/s001/cr-0101/cmd/ack", "not a device's cmd/ack"),
        ("campus/v1/S001/cr-0101/cmd/ack", "school_id 'S001' is not a valid id"),
        ("campus/v1/s001/-x/config/ack", "device_id '-x' is not a valid id"),
    ],
)
def test_bad_ack_topics_say_why(topic: str, says: str) -> None:
    with pytest.raises(ControlError, match=says):
        parse_ack_topic(topic)


def test_decode_acks() -> None:
    ack = decode_ack(AckKind.COMMAND, b'{"id": "a", "status": "error", "detail": {"x": 1}}')
    assert ack == CommandAck(id="a", status="error", detail={"x": 1})
    cfg = decode_ack(
        AckKind.CONFIG,
        b'{"version": 3, "status": "rolled_back", "detail": "no", "ts": "2026-01-01T00:00:00Z",'
        b' "extra": true}',
    )
    assert cfg == ConfigAck(
        version=3, status="rolled_back", detail="no", ts=datetime(2026, 1, 1, tzinfo=UTC)
    )


@pytest.mark.parametrize(
    ("kind", "payload", "says"),
    [
        (
            AckKind.COMMAND,
            b"\xff",
            "cmd/ack refused: payload is not UTF-8: invalid byte at offset 0",
        ),
        (AckKind.COMMAND, b"{,}", "malformed cmd/ack: JSON is malformed"),
        (AckKind.COMMAND, b'{"id": "a", "status": "fine"}', r"at `\$.status`"),
        (AckKind.COMMAND, b'{"status": "ok"}', "missing required field `id`"),
        (
            AckKind.CONFIG,
            b'{"version": 0, "status": "applied", "ts": "2026-01-01T00:00:00Z"}',
            r"at `\$.version`",
        ),
        (
            AckKind.CONFIG,
            b'{"version": 1, "status": "applied", "ts": "2026-01-01T00:00:00"}',
            r"at `\$.ts`",
        ),
    ],
)
def test_bad_acks_say_what_is_wrong(kind: AckKind, payload: bytes, says: str) -> None:
    with pytest.raises(ControlError, match=says):
        decode_ack(kind, payload)


def test_command_payload_is_the_contracts_command() -> None:
    expires = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    raw = command_payload("c1", "set_sample_rate", {"driver": "env", "interval_s": 5}, expires)
    cmd = command_decoder.decode(raw)
    assert (cmd.id, cmd.name, cmd.args, cmd.expires_at) == (
        "c1",
        "set_sample_rate",
        {"driver": "env", "interval_s": 5},
        expires,
    )


def test_check_document() -> None:
    doc = '{"config": {"a": 1}, "version": 2, "issued_at": "2026-11-22T08:00:00.000+00:00"}'
    assert check_document(doc) == doc.encode()
    with pytest.raises(msgspec.ValidationError, match="version"):
        check_document('{"config": {}, "version": 0, "issued_at": "2026-11-22T08:00:00Z"}')


_NESTED = b"[" * 17 + b"]" * 17


@pytest.mark.parametrize(
    ("kind", "payload", "why", "says"),
    [
        (
            AckKind.COMMAND,
            b'{"id": "a", "status": "ok", "detail": "x\\u0000y"}',
            "nul",
            r"cmd/ack refused: contains a \\u0000 character",
        ),
        (
            AckKind.CONFIG,
            b'{"version": 1, "status": "applied", "detail": "\\u0000",'
            b' "ts": "2026-01-01T00:00:00Z"}',
            "nul",
            "config/ack refused: contains a",
        ),
        (
            AckKind.COMMAND,
            b'{"id": "a", "status": "ok", "detail": "' + b"x" * ACK_LIMITS.max_bytes + b'"}',
            "oversize",
            f"over the limit of {ACK_LIMITS.max_bytes}",
        ),
        (
            AckKind.COMMAND,
            b'{"id": "a", "status": "ok", "detail": ' + _NESTED + b"}",
            "depth",
            "nested deeper than the limit of 16 levels",
        ),
        (
            AckKind.COMMAND,
            b'{"id": "a", "status": "ok", "detail": "' + b"x" * 8193 + b'"}',
            "string",
            "a string is 8193 bytes long, over the limit of 8192",
        ),
        (
            AckKind.COMMAND,
            b'{"id": "a", "status": "ok", "detail": "\\ud800"}',
            "malformed",
            "malformed cmd/ack",
        ),
        (
            AckKind.COMMAND,
            b'{"id": "a", "status": "ok", "detail": "\xed\xa0\x80"}',
            "encoding",
            "payload is not UTF-8",
        ),
    ],
)
def test_acks_beyond_the_limits_are_refused_before_the_database(
    kind: AckKind, payload: bytes, why: str, says: str
) -> None:
    with pytest.raises(ControlError, match=says) as info:
        decode_ack(kind, payload)
    assert info.value.kind == why


def test_acks_within_the_limits_pass() -> None:
    nested = b"[" * 15 + b"]" * 15
    ack = decode_ack(AckKind.COMMAND, b'{"id": "a", "status": "ok", "detail": ' + nested + b"}")
    assert isinstance(ack, CommandAck)
    # an escaped backslash before "u0000" is no NUL; brackets inside strings are no nesting
    text = b'{"id": "a", "status": "ok", "detail": ["\\\\u0000", "[[[[[[[[[[[[[[[[[[[["]}'
    ack = decode_ack(AckKind.COMMAND, text)
    assert isinstance(ack, CommandAck)
    assert ack.detail == ["\\u0000", "[" * 20]
