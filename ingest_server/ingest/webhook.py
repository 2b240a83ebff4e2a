"""Vendor webhooks: a TOML mapping file turns a vendor platform's own JSON into contract events.

    mapping = load_mapping(Path("acme.toml"))     # MappingFileError naming file, line, field
    mapping.authenticate(headers, body)           # its shared secret or HMAC-SHA256 signature
    mapped = mapping.map(body)                    # MappingError naming the JSON path
    mapped.messages(conn, now)                    # uplink messages, seqs assigned (see below)

The format is documented in docs/webhooks.md. Paths are a small JSONPath subset: ``$`` is the
item being mapped (an element of ``each``), ``$$`` the whole body, then ``.name``, ``["name"]``,
``[3]``; ``[*]`` only in ``each``.

Exactly once: an event's ``seq`` is the vendor's own per-device counter when the mapping names
one (``seq``), else the server assigns it from the vendor's event id (``event_id``): the pair
(source, event id) is stored in ``webhook_event_ids`` with the seq it got, in a transaction
committed before the events are written, so a retried delivery finds the same seq and the
event store's (device_id, seq) key makes it a duplicate. Seqs are drawn per device from
``webhook_device_seq``, consecutively, so a device's gaps stay meaningful.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import tomllib
from collections.abc import Mapping as AnyMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import psycopg
from msgspec import Meta

from ingest_server.ingest.batch import Inbound
from schemas import events as registry
from schemas.errors import ContractError, UplinkError
from schemas.patterns import whole
from schemas.topics import ID_PATTERN, Channel, build, check_id
from schemas.uplink import UplinkBatch, UplinkEvent, decode_uplink, encode_batch

MAX_FILE_BYTES: Final = 64 * 1024
#: Events one webhook delivery may carry (more: 422, send them in several deliveries).
MAX_EVENTS: Final = 1000
MAX_EVENT_ID: Final = 256
_SEQ_MAX: Final = 2**63 - 1
_TOKEN = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\*\]|\[\"([^\"]*)\"\]")

Short = Annotated[str, Meta(max_length=256)]


class MappingFileError(ValueError):
    """A mapping file that cannot be used; the message names the file, line and field."""


class MappingError(ValueError):
    """A delivery that does not fit its mapping; ``path`` names where in the vendor's JSON."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def detail(self) -> list[dict[str, Any]]:
        """The 422 body's ``detail`` in FastAPI's shape, ``loc`` the vendor's JSON path."""
        return [{"type": "value_error", "loc": ["body", self.path], "msg": str(self),
                 "input": None}]  # fmt: skip


# --- the file's schema ------------------------------------------------------------------------


class SourceSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    name: Annotated[str, Meta(pattern=whole(ID_PATTERN))]
    auth: Literal["shared-secret", "hmac-sha256"]
    header: Annotated[str, Meta(min_length=1, max_length=128)]
    #: The secret's file (relative to the mapping file) or environment variable: never inline.
    secret_file: Short | None = None
    secret_env: Short | None = None
    #: Text before the hex digest in the signature header (e.g. ``sha256=``).
    signature_prefix: Short = ""
    description: Annotated[str, Meta(max_length=2000)] = ""


class FieldSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    path: Short | None = None
    value: str | int | float | bool | None = None
    #: Vendor value (as text) → contract value.
    map: dict[str, str | int | float | bool] | None = None
    #: Used when ``path`` is absent in the item (without it, an absent path is refused).
    default: str | int | float | bool | None = None
    #: A number at ``path`` multiplied by this (units: 0.1 °C → °C).
    scale: float | None = None


