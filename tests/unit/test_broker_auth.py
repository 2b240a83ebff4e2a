"""Broker rules, Mosquitto file rendering, password hashes, codes and the failure limiter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ingest_server.control import enrolment
from ingest_server.control.broker_auth import (
    BrokerRules,
    DeviceCredential,
    filter_covers,
    hash_password,
    server_hash_for,
    verify_password,
    write_atomically,
)

A = DeviceCredential("s1-cr-aaaaaa", "s1", hash_password("pw-a"))
B = DeviceCredential("s1-cr-bbbbbb", "s1", hash_password("pw-b"))
RULES = BrokerRules({A.device_id: A, B.device_id: B}, "ingest", hash_password("srv"))


def test_hash_has_mosquitto_form_and_verifies() -> None:
    h = hash_password("secret")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/=]{16}\$[A-Za-z0-9+/=]{88}", h)
    assert verify_password("secret", h)
    assert not verify_password("Secret", h)
    assert not verify_password("secret", "$6$abc$def")
    assert not verify_password("secret", "$7$x$y$z")
    assert hash_password("secret") != h  # salted


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto-clients absent")
def test_verifies_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(f), "dev", "s3cret"], check=True)
    stored = f.read_text().strip().split(":", 1)[1]
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret!", stored)


@pytest.mark.parametrize(
    ("pattern", "flt", "covered"),
    [
        ("campus/v1/s/d/cmd", "campus/v1/s/d/cmd", True),
        ("campus/v1/s/d/cmd", "campus/v1/s/e/cmd", False),
        ("campus/v1/s/d/cmd", "campus/v1/s/+/cmd", False),
        ("campus/v1/s/d/cmd", "campus/v1/#", False),
        ("campus/v1/s/d/cmd", "campus/v1/s/d/cmd/ack", False),
        ("campus/v1/+/+/up", "campus/v1/+/+/up", True),
        ("campus/v1/+/+/up", "campus/v1/x/y/up", True),
        ("campus/v1/+/+/up", "campus/v1/#", False),
        ("campus/#", "campus/v1/x/y/up", True),
        ("campus/v1/+/+/up", "campus/v1/x/up", False),
    ],
)
def test_filter_covers(pattern: str, flt: str, covered: bool) -> None:
    assert filter_covers(pattern, flt) is covered


def test_device_confined_to_its_prefix() -> None:
    a, b = A.device_id, B.device_id
    assert RULES.authenticate(a, "pw-a")
    assert not RULES.authenticate(a, "pw-b")
    assert not RULES.authenticate("nobody", "pw-a")
    assert not RULES.authenticate(None, None)
    assert RULES.may_publish(a, f"campus/v1/s1/{a}/up")
    assert RULES.may_publish(a, f"campus/v1/s1/{a}/cmd/ack")
    assert not RULES.may_publish(a, f"campus/v1/s1/{b}/up")  # as another device
    assert not RULES.may_publish(a, f"campus/v1/s2/{a}/up")  # in another school
    assert not RULES.may_publish(a, f"campus/v1/s1/{a}/cmd")  # commands come from the server
    assert RULES.may_subscribe(a, f"campus/v1/s1/{a}/cmd")
    assert not RULES.may_subscribe(a, f"campus/v1/s1/{b}/cmd")
    assert not RULES.may_subscribe(a, "campus/v1/s1/+/cmd")
    assert not RULES.may_subscribe(a, "#")


def test_server_reads_all_uplinks_and_writes_commands() -> None:
    assert RULES.authenticate("ingest", "srv")
    assert RULES.may_subscribe("ingest", "campus/v1/+/+/up")
    assert RULES.may_subscribe("ingest", "$share/ingest/campus/v1/+/+/up")
    assert RULES.may_subscribe("ingest", "campus/v1/+/+/state")
    assert RULES.may_publish("ingest", "campus/v1/s1/x/cmd")
    assert not RULES.may_publish("ingest", "campus/v1/s1/x/up")  # cannot forge device data
    assert not RULES.may_subscribe("ingest", "#")


def test_client_ids_bound_to_their_user() -> None:
    reserved = frozenset({"campus-ingest", "campus-ingest-control"})
    a, b = A.device_id, B.device_id
    for cid in ("campus-ingest", "campus-ingest-control", "anything"):
        assert RULES.may_use_client_id("ingest", cid, reserved)  # the server user's own
    for user in (a, None):
        assert not RULES.may_use_client_id(user, "campus-ingest", reserved)
        assert not RULES.may_use_client_id(user, "campus-ingest-control", reserved)
        assert not RULES.may_use_client_id(user, f"agent-{b}", reserved)
        assert not RULES.may_use_client_id(user, b, reserved)
        assert RULES.may_use_client_id(user, "", reserved)  # the broker makes one up
    assert RULES.may_use_client_id(a, f"agent-{a}", reserved)
    assert RULES.may_use_client_id(a, a, reserved)
    assert not RULES.may_use_client_id(a, "t-123", reserved)
    assert not RULES.may_use_client_id("revoked-or-unknown", "revoked-or-unknown")
    assert RULES.may_use_client_id(None, "agent-cr-0101", reserved)  # a demo agent
    assert RULES.client_id_owner(f"agent-{a}") == a
    assert RULES.client_id_owner("agent-") is None


def test_anonymous_publishes_uplinks_of_unregistered_devices_only() -> None:
    assert RULES.anonymous_may_publish("campus/v1/demo/cr-0101/up")
    assert RULES.anonymous_may_publish("campus/v1/demo/cr-0101/state")
    assert RULES.anonymous_may_publish("campus/v1/demo/cr-0101/cmd/ack")
    assert not RULES.anonymous_may_publish(f"campus/v1/s1/{A.device_id}/up")  # enrolled
    for topic in ("campus/v1/demo/cr-0101/cmd", "campus/v1/demo/cr-0101/config", "x", "#"):
        assert not RULES.anonymous_may_publish(topic)
        assert not RULES.may_subscribe(None, topic)
    assert not RULES.anonymous_may_publish("campus/v1/+/+/up")


def test_anonymous_reads_only_exact_commands_of_unregistered_devices() -> None:
    """The demo's agents take commands; nobody anonymous reads an enrolled device's, nor data."""
    assert RULES.anonymous_may_read("campus/v1/demo/cr-0101/cmd")
    assert RULES.anonymous_may_read("campus/v1/demo/cr-0101/config")
    for topic_filter in (
        f"campus/v1/s1/{A.device_id}/cmd",  # enrolled
        f"campus/v1/s1/{A.device_id}/config",
        "campus/v1/demo/cr-0101/up",
        "campus/v1/demo/cr-0101/state",
        "campus/v1/demo/+/cmd",
        "campus/v1/+/+/config",
        "campus/v1/demo/cr-0101/#",
        "#",
        "$share/g/campus/v1/demo/cr-0101/cmd",
    ):
        assert not RULES.anonymous_may_read(topic_filter), topic_filter


def test_rendered_files() -> None:
    passwd = RULES.passwd_text().splitlines()
    assert [line.split(":")[0] for line in passwd] == ["ingest", A.device_id, B.device_id]
    assert "pw-a" not in RULES.passwd_text()
    acl = RULES.acl_text()
    block = acl.split(f"user {A.device_id}\n")[1].split("\n\n")[0]
    assert f"topic write campus/v1/s1/{A.device_id}/up" in block
    assert f"topic read campus/v1/s1/{A.device_id}/cmd" in block
    assert B.device_id not in block
    assert "topic write campus/v1/+/+/cmd" in acl.split("user ingest\n")[1].split("\n\n")[0]


def test_write_atomically_reports_change_and_mode(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "acl"
    assert write_atomically(f, "one\n", 0o640)
    assert f.stat().st_mode & 0o777 == 0o640
    assert not write_atomically(f, "one\n")
    assert write_atomically(f, "two\n")
    assert f.read_text() == "two\n"
    assert os.listdir(f.parent) == ["acl"]  # no temp file left behind


def test_server_hash_reused_while_it_matches(tmp_path: Path) -> None:
    f = tmp_path / "passwd"
    first = server_hash_for(f, "ingest", "pw")
    f.write_text(f"ingest:{first}\n")
    assert server_hash_for(f, "ingest", "pw") == first
    assert server_hash_for(f, "ingest", "other") != first


def test_codes_are_typeable_and_normalised() -> None:
    code = enrolment.new_code()
    assert re.fullmatch(r"([2-9A-HJKMNP-TV-Z]{4}-){3}[2-9A-HJKMNP-TV-Z]{4}", code)
    assert not set(code) & set("01ILOU")
    typed = code.lower().replace("-", " ")
    assert enrolment.code_digest(typed) == enrolment.code_digest(code)
    assert len({enrolment.new_code() for _ in range(200)}) == 200


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30m", 1800), ("24h", 86400)])
def test_parse_ttl(text: str, seconds: int) -> None:
    assert enrolment.parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["0", "31d", "1w", "-5"])
def test_parse_ttl_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="TTL"):
        enrolment.parse_ttl(text)


def test_request_errors_name_the_field() -> None:
    with pytest.raises(enrolment.EnrolmentError, match="hardware_ids"):
        enrolment.decode_request(b'{"code": "ABCD", "kind": "card_reader", "agent_version": "1"}')
    with pytest.raises(enrolment.EnrolmentError, match="kind"):
        enrolment.decode_request(
            b'{"code": "ABCD-EFGH", "kind": "toaster", "hardware_ids": {}, "agent_version": "1"}'
        )
    with pytest.raises(enrolment.EnrolmentError, match="JSON object"):
        enrolment.decode_request(b"not json")


def test_failure_limiter_blocks_and_stays_bounded() -> None:
    lim = enrolment.FailureLimiter(limit=3, window_s=60, max_clients=100)
    for _ in range(2):
        lim.failed("10.0.0.1")
    assert lim.retry_after("10.0.0.1") is None
    lim.failed("10.0.0.1")
    wait = lim.retry_after("10.0.0.1")
    assert wait is not None
    assert 1 <= wait <= 60
    assert lim.retry_after("10.0.0.2") is None  # per address
    for i in range(1000):
        lim.failed(f"192.168.{i // 256}.{i % 256}")
    assert len(lim) == 100
    assert lim.retry_after("10.0.0.1") is None  # forgotten first, being oldest
