"""A district scenario file (TOML) → typed, frozen structs, with errors naming the field and line.

Simulated time drives event rates only: ``speed = 60`` runs a simulated hour in a wall minute.
Event timestamps are the device's wall clock (plus any injected skew), so latency is real.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from schemas import events
from schemas.events import DeviceKind
from schemas.patterns import whole
from schemas.topics import ID_PATTERN

Id = Annotated[str, Meta(pattern=whole(ID_PATTERN))]
#: "HH:MM" or "HH:MM:SS" on the simulated school clock.
ClockTime = Annotated[str, Meta(pattern=whole(r"^([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?$"))]
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]

FaultAction = Literal[
    "broker_kill",  # SIGKILL Mosquitto, start it again after duration_s
    "broker_restart",  # graceful stop, start after duration_s
    "db_restart",  # PostgreSQL stopped (fast), started after duration_s
    "db_pause",  # SIGSTOP every PostgreSQL process, SIGCONT after duration_s
    "ingest_kill",  # SIGKILL the ingest server, start it again after duration_s
    "network_drop",  # close the target devices' TCP connections to the broker (once)
    "network_cut",  # refuse the target devices' connections for duration_s
    "network_blackhole",  # swallow the target devices' traffic for duration_s
    "disk_full",  # fill the target devices' outbox filesystem for duration_s
    "clock_skew",  # offset the target devices' clocks by skew_s from then on
    "malformed",  # publish `count` broken messages to the broker
    "duplicate_storm",  # re-publish the target devices' last sent batches `count` times
]


class ScenarioError(Exception):
    """The scenario file is unusable; the message names the file, the field and the line."""


class _S(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Phase(_S, frozen=True, kw_only=True):
    """From ``start`` to ``end`` (simulated clock) the kind's rate is multiplied by ``factor``."""

    start: ClockTime
    end: ClockTime
    factor: NonNegative
    label: str = ""


class KindProfile(_S, frozen=True, kw_only=True):
    """How often one device of a kind produces events, over the school day."""

    #: Event types produced in turn (a smart board alternates power, app, input, touch).
    event_types: Annotated[list[str], Meta(min_length=1)]
    #: Events per simulated hour outside every phase.
    per_hour: NonNegative
    rhythm: list[Phase] = []


class School(_S, frozen=True, kw_only=True):
    id: Id
    rooms: Annotated[int, Meta(ge=1, le=1000)]
    #: Devices of each kind in every room.
    devices: dict[DeviceKind, Annotated[int, Meta(ge=0, le=100)]]
    #: Devices of each kind once per school (gates, card readers at the door, the library).
    school_devices: dict[DeviceKind, Annotated[int, Meta(ge=0, le=1000)]] = {}


class SchoolGroup(_S, frozen=True, kw_only=True):
    """``count`` alike schools with ids ``{prefix}{n:03d}`` (n from ``first``): a district in
    a few lines instead of hundreds of ``[[schools]]`` tables."""

    prefix: Annotated[str, Meta(pattern=whole(r"^[a-z][a-z0-9_]{0,15}$"))]
    count: Annotated[int, Meta(ge=1, le=10_000)]
    first: Annotated[int, Meta(ge=0, le=1_000_000)] = 1
    rooms: Annotated[int, Meta(ge=1, le=1000)]
    devices: dict[DeviceKind, Annotated[int, Meta(ge=0, le=100)]]
    school_devices: dict[DeviceKind, Annotated[int, Meta(ge=0, le=1000)]] = {}

    def expand(self) -> list[School]:
        return [
            School(
                id=f"{self.prefix}{n:03d}",
                rooms=self.rooms,
                devices=self.devices,
                school_devices=self.school_devices,
            )
            for n in range(self.first, self.first + self.count)
        ]


class Layout(_S, frozen=True, kw_only=True):
    """How ``--local`` lays the district out on one box (docs/capacity.md).

    ``workers`` simulator processes share the devices (each stays under the per-process open
    file limit); ``brokers`` Mosquitto instances split the schools, one ingest worker each, one
    database. ``tls`` makes every device connect over TLS with its own MQTT credentials.
    """

    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    brokers: Annotated[int, Meta(ge=1, le=8)] = 1
    tls: bool = False
    #: Concurrent connection attempts (TCP + TLS handshake) per worker: no thundering herd.
    connect_concurrency: Annotated[int, Meta(ge=1, le=1000)] = 16

    @property
    def multi(self) -> bool:
        """Whether this is the multi-process district runner's layout."""
        return self.workers > 1 or self.brokers > 1 or self.tls


