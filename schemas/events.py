"""The registry of event types: each ``type`` and the schema of its ``data``.

Adding a type (the rule, also in docs/contract.md):

1. Define a ``msgspec.Struct`` for its ``data`` here, with ``forbid_unknown_fields=False`` (devices
   may send more than we know) and every field typed and documented by name.
2. Register it with :func:`register`, naming any numeric fields that also go to ``readings``
   under a metric name unique across all types.
3. Run ``campus-schemas export --out schemas/jsonschema`` and commit the result; CI fails while
   the checked-in JSON Schema differs from the code.
4. Never change the meaning of an existing field: add an optional one, or a new type.
"""

from __future__ import annotations

import functools
import operator
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from schemas.patterns import whole

#: An HMAC-SHA256 of a card UID with the district key, as 64 lowercase hex digits.
_UID_HASH_PATTERN: Final = r"^[0-9a-f]{64}$"
UidHash = Annotated[
    str, Meta(pattern=whole(_UID_HASH_PATTERN), description="HMAC-SHA256 of the UID")
]
Name = Annotated[str, Meta(min_length=1, max_length=128)]
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Meta(ge=0.0)]
#: A count; bounded like PostgreSQL int8, so every count fits its columns and float8 readings.
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class DeviceKind(StrEnum):
    SMART_BOARD = "smart_board"
    CLASS_SIGNAGE = "class_signage"
    CARD_READER = "card_reader"
    RECORDING_UNIT = "recording_unit"
    ENV_SENSOR = "env_sensor"
    ACCESS_GATE = "access_gate"
    LIBRARY_TERMINAL = "library_terminal"
    GATEWAY = "gateway"


CardTech = Literal[
    "iso14443a",
    "iso14443b",
    "felica",
    "iso15693",
    "mifare_classic",
    "em4100",
    "wiegand26",
    "wiegand34",
    "unknown",
]


class _Data(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, gc=False):
    """Base of every event's ``data``. (Not tracked by the garbage collector: decoded from JSON
    it cannot refer back to itself, and the ingest decodes one per event.)"""


class CardTap(_Data):
    uid_hash: UidHash
    tech: CardTech
    reader: Name
    #: The raw UID in hex: present only where a deployment has explicitly opted out of hashing.
    uid: Annotated[str, Meta(pattern=whole(r"^[0-9A-Fa-f]{2,40}$"))] | None = None


class AttendanceCheckin(_Data):
    uid_hash: UidHash
    reader: Name
    class_id: Name | None = None
    #: The timetable period the tap fell in, or null outside every period.
    period: Name | None = None
    status: Literal["on_time", "late", "outside_period"] = "on_time"


class BoardPower(_Data):
    state: Literal["on", "off", "standby"]
    previous: Literal["on", "off", "standby", "unknown"] | None = None


class BoardInput(_Data):
    source: Name
    previous: Name | None = None


class BoardApp(_Data):
    app: Name
    action: Literal["foreground", "start", "stop"] = "foreground"


class BoardTouch(_Data):
    touches: Count
    window_s: Annotated[float, Meta(gt=0.0)]


class SignageNoticeShown(_Data):
    notice_id: Name
    title: Annotated[str, Meta(max_length=512)] | None = None
    cmd_id: Name | None = None
    duration_s: NonNegative | None = None


class RecorderStatus(_Data):
    state: Literal["stop", "record", "pause"]
    free_space_mb: NonNegative | None = None
    recorder: Name | None = None


class CameraHealth(_Data):
    camera: Name
    #: Null while the camera is disconnected: there is no picture to measure.
    fps: NonNegative | None
    brightness: Annotated[float, Meta(ge=0.0, le=255.0)] | None
    black_frame: bool
    frozen: bool
    connected: bool = True
    #: From an ONVIF camera's device management (``onvif`` driver); absent from OpenCV ones.
    model: Name | None = None
    firmware: Name | None = None
    #: Seconds the camera's clock is ahead (+) or behind (-) the agent's.
    clock_offset_s: float | None = None


class CameraActivity(_Data):
    camera: Name
    motion: Fraction
    #: Null when people counting is switched off on this camera.
    people: Count | None = None


#: What an ONVIF camera reports of itself (its event topics, in our words).
CameraEventKind = Literal["motion", "tamper", "video_loss", "other"]