class When(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    path: Short
    equals: str | int | float | bool


Field = str | int | float | bool | FieldSpec


class EventSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    each: Short = "$"
    when: When | None = None
    device_id: Field
    school_id: Field
    kind: Field
    type: Field
    ts: Field
    ts_format: Literal["iso8601", "unix_s", "unix_ms"] = "iso8601"
    #: The offset of a ``ts`` without one (e.g. ``+08:00``); without it such a ts is refused.
    timezone: Annotated[str, Meta(pattern=r"^[+-]\d{2}:\d{2}$")] | None = None
    device_prefix: Annotated[str, Meta(pattern=r"^[a-z0-9_-]{0,32}$")] = ""
    seq: Field | None = None
    event_id: Field | None = None
    data: dict[str, Field] = msgspec.field(default_factory=dict)


class MappingFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    source: SourceSpec
    events: Annotated[list[EventSpec], Meta(min_length=1, max_length=64)]


# --- paths --------------------------------------------------------------------------------------

Step = str | int | None  # None: [*]


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    from_body: bool
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str, *, star: bool = False) -> JsonPath:
        from_body = text.startswith("$$")
        rest = text[2:] if from_body else text[1:]
        if not text.startswith("$"):
            raise ValueError(f"path {text!r} must start with $")
        steps: list[Step] = []
        pos = 0
        while pos < len(rest):
            m = _TOKEN.match(rest, pos)
            if m is None:
                raise ValueError(f"path {text!r}: cannot read {rest[pos:]!r}")
            if m[1] is not None:
                steps.append(m[1])
            elif m[2] is not None:
                steps.append(int(m[2]))
            elif m[3] is not None:
                steps.append(m[3])
            else:
                if not star:
                    raise ValueError(f"path {text!r}: [*] is allowed only in 'each'")
                steps.append(None)
            pos = m.end()
        return cls(text, from_body, tuple(steps))

    def get(self, item: Any, body: Any, where: str) -> tuple[bool, Any]:
        """(found, value) of this path in ``item`` (``body`` for ``$$``)."""
        node = body if self.from_body else item
        for step in self.steps:
            if isinstance(node, dict) and isinstance(step, str) and step in node:
                node = node[step]
                continue
            if not (isinstance(node, list) and isinstance(step, int) and step < len(node)):
                return False, None
            node = node[step]
        return True, node

    def expand(self, body: Any) -> list[tuple[str, Any]]:
        """Every (concrete path, value) ``each`` selects; [*] over a list's elements."""
        found: list[tuple[str, Any]] = [("$", body)]
        for step in self.steps:
            nxt: list[tuple[str, Any]] = []
            for where, node in found:
                if step is None:
                    if not isinstance(node, list):
                        raise MappingError(where, f"is not a list (needed by {self.text})")
                    nxt += [(f"{where}[{i}]", v) for i, v in enumerate(node)]
                elif isinstance(step, int):
                    if not isinstance(node, list) or step >= len(node):
                        raise MappingError(f"{where}[{step}]", f"is missing ({self.text})")
                    nxt.append((f"{where}[{step}]", node[step]))
                else:
                    if not isinstance(node, dict) or step not in node:
                        raise MappingError(f"{where}.{step}", f"is missing ({self.text})")
                    nxt.append((f"{where}.{step}", node[step]))
            found = nxt
        return found


@dataclass(frozen=True, slots=True)
class Getter:
    """One mapped value: a path (with value map, default, scale) or a literal."""

    name: str
    path: JsonPath | None
    literal: Any = None
    map: dict[str, Any] | None = None
    default: Any = None
    has_default: bool = False
    scale: float | None = None

    def __call__(self, item: Any, body: Any, where: str) -> Any:
        if self.path is None:
            return self.literal
        found, value = self.path.get(item, body, where)
        at = f"{where}{self.path.text[1:]}" if not self.path.from_body else self.path.text
        if not found or value is None:
            if self.has_default:
                return self.default
            raise MappingError(at, f"is missing ({self.name} = {self.path.text!r})")
        if self.map is not None:
            key = value if isinstance(value, str) else json.dumps(value)
            if key not in self.map:
                known = ", ".join(sorted(self.map))
                raise MappingError(at, f"{value!r} is not in {self.name}'s map (known: {known})")
            value = self.map[key]
        if self.scale is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise MappingError(at, f"{self.name}: {value!r} is not a number")
            value = value * self.scale
        return value


def _getter(name: str, spec: Field) -> Getter:
    if isinstance(spec, FieldSpec):
        if (spec.path is None) == (spec.value is None):
            raise ValueError(f"{name}: give exactly one of path and value")
        path = JsonPath.parse(spec.path) if spec.path is not None else None
        has_default = spec.default is not None
        return Getter(name, path, spec.value, spec.map, spec.default, has_default, spec.scale)
    if isinstance(spec, str) and spec.startswith("$"):
        return Getter(name, JsonPath.parse(spec))
    return Getter(name, None, spec)