class Fault(_S, frozen=True, kw_only=True):
    at: ClockTime
    action: FaultAction
    #: Wall-clock seconds the fault lasts (where it has a length).
    duration_s: NonNegative = 3.0
    #: "all", a school id, or a device id.
    target: str = "all"
    count: Annotated[int, Meta(ge=1, le=100_000)] = 10
    skew_s: float = 0.0


class Tuning(_S, frozen=True, kw_only=True):
    """The agents' ``[publish]`` and ``[mqtt]`` knobs for the whole fleet."""

    max_batch_events: Annotated[int, Meta(ge=1, le=10_000)] = 200
    inflight: Annotated[int, Meta(ge=1, le=1000)] = 4
    linger_ms: Annotated[int, Meta(ge=0, le=10_000)] = 50
    replay_rate: Annotated[int, Meta(ge=0)] = 2000
    keepalive_s: Annotated[int, Meta(ge=5, le=600)] = 10
    backoff_initial_s: Positive = 0.2
    backoff_max_s: Positive = 2.0
    #: Seconds without a PUBACK before a connection is given up.
    puback_timeout_s: Positive = 10.0


class Scenario(_S, frozen=True, kw_only=True):
    name: str
    district: Id = "d01"
    seed: int = 1
    start: ClockTime = "07:30"
    end: ClockTime = "08:30"
    speed: Annotated[float, Meta(gt=0, le=100_000)] = 60.0
    #: Wall seconds between generation rounds.
    tick_s: Annotated[float, Meta(ge=0.01, le=10)] = 0.25
    schools: list[School] = []
    school_groups: list[SchoolGroup] = []
    kinds: dict[DeviceKind, KindProfile] = {}
    #: Every device also sends ``agent.health`` every ``health_s`` simulated seconds (0: never).
    health_s: NonNegative = 0.0
    faults: list[Fault] = []
    tuning: Tuning = Tuning()
    layout: Layout = Layout()

    @property
    def all_schools(self) -> list[School]:
        """The listed schools, then every group's, in file order."""
        return [*self.schools, *(s for g in self.school_groups for s in g.expand())]

    @property
    def sim_seconds(self) -> float:
        return clock_seconds(self.end) - clock_seconds(self.start)

    @property
    def wall_seconds(self) -> float:
        return self.sim_seconds / self.speed

    def profile(self, kind: DeviceKind) -> KindProfile | None:
        return self.kinds.get(kind) or DEFAULT_KINDS.get(kind)

    def fault_offset_s(self, fault: Fault) -> float:
        """Wall seconds after the run starts at which ``fault`` fires."""
        return (clock_seconds(fault.at) - clock_seconds(self.start)) / self.speed


def clock_seconds(hhmm: str) -> int:
    parts = [int(p) for p in hhmm.split(":")]
    return parts[0] * 3600 + parts[1] * 60 + (parts[2] if len(parts) > 2 else 0)


def rate_factor(profile: KindProfile, sim_s: float) -> float:
    """The product of the factors of every phase the simulated second ``sim_s`` falls in."""
    factor = 1.0
    for p in profile.rhythm:
        if clock_seconds(p.start) <= sim_s < clock_seconds(p.end):
            factor *= p.factor
    return factor


def _p(start: str, end: str, factor: float, label: str) -> Phase:
    return Phase(start=start, end=end, factor=factor, label=label)


