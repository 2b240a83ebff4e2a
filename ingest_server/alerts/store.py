"""Alerts in PostgreSQL: every transition updates ``alerts`` and inserts its ``alert_events`` row
in one transaction (the notifier reads ``alert_events`` in id order), and the queries the API
and the engine share. Which schools a caller may see is one argument, ``schools``, applied in
:func:`scope` only (None: every school, as for an admin token)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

#: The columns an alert is shown with (API, live stream).
COLUMNS: Final = (
    "id, rule, severity, state, school_id, device_id, room, opened_at, last_seen_at,"
    " acknowledged_at, acknowledged_by, resolved_at, resolved_by, message, detail"
)
_COLUMNS: Final = sql.SQL(COLUMNS)
_RETURNING: Final = sql.SQL("RETURNING {}").format(_COLUMNS)
#: Longest message and detail stored (they are built from device data: bounded).
MAX_MESSAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class Transition:
    """A transition written: the alert as it now is, and what happened to it."""

    transition: str
    alert: dict[str, Any]


def scope(schools: Collection[str] | None) -> tuple[sql.Composable, list[Any]]:
    """The one school filter of every alert query (``TRUE`` when ``schools`` is None)."""
    if schools is None:
        return sql.SQL("TRUE"), []
    return sql.SQL("school_id = ANY(%s)"), [list(schools)]


def _ts(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def _event(
    conn: psycopg.Connection[Any], alert_id: int, transition: str, at: Any, by: str | None
) -> None:
    conn.execute(
        "INSERT INTO alert_events (alert_id, transition, at, by_whom) VALUES (%s, %s, %s, %s)",
        (alert_id, transition, at, by),
    )


def open_alert(
    conn: psycopg.Connection[Any],
    *,
    rule: str,
    severity: str,
    school_id: str,
    device_id: str,
    message: str,
    detail: dict[str, Any],
    at: float,
) -> Transition:
    """Open an alert; when one is open for the rule and device already, that one is touched
    and returned as transition ``touched`` (no event is written)."""
    with conn.transaction():
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL(
                    "INSERT INTO alerts (rule, severity, school_id, device_id, room, opened_at,"
                    " last_seen_at, message, detail)"
                    " SELECT %(rule)s, %(severity)s, %(school)s, %(device)s,"
                    " (SELECT room FROM devices WHERE device_id = %(device)s), %(at)s, %(at)s,"
                    " %(message)s, %(detail)s"
                    " ON CONFLICT (rule, device_id) WHERE state <> 'resolved'"
                    " DO UPDATE SET"
                    " last_seen_at = greatest(alerts.last_seen_at, EXCLUDED.last_seen_at)"
                    " {}, (xmax = 0) AS inserted"
                ).format(_RETURNING),
                {
                    "rule": rule,
                    "severity": severity,
                    "school": school_id,
                    "device": device_id,
                    "at": _ts(at),
                    "message": message[:MAX_MESSAGE],
                    "detail": Jsonb(detail),
                },
            )
            .fetchone()
        )
        assert row is not None
        inserted = row.pop("inserted")
        if inserted:
            _event(conn, row["id"], "opened", row["opened_at"], None)
    return Transition("opened" if inserted else "touched", row)


def reopen(
    conn: psycopg.Connection[Any], alert_id: int, *, message: str, detail: dict[str, Any], at: float
) -> Transition | None:
    """Reopen a resolved alert; None if it is not resolved, or another is open for its rule and
    device meanwhile (the caller opens then)."""
    try:
        with conn.transaction():
            row = (
                conn.cursor(row_factory=dict_row)
                .execute(
                    sql.SQL(
                        "UPDATE alerts SET state = 'open', resolved_at = NULL, resolved_by = NULL,"
                        " acknowledged_at = NULL, acknowledged_by = NULL, last_seen_at = %s,"
                        " message = %s, detail = %s WHERE id = %s AND state = 'resolved' {}"
                    ).format(_RETURNING),
                    (_ts(at), message[:MAX_MESSAGE], Jsonb(detail), alert_id),
                )
                .fetchone()
            )
            if row is not None:
                _event(conn, alert_id, "reopened", _ts(at), None)
    except psycopg.errors.UniqueViolation:
        return None
    return None if row is None else Transition("reopened", row)


def resolve(
    conn: psycopg.Connection[Any],
    alert_id: int,
    by: str,
    at: float | None = None,
    schools: Collection[str] | None = None,
) -> Transition | None:
    """Resolve an alert (``by``: 'auto' or a token's name); None if it is resolved already or
    not visible in ``schools``."""
    return _set_state(conn, alert_id, "resolved", by=by, at=at, schools=schools)


def acknowledge(
    conn: psycopg.Connection[Any], alert_id: int, by: str, schools: Collection[str] | None = None
) -> Transition | None:
    """Acknowledge an open alert; None if it is not open (or not visible in ``schools``)."""
    return _set_state(conn, alert_id, "acknowledged", by=by, at=None, schools=schools)


def _set_state(
    conn: psycopg.Connection[Any],
    alert_id: int,
    state: str,
    *,
    by: str,
    at: float | None,
    schools: Collection[str] | None,
) -> Transition | None:
    cond, params = scope(schools)
    when = _ts(at) if at is not None else datetime.now(UTC)
    if state == "resolved":
        change = sql.SQL("state = 'resolved', resolved_at = %s, resolved_by = %s")
        allowed = sql.SQL("state <> 'resolved'")
    else:
        change = sql.SQL("state = 'acknowledged', acknowledged_at = %s, acknowledged_by = %s")
        allowed = sql.SQL("state = 'open'")
    with conn.transaction():
        row = (
            conn.cursor(row_factory=dict_row)
            .execute(
                sql.SQL("UPDATE alerts SET {} WHERE id = %s AND {} AND {} {}").format(
                    change, allowed, cond, _RETURNING
                ),
                [when, by, alert_id, *params],
            )
            .fetchone()
        )
        if row is not None:
            _event(conn, alert_id, state, when, by)
    return None if row is None else Transition(state, row)


def touch(conn: psycopg.Connection[Any], seen: dict[int, float]) -> None:
    """Record when each alert's condition was last seen true (alert id → Unix time)."""
    if seen:
        conn.execute(
            "UPDATE alerts AS a SET last_seen_at = greatest(a.last_seen_at, s.at)"
            " FROM unnest(%s::bigint[], %s::timestamptz[]) AS s (id, at)"
            " WHERE a.id = s.id AND a.state <> 'resolved'",
            ([*seen], [_ts(v) for v in seen.values()]),
        )


def not_resolved(
    conn: psycopg.Connection[Any], limit: int
) -> list[tuple[int, str, str, str, datetime]]:
    """Alerts open or acknowledged (on the partial unique index): id, rule, school, device,
    last_seen_at."""
    return conn.execute(
        "SELECT id, rule, school_id, device_id, last_seen_at FROM alerts"
        " WHERE state <> 'resolved' ORDER BY id LIMIT %s",
        (limit,),
    ).fetchall()


def get(
    conn: psycopg.Connection[Any], alert_id: int, schools: Collection[str] | None = None
) -> dict[str, Any] | None:
    """One alert with its transitions (oldest first)."""
    cond, params = scope(schools)
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(
        sql.SQL("SELECT {} FROM alerts WHERE id = %s AND {}").format(_COLUMNS, cond),
        [alert_id, *params],
    ).fetchone()
    if row is None:
        return None
    row["events"] = cur.execute(
        "SELECT id, transition, at, by_whom FROM alert_events WHERE alert_id = %s"
        " ORDER BY id LIMIT 1000",
        (alert_id,),
    ).fetchall()
    return row


def listing(
    conn: psycopg.Connection[Any],
    *,
    schools: Collection[str] | None,
    state: str | None,
    school: str | None,
    rule: str | None,
    device: str | None,
    before: int | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Alerts newest first (keyset on id), ``limit`` of them."""
    cond, params = scope(schools)
    parts: list[sql.Composable] = [cond]
    wanted = (("state", state), ("school_id", school), ("rule", rule), ("device_id", device))
    for column, value in wanted:
        if value is not None:
            parts.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if before is not None:
        parts.append(sql.SQL("id < %s"))
        params.append(before)
    query = sql.SQL("SELECT {} FROM alerts WHERE {} ORDER BY id DESC LIMIT %s").format(
        _COLUMNS, sql.SQL(" AND ").join(parts)
    )
    return conn.cursor(row_factory=dict_row).execute(query, [*params, limit]).fetchall()


def open_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Alerts not resolved, per rule (the partial unique index holds exactly these)."""
    rows = conn.execute(
        "SELECT rule, count(*) FROM alerts WHERE state <> 'resolved' GROUP BY rule"
    ).fetchall()
    return {str(r): int(n) for r, n in rows}


def states_of(conn: psycopg.Connection[Any], ids: list[int]) -> dict[int, str]:
    """The state of each of ``ids`` (by primary key)."""
    if not ids:
        return {}
    rows = conn.execute("SELECT id, state FROM alerts WHERE id = ANY(%s)", (ids,)).fetchall()
    return {int(i): str(s) for i, s in rows}


def silent_devices(
    conn: psycopg.Connection[Any], silent_s: float, lookback_s: float, limit: int
) -> list[tuple[str, str, datetime, datetime | None, str | None]]:
    """Devices whose last event is older than ``silent_s`` but within ``lookback_s`` (on the
    ``devices (last_seen)`` index of migration 0052): device, school, last_seen, state_at, state."""
    return conn.execute(
        "SELECT device_id, school_id, last_seen, state_at, state FROM devices"
        " WHERE last_seen < now() - make_interval(secs => %s)"
        " AND last_seen >= now() - make_interval(secs => %s)"
        " ORDER BY last_seen DESC, device_id LIMIT %s",
        (silent_s, lookback_s, limit),
    ).fetchall()
