"""Enrolment: single-use codes for a school, exchanged by a device for its MQTT credentials.

    code, expires = create_code(conn, school_id="s01", room="101", ttl_s=86400)
    result = enrol(conn, EnrolRequest(code=..., kind="card_reader", ...), offer)

A code is 16 characters of an alphabet without look-alikes (no 0/O, 1/I/L, U), about 79 random
bits, shown as ``XXXX-XXXX-XXXX-XXXX``; case, dashes and spaces do not matter when typed. Only
its SHA-256 is stored. Failures are :class:`EnrolmentError` with the HTTP status they map to.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import msgspec
import psycopg
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from ingest_server.control.broker_auth import hash_password
from ingest_server.control.targets import TargetError, check_tags
from schemas.events import DeviceKind
from schemas.topics import ID_PATTERN, ID_RE

ALPHABET: Final = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LEN: Final = 16
DEFAULT_TTL_S: Final = 24 * 3600
MAX_TTL_S: Final = 30 * 24 * 3600
KINDS: Final = frozenset(k.value for k in DeviceKind)
_SHORT: Final = {
    "smart_board": "sb",
    "class_signage": "cs",
    "card_reader": "cr",
    "recording_unit": "ru",
    "env_sensor": "es",
    "access_gate": "ag",
    "library_terminal": "lt",
    "gateway": "gw",
}
_ID_ALPHABET: Final = "23456789abcdefghjkmnpqrstvwxyz"


class EnrolmentError(Exception):
    """An enrolment step failed; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def new_code() -> str:
    raw = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LEN))
    return "-".join(raw[i : i + 4] for i in range(0, CODE_LEN, 4))


def normalise_code(code: str) -> str:
    return re.sub(r"[\s-]", "", code).upper()


def code_digest(code: str) -> bytes:
    return hashlib.sha256(normalise_code(code).encode()).digest()


def parse_ttl(text: str) -> int:
    """``90``, ``30m``, ``24h``, ``7d`` → seconds, within (0, 30 d]."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"TTL must be a number with an optional unit s, m, h or d, got {text!r}")
    seconds = int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    if not 0 < seconds <= MAX_TTL_S:
        raise ValueError(f"TTL must be more than 0 and at most 30 days, got {text!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class CodeInfo:
    id: int
    school_id: str
    room: str | None
    kind: str | None
    replaces: str | None
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    device_id: str | None
    tags: list[str]


def create_code(
    conn: psycopg.Connection[Any],
    school_id: str,
    *,
    room: str | None = None,
    kind: str | None = None,
    replaces: str | None = None,
    ttl_s: int = DEFAULT_TTL_S,
    tags: list[str] | None = None,
) -> tuple[str, datetime]:
    """Store a new code's digest; return the code (the only time it is seen) and its expiry.
    The device enrolled with it gets ``tags`` (a replacement: those, else its own)."""
    if not ID_RE.match(school_id):
        raise EnrolmentError(400, f"school_id {school_id!r} must match {ID_PATTERN}")
    if kind is not None and kind not in KINDS:
        raise EnrolmentError(400, f"kind {kind!r} is not one of {', '.join(sorted(KINDS))}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise EnrolmentError(400, f"ttl_s must be more than 0 and at most {MAX_TTL_S}")
    try:
        tags = check_tags(tags or [])
    except TargetError as exc:
        raise EnrolmentError(400, str(exc)) from None
    if replaces is not None:
        row = conn.execute(
            "SELECT school_id, kind FROM devices WHERE device_id = %s", (replaces,)
        ).fetchone()
        if row is None:
            raise EnrolmentError(400, f"replaces: no device {replaces!r} is registered")
        if row[0] != school_id:
            raise EnrolmentError(
                400,
                f"replaces: device {replaces!r} belongs to school {row[0]!r}, not {school_id!r}",
            )
        kind = kind or row[1]
    code = new_code()
    row = conn.execute(
        "INSERT INTO enrolment_codes (code_sha256, school_id, room, kind, replaces, tags,"
        " expires_at) VALUES (%s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))"
        " RETURNING expires_at",
        (code_digest(code), school_id, room, kind, replaces, tags, ttl_s),
    ).fetchone()
    assert row is not None
    return code, row[0]


def list_codes(
    conn: psycopg.Connection[Any], schools: frozenset[str] | None = None
) -> list[CodeInfo]:
    """Every code's record (never the code), or only those of ``schools``."""
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        "SELECT id, school_id, room, kind, replaces, created_at, expires_at, used_at, device_id,"
        " tags FROM enrolment_codes WHERE %s::text[] IS NULL OR school_id = ANY(%s::text[])"
        " ORDER BY id",
        (None if schools is None else sorted(schools),) * 2,
    ).fetchall()
    return [CodeInfo(*r) for r in rows]


class EnrolRequest(msgspec.Struct, forbid_unknown_fields=False):
    """What a device sends to ``POST /api/v1/enrol``."""

    code: str
    kind: str
    hardware_ids: dict[str, str]
    agent_version: str
    room: str | None = None

    def check(self) -> None:
        if not 4 <= len(self.code) <= 64:
            raise EnrolmentError(400, "code: expected the enrolment code, e.g. ABCD-EFGH-JKMN-PQRS")
        if self.kind not in KINDS:
            known = ", ".join(sorted(KINDS))
            raise EnrolmentError(400, f"kind: {self.kind!r} is not one of {known}")
        if len(self.hardware_ids) > 16 or any(
            not 0 < len(k) <= 64 or len(v) > 256 for k, v in self.hardware_ids.items()
        ):
            raise EnrolmentError(
                400, "hardware_ids: at most 16 entries, names 1-64 and values up to 256 characters"
            )
        if len(self.agent_version) > 64 or (self.room is not None and len(self.room) > 64):
            raise EnrolmentError(400, "agent_version and room may have at most 64 characters")


