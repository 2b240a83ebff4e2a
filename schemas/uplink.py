"""The uplink batch on ``up`` (ARCHITECTURE.md section 4): encode on the device, decode and
validate on the server.

Decoding is deliberately two-level: the envelope first, then each event on its own, so one bad
event is rejected with its reason while the valid events around it are kept.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Final, Literal

import msgspec
from msgspec import Meta

from schemas import events as registry
from schemas.errors import UplinkError
from schemas.topics import Channel, Topic, parse

VERSION: Final = 1
#: Messages above this size are refused whole (the broker limit should sit above it).
DEFAULT_MAX_BYTES: Final = 256 * 1024
_SEQ_MAX: Final = 2**63 - 1

Seq = Annotated[int, Meta(ge=0, le=_SEQ_MAX, description="per-device sequence number")]
AwareDatetime = Annotated[datetime, Meta(tz=True)]


class _Envelope(msgspec.Struct, forbid_unknown_fields=False):
    v: int
    device_id: str
    kind: str
    events: list[msgspec.Raw]
    sent_at: AwareDatetime | None = None
    replay: bool = False


class _Event(msgspec.Struct, forbid_unknown_fields=False):
    seq: Seq
    ts: AwareDatetime
    type: str
    data: msgspec.Raw
    synced: bool = True
    replay: bool = False


class UplinkEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as it travels (encoding side): ``data`` is already-encoded JSON."""

    seq: Seq
    ts: AwareDatetime
    type: str
    data: msgspec.Raw
    synced: bool = True


class UplinkBatch(msgspec.Struct, frozen=True, kw_only=True):
    """The uplink batch as the agent sends it."""

    v: int = VERSION
    device_id: str
    kind: str
    sent_at: AwareDatetime
    events: list[UplinkEvent]
    replay: bool = False


if TYPE_CHECKING:
    _Version = int
    _KindName = str
    _TypeName = str
else:
    # The fast decoder validates these itself, and gives back the contract's own string
    # objects (a Literal's): no look-up of a new string, rows compare by identity downstream.
    _Version = Literal[VERSION]
    _KindName = Literal[tuple(k.value for k in registry.DeviceKind)]
    _TypeName = Literal[tuple(registry.REGISTRY)]


class _FastEvent(msgspec.Struct, forbid_unknown_fields=False):
    """An event as :class:`_Event`, its ``type`` one of the registered names."""

    seq: Seq
    ts: AwareDatetime
    type: _TypeName
    data: msgspec.Raw
    synced: bool = True
    replay: bool = False


class _FastEnvelope(msgspec.Struct, forbid_unknown_fields=False):
    """The envelope with its events decoded in the same pass (valid payloads only)."""

    v: _Version
    device_id: str
    kind: _KindName
    events: list[_FastEvent]
    sent_at: AwareDatetime | None = None
    replay: bool = False


_encoder: Final = msgspec.json.Encoder()
_envelope_decoder: Final = msgspec.json.Decoder(_Envelope)
_event_decoder: Final = msgspec.json.Decoder(_Event)
_fast_decoder: Final = msgspec.json.Decoder(_FastEnvelope)
_KINDS: Final = frozenset(k.value for k in registry.DeviceKind)
_TYPES: Final = registry.REGISTRY
# A JSON \u0000 escape not itself escaped: PostgreSQL's jsonb cannot hold NUL characters.
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def encode_batch(batch: UplinkBatch) -> bytes:
    return _encoder.encode(batch)


class ValidEvent(msgspec.Struct, frozen=True, gc=False):
    """A validated event ready to store; ``data_json`` is the event's ``data`` as sent.

    (Not tracked by the garbage collector: it holds no container that could lead back to it,
    and the ingest makes one per event. Positional construction on the hot path: keyword
    arguments cost a name lookup per field.)
    """

    seq: int
    ts: datetime
    type: str
    data_json: bytes
    data: registry._Data
    synced: bool
    replay: bool


class RejectedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event that failed validation: its raw JSON and a reason naming the field."""

    raw: bytes
    reason: str
    seq: int | None = None


class DecodedUplink(msgspec.Struct, frozen=True):
    """(Built positionally on the hot path, once per message.)"""

    topic: Topic
    kind: str
    replay: bool
    events: list[ValidEvent]
    rejected: list[RejectedEvent]


def _describe(err: msgspec.ValidationError | msgspec.DecodeError, prefix: str) -> str:
    """Turn msgspec's ``Expected X - at `$.a[0].b``` into ``prefix.a[0].b: expected X``."""
    text = str(err)
    what, sep, where = text.rpartition(" - at `$")
    if not sep:
        return f"{prefix}: {text[:1].lower()}{text[1:]}" if prefix else text
    path = (prefix + where.rstrip("`")).removeprefix("payload.")
    return f"{path.lstrip('.')}: {what[:1].lower()}{what[1:]}"


