"""Batch assembly without I/O: messages → rows, the bounded inbox, and collecting a batch."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest_server.ingest import pgcopy
from ingest_server.ingest.batch import (
    QUARANTINE_KEEP_BYTES,
    Batch,
    DeviceSpan,
    Inbound,
    Rows,
    StateRow,
    rows_of,
    spans_of,
    unique,
)
from ingest_server.ingest.consumer import Inbox, collect
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch

NOW = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)


def board_touch(seq: int, touches: object = 3) -> UplinkEvent:
    data = msgspec.json.encode({"touches": touches, "window_s": 60.0})
    return UplinkEvent(seq=seq, ts=NOW, type="board.touch", data=msgspec.Raw(data))


def msg(payload: bytes, topic: str = "campus/v1/sch-1/sb-1/up", *, retain: bool = False) -> Inbound:
    return Inbound(topic, payload, 1, 1, NOW, retain=retain)


def uplink(*events: UplinkEvent) -> bytes:
    return encode_batch(
        UplinkBatch(device_id="sb-1", kind="smart_board", sent_at=NOW, events=list(events))
    )


def test_valid_and_rejected_events_of_one_message() -> None:
    rows, n = rows_of(msg(uplink(board_touch(1), board_touch(2, touches=-1), board_touch(3))))
    assert n == 3
    assert [(r.school_id, r.device_id, r.kind, r.event.seq) for r in rows.events] == [
        ("sch-1", "sb-1", "smart_board", 1),
        ("sch-1", "sb-1", "smart_board", 3),
    ]
    (q,) = rows.quarantine
    assert (q.kind, q.device_id, q.seq) == ("event", "sb-1", 2)
    assert q.reason == "events[1].data.touches: expected `int` >= 0"
    assert msgspec.json.decode(q.payload)["seq"] == 2  # the event's own JSON


def test_whole_message_failure_is_one_quarantine_row() -> None:
    rows, n = rows_of(msg(b"{1, 2"))
    assert n == 0
    assert not rows.events
    (q,) = rows.quarantine
    assert (q.kind, q.payload, q.device_id, q.seq) == ("message", b"{1, 2", "sb-1", None)
    assert q.reason.startswith("payload is not valid JSON")


def test_bad_topic_is_quarantined_without_a_device() -> None:
    rows, _ = rows_of(msg(uplink(board_touch(1)), topic="campus/v1/sch-1/SB-1/up"))
    (q,) = rows.quarantine
    assert q.device_id is None
    assert "device_id 'SB-1' is not a valid id" in q.reason


def test_oversize_is_cut_and_says_so() -> None:
    payload = b"x" * (QUARANTINE_KEEP_BYTES + 10)
    (q,) = rows_of(msg(payload), max_bytes=1000)[0].quarantine
    assert (q.kind, len(q.payload)) == ("oversize", QUARANTINE_KEEP_BYTES)
    assert q.reason == (
        f"message is {len(payload)} bytes, over the limit of 1000 bytes; "
        f"only its first {QUARANTINE_KEEP_BYTES} bytes are kept here"
    )
    (q,) = rows_of(msg(b"x" * 1001), max_bytes=1000)[0].quarantine
    assert q.reason == "message is 1001 bytes, over the limit of 1000 bytes"
    assert len(q.payload) == 1001


def test_state_messages() -> None:
    topic = "campus/v1/sch-1/sb-1/state"
    body = b'{"state": "offline", "boot": 2, "agent_version": "1.0", "ts": "2026-11-21T10:00:00Z"}'
    (live,) = rows_of(msg(body, topic=topic))[0].states
    assert isinstance(live, StateRow)
    assert (live.device_id, live.state.state, live.state_at) == ("sb-1", "offline", NOW)
    (retained,) = rows_of(msg(body, topic=topic, retain=True))[0].states
    assert retained.state_at == datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert len(rows_of(msg(b"", topic=topic))[0]) == 0  # a cleared retained message
    (q,) = rows_of(msg(b'{"state": "online"}', topic=topic))[0].quarantine
    assert q.kind == "state"
    assert q.reason == "state: Object missing required field `boot`"


def test_batch_counts_rows_and_events() -> None:
    batch = Batch()
    batch.add(msg(uplink(board_touch(1), board_touch(2))))
    batch.add(msg(b"nonsense"))
    batch.add(msg(uplink()))
    assert (len(batch), batch.size, batch.events_received) == (3, 4, 2)
    assert [len(rows) for _, rows in batch.parts()] == [2, 1, 0]


def test_batch_rows_are_each_message_rows_in_order() -> None:
    """The batch decodes straight into one Rows; parts() decodes each message again, alike."""
    batch = Batch()
    messages = [
        msg(uplink(board_touch(1), board_touch(2, touches=-1))),
        msg(b"nonsense"),
        msg(uplink(board_touch(3))),
    ]
    for m in messages:
        batch.add(m)
    assert [r.event.seq for r in batch.rows.events] == [1, 3]
    assert [q.kind for q in batch.rows.quarantine] == ["event", "message"]
    parts = batch.parts()
    assert [m for m, _ in parts] == messages
    assert [rows for _, rows in parts] == [rows_of(m)[0] for m in messages]


def test_a_decoder_bug_quarantines_only_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import ingest_server.ingest.batch as batch_module

    real = batch_module.decode_valid

    def flaky(topic: object, payload: bytes) -> object:
        if b'"seq":2' in payload:
            raise RuntimeError("boom")
        return real(topic, payload)  # type: ignore[arg-type]

    # the decoder of the common case: Batch.add and parts() (rows_of) both call it first
    monkeypatch.setattr(batch_module, "decode_valid", flaky)
    batch = Batch()
    batch.add(msg(uplink(board_touch(1))))
    batch.add(msg(uplink(board_touch(2))))
    batch.add(msg(uplink(board_touch(3))))
    assert [r.event.seq for r in batch.rows.events] == [1, 3]
    (q,) = batch.rows.quarantine
    assert (q.kind, q.reason) == ("internal", "internal error while decoding: RuntimeError('boom')")
    assert (batch.size, batch.events_received) == (3, 2)
    assert [len(rows) for _, rows in batch.parts()] == [1, 1, 1]


def test_inbox_waits_when_full_and_releases_on_get() -> None:
    inbox = Inbox(max_messages=2, max_bytes=1 << 20)
    assert inbox.put(msg(b"1"))
    assert inbox.put(msg(b"2"))
    third = threading.Thread(target=inbox.put, args=(msg(b"3"),))
    third.start()
    third.join(0.2)
    assert third.is_alive(), "a put into a full inbox must wait"
    got = inbox.get(1.0)
    assert got is not None
    assert got.payload == b"1"
    third.join(5.0)
    assert not third.is_alive()
    assert [getattr(inbox.get(0), "payload", None) for _ in range(2)] == [b"2", b"3"]
    assert inbox.get(0) is None


def test_inbox_bounds_bytes_but_takes_one_big_message() -> None:
    inbox = Inbox(max_messages=100, max_bytes=100)
    assert inbox.put(msg(b"x" * 500))  # alone, it is allowed through
    late = threading.Thread(target=inbox.put, args=(msg(b"y"),))
    late.start()
    late.join(0.2)
    assert late.is_alive()
    inbox.close()
    late.join(5.0)
    assert not late.is_alive()
    assert inbox.put(msg(b"z")) is False


def test_collect_stops_at_the_size_limit() -> None:
    inbox = Inbox(100, 1 << 20)
    for i in range(10):
        inbox.put(msg(uplink(board_touch(i))))
    batch = collect(inbox, max_size=4, max_wait_s=10.0, idle_s=0.0, max_bytes=1 << 20)
    assert batch is not None
    assert len(batch) == 4
    assert len(inbox) == 6


def test_collect_stops_at_the_time_limit() -> None:
    inbox = Inbox(100, 1 << 20)
    inbox.put(msg(uplink(board_touch(1))))
    started = time.monotonic()
    batch = collect(inbox, max_size=1000, max_wait_s=0.05, idle_s=0.0, max_bytes=1 << 20)
    assert batch is not None
    assert len(batch) == 1
    assert time.monotonic() - started < 2.0
    assert collect(inbox, max_size=1000, max_wait_s=0.05, idle_s=0.01, max_bytes=1) is None


@pytest.mark.parametrize("seq", [-1, 2**63, "1", 1.0, None])
def test_bad_seq_is_rejected(seq: object) -> None:
    event: dict[str, object] = {"ts": "2026-11-22T07:50:01Z", "type": "board.touch", "data": {}}
    if seq is not None:
        event["seq"] = seq
    payload = msgspec.json.encode(
        {"v": 1, "device_id": "sb-1", "kind": "smart_board", "events": [event]}
    )
    rows, _ = rows_of(msg(payload))
    (q,) = rows.quarantine
    assert q.reason.startswith("events[0]")
    assert "seq" in q.reason


def _device_uplink(device: str, seqs: list[int], at: datetime = NOW) -> Inbound:
    payload = encode_batch(
        UplinkBatch(
            device_id=device,
            kind="smart_board",
            sent_at=NOW,
            events=[board_touch(s) for s in seqs],
        )
    )
    return Inbound(f"campus/v1/sch-1/{device}/up", payload, 1, 1, at)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sb-1", "sb-2", "sb-3"]),
            st.lists(st.integers(0, 40), min_size=0, max_size=6),
            st.integers(0, 5),
        ),
        max_size=12,
    )
)
def test_sealed_spans_and_events_match_a_check_of_every_event(
    messages: list[tuple[str, list[int], int]],
) -> None:
    """The batch works out each device's span a message at a time while seqs keep rising, and
    falls back to checking every event once one repeats or goes back: either way the writer
    gets each (device, seq) once and the same spans as a count over the distinct events."""
    batch = Batch()
    for device, seqs, minutes in messages:
        batch.add(_device_uplink(device, seqs, NOW + timedelta(minutes=minutes)))
    batch.seal()
    encoded = batch.encoded
    assert encoded is not None
    distinct = unique(batch.rows.events)
    assert [r.key for r in encoded.events] == [r.key for r in distinct]
    assert encoded.spans == spans_of(distinct)
    assert encoded.stamps == sorted(pgcopy.micros(r.event.ts) for r in distinct)


def test_spans_of_a_rising_batch_are_worked_out_per_message() -> None:
    batch = Batch()
    batch.add(_device_uplink("sb-1", [1, 2, 3]))
    batch.add(_device_uplink("sb-2", [7]))
    batch.add(_device_uplink("sb-1", [4, 9], NOW + timedelta(seconds=5)))
    batch.seal()
    assert batch.encoded is not None
    assert batch.encoded.spans == {
        "sb-1": DeviceSpan("sch-1", "smart_board", NOW + timedelta(seconds=5), 1, 9, 5),
        "sb-2": DeviceSpan("sch-1", "smart_board", NOW, 7, 7, 1),
    }
    assert batch._increasing  # the per-message path, not the fallback
    batch.add(_device_uplink("sb-2", [7]))  # a resend: the fallback finds it
    batch.seal()
    assert batch.encoded is not None
    assert not batch._increasing
    assert [r.key for r in batch.encoded.events] == [
        ("sb-1", 1), ("sb-1", 2), ("sb-1", 3), ("sb-2", 7), ("sb-1", 4), ("sb-1", 9)
    ]  # fmt: skip
    assert batch.encoded.spans["sb-2"].count == 1


def test_a_count_beyond_int8_is_rejected_with_the_bound_and_the_rest_flows() -> None:
    batch = Batch()
    batch.add(msg(uplink(board_touch(1), board_touch(2, touches=10**400), board_touch(3))))
    batch.seal()
    assert [r.event.seq for r in batch.rows.events] == [1, 3]
    (bad,) = batch.rows.quarantine
    assert bad.seq == 2
    assert "events[1].data.touches: expected `int` <= 9223372036854775807" in bad.reason
    assert batch.encoded is not None
    assert batch.encoded.readings == 2


def test_an_encoder_bug_leaves_the_batch_unsealed_not_the_decoder_stopped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> tuple[bytes, int]:
        raise RuntimeError("boom")

    monkeypatch.setattr(pgcopy, "encode_readings", broken)
    batch = Batch()
    batch.add(msg(uplink(board_touch(1))))
    batch.seal()  # does not raise
    assert batch.encoded is None
    assert "cannot encode a batch of 1 messages" in caplog.text


def test_rows_set_without_add_get_their_spans_counted() -> None:
    source = Batch()
    source.add(_device_uplink("sb-1", [1, 2]))
    batch = Batch()
    batch.rows = Rows(events=list(source.rows.events))  # not through add(): no spans kept
    batch.seal()
    assert batch.encoded is not None
    assert batch.encoded.spans == {"sb-1": DeviceSpan("sch-1", "smart_board", NOW, 1, 2, 2)}


_STATE = b'{"state": "online", "boot": 1, "ts": "2026-11-22T00:00:00Z", "agent_version": '
_STATE_TOPIC = "campus/v1/sch-1/sb-1/state"


@pytest.mark.parametrize(
    ("topic", "payload", "kind", "says"),
    [
        # every bound an up or state message meets before the database, each a quarantine row
        (
            "campus/v1/sch-1/sb-1/up",
            b"[" * 5000 + b"]" * 5000,
            "message",
            "expected `object`, got `array`",
        ),
        (
            "campus/v1/sch-1/sb-1/up",
            uplink(board_touch(1)).replace(
                b'"touches"', b'"x": ' + b"[" * 3000 + b"]" * 3000 + b', "touches"'
            ),
            "message",
            "nested too deeply",
        ),
        ("campus/v1/sch-1/sb-1/up", b'{"v": 1, "x": "\xff"}', "message", "not UTF-8"),
        (_STATE_TOPIC, _STATE + b'"1.0\xed\xa0\x80"}', "state", "cannot decode: 'utf-8'"),
        (
            _STATE_TOPIC,
            _STATE + b'"1.0", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "state",
            "recursion",
        ),
        (_STATE_TOPIC, _STATE + b'"1.0\\u0000"}', "state", "agent_version contains a NUL"),
        (_STATE_TOPIC, _STATE + b'"' + b"9" * 129 + b'"}', "state", "is 129 characters, over"),
        (_STATE_TOPIC, _STATE + b'"1.0\\ud800"}', "state", "state: "),
    ],
)
def test_up_and_state_bounds_quarantine_with_a_reason(
    topic: str, payload: bytes, kind: str, says: str
) -> None:
    rows, _ = rows_of(msg(payload, topic))
    assert (rows.events, rows.states) == ([], [])
    (q,) = rows.quarantine
    assert q.kind == kind
    assert says in q.reason, q.reason


def test_a_state_within_the_bounds_is_kept() -> None:
    rows, _ = rows_of(msg(_STATE + b'"' + b"9" * 128 + b'"}', _STATE_TOPIC))
    (state,) = rows.states
    assert state.state.agent_version == "9" * 128


_CARD_TOPIC = "campus/v1/sch-1/cr-1/up"
_HASH = "0123456789abcdef" * 4


def _card(seq: int, **change: object) -> Inbound:
    """A card reader's message of one event (the shape of many small devices), with
    ``change`` applied: envelope keys as they are, ``data_*`` keys to the event's data, other
    ``event_*`` keys to the event."""
    data: dict[str, object] = {"uid_hash": _HASH, "tech": "iso14443a", "reader": "door-1"}
    event: dict[str, object] = {"seq": seq, "ts": "2026-11-22T07:50:01Z", "type": "card.tap"}
    body: dict[str, object] = {"v": 1, "device_id": "cr-1", "kind": "card_reader"}
    for key, value in change.items():
        if key.startswith("data_"):
            data[key.removeprefix("data_")] = value
        elif key.startswith("event_"):
            event[key.removeprefix("event_")] = value
        else:
            body[key] = value
    body["events"] = [event | {"data": data}]
    return Inbound(_CARD_TOPIC, msgspec.json.encode(body), seq, 1, NOW)


@pytest.mark.parametrize(
    ("change", "kind", "says"),
    [
        ({"data_uid_hash": "G" * 64}, "event", "events[0].data.uid_hash: expected `str` matching"),
        ({"data_uid_hash": _HASH.upper()}, "event", "events[0].data.uid_hash: expected `str`"),
        ({"data_uid_hash": _HASH[:-1]}, "event", "events[0].data.uid_hash: expected `str`"),
        ({"data_uid_hash": _HASH[:-1] + "\n"}, "event", "events[0].data.uid_hash: expected `str`"),
        ({"data_uid": "xyz"}, "event", "events[0].data.uid: expected `str` matching regex"),
        ({"data_reader": "a\x00b"}, "event", "events[0].data: contains a \\u0000 character"),
        ({"data_tech": "magic"}, "event", "events[0].data.tech: invalid enum value 'magic'"),
        ({"event_type": "nope"}, "event", "events[0].type: unknown event type 'nope'"),
        ({"event_seq": -1}, "event", "events[0].seq: expected `int` >= 0"),
        ({"event_ts": "2026-11-22T07:50:01"}, "event", "events[0].ts: expected `datetime`"),
        ({"device_id": "cr-2"}, "message", "device_id: 'cr-2' does not match the topic's"),
        ({"kind": "toaster"}, "message", "kind: unknown device kind 'toaster'"),
        ({"v": 2}, "message", "v: unsupported contract version 2"),
        ({"sent_at": "yesterday"}, "message", "sent_at: invalid RFC3339"),
        ({"replay": "yes"}, "message", "replay: expected `bool`"),
    ],
)
def test_a_bad_message_of_one_event_is_quarantined_while_the_others_flow(
    change: dict[str, object], kind: str, says: str
) -> None:
    """The batch's inline path (a known topic, one event) gives a bad message the same verdict
    and reason as the full decoder, and the messages around it are stored."""
    bad = _card(2, **change)
    batch = Batch()
    for m in (_card(1), bad, _card(3)):
        batch.add(m)
    assert [r.event.seq for r in batch.rows.events] == [1, 3]
    (q,) = batch.rows.quarantine
    assert (q.kind, q.device_id, q.topic) == (kind, "cr-1", _CARD_TOPIC)
    assert says in q.reason, q.reason
    assert (batch.size, batch.events_received) == (3, 3 if kind == "event" else 2)
    assert batch.parts()[1][1] == rows_of(bad)[0]  # the same rows the slow way
    batch.seal()
    assert batch.encoded is not None
    assert [r.key for r in batch.encoded.events] == [("cr-1", 1), ("cr-1", 3)]


def test_a_non_utf8_or_oversize_message_of_one_event_is_quarantined_on_its_bytes() -> None:
    good = _card(1)
    not_utf8 = Inbound(_CARD_TOPIC, good.payload.replace(b"door-1", b"door-\xff"), 2, 1, NOW)
    batch = Batch(max_bytes=len(good.payload) + 5)
    assert batch.max_bytes == 243
    big = _card(3, data_reader="door-1" + "x" * 10)
    for m in (good, not_utf8, big, _card(4)):
        batch.add(m)
    assert [r.event.seq for r in batch.rows.events] == [1, 4]
    assert [(q.kind, q.reason.split(":")[0]) for q in batch.rows.quarantine] == [
        ("message", "payload is not UTF-8"),
        ("oversize", f"message is {len(big.payload)} bytes, over the limit of 243 bytes"),
    ]


def test_one_event_messages_share_the_contracts_strings_and_their_spans() -> None:
    """Interleaved one-event messages of two devices: rows carry the contract's own kind and
    type strings (so the COPY encoder's caches hit by identity) and each device's span."""
    from schemas.events import REGISTRY

    batch = Batch()
    later = NOW + timedelta(seconds=1)
    for seq in (1, 2, 3):
        batch.add(_card(seq))
        other = _card(seq + 10, device_id="cr-2")
        batch.add(Inbound("campus/v1/sch-2/cr-2/up", other.payload, seq, 1, later))
    rows = batch.rows.events
    assert len({id(r.kind) for r in rows}) == 1
    assert all(r.event.type is REGISTRY["card.tap"].name for r in rows)
    batch.seal()
    assert batch.encoded is not None
    assert batch._increasing
    assert batch.encoded.spans == {
        "cr-1": DeviceSpan("sch-1", "card_reader", NOW, 1, 3, 3),
        "cr-2": DeviceSpan("sch-2", "card_reader", later, 11, 13, 3),
    }
    batch.add(_card(2))  # a resend of one event: the fallback check finds it
    batch.seal()
    assert batch.encoded is not None
    assert not batch._increasing
    assert len(batch.encoded.events) == 6


def test_the_topic_cache_is_bounded_and_never_lends_a_device_another_s_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ingest_server.ingest.batch as batch_module

    cache: dict[str, object] = {}
    monkeypatch.setattr(batch_module, "_TOPICS", cache)
    monkeypatch.setattr(batch_module, "_TOPICS_MAX", 3)
    batch = Batch()
    devices = [f"cr-{i}" for i in range(1, 6)]
    for seq in (1, 2):
        for device in devices:  # five topics through a cache of three: it keeps starting over
            payload = _card(seq, device_id=device).payload
            batch.add(Inbound(f"campus/v1/sch-1/{device}/up", payload, seq, 1, NOW))
            assert len(cache) <= 3
    batch.add(_card(3, device_id="cr-1"))  # cr-1's payload on cr-1's topic ...
    cr1_on_cr2 = _card(4, device_id="cr-1").payload
    batch.add(Inbound("campus/v1/sch-1/cr-2/up", cr1_on_cr2, 4, 1, NOW))  # ... and on cr-2's
    assert [(r.device_id, r.event.seq) for r in batch.rows.events] == [
        (d, s) for s in (1, 2) for d in devices
    ] + [("cr-1", 3)]
    (q,) = batch.rows.quarantine
    assert (q.device_id, q.reason) == (
        "cr-2",
        "device_id: 'cr-1' does not match the topic's device 'cr-2'",
    )
    # a topic that does not parse is cached as such, and still quarantined with its reason
    batch.add(Inbound("campus/v1/sch-1/CR-9/up", cr1_on_cr2, 5, 1, NOW))
    batch.add(Inbound("campus/v1/sch-1/CR-9/up", cr1_on_cr2, 6, 1, NOW))
    assert cache["campus/v1/sch-1/CR-9/up"] is None
    assert [q.device_id for q in batch.rows.quarantine[1:]] == [None, None]
    assert "is not a valid id" in batch.rows.quarantine[-1].reason