class CameraEvent(_Data):
    """An event a camera raised itself (ONVIF event service), never a frame."""

    camera: Name
    kind: CameraEventKind
    #: True when the condition starts, False when it ends (ONVIF's property state).
    active: bool
    #: The camera's own topic, e.g. ``tns1:VideoSource/MotionAlarm`` (bounded, for diagnosis).
    topic: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    #: The video source (or analytics rule) the camera named, when it did.
    source: Name | None = None


#: Money in fen (0.01 yuan), an integer: no float rounding in sums.
Fen = Annotated[int, Meta(ge=0, le=10**11)]


class CardPurchase(_Data):
    """A payment with the campus card at a POS terminal (canteen window, shop, e-wallet)."""

    #: HMAC-SHA256 of the card number with the district key (never the number itself).
    card_hash: UidHash
    amount_fen: Fen
    terminal: Name
    #: Where the money went, e.g. ``canteen-1/window-3`` or ``shop``.
    merchant: Name
    #: The card's balance after the payment, when the terminal reports it.
    balance_after_fen: Annotated[int, Meta(ge=-(10**11), le=10**11)] | None = None


#: The fixed list of symptoms a morning-check station records (晨午检).
HealthSymptom = Literal[
    "fever",
    "cough",
    "sore_throat",
    "runny_nose",
    "headache",
    "vomiting",
    "diarrhea",
    "rash",
    "conjunctivitis",
    "fatigue",
    "other",
]


class HealthCheck(_Data):
    """One student's morning (or noon) check at a check station."""

    student_hash: UidHash
    class_id: Name
    temperature_c: Annotated[float, Meta(ge=30.0, le=45.0)] | None = None
    symptoms: Annotated[list[HealthSymptom], Meta(max_length=11)] = msgspec.field(
        default_factory=list
    )
    station: Name | None = None


#: Visual acuity in the five-grade (logMAR-based) notation of GB 11533: 5.0 is normal (decimal
#: 1.0), each 0.1 below one chart line worse (4.0 = decimal 0.1); under 4.0 when measured nearer.
Acuity = Annotated[float, Meta(ge=3.0, le=5.3)]


class HealthVision(_Data):
    """One student's vision screening result (视力筛查)."""

    student_hash: UidHash
    class_id: Name
    left_acuity: Acuity
    right_acuity: Acuity
    #: True when the screening was done with the student's glasses on.
    corrected: bool = False
    station: Name | None = None


class EnvReading(_Data):
    sensor: Name | None = None
    temperature_c: Annotated[float, Meta(ge=-60.0, le=100.0)] | None = None
    humidity_pct: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    co2_ppm: Annotated[float, Meta(ge=0.0, le=100000.0)] | None = None
    pm25_ugm3: Annotated[float, Meta(ge=0.0, le=10000.0)] | None = None
    noise_db: Annotated[float, Meta(ge=0.0, le=200.0)] | None = None


class AccessPass(_Data):
    uid_hash: UidHash
    gate: Name
    direction: Literal["in", "out"]
    result: Literal["granted", "denied"]
    temperature_c: Annotated[float, Meta(ge=25.0, le=45.0)] | None = None
    reason: Name | None = None


class _LibraryTransaction(_Data):
    student_hash: UidHash | None
    item_id: Name
    source: Literal["barcode", "rfid"]
    terminal: Name
    session_id: Name | None = None


class LibraryLoan(_LibraryTransaction):
    pass


class LibraryReturn(_LibraryTransaction):
    pass


class AgentHealth(_Data):
    cpu_pct: NonNegative
    rss_mb: NonNegative
    outbox_depth: Count
    oldest_unsent_s: NonNegative
    clock_offset_s: (
        Annotated[
            float,
            Meta(
                description="Seconds the device clock is off its reference (the agent's "
                "[clock] reference): positive = the device clock is ahead, negative = behind; "
                "null when no reference is configured or none has answered yet."
            ),
        ]
        | None
    ) = None
    drivers: dict[str, str] = msgspec.field(default_factory=dict)