def decode_uplink(
    topic: str | Topic, payload: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> DecodedUplink:
    """Decode and validate one ``up`` message.

    ``topic`` may come already parsed (a server sees the same topics over and over). Raises
    :class:`UplinkError` when the message as a whole is unusable; otherwise returns the valid
    events and, separately, every rejected event with its reason.
    """
    if isinstance(topic, Topic):
        parsed = topic
    else:
        try:
            parsed = parse(topic)
        except ValueError as exc:
            raise UplinkError(str(exc)) from None
    if parsed.channel is not Channel.UP:
        raise UplinkError(f"topic {str(parsed)!r} is not an uplink ('up') topic")
    if len(payload) > max_bytes:
        raise UplinkError(f"message is {len(payload)} bytes, over the limit of {max_bytes} bytes")
    fast = decode_valid(parsed, payload)
    if fast is not None:
        kind, replay, valid = fast
        return DecodedUplink(parsed, kind, replay, valid, [])
    return decode_each(parsed, payload)


def decode_each(topic: Topic, payload: bytes) -> DecodedUplink:
    """:func:`decode_uplink` the slow way, each event on its own and every failure named: for
    a message :func:`decode_valid` did not take. ``topic`` must be an ``up`` topic and the
    payload within the size limit (the caller checked both)."""
    if not payload.isascii():  # ASCII is UTF-8; only other bytes need the (copying) check
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UplinkError(f"payload is not UTF-8: invalid byte at offset {exc.start}") from None
    try:
        env = _decode_envelope(payload)
        _check_envelope(env, topic)
        valid, rejected = _decode_events(env)
    except RecursionError:  # msgspec's own bound on nesting, some 1000 levels
        raise UplinkError("payload is nested too deeply to decode") from None
    return DecodedUplink(topic, env.kind, env.replay, valid, rejected)


def _check_envelope(env: _Envelope, topic: Topic) -> None:
    if env.v != VERSION:
        raise UplinkError(f"v: unsupported contract version {env.v} (this server speaks {VERSION})")
    if env.device_id != topic.device_id:
        raise UplinkError(
            f"device_id: {env.device_id!r} does not match the topic's device {topic.device_id!r}"
        )
    if env.kind not in _KINDS:
        raise UplinkError(
            f"kind: unknown device kind {env.kind!r} (known: {', '.join(sorted(_KINDS))})"
        )


def _decode_envelope(payload: bytes) -> _Envelope:
    try:
        return _envelope_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise UplinkError(_describe(exc, "payload")) from None
    except msgspec.DecodeError as exc:
        raise UplinkError(f"payload is not valid JSON: {exc}") from None


_DECODE_ERRORS: Final = (msgspec.ValidationError, msgspec.DecodeError, RecursionError)


def decode_valid(topic: Topic, payload: bytes) -> tuple[str, bool, list[ValidEvent]] | None:
    """The common case in one decoder pass: ``(kind, replay, events)`` when the whole message
    and every event in it are valid; None means: take :func:`decode_each`, which finds the
    same verdicts and names each failure. ``topic`` must be an ``up`` topic and the payload
    within the size limit (the caller checked both).

    ``kind`` and each event's ``type`` are the contract's own string objects, so rows of one
    device compare by identity downstream (the COPY encoder's caches)."""
    if not payload.isascii():  # ASCII is UTF-8; only other bytes need the (copying) check
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        env = _fast_decoder.decode(payload)
    except _DECODE_ERRORS:
        return None
    # (v, kind and each type were checked by the decoder)
    if env.device_id != topic.device_id:
        return None
    kind, replay, events = env.kind, env.replay, env.events
    if len(events) != 1:
        valid = _valid_events(events, payload, replay)
        return None if valid is None else (kind, replay, valid)
    # one event per message (many small devices): no loop, no grouping by type
    ev = events[0]
    etype = _TYPES[ev.type]
    data_json = bytes(ev.data)
    try:
        data = etype.unchecked_decoder.decode(data_json)
    except _DECODE_ERRORS:
        return None
    check = etype.pattern_holds_one
    if check is not None and not check(data):
        return None
    # (``find``, not ``in``: bytes ``in`` bytes first tries the operand as an int and formats
    # the error it raises, which cost more than the search)
    if data_json.find(b"\\u0000") >= 0 and _NUL_ESCAPE.search(data_json):
        return None
    # seq, ts, type, data_json, data, synced, replay
    one = ValidEvent(ev.seq, ev.ts, ev.type, data_json, data, ev.synced, replay or ev.replay)
    return kind, replay, [one]


def _valid_events(
    events: list[_FastEvent], payload: bytes, replay: bool
) -> list[ValidEvent] | None:
    """:func:`decode_valid` of a message of any other number of events."""
    valid: list[ValidEvent] = []
    append, types = valid.append, _TYPES
    nul = payload.find(b"\\u0000") >= 0
    # data whose patterns are still to be checked, by type: one check per type and message
    unchecked: dict[str, list[registry._Data]] = {}
    for ev in events:
        etype = types[ev.type]  # (a registered name: the decoder checked)
        data_json = bytes(ev.data)
        try:
            data = etype.unchecked_decoder.decode(data_json)
        except _DECODE_ERRORS:
            return None
        if nul and _NUL_ESCAPE.search(data_json):
            return None
        name = etype.name
        if etype.pattern_checks:
            if (datas := unchecked.get(name)) is None:
                unchecked[name] = [data]
            else:
                datas.append(data)
        # seq, ts, type, data_json, data, synced, replay
        append(ValidEvent(ev.seq, ev.ts, name, data_json, data, ev.synced, replay or ev.replay))
    for name, datas in unchecked.items():
        if not _TYPES[name].patterns_hold(datas):
            return None
    return valid


def _decode_events(env: _Envelope) -> tuple[list[ValidEvent], list[RejectedEvent]]:
    valid: list[ValidEvent] = []
    rejected: list[RejectedEvent] = []
    for i, raw_event in enumerate(env.events):
        raw = bytes(raw_event)
        where = f"events[{i}]"
        try:
            ev = _event_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            rejected.append(RejectedEvent(raw=raw, reason=_describe(exc, where), seq=_seq_of(raw)))
            continue
        etype = registry.get(ev.type)
        if etype is None:
            rejected.append(
                RejectedEvent(
                    raw=raw,
                    seq=ev.seq,
                    reason=f"{where}.type: unknown event type {ev.type!r} "
                    f"(registered: {', '.join(sorted(registry.REGISTRY))})",
                )
            )
            continue
        data_json = bytes(ev.data)
        try:
            data = etype.decoder.decode(data_json)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            rejected.append(
                RejectedEvent(raw=raw, seq=ev.seq, reason=_describe(exc, f"{where}.data"))
            )
            continue
        if data_json.find(b"\\u0000") >= 0 and _NUL_ESCAPE.search(data_json):
            rejected.append(
                RejectedEvent(
                    raw=raw,
                    seq=ev.seq,
                    reason=f"{where}.data: contains a \\u0000 character, which cannot be stored",
                )
            )
            continue
        valid.append(
            ValidEvent(
                seq=ev.seq,
                ts=ev.ts,
                type=ev.type,
                data_json=data_json,
                data=data,
                synced=ev.synced,
                replay=env.replay or ev.replay,
            )
        )
    return valid, rejected


class _SeqOnly(msgspec.Struct, forbid_unknown_fields=False):
    seq: int | None = None


_seq_decoder: Final = msgspec.json.Decoder(_SeqOnly)


def _seq_of(raw: bytes) -> int | None:
    """Best-effort seq of a rejected event, so quarantine rows can be tied to gaps."""
    try:
        seq = _seq_decoder.decode(raw).seq
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return seq if seq is not None and 0 <= seq <= _SEQ_MAX else None


def metrics_of(event: ValidEvent) -> list[tuple[str, float]]:
    """The numeric readings an event carries, as (metric, value) pairs."""
    out: list[tuple[str, float]] = []
    data = event.data
    for fld, metric in _metric_fields(event.type):
        value = getattr(data, fld, None)
        if value is None:  # the common case for optional fields: skip the type checks
            continue
        cls = value.__class__
        if cls is float or cls is int or (cls is not bool and isinstance(value, (int, float))):
            out.append((metric, float(value)))
    return out


@functools.cache
def _metric_fields(event_type: str) -> tuple[tuple[str, str], ...]:
    return tuple(registry.REGISTRY[event_type].metrics.items())