def decode_request(body: bytes) -> EnrolRequest:
    try:
        req = msgspec.json.decode(body, type=EnrolRequest)
    except msgspec.ValidationError as exc:
        raise EnrolmentError(400, f"the request body is not valid: {exc}") from None
    except msgspec.DecodeError:
        raise EnrolmentError(400, "the request body must be a JSON object") from None
    req.check()
    return req


@dataclass(frozen=True, slots=True)
class Offer:
    """What this server hands an enrolled device besides its credentials."""

    mqtt_url: str
    hash_key_hex: str
    ca_cert_pem: str | None = None


class EnrolResult(msgspec.Struct):
    device_id: str
    school_id: str
    mqtt_url: str
    mqtt_username: str
    mqtt_password: str
    ca_cert_pem: str | None
    hash_key_hex: str
    seq_floor: int
    config: dict[str, Any] | None = None


def _new_device_id(conn: psycopg.Connection[Any], school_id: str, kind: str) -> str:
    for _ in range(8):
        suffix = "".join(secrets.choice(_ID_ALPHABET) for _ in range(6))
        device_id = f"{school_id[: 64 - 4 - len(suffix)]}-{_SHORT[kind]}-{suffix}"
        taken = conn.execute("SELECT 1 FROM devices WHERE device_id = %s", (device_id,)).fetchone()
        if taken is None:
            return device_id
    raise EnrolmentError(503, "could not find a free device_id; try again")


def enrol(conn: psycopg.Connection[Any], req: EnrolRequest, offer: Offer) -> EnrolResult:
    """Spend the code: register (or re-credential) the device in one transaction."""
    with conn.transaction():
        row = conn.execute(
            "SELECT id, school_id, room, kind, replaces, used_at IS NOT NULL,"
            " expires_at <= now(), tags FROM enrolment_codes WHERE code_sha256 = %s FOR UPDATE",
            (code_digest(req.code),),
        ).fetchone()
        if row is None:
            raise EnrolmentError(404, "this enrolment code is not known: check it for typos")
        code_id, school_id, room, kind, replaces, used, expired, tags = row
        if used:
            raise EnrolmentError(410, "this enrolment code was used already: ask for a new one")
        if expired:
            raise EnrolmentError(410, "this enrolment code has expired: ask for a new one")
        if kind is not None and kind != req.kind:
            raise EnrolmentError(400, f"this code is for a {kind}, not a {req.kind}")
        room = room if room is not None else req.room
        seq_floor = 0
        if replaces is not None:
            device_id = replaces
            max_seq = conn.execute(
                "SELECT max_seq FROM devices WHERE device_id = %s FOR UPDATE", (device_id,)
            ).fetchone()
            seq_floor = int(max_seq[0] or 0) if max_seq else 0
            conn.execute(
                "UPDATE device_credentials SET revoked_at = now()"
                " WHERE device_id = %s AND revoked_at IS NULL",
                (device_id,),
            )
        else:
            device_id = _new_device_id(conn, school_id, req.kind)
        conn.execute(
            "INSERT INTO devices (device_id, school_id, kind, room, tags)"
            " VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (device_id) DO UPDATE SET kind = EXCLUDED.kind,"
            " room = coalesce(EXCLUDED.room, devices.room),"
            " tags = CASE WHEN cardinality(EXCLUDED.tags) > 0 THEN EXCLUDED.tags"
            " ELSE devices.tags END",
            (device_id, school_id, req.kind, room, list(tags)),
        )
        password = secrets.token_urlsafe(24)
        conn.execute(
            "INSERT INTO device_credentials (device_id, school_id, password_hash, code_id,"
            " hardware_ids, agent_version) VALUES (%s, %s, %s, %s, %s, %s)",
            (
                device_id,
                school_id,
                hash_password(password),
                code_id,
                Jsonb(req.hardware_ids),
                req.agent_version,
            ),
        )
        conn.execute(
            "UPDATE enrolment_codes SET used_at = now(), device_id = %s WHERE id = %s",
            (device_id, code_id),
        )
    return EnrolResult(
        device_id=device_id,
        school_id=school_id,
        mqtt_url=offer.mqtt_url,
        mqtt_username=device_id,
        mqtt_password=password,
        ca_cert_pem=offer.ca_cert_pem,
        hash_key_hex=offer.hash_key_hex,
        seq_floor=seq_floor,
    )


class FailureLimiter:
    """Counts failed code attempts per client address in a sliding window; memory is bounded
    (the least recently failing addresses are forgotten first)."""

    def __init__(self, limit: int = 10, window_s: float = 600.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._fails: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(client, []) if now - t < self.window_s]
        if times:
            self._fails[client] = times
        else:
            self._fails.pop(client, None)
        return times

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None if it may now."""
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            if len(times) < self.limit:
                return None
            return max(1.0, self.window_s - (now - times[-self.limit]))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._recent(client, now)
            times.append(now)
            self._fails[client] = times[-self.limit :]
            self._fails.move_to_end(client)
            while len(self._fails) > self.max_clients:
                self._fails.popitem(last=False)

    def __len__(self) -> int:
        return len(self._fails)
