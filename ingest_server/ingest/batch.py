"""From MQTT messages to rows: decoding, validation and quarantine decisions, without I/O."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import msgspec

from ingest_server.ingest import pgcopy
from schemas import state as state_schema
from schemas.errors import ContractError, UplinkError
from schemas.topics import Channel, Topic, parse
from schemas.uplink import DEFAULT_MAX_BYTES, ValidEvent, decode_each, decode_uplink, decode_valid

log = logging.getLogger(__name__)

#: At most this much of an oversize payload is kept in quarantine.
QUARANTINE_KEEP_BYTES: Final = 64 * 1024
#: The longest ``agent_version`` a state may carry (the agent's is a few characters).
MAX_AGENT_VERSION: Final = 128


class Inbound(msgspec.Struct, frozen=True, gc=False):
    """One message as the network thread received it (a Struct: one is built per message)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    received_at: datetime
    retain: bool = False
    #: Which broker connection delivered it: a PUBACK is only valid on that connection.
    generation: int = 0


class EventRow(msgspec.Struct, frozen=True, gc=False):
    """One event to store (a Struct: one is built per event, and a dataclass costs 10x more)."""

    school_id: str
    device_id: str
    kind: str
    received_at: datetime
    event: ValidEvent

    @property
    def key(self) -> tuple[str, int]:
        return self.device_id, self.event.seq


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    received_at: datetime
    topic: str
    payload: bytes
    reason: str
    device_id: str | None = None
    seq: int | None = None
    #: Coarse class of the failure, for metrics: oversize, message, event, state, database,
    #: internal.
    kind: str = "message"


@dataclass(frozen=True, slots=True)
class StateRow:
    school_id: str
    device_id: str
    state: state_schema.DeviceState
    #: When the state took effect as far as the server can tell (see :func:`_state_row`).
    state_at: datetime


class Rows(msgspec.Struct, gc=False):
    """Everything one transaction writes (a Struct: one is built per message)."""

    events: list[EventRow] = msgspec.field(default_factory=list)
    quarantine: list[QuarantineRow] = msgspec.field(default_factory=list)
    states: list[StateRow] = msgspec.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.events) + len(self.quarantine) + len(self.states)

    def extend(self, other: Rows) -> None:
        self.events += other.events
        self.quarantine += other.quarantine
        self.states += other.states


def unique(events: Sequence[EventRow]) -> list[EventRow]:
    """The first of each (device_id, seq): a batch may carry the same event twice."""
    keys = [(r.device_id, r.event.seq) for r in events]
    if len(set(keys)) == len(keys):  # the common case: no repeats, keep the list as it is
        return list(events)
    seen: set[tuple[str, int]] = set()
    out = []
    for key, row in zip(keys, events, strict=True):
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


class DeviceSpan(msgspec.Struct, gc=False):
    """One device's share of a batch: what its ``devices`` row is updated with."""

    #: School and kind of the device's first event in the batch.
    school_id: str
    kind: str
    #: The latest ``received_at`` of its events.
    seen: datetime
    min_seq: int
    max_seq: int
    count: int


def spans_of(events: Sequence[EventRow]) -> dict[str, DeviceSpan]:
    """Each device's span over ``events``, one event at a time (any order, no repeats)."""
    spans: dict[str, DeviceSpan] = {}
    for r in events:
        seq = r.event.seq
        span = spans.get(r.device_id)
        if span is None:
            spans[r.device_id] = DeviceSpan(r.school_id, r.kind, r.received_at, seq, seq, 1)
            continue
        span.seen = max(span.seen, r.received_at)
        if seq < span.min_seq:
            span.min_seq = seq
        elif seq > span.max_seq:
            span.max_seq = seq
        span.count += 1
    return spans


