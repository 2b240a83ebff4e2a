"""The embedded broker's CONNECT gate: parsing, and what it admits (no broker running)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest_server.control.broker_auth import (
    BrokerRules,
    DeviceCredential,
    RulesHolder,
    hash_password,
)
from ingest_server.embedded.broker import ConnectRequest, EmbeddedBroker, parse_connect
from ingest_server.settings import Settings, SettingsError

A = DeviceCredential("s1-sb-aaaaaa", "s1", hash_password("pw-a"))
RULES = BrokerRules({A.device_id: A}, "srv", hash_password("srv-pw"))


def _s(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _connect(
    cid: str,
    *,
    flags: int = 0x02,
    will: tuple[str, str] | None = None,
    user: str | None = None,
    password: str | None = None,
    level: int = 4,
) -> bytes:
    body = _s("MQTT") + bytes((level, flags)) + (30).to_bytes(2, "big") + _s(cid)
    if will:
        body += _s(will[0]) + _s(will[1])
    if user is not None:
        body += _s(user)
    if password is not None:
        body += _s(password)
    return body


def test_parse_connect_reads_every_field() -> None:
    body = _connect(
        "agent-x", flags=0x02 | 0x04 | 0x80 | 0x40, will=("t/w", "bye"), user="u", password="p"
    )
    assert parse_connect(body) == ConnectRequest(4, True, "agent-x", "t/w", "u", "p")
    assert parse_connect(_connect("c", flags=0)) == ConnectRequest(4, False, "c")
    assert parse_connect(_connect("c", level=5)).level == 5


@pytest.mark.parametrize(
    "body",
    [
        b"",
        _connect("c")[:-1],  # client id cut short
        _connect("c", flags=0x80),  # says a user follows, none does
        _s("MQTT") + bytes((4, 0x02)) + b"\x00\x1e" + b"\x00\x02\xff\xfe",  # not UTF-8
    ],
)
def test_parse_connect_refuses_malformed(body: bytes) -> None:
    with pytest.raises(ValueError, match=r"truncated|codec"):
        parse_connect(body)


def _gate(*, anonymous: bool = False) -> EmbeddedBroker:
    return EmbeddedBroker(
        rules=RulesHolder(RULES), allow_anonymous=anonymous, reserved_client_ids=("ingest",)
    )


def test_admission() -> None:
    gate = _gate()
    dev = {"username": A.device_id, "password": "pw-a"}
    assert gate.admission(ConnectRequest(4, True, f"agent-{A.device_id}", **dev))[0] == 0
    assert (
        gate.admission(ConnectRequest(4, True, "ingest", username="srv", password="srv-pw"))[0] == 0
    )
    assert gate.admission(ConnectRequest(4, True, "ingest", **dev)) == (
        2,
        "the client id belongs to the server or another device",
    )
    assert gate.admission(ConnectRequest(4, True, "x"))[0] == 5  # anonymous
    assert (
        gate.admission(ConnectRequest(4, True, "x", username=A.device_id, password="wrong"))[0] == 5
    )
    assert gate.admission(ConnectRequest(4, False, "", **dev))[0] == 2
    assert gate.admission(ConnectRequest(5))[0] == 1
    will_ok = f"campus/v1/s1/{A.device_id}/state"
    assert gate.admission(ConnectRequest(4, True, A.device_id, will_ok, **dev))[0] == 0
    assert gate.admission(ConnectRequest(4, True, A.device_id, "campus/v1/s1/o/cmd", **dev))[0] == 5
    demo = _gate(anonymous=True)
    assert demo.admission(ConnectRequest(4, True, "agent-cr-0101"))[0] == 0
    assert demo.admission(ConnectRequest(4, True, "ingest"))[0] == 2
    assert demo.admission(ConnectRequest(4, True, f"agent-{A.device_id}"))[0] == 2
    assert demo.admission(ConnectRequest(4, True, "c", "campus/v1/d/cr-0101/cmd"))[0] == 5
    # without rules (a test harness broker) only the protocol level is checked
    assert EmbeddedBroker().admission(ConnectRequest(4, False, "anyone"))[0] == 0


def test_settings_never_anonymous_with_enrolment() -> None:
    assert Settings().embedded_allow_anonymous is False
    with pytest.raises(SettingsError, match="--embedded-anonymous cannot go with"):
        Settings(embedded_allow_anonymous=True, hash_key_file=Path("k"))
    with pytest.raises(SettingsError, match="for the embedded broker"):
        Settings(embedded_allow_anonymous=True, broker_url="mqtt://127.0.0.1:1883")
