"""The wire contract in code: topics, uplink decoding, and the reasons given for bad input."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import REGISTRY, Channel, TopicError, UplinkError, decode_uplink, metrics_of, topics
from schemas.cli import export_all
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch

TOPIC = "campus/v1/s001/cr-0101/up"
HASH = "ab" * 32


def event(seq: int = 1, type_: str = "card.tap", data: Any = None, **extra: Any) -> dict[str, Any]:
    if data is None:
        data = {"uid_hash": HASH, "tech": "iso14443a", "reader": "door-1"}
    return {"seq": seq, "ts": "2026-11-22T07:50:01.123+08:00", "type": type_, "data": data, **extra}


def batch(*events: dict[str, Any], **over: Any) -> bytes:
    body = {
        "v": 1,
        "device_id": "cr-0101",
        "kind": "card_reader",
        "sent_at": "2026-11-22T07:50:02.010+08:00",
        "events": list(events),
    }
    body.update(over)
    return json.dumps(body).encode()


def test_topic_round_trip() -> None:
    t = topics.build("s001", "cr-0101", Channel.CMD_ACK)
    assert t == "campus/v1/s001/cr-0101/cmd/ack"
    parsed = topics.parse(t)
    assert (parsed.school_id, parsed.device_id, parsed.channel) == (
        "s001",
        "cr-0101",
        Channel.CMD_ACK,
    )


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        ("campus/v2/s001/d1/up", "not of the form"),
        ("campus/v1/S001/d1/up", "school_id 'S001' is not a valid id"),
        ("campus/v1/s001/-d/up", "device_id '-d' is not a valid id"),
        ("campus/v1/s001/d1/down", "unknown channel 'down'"),
        ("campus/v1/s001", "not of the form"),
    ],
)
def test_bad_topics_say_what_is_wrong(topic: str, words: str) -> None:
    with pytest.raises(TopicError, match=words):
        topics.parse(topic)


def test_shared_subscription_filter() -> None:
    assert topics.subscription(Channel.UP, share_group="ingest") == "$share/ingest/campus/v1/+/+/up"


def test_contract_example_decodes() -> None:
    decoded = decode_uplink(TOPIC, batch(event(1841, synced=True)))
    assert decoded.rejected == []
    (ev,) = decoded.events
    assert ev.seq == 1841
    assert ev.ts.utcoffset() is not None
    assert json.loads(ev.data_json)["reader"] == "door-1"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "payload is not valid JSON"),
        (b"\xff\xfe{}", "payload is not UTF-8: invalid byte at offset 0"),
        (batch(event(), v=2), "v: unsupported contract version 2"),
        (
            batch(event(), device_id="cr-0999"),
            "device_id: 'cr-0999' does not match the topic's device 'cr-0101'",
        ),
        (batch(event(), kind="toaster"), "kind: unknown device kind 'toaster'"),
        (
            b'{"v": 1, "device_id": "cr-0101", "kind": "card_reader"}',
            "missing required field `events`",
        ),
        (batch(event(), events="x"), "events: expected `array`, got `str`"),
    ],
)
def test_whole_message_failures_name_the_problem(payload: bytes, reason: str) -> None:
    with pytest.raises(UplinkError) as info:
        decode_uplink(TOPIC, payload)
    assert reason in str(info.value)


def test_oversize_message_is_refused_with_sizes() -> None:
    with pytest.raises(UplinkError, match=r"message is \d+ bytes, over the limit of 100 bytes"):
        decode_uplink(TOPIC, batch(event()), max_bytes=100)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            {k: v for k, v in event().items() if k != "seq"},
            "events[1]: object missing required field `seq`",
        ),
        (event(seq=-5), "events[1].seq: expected `int` >= 0"),
        (event(seq="7"), "events[1].seq: expected `int`, got `str`"),
        (event(seq=7.5), "events[1].seq: expected `int`, got `float`"),
        (event(type_="card.swipe"), "events[1].type: unknown event type 'card.swipe'"),
        (
            event(data={"uid_hash": "nothex", "tech": "iso14443a", "reader": "r"}),
            "events[1].data.uid_hash: expected `str` matching regex",
        ),
        (
            event(data={"uid_hash": HASH, "tech": "iso14443a"}),
            "events[1].data: object missing required field `reader`",
        ),
        (
            event(type_="env.reading", data={"co2_ppm": "high"}),
            "events[1].data.co2_ppm: expected `float | null`, got `str`",
        ),
        (
            {**event(), "ts": "2026-11-22T07:50:01"},
            "events[1].ts: expected `datetime` with a timezone component",
        ),
        (
            event(data={"uid_hash": HASH, "tech": "iso14443a", "reader": "a\u0000b"}),
            "cannot be stored",
        ),
    ],
)
def test_bad_event_is_rejected_alone(bad: dict[str, Any], reason: str) -> None:
    decoded = decode_uplink(TOPIC, batch(event(1), bad, event(3)))
    assert [e.seq for e in decoded.events] == [1, 3]
    (rej,) = decoded.rejected
    assert reason in rej.reason, rej.reason
    assert json.loads(rej.raw) == bad


def test_every_metric_names_a_field_of_its_type() -> None:
    """A metric naming no field would silently never produce a reading."""
    for etype in REGISTRY.values():
        assert set(etype.metrics) <= set(etype.data.__struct_fields__), etype.name


def test_metrics_of_one_field_types_and_of_types_without_metrics() -> None:
    touch = decode_uplink(TOPIC, batch(event(1, "board.touch", {"touches": 4, "window_s": 60.0})))
    assert metrics_of(touch.events[0]) == [("board_touches", 4.0)]
    assert metrics_of(decode_uplink(TOPIC, batch(event(1))).events[0]) == []


def test_rejected_event_keeps_its_seq_when_it_has_one() -> None:
    decoded = decode_uplink(TOPIC, batch(event(9, type_="nope")))
    assert decoded.rejected[0].seq == 9


def test_metrics_come_from_registered_fields_only() -> None:
    data = {"temperature_c": 22.5, "co2_ppm": 800, "sensor": "room"}
    decoded = decode_uplink(TOPIC, batch(event(1, "env.reading", data)))
    assert sorted(metrics_of(decoded.events[0])) == [("co2_ppm", 800.0), ("temperature_c", 22.5)]


def test_agent_encoding_decodes_on_the_server() -> None:
    out = UplinkBatch(
        device_id="cr-0101",
        kind="card_reader",
        sent_at=datetime.now(UTC),
        replay=True,
        events=[
            UplinkEvent(
                seq=5, ts=datetime.now(UTC), type="board.power", data=msgspec.Raw(b'{"state":"on"}')
            )
        ],
    )
    decoded = decode_uplink(TOPIC, encode_batch(out))
    assert decoded.replay is True
    assert decoded.events[0].replay is True
    assert decoded.events[0].data_json == b'{"state":"on"}'


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(payload: bytes) -> None:
    with contextlib.suppress(UplinkError):
        decode_uplink(TOPIC, payload)


def test_every_registered_type_exports_a_schema() -> None:
    exported = export_all()
    for name in REGISTRY:
        assert exported[f"event.{name}.json"]["title"] == name
    assert "uplink_batch.json" in exported


def test_contract_names_every_type_in_the_architecture() -> None:
    named = {
        "card.tap",
        "attendance.checkin",
        "board.power",
        "board.input",
        "board.app",
        "board.touch",
        "signage.notice_shown",
        "recorder.status",
        "camera.health",
        "camera.activity",
        "env.reading",
        "access.pass",
        "library.loan",
        "library.return",
        "agent.health",
    }
    assert named <= set(REGISTRY)


def test_a_parsed_topic_decodes_like_its_string() -> None:
    payload = batch(event(1), event(2, data={"tech": "x"}))
    assert decode_uplink(topics.parse(TOPIC), payload) == decode_uplink(TOPIC, payload)
    state = topics.parse("campus/v1/s001/cr-0101/state")
    with pytest.raises(UplinkError, match="'campus/v1/s001/cr-0101/state' is not an uplink"):
        decode_uplink(state, payload)


def test_non_ascii_utf8_is_kept_and_bad_utf8_refused_after_ascii() -> None:
    data = {"uid_hash": HASH, "tech": "iso14443a", "reader": "门-1"}
    body = json.dumps(json.loads(batch(event(1, data=data))), ensure_ascii=False).encode()
    assert not body.isascii()
    (ev,) = decode_uplink(TOPIC, body).events
    assert json.loads(ev.data_json)["reader"] == "门-1"
    with pytest.raises(UplinkError, match="not UTF-8: invalid byte at offset 3"):
        decode_uplink(TOPIC, b'{"v\xe9": 1}')


_HASHES = st.one_of(
    st.just(HASH),
    st.text("0123456789abcdef", min_size=62, max_size=66),
    st.text("0123456789abcdefABCDEF \n\u00e9", min_size=63, max_size=65),
    st.just(HASH + "\n"),
    st.just(HASH.upper()),
    st.none(),
    st.integers(),
)
_TYPES = st.sampled_from(["card.tap", "access.pass", "library.loan", "attendance.checkin"])


def _data(type_: str, uid_hash: Any, uid: Any) -> dict[str, Any]:
    if type_ == "card.tap":
        return {"uid_hash": uid_hash, "tech": "iso14443a", "reader": "r", "uid": uid}
    if type_ == "access.pass":
        return {"uid_hash": uid_hash, "gate": "g", "direction": "in", "result": "granted"}
    if type_ == "library.loan":
        return {"student_hash": uid_hash, "item_id": "i", "source": "rfid", "terminal": "t"}
    return {"uid_hash": uid_hash, "reader": "r"}


@given(
    st.lists(
        st.tuples(_TYPES, _HASHES, st.one_of(st.none(), st.just("0A1b"), st.just("xyz"))),
        min_size=1,
        max_size=6,
    )
)
def test_the_fast_path_takes_exactly_what_the_strict_decoder_takes(
    cases: list[tuple[str, Any, Any]],
) -> None:
    """The fast decoder checks ``pattern`` fields a message at a time; each event must still
    get the strict decoder's verdict, so no invalid value is ever stored."""
    from schemas import uplink

    payload = batch(*(event(i + 1, t, _data(t, h, u)) for i, (t, h, u) in enumerate(cases)))
    strict = uplink._decode_events(uplink._decode_envelope(payload))
    fast = uplink.decode_valid(topics.parse(TOPIC), payload)
    if fast is not None:  # taken only when every event is valid, and then the same events
        assert not strict[1]
        assert [(e.seq, e.data_json) for e in fast[2]] == [(e.seq, e.data_json) for e in strict[0]]
    decoded = decode_uplink(TOPIC, payload)
    assert [e.seq for e in decoded.events] == [e.seq for e in strict[0]]
    assert [r.reason for r in decoded.rejected] == [r.reason for r in strict[1]]
    # and nothing the fast path let through would fail the contract's own types
    for e in decoded.events:
        msgspec.json.decode(e.data_json, type=REGISTRY[e.type].data)