@dataclass(frozen=True, slots=True)
class EncodedEvents:
    """A batch's distinct events with their binary COPY payloads, built before the writer."""

    events: list[EventRow]
    #: ``events`` rows (:data:`~.pgcopy.EVENT_COLUMNS`) of every one of ``events``.
    events_copy: bytes
    #: ``readings`` rows of every one of ``events``, and how many (0: none to send).
    readings_copy: bytes
    readings: int
    #: device_id → its span over ``events``.
    spans: dict[str, DeviceSpan]
    #: The ``ts`` of every one of ``events``, ascending, in µs since 2000-01-01 UTC (as
    #: encoded), for the latency histogram: one bisection per bucket instead of one per event.
    stamps: list[int]


def encode_events(
    events: Sequence[EventRow], spans: dict[str, DeviceSpan] | None = None
) -> EncodedEvents:
    """De-duplicate ``events`` and encode them (raises :class:`pgcopy.CopyEncodeError`).

    ``spans``, when given, must be :func:`spans_of` ``events`` and vouches that no
    (device_id, seq) repeats: the batch worked both out a message at a time.
    """
    if spans is None:
        distinct = unique(events)
        spans = spans_of(distinct)
    else:
        distinct = list(events)
    stamps: list[int] = []
    seen: set[str] = set()
    events_copy = pgcopy.encode_events(distinct, stamps, seen)
    if pgcopy.carries_readings(seen):
        readings_copy, readings = pgcopy.encode_readings(distinct, stamps)
    else:  # (card taps, presence...: most types carry no readings)
        readings_copy, readings = pgcopy.NO_ROWS, 0
    stamps.sort()
    return EncodedEvents(distinct, events_copy, readings_copy, readings, spans, stamps)


#: Parsed topics by string: a server sees the same few thousand device topics over and over.
_TOPICS: dict[str, Topic | None] = {}
_TOPICS_MAX: Final = 100_000


def _device_of(topic: str) -> Topic | None:
    try:
        return _TOPICS[topic]
    except KeyError:
        pass
    try:
        parsed: Topic | None = parse(topic)
    except ContractError:
        parsed = None
    if len(_TOPICS) >= _TOPICS_MAX:  # bounded: start over rather than grow
        _TOPICS.clear()
    _TOPICS[topic] = parsed
    return parsed


def _quarantine(
    msg: Inbound, reason: str, kind: str, *, payload: bytes | None = None, seq: int | None = None
) -> QuarantineRow:
    where = _device_of(msg.topic)
    return QuarantineRow(
        received_at=msg.received_at,
        topic=msg.topic,
        payload=msg.payload if payload is None else payload,
        reason=reason,
        device_id=where.device_id if where else None,
        seq=seq,
        kind=kind,
    )