class AgentOutboxDropped(_Data):
    """Events the outbox deleted unsent to stay within its quota or a full disk."""

    #: Event type → how many of it were dropped since ``since``.
    dropped: dict[str, Count]
    since: Annotated[datetime, Meta(tz=True)]
    reason: Literal["max_events", "max_bytes", "disk_full"]


@dataclass(frozen=True, slots=True)
class _Run:
    """A pattern recast as a length and a set of allowed ASCII characters: the values of a
    whole message can then be joined and checked at once (~40 ns a value here, against ~700
    for a regular expression search each)."""

    allowed: bytes
    length: int


#: Patterns that hold for a value of the run's length made of the run's characters (each ends
#: in ``\Z``: see :mod:`schemas.patterns`).
_RUN_PATTERNS: Final[dict[str, _Run]] = {
    whole(_UID_HASH_PATTERN): _Run(b"0123456789abcdef", 64),
}


def _without_pattern(tp: Any) -> tuple[Any, str | None]:
    """``tp`` with the ``pattern`` of its (possibly optional) ``Meta`` left out (or replaced by
    its run's length), and that pattern; ``tp`` as it is and None when it has none."""
    if get_origin(tp) is Annotated:
        base, *metas = get_args(tp)
        pattern = next((m.pattern for m in metas if isinstance(m, Meta) and m.pattern), None)
        if pattern is None:
            return tp, None
        kept = [_meta_without_pattern(m) if isinstance(m, Meta) else m for m in metas]
        run = _RUN_PATTERNS.get(pattern)
        if run is not None:
            kept.append(Meta(min_length=run.length, max_length=run.length))
        return Annotated[(base, *kept)], pattern
    if get_origin(tp) in (Union, types.UnionType):
        args = [_without_pattern(a) for a in get_args(tp)]
        patterns = {p for _, p in args if p is not None}
        if len(patterns) != 1:
            return tp, None
        return functools.reduce(operator.or_, (a for a, _ in args)), patterns.pop()
    return tp, None


def _meta_without_pattern(meta: Meta) -> Meta:
    kept = {
        name: getattr(meta, name)
        for name in ("gt", "ge", "lt", "le", "multiple_of", "max_length", "min_length", "tz")
        if getattr(meta, name) is not None
    }
    return Meta(**kept)


@dataclass(frozen=True, slots=True)
class _PatternCheck:
    """One ``pattern`` field that the fast decoder left to be checked a message at a time."""

    field: str
    getter: Callable[[Any], Any]
    #: Checks the list of a message's values (None when the field was null).
    holds: Callable[[list[Any]], bool]
    #: Checks one value (None when the field was null): a message of one event.
    one: Callable[[Any], bool]
    #: Checks one value that is not None.
    value: Callable[[str], bool]


_LOWER_HEX: Final = b"0123456789abcdef"


def _is_lower_hex(text: str) -> bool:
    """Whether ``text`` is made of ``0-9a-f`` only: what the lower-case hex run allows. Hex
    digits in pairs are what ``fromhex`` reads (it skips spaces and takes upper case, which
    then do not come back from ``hex``); ~2x cheaper than deleting the allowed characters,
    which only a value of odd length, or a refused one, still costs."""
    try:
        if bytes.fromhex(text).hex() == text:
            return True
    except ValueError:
        pass
    return len(text) % 2 == 1 and text.isascii() and not text.encode().translate(None, _LOWER_HEX)


def _run_check(allowed: bytes) -> Callable[[str], bool]:
    """Whether a value is made of ``allowed`` ASCII characters only."""
    if allowed == _LOWER_HEX:
        return _is_lower_hex
    return lambda text: text.isascii() and not text.encode().translate(None, allowed)


def _checker(pattern: str, optional: bool) -> Callable[[list[Any]], bool]:
    run = _RUN_PATTERNS.get(pattern)
    if run is not None:
        holds = _run_check(run.allowed)

        def joined(values: list[Any]) -> bool:
            if optional:
                values = [v for v in values if v is not None]
                if not values:
                    return True
            # one check of the values joined: each is of the run's length (the decoder saw to
            # it), and a character is allowed or not wherever it stands
            return holds("".join(values))

        return joined
    search = re.compile(pattern).search  # what msgspec does with a pattern

    def each(values: list[Any]) -> bool:
        # a loop, not all(): a generator costs more than checking the usual one or two values
        for v in values:  # noqa: SIM110
            if v is not None and search(v) is None:
                return False
        return True

    return each


