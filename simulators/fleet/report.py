"""The accounting report: what the fleet generated against what the database holds."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg


@dataclass(frozen=True, slots=True)
class Report:
    scenario: str
    devices: int
    wall_s: float
    #: Events the simulated devices made (stored in their outbox or not).
    generated: int
    #: Events that got a seq in an outbox.
    outboxed: int
    #: Events whose batch the broker acknowledged (left the outbox).
    acknowledged: int
    #: Distinct (device_id, seq) in ``events`` for this fleet, within 1..outboxed per device.
    stored: int
    #: Rows stored more than once for one (device_id, seq): must be 0.
    duplicates_stored: int
    #: Resends the ingest server dropped as duplicates (its metric), when it is ours to read.
    duplicates_dropped: int | None
    #: Seqs missing between the lowest and highest stored, summed over devices.
    gaps: int
    #: generated - stored - dropped: made, neither in the database nor reported dropped.
    lost: int
    #: Stored seqs no device assigned.
    unexpected: int
    quarantined: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    #: Events sent again as paced backlog (``replay: true``) after an outage.
    replayed: int = 0
    #: Events an outbox dropped on purpose (quota, sustained full disk), each reported.
    dropped: int = 0
    #: Times an outbox refused a write (disk full); the readings stayed pending.
    store_errors: int = 0
    #: Publishers that died on an error and were started again (an agent restart).
    publisher_crashes: int = 0
    faults: Sequence[Mapping[str, Any]] = field(default_factory=list)
    lost_by_device: Mapping[str, int] = field(default_factory=dict)
    #: Devices online at the end (district runs).
    connected: int | None = None
    #: Seconds from the first worker's start until every device was online (district runs).
    connect_s: float | None = None
    #: The longest fault recovery: service back → every event made by then stored.
    recovery_s: float | None = None
    #: Event → stored percentiles of the events made outside every fault's window (fault → its
    #: recovery): the steady morning, which the p99 target is about (district runs).
    latency_steady_p50_s: float | None = None
    latency_steady_p99_s: float | None = None
    #: Per minute of event time: ``{"minute": "HH:MM", "events": n, "p99_s": x}``.
    latency_by_minute: Sequence[Mapping[str, Any]] = field(default_factory=list)
    #: CPU seconds per component over the day (district runs), and per stored event.
    cpu_s: Mapping[str, float] = field(default_factory=dict)
    cpu_ms_per_event: Mapping[str, float] = field(default_factory=dict)
    layout: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates_stored == 0 and self.unexpected == 0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, default=str)

    def table(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"

        rate = self.stored / self.wall_s if self.wall_s else 0.0
        rows = [
            ("scenario", self.scenario),
            ("devices", f"{self.devices}"),
            ("wall time", f"{self.wall_s:.1f} s ({rate:.0f} events/s stored)"),
            ("generated", f"{self.generated}"),
            ("outboxed", f"{self.outboxed}"),
            ("acknowledged", f"{self.acknowledged}"),
            ("stored", f"{self.stored}"),
            ("duplicates stored", f"{self.duplicates_stored}"),
            (
                "duplicates dropped",
                "-" if self.duplicates_dropped is None else f"{self.duplicates_dropped}",
            ),
            ("gaps", f"{self.gaps}"),
            ("dropped (reported)", f"{self.dropped}"),
            ("lost", f"{self.lost}"),
            ("unexpected", f"{self.unexpected}"),
            ("quarantined", f"{self.quarantined}"),
            ("replayed", f"{self.replayed}"),
            ("outbox write errors", f"{self.store_errors}"),
            ("publisher crashes", f"{self.publisher_crashes}"),
            ("latency p50", ms(self.latency_p50_s)),
            ("latency p95", ms(self.latency_p95_s)),
            ("latency p99", ms(self.latency_p99_s)),
        ]
        if self.latency_steady_p99_s is not None:
            rows.append(
                (
                    "latency outside faults",
                    f"p50 {ms(self.latency_steady_p50_s)}, p99 {ms(self.latency_steady_p99_s)}",
                )
            )
        if self.latency_by_minute:
            worst = max(self.latency_by_minute, key=lambda m: m["p99_s"])
            rows.append(
                ("worst minute p99", f"{ms(worst['p99_s'])} at {worst['minute']} (event time)")
            )
        if self.connect_s is not None:
            rows.append(("connected", f"{self.connected} in {self.connect_s:.1f} s"))
        for k, v in self.cpu_s.items():
            per = self.cpu_ms_per_event.get(k, 0.0)
            rows.append((f"cpu {k}", f"{v:.1f} s ({per * 1000:.0f} us/event)"))
        for f in self.faults:
            extra = ""
            if "reconnect_s" in f:
                extra = f"every device back in {f['reconnect_s']} s; "
            if "recovered_s" in f:
                extra += f"backlog stored {f['recovered_s']} s after the service was back"
            if f.get("latency_p99_s") is not None:
                extra += f"; p99 of its window {ms(f['latency_p99_s'])}"
            rows.append(
                (
                    "fault",
                    f"{f['at']} {f['action']} {f['target']} {f.get('detail', '')}{extra}",
                )
            )
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines.append(f"{'verdict':<{width}}  {'OK' if self.ok else 'FAIL: events lost or doubled'}")
        return "\n".join(lines)


def stored_by_device(db_url: str, outboxed: Mapping[str, int]) -> dict[str, tuple[int, int, int]]:
    """device → (distinct seqs in 1..outboxed, rows beyond distinct, seqs outside 1..outboxed)."""
    ids = list(outboxed)
    tops = [outboxed[d] for d in ids]
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        rows = conn.execute(
            """
            SELECT e.device_id,
                   count(DISTINCT e.seq) FILTER (WHERE e.seq BETWEEN 1 AND t.top),
                   count(*) - count(DISTINCT e.seq),
                   count(*) FILTER (WHERE e.seq < 1 OR e.seq > t.top)
            FROM events e JOIN unnest(%s::text[], %s::bigint[]) AS t(device_id, top)
                 USING (device_id)
            GROUP BY e.device_id
            """,
            (ids, tops),
        ).fetchall()
    return {str(d): (int(a), int(b), int(c)) for d, a, b, c in rows}


def gaps_and_latency(
    db_url: str, device_ids: Sequence[str], latency_ids: Sequence[str]
) -> tuple[int, list[float | None], int]:
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(missing), 0) FROM devices WHERE device_id = ANY(%s)",
            (list(device_ids),),
        ).fetchone()
        gaps = int(row[0]) if row else 0
        lat = conn.execute(
            """
            SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                   (ORDER BY extract(epoch FROM received_at - time))
            FROM events WHERE device_id = ANY(%s)
            """,
            (list(latency_ids),),
        ).fetchone()
        pct = [None if v is None else float(v) for v in (lat[0] or [None] * 3)] if lat else []
        q = conn.execute("SELECT count(*) FROM quarantine").fetchone()
    return gaps, (pct or [None, None, None]), int(q[0]) if q else 0


_STEADY_LATENCY = """
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
       (ORDER BY extract(epoch FROM e.received_at - e.time))