def _state_row(msg: Inbound, topic: Topic) -> StateRow | QuarantineRow:
    try:
        state = state_schema.state_decoder.decode(msg.payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return _quarantine(msg, f"state: {exc}", "state")
    except (UnicodeDecodeError, RecursionError) as exc:  # not UTF-8; nested ~1000 deep
        return _quarantine(msg, f"state: cannot decode: {exc}", "state")
    version = state.agent_version
    if len(version) > MAX_AGENT_VERSION or "\x00" in version:  # a text column holds it
        why = (
            "contains a NUL character, which cannot be stored"
            if "\x00" in version
            else f"is {len(version)} characters, over the limit of {MAX_AGENT_VERSION}"
        )
        return _quarantine(msg, f"state: agent_version {why}", "state")
    # A retained copy replayed at subscribe time arrived late: its own ts is the best guess.
    # A live one (including a will, whose ts dates from the device's connect) is news now.
    state_at = state.ts if msg.retain else msg.received_at
    return StateRow(topic.school_id, topic.device_id, state, state_at)


def rows_of(msg: Inbound, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Rows, int]:
    """The rows one message becomes, and how many events it carried (valid or not)."""
    rows = Rows()
    return rows, _add_rows(msg, rows, max_bytes)


_UP: Final = Channel.UP
_STATE: Final = Channel.STATE


def _add_rows(msg: Inbound, rows: Rows, max_bytes: int, *, tried_fast: bool = False) -> int:
    """Append the rows of ``msg`` to ``rows`` (all at the end, so an exception adds none);
    how many events it carried. ``tried_fast``: :func:`decode_valid` already refused it."""
    payload = msg.payload
    if len(payload) > max_bytes:  # on the raw bytes, before anything decodes them
        kept = payload[:QUARANTINE_KEEP_BYTES]
        reason = f"message is {len(payload)} bytes, over the limit of {max_bytes} bytes"
        if len(kept) < len(payload):
            reason += f"; only its first {len(kept)} bytes are kept here"
        rows.quarantine.append(_quarantine(msg, reason, "oversize", payload=kept))
        return 0
    topic = _device_of(msg.topic)
    if topic is not None and topic.channel is _STATE:
        if payload:  # an empty retained publish only clears the retained state
            row = _state_row(msg, topic)
            if isinstance(row, StateRow):
                rows.states.append(row)
            else:
                rows.quarantine.append(row)
        return 0
    try:
        if topic is None or topic.channel is not _UP:
            # the string, for the error's wording
            decoded = decode_uplink(topic or msg.topic, payload, max_bytes=max_bytes)
        elif tried_fast or (fast := decode_valid(topic, payload)) is None:
            decoded = decode_each(topic, payload)
        else:
            school, device, kind, at = topic.school_id, topic.device_id, fast[0], msg.received_at
            rows.events += [EventRow(school, device, kind, at, e) for e in fast[2]]
            return len(fast[2])
    except UplinkError as exc:
        rows.quarantine.append(_quarantine(msg, str(exc), "message"))
        return 0
    school, device = decoded.topic.school_id, decoded.topic.device_id
    kind, at = decoded.kind, msg.received_at
    rejected = decoded.rejected
    events = [EventRow(school, device, kind, at, e) for e in decoded.events]
    if rejected:
        rows.quarantine += [
            _quarantine(msg, r.reason, "event", payload=r.raw, seq=r.seq) for r in rejected
        ]
    rows.events += events
    return len(decoded.events) + len(rejected)


def refused(msg: Inbound, reason: str, kind: str = "database") -> Rows:
    """The whole message to quarantine, for when its rows cannot be written as decoded."""
    payload = msg.payload[:QUARANTINE_KEEP_BYTES]
    return Rows(quarantine=[_quarantine(msg, reason, kind, payload=payload)])


def _internal_error(msg: Inbound, exc: Exception) -> Rows:
    log.exception("cannot decode a message on %s", msg.topic)
    return refused(msg, f"internal error while decoding: {exc!r}", "internal")


class Batch:
    """Messages taken for one transaction and the rows they decode to.

    The rows of all messages go into one :class:`Rows` as they are decoded; a message's own
    rows are decoded again only when the database refuses the batch (:meth:`parts`).
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.messages: list[Inbound] = []
        self.rows = Rows()
        #: Events carried by the messages, valid or rejected.
        self.events_received = 0
        #: Rows to write, counting each message as at least one: what the batch limit bounds.
        self.size = 0
        #: The events' COPY payloads, once :meth:`seal` built them.
        self.encoded: EncodedEvents | None = None
        #: Each device's span, worked out a message at a time while :attr:`_increasing`.
        self._spans: dict[str, DeviceSpan] = {}
        #: Whether every device's seqs have risen strictly so far, message after message (so
        #: none repeats; almost always true). Once false, :meth:`seal` checks each event.
        self._increasing = True

    def add(self, msg: Inbound) -> None:
        self.encoded = None
        self.messages.append(msg)
        # The common case inline, a message of valid events: one call to decode it and no
        # counting of rows before and after.
        topic = _TOPICS.get(msg.topic)
        if topic is not None and topic.channel is _UP and len(msg.payload) <= self.max_bytes:
            try:
                fast = decode_valid(topic, msg.payload)
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the pipeline: keep the message
                self._add_error(msg, exc)
                return
            if fast is not None:
                kind, _, valid = fast
                school, device, at = topic.school_id, topic.device_id, msg.received_at
                if len(valid) == 1:
                    (ev,) = valid
                    self.rows.events.append(EventRow(school, device, kind, at, ev))
                    if self._increasing:  # _extend_span of one event, inline
                        seq = ev.seq
                        span = self._spans.get(device)
                        if span is None:
                            self._spans[device] = DeviceSpan(school, kind, at, seq, seq, 1)
                        elif seq > span.max_seq:
                            if at is not span.seen and at > span.seen:
                                span.seen = at
                            span.max_seq = seq
                            span.count += 1
                        else:
                            self._increasing = False
                    self.events_received += 1
                    self.size += 1
                    return
                new = [EventRow(school, device, kind, at, e) for e in valid]
                self.rows.events += new
                if self._increasing and new:
                    self._increasing = self._extend_span(new)
                n = len(valid)
                self.events_received += n
                self.size += n or 1
                return
        self._add_slow(msg, tried_fast=topic is not None and topic.channel is _UP)

    def _add_slow(self, msg: Inbound, *, tried_fast: bool) -> None:
        """:meth:`add` of any other message: invalid, a state, an unknown topic, oversize."""
        rows = self.rows
        events = rows.events
        n_events = len(events)
        before = n_events + len(rows.quarantine) + len(rows.states)
        try:
            self.events_received += _add_rows(msg, rows, self.max_bytes, tried_fast=tried_fast)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the pipeline: keep the message
            rows.extend(_internal_error(msg, exc))
        if self._increasing and len(events) > n_events:
            self._increasing = self._extend_span(events[n_events:])
        added = len(events) + len(rows.quarantine) + len(rows.states) - before
        self.size += added if added else 1

    def _add_error(self, msg: Inbound, exc: Exception) -> None:
        self.rows.extend(_internal_error(msg, exc))
        self.size += 1

    def _extend_span(self, new: list[EventRow]) -> bool:
        """Add one message's events (all of one device) to its span; False if a seq does not
        rise above every seq of the device before it."""
        first = new[0]
        if len(new) == 1:  # one event per message: the common case of many small devices
            lo = hi = first.event.seq
        else:
            seqs = [r.event.seq for r in new]
            lo, hi = seqs[0], seqs[-1]
            if seqs != sorted(set(seqs)):
                return False
        span = self._spans.get(first.device_id)
        if span is None:
            self._spans[first.device_id] = DeviceSpan(
                first.school_id, first.kind, first.received_at, lo, hi, len(new)
            )
            return True
        if lo <= span.max_seq:
            return False
        span.seen = max(span.seen, first.received_at)
        span.max_seq = hi
        span.count += len(new)
        return True

    def __len__(self) -> int:
        return len(self.messages)

    def seal(self) -> None:
        """Encode the events' COPY payloads now, so the writer thread only sends them.

        A value that cannot be encoded leaves :attr:`encoded` None: the writer then meets the
        same error and the batch takes the per-message path that quarantines its message. So
        does an encoder bug (logged here): it must not stop the decoder thread.
        """
        events = self.rows.events
        spans: dict[str, DeviceSpan] | None = None
        if self._increasing and sum(s.count for s in self._spans.values()) == len(events):
            spans = self._spans  # (the count guards against rows set other than by add())
        try:
            self.encoded = encode_events(events, spans)
        except pgcopy.CopyEncodeError:
            self.encoded = None
        except Exception:
            log.exception("cannot encode a batch of %d messages", len(self.messages))
            self.encoded = None

    def parts(self) -> list[tuple[Inbound, Rows]]:
        """Each message with its own rows, to find the one the database refuses."""
        out = []
        for msg in self.messages:
            try:
                rows, _ = rows_of(msg, max_bytes=self.max_bytes)
            except Exception as exc:  # noqa: BLE001 - a decoder bug quarantines this message, not the batch
                rows = _internal_error(msg, exc)
            out.append((msg, rows))
        return out