def test_fast_path_checks_patterns_of_every_event_in_a_message() -> None:
    from schemas import uplink

    good = event(1)
    bad = event(2, data={"uid_hash": "g" * 64, "tech": "iso14443a", "reader": "r"})
    up = topics.parse(TOPIC)
    assert uplink.decode_valid(up, batch(good, good | {"seq": 3})) is not None
    assert uplink.decode_valid(up, batch(good, bad)) is None
    decoded = decode_uplink(TOPIC, batch(good, bad))
    assert [e.seq for e in decoded.events] == [1]
    assert "events[1].data.uid_hash: expected `str` matching regex" in decoded.rejected[0].reason


def test_new_platform_types_decode_with_their_metrics() -> None:
    purchase = {
        "card_hash": HASH,
        "amount_fen": 1250,
        "terminal": "pos-3",
        "merchant": "canteen-1/w3",
    }
    check = {"student_hash": HASH, "class_id": "g7c2", "temperature_c": 37.6, "symptoms": ["cough"]}
    vision = {"student_hash": HASH, "class_id": "g7c2", "left_acuity": 4.8, "right_acuity": 5.0}
    cam = {
        "camera": "gate-cam",
        "kind": "motion",
        "active": True,
        "topic": "tns1:VideoSource/Motion",
    }
    decoded = decode_uplink(
        TOPIC,
        batch(
            event(1, "card.purchase", purchase),
            event(2, "health.check", check),
            event(3, "health.vision", vision),
            event(4, "camera.event", cam),
        ),
    )
    assert not decoded.rejected
    assert [metrics_of(e) for e in decoded.events] == [
        [("purchase_amount_fen", 1250.0)],
        [("health_temperature_c", 37.6)],
        [("vision_left_acuity", 4.8), ("vision_right_acuity", 5.0)],
        [],
    ]