FROM events e
WHERE e.device_id = ANY(%(ids)s)
  AND NOT EXISTS (SELECT FROM unnest(%(a)s::timestamptz[], %(b)s::timestamptz[]) AS w(a, b)
                  WHERE e.time BETWEEN w.a AND w.b)
"""
_WINDOW_P99 = """
SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM e.received_at - e.time))
FROM events e WHERE e.device_id = ANY(%s) AND e.time BETWEEN %s AND %s
"""
_MINUTE_P99 = """
SELECT date_bin(%s, e.time, %s), count(*),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM e.received_at - e.time))
FROM events e WHERE e.device_id = ANY(%s) GROUP BY 1 ORDER BY 1
"""


def window_latency(
    db_url: str,
    device_ids: Sequence[str],
    windows: Sequence[tuple[datetime, datetime]],
    label: Callable[[datetime], str] = lambda t: t.strftime("%H:%M"),
    minute: tuple[timedelta, datetime] = (timedelta(minutes=1), datetime(2000, 1, 1, tzinfo=UTC)),
) -> tuple[list[float | None], list[float | None], list[dict[str, Any]]]:
    """Latency split by fault windows: (p50, p99) of events made outside every window, the p99
    of each window's events, and p99 per minute of event time."""
    starts = [a for a, _ in windows]
    ends = [b for _, b in windows]
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        args = {"ids": list(device_ids), "a": starts, "b": ends}
        row = conn.execute(_STEADY_LATENCY, args).fetchone()
        steady = [None if v is None else float(v) for v in (row[0] if row and row[0] else [])]
        per_window: list[float | None] = []
        for a, b in windows:
            w = conn.execute(_WINDOW_P99, (list(device_ids), a, b)).fetchone()
            per_window.append(None if not w or w[0] is None else float(w[0]))
        minutes = conn.execute(_MINUTE_P99, (*minute, list(device_ids))).fetchall()
    by_minute = [
        {"minute": label(m), "events": int(n), "p99_s": round(float(p), 3)}
        for m, n, p in minutes
        if p is not None
    ]
    return (steady or [None, None]), per_window, by_minute


def count_stored(db_url: str, device_ids: Sequence[str]) -> int:
    """Distinct events stored for these devices (the progress figure; cheap enough each second)."""
    with psycopg.connect(db_url, connect_timeout=2) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(event_count), 0) FROM devices WHERE device_id = ANY(%s)",
            (list(device_ids),),
        ).fetchone()
    return int(row[0]) if row else 0


def existing_devices(db_url: str, device_ids: Sequence[str]) -> list[str]:
    with psycopg.connect(db_url, connect_timeout=10) as conn:
        try:
            rows = conn.execute(
                "SELECT DISTINCT device_id FROM events WHERE device_id = ANY(%s) LIMIT 5",
                (list(device_ids),),
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [str(r[0]) for r in rows]