# --- the mapping --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    each: JsonPath
    when: tuple[JsonPath, Any] | None
    device_id: Getter
    school_id: Getter
    kind: Getter
    type: Getter
    ts: Getter
    ts_format: str
    tz: timezone | None
    device_prefix: str
    seq: Getter | None
    event_id: Getter | None
    data: dict[str, Getter]


@dataclass(frozen=True, slots=True)
class Pending:
    """One mapped event, its seq given by the vendor or still to assign from ``event_id``."""

    where: str
    school_id: str
    device_id: str
    kind: str
    type: str
    ts: datetime
    data: dict[str, Any]
    seq: int | None
    event_id: str | None


@dataclass(frozen=True, slots=True)
class Mapped:
    source: str
    events: list[Pending]

    def messages(self, conn: psycopg.Connection[Any], now: datetime) -> list[Inbound]:
        """Uplink messages, one per device; seqs from event ids assigned and committed first."""
        seqs = assign_seqs(conn, self.source, [e for e in self.events if e.seq is None])
        return _messages(self.events, seqs, now)


def _messages(events: list[Pending], seqs: dict[str, int], now: datetime) -> list[Inbound]:
    by_device: dict[tuple[str, str, str], list[UplinkEvent]] = {}
    for e in events:
        seq = e.seq if e.seq is not None else seqs[e.event_id or ""]
        by_device.setdefault((e.school_id, e.device_id, e.kind), []).append(
            UplinkEvent(
                seq=seq, ts=e.ts, type=e.type, data=msgspec.Raw(msgspec.json.encode(e.data))
            )
        )
    out = []
    for (school, device, kind), items in by_device.items():
        batch = UplinkBatch(device_id=device, kind=kind, sent_at=now, events=items)
        out.append(Inbound(build(school, device, Channel.UP), encode_batch(batch), 0, 1, now))
    return out


@dataclass(frozen=True, slots=True)
class Mapping:
    """A loaded mapping file: one vendor source."""

    name: str
    file: Path
    auth: str
    header: str
    secret: bytes
    signature_prefix: str
    rules: tuple[Rule, ...]

    def authenticate(self, headers: AnyMapping[str, str], body: bytes) -> bool:
        given = headers.get(self.header.lower()) or headers.get(self.header) or ""
        if self.auth == "shared-secret":
            return hmac.compare_digest(given.encode(), self.secret)
        if not given.startswith(self.signature_prefix):
            return False
        want = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(given[len(self.signature_prefix) :].lower().encode(),
                                   want.encode())  # fmt: skip

    def map(self, body: bytes) -> Mapped:
        """The delivery's events, checked against the contract (MappingError if not)."""
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise MappingError("$", f"the body is not JSON: {exc}") from None
        events: list[Pending] = []
        for rule in self.rules:
            for where, item in rule.each.expand(doc):
                if rule.when is not None:
                    found, value = rule.when[0].get(item, doc, where)
                    if not found or value != rule.when[1]:
                        continue
                events.append(_pending(rule, item, doc, where))
                if len(events) > MAX_EVENTS:
                    raise MappingError("$", f"more than {MAX_EVENTS} events in one delivery")
        _validate(events)
        return Mapped(self.name, events)


def _text(getter: Getter, item: Any, body: Any, where: str) -> str:
    value = getter(item, body, where)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(where, f"{getter.name}: {value!r} is not a text or a whole number")
    return str(value)


def _ts(rule: Rule, item: Any, body: Any, where: str) -> datetime:
    value = rule.ts(item, body, where)
    try:
        if rule.ts_format == "iso8601":
            if not isinstance(value, str):
                raise ValueError("not a text")
            ts = datetime.fromisoformat(value)
            if ts.tzinfo is None:
                if rule.tz is None:
                    raise ValueError("has no UTC offset and the mapping gives no timezone")
                ts = ts.replace(tzinfo=rule.tz)
            return ts
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("not a number")
        return datetime.fromtimestamp(value / (1000 if rule.ts_format == "unix_ms" else 1), UTC)
    except (ValueError, OverflowError, OSError) as exc:
        raise MappingError(where, f"ts {value!r} is not a {rule.ts_format} time: {exc}") from None