@pytest.mark.parametrize(
    ("type_", "data", "reason"),
    [
        # a raw card number is not a hash: refused, never stored
        (
            "card.purchase",
            {"card_hash": "6222021234567890", "amount_fen": 1, "terminal": "t", "merchant": "m"},
            "card_hash",
        ),
        (
            "card.purchase",
            {"card_hash": HASH, "amount_fen": 12.5, "terminal": "t", "merchant": "m"},
            "amount_fen",
        ),
        (
            "card.purchase",
            {"card_hash": HASH, "amount_fen": -1, "terminal": "t", "merchant": "m"},
            "amount_fen",
        ),
        (
            "health.check",
            {"student_hash": HASH, "class_id": "c", "symptoms": ["sneezy"]},
            "symptoms",
        ),
        (
            "health.check",
            {"student_hash": HASH, "class_id": "c", "temperature_c": 52.0},
            "temperature_c",
        ),
        (
            "health.vision",
            {"student_hash": HASH, "class_id": "c", "left_acuity": 1.0, "right_acuity": 5.0},
            "left_acuity",
        ),
        ("camera.event", {"camera": "c", "kind": "explosion", "active": True}, "kind"),
    ],
)
def test_new_platform_types_refuse_bad_fields_by_name(
    type_: str, data: dict[str, Any], reason: str
) -> None:
    decoded = decode_uplink(TOPIC, batch(event(1, type_, data), event(2)))
    assert [e.seq for e in decoded.events] == [2]
    (rej,) = decoded.rejected
    assert reason in rej.reason, rej.reason