def _value_checker(pattern: str) -> Callable[[str], bool]:
    """Whether one value (not None) holds ``pattern``."""
    run = _RUN_PATTERNS.get(pattern)
    if run is not None:
        return _run_check(run.allowed)
    search = re.compile(pattern).search
    return lambda v: search(v) is not None


def _one_checker(pattern: str) -> Callable[[Any], bool]:
    """:func:`_checker` for a single value (None passes: the decoder allowed it or not)."""
    holds = _value_checker(pattern)
    return lambda v: v is None or holds(v)


def _all_of(checks: tuple[_PatternCheck, ...]) -> Callable[[Any], bool] | None:
    """One call checking every pattern of one decoded ``data``; None when there are none.
    (The usual value of an optional field is None: tested here, not in a call.)"""
    if not checks:
        return None
    if len(checks) == 1:
        get, one = checks[0].getter, checks[0].value
        return lambda data: (v := get(data)) is None or one(v)
    if len(checks) == 2:  # (card.tap: uid_hash and the optional uid)
        (get1, one1), (get2, one2) = ((c.getter, c.value) for c in checks)

        def two(data: Any) -> bool:
            v = get1(data)
            if v is not None and not one1(v):
                return False
            v = get2(data)
            return v is None or one2(v)

        return two
    pairs = tuple((c.getter, c.one) for c in checks)

    def every(data: Any) -> bool:
        for get, one in pairs:  # noqa: SIM110 (a loop: cheaper than all() for two or three)
            if not one(get(data)):
                return False
        return True

    return every


def _fast_twin(cls: type[_Data]) -> tuple[type[_Data], tuple[_PatternCheck, ...]]:
    """A subclass of ``cls`` whose fields keep every constraint but ``pattern``, and the checks
    of the patterns it leaves out; ``cls`` itself when it has none."""
    fields: list[tuple[str, Any, Any]] = []
    checks: list[_PatternCheck] = []
    for f in msgspec.structs.fields(cls):
        tp, pattern = _without_pattern(f.type)
        if pattern is None:
            continue
        default: Any = msgspec.NODEFAULT
        if f.default is not msgspec.NODEFAULT:
            default = f.default
        elif f.default_factory is not msgspec.NODEFAULT:
            default = msgspec.field(default_factory=f.default_factory)
        fields.append((f.name, tp, default))
        optional = get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)
        holds = _checker(pattern, optional)
        getter = operator.attrgetter(f.name)
        checks.append(
            _PatternCheck(f.name, getter, holds, _one_checker(pattern), _value_checker(pattern))
        )
    if not fields:
        return cls, ()
    twin: type[_Data] = msgspec.defstruct(  # type: ignore[assignment]
        f"{cls.__name__}Unchecked",
        fields,
        bases=(cls,),
        kw_only=True,
        forbid_unknown_fields=False,
        gc=False,
        module=__name__,
    )
    return twin, tuple(checks)


@dataclass(frozen=True, slots=True)
class EventType:
    """One registered event type."""

    name: str
    data: type[_Data]
    description: str
    #: data field → metric name in ``readings`` (numeric fields only).
    metrics: Mapping[str, str] = field(default_factory=dict)
    decoder: msgspec.json.Decoder[_Data] = field(init=False, repr=False, compare=False)
    #: Decodes ``data`` with every constraint but the ``pattern`` ones, into a subclass of
    #: ``data`` (``decoder`` itself when there are none); :meth:`patterns_hold` checks those for
    #: a message's events at once. The ingest's fast path; errors are named by ``decoder``.
    unchecked_decoder: msgspec.json.Decoder[_Data] = field(init=False, repr=False, compare=False)
    pattern_checks: tuple[_PatternCheck, ...] = field(init=False, repr=False, compare=False)
    #: :meth:`patterns_hold` for one ``data`` in one call (None: no pattern to check), for a
    #: message of one event.
    pattern_holds_one: Callable[[_Data], bool] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", msgspec.json.Decoder(self.data))
        twin, checks = _fast_twin(self.data)
        unchecked = self.decoder if twin is self.data else msgspec.json.Decoder(twin)
        object.__setattr__(self, "unchecked_decoder", unchecked)
        object.__setattr__(self, "pattern_checks", checks)
        object.__setattr__(self, "pattern_holds_one", _all_of(checks))

    def patterns_hold(self, datas: list[_Data]) -> bool:
        """Whether the ``pattern`` of every field holds in all of ``datas`` (decoded by
        :attr:`unchecked_decoder`)."""
        for c in self.pattern_checks:  # noqa: SIM110 (a loop: cheaper than all() per message)
            if not c.holds(list(map(c.getter, datas))):
                return False
        return True