def _pending(rule: Rule, item: Any, body: Any, where: str) -> Pending:
    device = rule.device_prefix + _text(rule.device_id, item, body, where)
    school = _text(rule.school_id, item, body, where)
    try:
        check_id(device, "device_id")
        check_id(school, "school_id")
    except ContractError as exc:
        raise MappingError(where, str(exc)) from None
    seq = event_id = None
    if rule.seq is not None:
        raw = rule.seq(item, body, where)
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= _SEQ_MAX:
            raise MappingError(where, f"seq {raw!r} is not a whole number >= 0")
        seq = raw
    else:
        assert rule.event_id is not None
        event_id = _text(rule.event_id, item, body, where)
        if not 0 < len(event_id) <= MAX_EVENT_ID:
            raise MappingError(where, f"event_id is empty or over {MAX_EVENT_ID} characters")
    data = {name: get(item, body, where) for name, get in rule.data.items()}
    return Pending(
        where, school, device, _text(rule.kind, item, body, where),
        _text(rule.type, item, body, where), _ts(rule, item, body, where), data, seq, event_id,
    )  # fmt: skip


def _validate(events: list[Pending]) -> None:
    """Each event through the uplink decoder, as the writer will see it: refused here (with the
    item's path) rather than quarantined, since the vendor can fix and resend."""
    now = datetime.now(UTC)
    for e in events:
        msg = _messages([e], {e.event_id or "": 0}, now)[0]
        try:
            decoded = decode_uplink(msg.topic, msg.payload)
        except UplinkError as exc:
            raise MappingError(e.where, str(exc)) from None
        if decoded.rejected:
            raise MappingError(e.where, decoded.rejected[0].reason)


_ASSIGNED: Final = """
SELECT event_id, seq FROM webhook_event_ids WHERE source = %s AND event_id = ANY(%s)
"""
_RESERVE: Final = """
INSERT INTO webhook_device_seq AS w (device_id, next_seq) VALUES (%s, %s)
ON CONFLICT (device_id) DO UPDATE SET next_seq = w.next_seq + EXCLUDED.next_seq
RETURNING next_seq
"""
_RECORD: Final = """
INSERT INTO webhook_event_ids (source, event_id, device_id, seq)
SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::bigint[])
ON CONFLICT (source, event_id) DO NOTHING
"""


def assign_seqs(
    conn: psycopg.Connection[Any], source: str, events: list[Pending]
) -> dict[str, int]:
    """event id → seq for ``events`` (all with an event id): those seen before keep theirs, new
    ones get the next seqs of their device; committed before this returns."""
    if not events:
        return {}
    ids = sorted({e.event_id or "" for e in events})
    with conn.transaction():
        seqs: dict[str, int] = dict(conn.execute(_ASSIGNED, (source, ids)).fetchall())
        new: dict[str, list[str]] = {}
        for e in events:
            eid = e.event_id or ""
            if eid not in seqs and eid not in new.get(e.device_id, []):
                new.setdefault(e.device_id, []).append(eid)
        rows: tuple[list[str], list[str], list[int]] = ([], [], [])
        for device in sorted(new):  # one order of row locks across servers
            wanted = new[device]
            row = conn.execute(_RESERVE, (device, len(wanted))).fetchone()
            assert row is not None
            first = int(row[0]) - len(wanted)
            for i, eid in enumerate(wanted):
                rows[0].append(eid)
                rows[1].append(device)
                rows[2].append(first + i)
        conn.execute(_RECORD, (source, *rows))
        # another server may have recorded one of them first: its seq is the one that counts
        return dict(conn.execute(_ASSIGNED, (source, ids)).fetchall())


# --- loading ------------------------------------------------------------------------------------