@given(
    st.one_of(
        st.text("0123456789abcdef", max_size=70),
        st.text("0123456789abcdefABCDEFgx \n\t\u00e9\u0660", max_size=70),
        st.text(max_size=70),
    )
)
def test_the_hex_run_check_says_what_the_uid_hash_pattern_says(text: str) -> None:
    """The fast path's lower-case hex check (``fromhex`` then ``hex``) takes a value of the
    run's length exactly when the contract's pattern does, and one of any length exactly when
    every character is ``0-9a-f``."""
    import re

    from schemas import events
    from schemas.patterns import whole

    pattern = re.compile(whole(events._UID_HASH_PATTERN))
    got = events._is_lower_hex(text)
    assert got == all(c in "0123456789abcdef" for c in text)
    if len(text) == 64:
        assert got == (pattern.search(text) is not None)
    hex_check = events._value_checker(whole(events._UID_HASH_PATTERN))
    assert hex_check(text) == got


# -- a final newline is not the end of a value ----------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["campus/v1/s001\n/cr-0101/up", "campus/v1/s001/cr-0101\n/up", "campus/v1/s001/cr-0101/up\n"],
)
def test_an_id_with_a_final_newline_is_refused(topic: str) -> None:
    """The contract's ``^...$`` is ECMA-262's: ``$`` is the end of the value. Python's ``$``
    also matched before a final newline, so ``s001\\n`` was taken as a school id (and stored as
    a school of its own)."""
    with pytest.raises(TopicError):
        topics.parse(topic)


def test_a_uid_hash_with_a_final_newline_is_refused_and_the_rest_flows() -> None:
    from schemas.uplink import decode_valid

    bad = {"uid_hash": HASH + "\n", "tech": "em4100", "reader": "r"}
    body = batch(event(1), event(2, data=bad))
    assert decode_valid(topics.parse(TOPIC), body) is None  # not the fast path's to take
    decoded = decode_uplink(TOPIC, body)
    assert [e.seq for e in decoded.events] == [1]
    ((rejected),) = decoded.rejected
    assert "uid_hash" in rejected.reason, rejected


def test_release_args_with_a_final_newline_are_refused() -> None:
    from schemas.release import UpdateArgs

    good = {
        "version": "1.2.0",
        "url": "https://updates.example/campus_edge-1.2.0-py3-none-any.whl",
        "sha256": HASH,
        "signature": "A" * 86 + "==",
    }
    msgspec.convert(good, UpdateArgs)
    for field in ("version", "sha256", "signature"):
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.convert({**good, field: good[field] + "\n"}, UpdateArgs)


def test_exported_patterns_are_the_contracts_ecma_ones() -> None:
    """In code the patterns end in ``\\Z``; the published schemas keep the contract's ``$``."""
    text = json.dumps(export_all())
    assert "\\\\Z" not in text
    assert '"pattern": "^[0-9a-f]{64}$"' in text