REGISTRY: Final[dict[str, EventType]] = {}


def register(event_type: EventType) -> EventType:
    if event_type.name in REGISTRY:
        raise ValueError(f"event type {event_type.name!r} is registered twice")
    metric_names = {m for t in REGISTRY.values() for m in t.metrics.values()}
    clash = metric_names & set(event_type.metrics.values())
    if clash:
        raise ValueError(f"metric names {sorted(clash)} are already used by another event type")
    REGISTRY[event_type.name] = event_type
    return event_type


def get(name: str) -> EventType | None:
    return REGISTRY.get(name)


for _t in (
    EventType("card.tap", CardTap, "A card was presented to a reader."),
    EventType("attendance.checkin", AttendanceCheckin, "A student checked in at class signage."),
    EventType("board.power", BoardPower, "A smart board's power state changed."),
    EventType("board.input", BoardInput, "A smart board's input source changed."),
    EventType("board.app", BoardApp, "An application came to the foreground on a board."),
    EventType(
        "board.touch",
        BoardTouch,
        "Touch activity on a board over a window.",
        {"touches": "board_touches"},
    ),
    EventType("signage.notice_shown", SignageNoticeShown, "Signage displayed a notice."),
    EventType(
        "recorder.status",
        RecorderStatus,
        "A recording unit's status poll.",
        {"free_space_mb": "recorder_free_space_mb"},
    ),
    EventType(
        "camera.health",
        CameraHealth,
        "Figures about a camera's picture (never frames).",
        {"fps": "camera_fps", "brightness": "camera_brightness"},
    ),
    EventType(
        "camera.activity",
        CameraActivity,
        "Motion level and a people estimate.",
        {"motion": "camera_motion", "people": "camera_people"},
    ),
    EventType(
        "camera.event",
        CameraEvent,
        "A camera's own event (ONVIF motion, tamper, video loss): its start or end.",
    ),
    EventType(
        "card.purchase",
        CardPurchase,
        "A campus-card payment at a POS terminal (amount in fen; the card only as its hash).",
        {"amount_fen": "purchase_amount_fen"},
    ),
    EventType(
        "health.check",
        HealthCheck,
        "A student's morning check: temperature and symptoms from a fixed list.",
        {"temperature_c": "health_temperature_c"},
    ),
    EventType(
        "health.vision",
        HealthVision,
        "A student's vision screening (acuity in the 5-grade notation, 5.0 normal).",
        {"left_acuity": "vision_left_acuity", "right_acuity": "vision_right_acuity"},
    ),
    EventType(
        "env.reading",
        EnvReading,
        "An environment sensor reading.",
        {
            "temperature_c": "temperature_c",
            "humidity_pct": "humidity_pct",
            "co2_ppm": "co2_ppm",
            "pm25_ugm3": "pm25_ugm3",
            "noise_db": "noise_db",
        },
    ),
    EventType(
        "access.pass",
        AccessPass,
        "A pass (or refusal) at an access gate.",
        {"temperature_c": "body_temperature_c"},
    ),
    EventType("library.loan", LibraryLoan, "A book was borrowed at a library terminal."),
    EventType("library.return", LibraryReturn, "A book was returned at a library terminal."),
    EventType(
        "agent.health",
        AgentHealth,
        "The edge agent's own health.",
        {
            "cpu_pct": "agent_cpu_pct",
            "rss_mb": "agent_rss_mb",
            "outbox_depth": "agent_outbox_depth",
            "oldest_unsent_s": "agent_oldest_unsent_s",
        },
    ),
    EventType(
        "agent.outbox_dropped",
        AgentOutboxDropped,
        "The edge agent's outbox dropped unsent events (quota or full disk), counted by type.",
    ),
):
    register(_t)