def _line_of(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=|^\s*\[+\s*[\w.]*{re.escape(key)}\b")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.search(line):
            return number
    return None


def _fail(path: Path, text: str, field: str, problem: str) -> MappingFileError:
    key = re.split(r"[.\[\]]", field.strip("$."))
    last = [k for k in key if k and not k.isdigit()]
    line = _line_of(text, last[-1]) if last else None
    where = f"{path}:{line}" if line else str(path)
    return MappingFileError(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


def _secret(path: Path, text: str, spec: SourceSpec) -> bytes:
    if (spec.secret_file is None) == (spec.secret_env is None):
        raise _fail(path, text, "source", "give exactly one of secret_file and secret_env")
    if spec.secret_file is not None:
        file = (path.parent / spec.secret_file).resolve()
        try:
            secret = file.read_bytes().strip()
        except OSError as exc:
            raise _fail(path, text, "source.secret_file", f"cannot read: {exc}") from None
    else:
        secret = os.environ.get(spec.secret_env or "", "").encode()
        if not secret:
            raise _fail(path, text, "source.secret_env", f"${spec.secret_env} is not set")
    if len(secret) < 16:
        raise _fail(path, text, "source", "the secret must be at least 16 bytes")
    return secret


def _offset(spec: str | None) -> timezone | None:
    if spec is None:
        return None
    sign = -1 if spec[0] == "-" else 1
    hours, minutes = int(spec[1:3]), int(spec[4:6])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _rule(spec: EventSpec) -> Rule:
    if (spec.seq is None) == (spec.event_id is None):
        raise ValueError("give exactly one of seq and event_id")
    when = None
    if spec.when is not None:
        when = (JsonPath.parse(spec.when.path), spec.when.equals)
    type_ = _getter("type", spec.type)
    if type_.path is None and registry.get(str(type_.literal)) is None:
        raise ValueError(f"type: {type_.literal!r} is not a registered event type")
    return Rule(
        each=JsonPath.parse(spec.each, star=True),
        when=when,
        device_id=_getter("device_id", spec.device_id),
        school_id=_getter("school_id", spec.school_id),
        kind=_getter("kind", spec.kind),
        type=type_,
        ts=_getter("ts", spec.ts),
        ts_format=spec.ts_format,
        tz=_offset(spec.timezone),
        device_prefix=spec.device_prefix,
        seq=None if spec.seq is None else _getter("seq", spec.seq),
        event_id=None if spec.event_id is None else _getter("event_id", spec.event_id),
        data={k: _getter(f"data.{k}", v) for k, v in spec.data.items()},
    )


def load_mapping(path: Path) -> Mapping:
    """Read and check one mapping file (:class:`MappingFileError` naming file, line, field)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MappingFileError(f"{path}: cannot read: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise MappingFileError(f"{path}: over {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode()
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise MappingFileError(f"{path}: not UTF-8: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MappingFileError(f"{path}: {exc}") from None  # tomllib names line and column
    try:
        spec = msgspec.convert(doc, MappingFile)
    except msgspec.ValidationError as exc:
        message = str(exc)
        field = message.rsplit("at `", 1)[1].rstrip("`") if "at `" in message else ""
        raise _fail(path, text, field, message.split(" - at `", maxsplit=1)[0]) from None
    rules = []
    for i, event in enumerate(spec.events):
        try:
            rules.append(_rule(event))
        except ValueError as exc:
            raise _fail(path, text, f"events[{i}]", str(exc)) from None
    s = spec.source
    return Mapping(
        s.name, path, s.auth, s.header, _secret(path, text, s), s.signature_prefix, tuple(rules)
    )


def load_mappings(paths: list[Path]) -> dict[str, Mapping]:
    """Every mapping of ``paths`` (files, or directories of ``*.toml``) by source name."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.toml")) if p.is_dir() else [p]
    out: dict[str, Mapping] = {}
    for f in files:
        m = load_mapping(f)
        if m.name in out:
            raise MappingFileError(
                f"{f}: source {m.name!r} is mapped already by {out[m.name].file}"
            )
        out[m.name] = m
    return out


__all__ = [
    "Mapped",
    "Mapping",
    "MappingError",
    "MappingFileError",
    "assign_seqs",
    "load_mapping",
    "load_mappings",
]