_PERIODS: Final = [_p(f"{h:02d}:00", f"{h:02d}:45", 1.0, f"period {h - 7}") for h in range(8, 16)]
_CHANGES: Final = [_p(f"{h:02d}:45", f"{h + 1:02d}:00", 4.0, "break") for h in range(8, 16)]
#: A school day: the morning attendance burst, lessons on the hour, breaks, home time.
DEFAULT_KINDS: Final[dict[DeviceKind, KindProfile]] = {
    DeviceKind.CARD_READER: KindProfile(
        event_types=["card.tap"],
        per_hour=6,
        rhythm=[
            _p("07:30", "08:00", 40, "morning attendance"),
            *_CHANGES,
            _p("16:00", "16:30", 20, "home time"),
        ],
    ),
    DeviceKind.CLASS_SIGNAGE: KindProfile(
        event_types=["attendance.checkin", "signage.notice_shown"],
        per_hour=4,
        rhythm=[_p("07:40", "08:05", 50, "morning check-in"), *_CHANGES],
    ),
    DeviceKind.SMART_BOARD: KindProfile(
        event_types=["board.power", "board.app", "board.input", "board.touch"],
        per_hour=2,
        rhythm=[_p(p.start, p.end, 15, p.label) for p in _PERIODS],
    ),
    DeviceKind.RECORDING_UNIT: KindProfile(
        event_types=["recorder.status", "camera.activity", "camera.health"],
        per_hour=12,
        rhythm=[_p(p.start, p.end, 5, p.label) for p in _PERIODS],
    ),
    DeviceKind.ENV_SENSOR: KindProfile(event_types=["env.reading"], per_hour=60),
    DeviceKind.ACCESS_GATE: KindProfile(
        event_types=["access.pass"],
        per_hour=10,
        rhythm=[_p("07:20", "08:00", 60, "arrival"), _p("16:00", "16:40", 40, "departure")],
    ),
    DeviceKind.LIBRARY_TERMINAL: KindProfile(
        event_types=["library.loan", "library.return"],
        per_hour=3,
        rhythm=[_p("12:00", "13:00", 8, "lunch"), *_CHANGES],
    ),
}

_AT: Final = re.compile(r"`\$((?:\.[A-Za-z_]\w*|\[\d+\])*)`")


def _line_of(text: str, path: str) -> int | None:
    """Best effort: the line where the value at a msgspec path (``.schools[1].rooms``) is set."""
    parts = re.findall(r"\.([A-Za-z_]\w*)|\[(\d+)\]", path)
    lines = text.splitlines()
    table, index, line = "", 0, None
    for key, idx in parts:
        if idx:
            # the idx-th [[table]] header of the current array
            count = -1
            for n, raw in enumerate(lines):
                if raw.strip() == f"[[{table}]]":
                    count += 1
                    if count == int(idx):
                        index, line = n, n + 1
                        break
            continue
        table = f"{table}.{key}" if table else key
        pattern = re.compile(rf"^\s*{re.escape(key)}\s*=|^\s*\[+{re.escape(table)}\]+\s*$")
        for n in range(index, len(lines)):
            if pattern.search(lines[n]):
                index, line = n, n + 1
                break
    return line


def parse(text: str, source: str = "<scenario>") -> Scenario:
    """Decode and check a scenario; :class:`ScenarioError` says what is wrong and where."""
    try:
        scenario = msgspec.toml.decode(text.encode(), type=Scenario)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = _AT.search(msg)
        path = m.group(1).lstrip(".") if m else ""
        what = msg.split(" - at ", maxsplit=1)[0]
        line = _line_of(text, m.group(1)) if m else None
        where = f"{source}:{line}" if line else source
        raise ScenarioError(f"{where}: {path or '(top level)'}: {what}") from None
    except msgspec.DecodeError as exc:
        raise ScenarioError(f"{source}: not valid TOML: {exc}") from None
    _check(scenario, text, source)
    return scenario


def _check(s: Scenario, text: str, source: str) -> None:
    def fail(path: str, what: str) -> None:
        line = _line_of(text, "." + path)
        raise ScenarioError(f"{source}{f':{line}' if line else ''}: {path}: {what}")

    if s.sim_seconds <= 0:
        fail("end", f"must be after start ({s.start})")
    if not s.schools and not s.school_groups:
        fail("schools", "a scenario needs at least one school (schools or school_groups)")
    if s.health_s and s.health_s < 1:
        fail("health_s", "must be 0 (no health events) or at least 1 second")
    ids = [school.id for school in s.all_schools]
    if len(set(ids)) != len(ids):
        fail("schools", "school ids must be unique (a group's ids clash with another's)")
    for kind, profile in s.kinds.items():
        for j, et in enumerate(profile.event_types):
            if events.get(et) is None:
                fail(f"kinds.{kind.value}.event_types[{j}]", f"unknown event type {et!r}")
    for i, f in enumerate(s.faults):
        if clock_seconds(f.at) > clock_seconds(s.end):
            fail(f"faults[{i}].at", f"{f.at} is after the scenario ends ({s.end})")
        if clock_seconds(f.at) < clock_seconds(s.start):
            fail(f"faults[{i}].at", f"{f.at} is before the scenario starts ({s.start})")
        if f.target != "all" and f.target not in ids and not re.fullmatch(ID_PATTERN, f.target):
            fail(f"faults[{i}].target", f"{f.target!r} is not 'all', a school or a device id")


def load(path: Path | str) -> Scenario:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the scenario: {exc.strerror}") from None
    return parse(text, str(p))
