"""Staged fleet rollouts: a config or a command to a target's devices, batch by batch.

A rollout's devices are fixed when it is created (the target resolved once, in device_id
order, at most :data:`~ingest_server.control.targets.MAX_TARGET_DEVICES`). The
:class:`RolloutRunner` (one thread; only the server holding :data:`RUNNER_LOCK_KEY` acts) issues
the canary batch first, then ``batch_size`` at a time, each after the previous batch settled and
``pause_s`` passed. Issuing is writing what an admin would: a ``device_config`` version or a
``commands`` row; the control plane publishes it and records the ack, which the runner reads
back from those tables. No new MQTT path.

Per device the outcome is ``pending`` (not issued yet, or issued while the device is offline),
``sent`` (published while the device was online, no answer yet; it stays ``sent`` if the
device then goes offline, as an ``update_agent`` restarting it does), ``ok``, ``failed``
(rejected, rolled back, an error, or no answer within ``device_timeout_s``) or ``skipped``
(aborted before it was issued, or its config superseded by a newer one).

A batch is settled when each of its devices is settled or offline without having got it: such
a device does not hold the rollout up, and gets its config (retained) or command (queued in its
persistent session; re-issued if it expired) when it comes back. A device that went offline
after getting it does hold the batch (until it answers or times out), so a canary whose update
restarts it is judged before the next batch goes out. When ``failed / (ok + failed)`` exceeds
``max_failure_share`` the rollout halts: nothing more is issued (the rest stays ``pending``;
resume continues, abort skips them). It is ``done`` when no device is left pending or sent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import psycopg
from psycopg.types.json import Jsonb

from ingest_server.control.plane import desire_config
from ingest_server.logbound import short
from ingest_server.settings import mask
from ingest_server.storage.db import connect_session

log = logging.getLogger(__name__)

#: Advisory lock held by the one server (per database) that runs rollouts; "campus\0\x31".
RUNNER_LOCK_KEY: Final = 0x6361_6D70_7573_0031
#: Largest batch (and canary); one batch is issued in one transaction.
MAX_BATCH: Final = 1000
#: Longest a rollout's command lives on the broker and in ``commands`` (the API's bound too).
MAX_COMMAND_TTL_S: Final = 7 * 24 * 3600
#: Times a rollout's command is issued to a device whose copy expired unanswered (offline).
MAX_COMMAND_ATTEMPTS: Final = 3
#: Device rows looked at per statement in one tick, and rollouts stepped per tick.
TICK_ROWS: Final = 5000
TICK_ROLLOUTS: Final = 100

State = Literal["running", "paused", "halted", "done", "aborted"]
Outcome = Literal["pending", "sent", "ok", "failed", "skipped"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("pending", "sent", "ok", "failed", "skipped")


@dataclass(frozen=True, slots=True)
class Strategy:
    canary: int = 1
    batch_size: int = 10
    pause_s: float = 0.0
    max_failure_share: float = 0.2
    device_timeout_s: int = 600


def canary_count(total: int, canary: int | None, canary_share: float | None) -> int:
    """The canary batch's size from a count or a share of ``total`` (at least 1 for a share)."""
    if canary_share is not None:
        return min(total, max(1, math.ceil(canary_share * total)))
    return min(total, canary if canary is not None else 1)


# -- the batch state machine (pure) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """One rollout's devices as counted now."""

    unissued: int
    ok: int
    failed: int
    #: Issued, not settled, the device online or offline since it got it (the batch in flight).
    open_online: int
    #: Issued, not settled, the device offline without having got it: waits, holds nothing up.
    open_offline: int
    batches: int
    settled_at: datetime | None


@dataclass(frozen=True, slots=True)
class Issue:
    count: int


@dataclass(frozen=True, slots=True)
class Halt:
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    why: str


@dataclass(frozen=True, slots=True)
class MarkSettled:
    """The newest batch has just settled: the pause starts now."""


@dataclass(frozen=True, slots=True)
class Done:
    pass


Action = Issue | Halt | Wait | MarkSettled | Done


def decide(s: Strategy, p: Progress, now: datetime) -> Action:
    """What a running rollout does next."""
    settled = p.ok + p.failed
    if settled and p.failed / settled > s.max_failure_share:
        return Halt(
            f"{p.failed} of {settled} settled devices failed "
            f"({p.failed / settled:.0%} > {s.max_failure_share:.0%})"
        )
    if p.open_online:
        return Wait(f"batch {p.batches}: {p.open_online} device(s) yet to answer")
    if not p.unissued:
        if p.open_offline:
            return Wait(f"{p.open_offline} offline device(s) get it when they come back")
        return Done()
    if p.batches:
        if p.settled_at is None:
            return MarkSettled()
        if now < p.settled_at + timedelta(seconds=s.pause_s):
            return Wait(f"pause after batch {p.batches}")
    size = s.canary if p.batches == 0 and s.canary > 0 else s.batch_size
    return Issue(min(size, p.unissued, MAX_BATCH))


# -- creating ------------------------------------------------------------------------------


def create_rollout(
    conn: psycopg.Connection[Any],
    *,
    target: dict[str, Any],
    devices: list[tuple[str, str]],
    strategy: Strategy,
    config: dict[str, Any] | None = None,
    command: tuple[str, dict[str, Any], int] | None = None,
    created_by: str | None = None,
) -> int:
    """Store a running rollout over ``devices`` (already resolved, in issue order); its id."""
    if (config is None) == (command is None):
        raise ValueError("a rollout carries either a config or a command")
    name, args, ttl = command if command is not None else (None, None, None)
    s = strategy
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO rollouts (what, target, config, command_name, command_args,"
            " command_ttl_s, canary, batch_size, pause_s, max_failure_share, device_timeout_s,"
            " total, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " RETURNING id",
            (
                "config" if config is not None else "command",
                Jsonb(target),
                None if config is None else Jsonb(config),
                name,
                None if args is None else Jsonb(args),
                ttl,
                s.canary,
                s.batch_size,
                s.pause_s,
                s.max_failure_share,
                s.device_timeout_s,
                len(devices),
                created_by,
            ),
        ).fetchone()
        assert row is not None
        rollout_id = int(row[0])
        conn.execute(
            "INSERT INTO rollout_devices (rollout_id, device_id, school_id, position)"
            " SELECT %s, u.d, u.s, u.n - 1"
            " FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS u(d, s, n)",
            (rollout_id, [d for d, _ in devices], [sc for _, sc in devices]),
        )
    return rollout_id


class TransitionError(ValueError):
    """A state change the rollout's state does not allow; ``status`` for HTTP."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


#: Operator actions: the states each may start from, and the state it leads to.
TRANSITIONS: Final[dict[str, tuple[frozenset[str], State]]] = {
    "pause": (frozenset({"running"}), "paused"),
    "resume": (frozenset({"paused", "halted"}), "running"),
    "abort": (frozenset({"running", "paused", "halted"}), "aborted"),
}


def transition(conn: psycopg.Connection[Any], rollout_id: int, action: str, who: str) -> State:
    """Apply ``pause``, ``resume`` or ``abort``; the new state. Abort skips every device not
    issued yet and withdraws its commands not yet published."""
    allowed, new = TRANSITIONS[action]
    with conn.transaction():
        row = conn.execute(
            "SELECT state FROM rollouts WHERE id = %s FOR UPDATE", (rollout_id,)
        ).fetchone()
        if row is None:
            raise TransitionError(f"no rollout {rollout_id}", 404)
        if row[0] not in allowed:
            raise TransitionError(
                f"rollout {rollout_id} is {row[0]}; "
                f"{action} needs it {' or '.join(sorted(allowed))}"
            )
        conn.execute(
            "UPDATE rollouts SET state = %s, reason = %s, updated_at = now(),"
            " finished_at = CASE WHEN %s = 'aborted' THEN now() END WHERE id = %s",
            (new, f"{action} by {who}", new, rollout_id),
        )
        if new == "aborted":
            conn.execute(
                "UPDATE rollout_devices SET outcome = 'skipped', settled_at = now(),"
                " detail = 'aborted before it was issued'"
                " WHERE rollout_id = %s AND batch IS NULL AND outcome = 'pending'",
                (rollout_id,),
            )
            # a command still waiting to be published is withdrawn; one on its way is not
            conn.execute(
                "UPDATE commands c SET status = 'expired',"
                ' detail = \'{"rollout": "aborted before it was published"}\''
                " FROM rollout_devices rd WHERE rd.rollout_id = %s AND c.id = rd.command_id"
                " AND c.status = 'pending'",
                (rollout_id,),
            )
    return new


# -- the runner ----------------------------------------------------------------------------

#: Settle issued devices from their config's ack (or a newer version that superseded it).
_SETTLE_CONFIG: Final = """
UPDATE rollout_devices rd SET
    outcome = CASE WHEN dc.version > rd.config_version THEN 'skipped'
                   WHEN dc.status = 'applied' THEN 'ok' ELSE 'failed' END,
    detail = CASE WHEN dc.version > rd.config_version
                  THEN 'superseded by config version ' || dc.version
                  WHEN dc.status = 'applied' THEN NULL
                  ELSE dc.status || coalesce(': ' || dc.detail, '') END,
    settled_at = now()
FROM device_config dc
WHERE dc.device_id = rd.device_id
  AND (rd.rollout_id, rd.device_id) IN (
    SELECT r.rollout_id, r.device_id FROM rollout_devices r
    JOIN device_config d ON d.device_id = r.device_id
    WHERE r.batch IS NOT NULL AND r.outcome IN ('pending', 'sent') AND r.config_version IS NOT NULL
      AND (d.version > r.config_version
           OR (d.version = r.config_version AND d.acked_at IS NOT NULL AND d.status <> 'pending'))
    LIMIT %(limit)s)
"""
#: Settle issued devices from their command's answer (expired ones are handled apart).
_SETTLE_COMMAND: Final = """
UPDATE rollout_devices rd SET
    outcome = CASE WHEN c.status = 'ok' THEN 'ok' ELSE 'failed' END,
    detail = CASE WHEN c.status = 'ok' THEN c.detail::text
                  ELSE c.status || coalesce(': ' || c.detail::text, '') END,
    settled_at = now()
FROM commands c
WHERE c.id = rd.command_id
  AND (rd.rollout_id, rd.device_id) IN (
    SELECT r.rollout_id, r.device_id FROM rollout_devices r
    JOIN commands k ON k.id = r.command_id
    WHERE r.batch IS NOT NULL AND r.outcome IN ('pending', 'sent')
      AND k.status IN ('ok', 'error', 'rejected')
    LIMIT %(limit)s)
"""
#: Issued devices whose command expired unanswered: re-issued, or failed after the last try.
_EXPIRED: Final = """
SELECT r.rollout_id, r.device_id, r.school_id, r.attempts, ro.command_name, ro.command_args,
       ro.command_ttl_s, ro.state
FROM rollout_devices r
JOIN commands k ON k.id = r.command_id
JOIN rollouts ro ON ro.id = r.rollout_id
WHERE r.batch IS NOT NULL AND r.outcome IN ('pending', 'sent') AND k.status = 'expired'
LIMIT %(limit)s
"""
#: ``sent`` while published to an online device, and kept ``sent`` when the device goes offline
#: after that (it got it: an ``update_agent`` restarts the agent, a bad one may never come back);
#: ``pending`` while it is offline and has not had it (or it is unpublished).
_PRESENCE: Final = """
WITH cur AS (
    SELECT r.rollout_id, r.device_id, r.outcome, r.detail,
           CASE WHEN (coalesce(d.state, 'offline') = 'online' OR r.outcome = 'sent')
                     AND (c.status = 'sent' OR dc.published_version >= r.config_version)
                THEN 'sent' ELSE 'pending' END AS want,
           CASE WHEN coalesce(d.state, 'offline') = 'online' THEN NULL
                WHEN r.outcome = 'sent'
                     AND (c.status = 'sent' OR dc.published_version >= r.config_version)
                THEN 'offline since it got it: waiting for its answer'
                ELSE 'waiting for the device to come online' END AS why
    FROM rollout_devices r
    LEFT JOIN devices d ON d.device_id = r.device_id
    LEFT JOIN commands c ON c.id = r.command_id
    LEFT JOIN device_config dc ON dc.device_id = r.device_id AND r.config_version IS NOT NULL
    WHERE r.batch IS NOT NULL AND r.outcome IN ('pending', 'sent')
)
UPDATE rollout_devices rd SET outcome = ch.want, detail = ch.why
FROM (SELECT * FROM cur WHERE (want, why) IS DISTINCT FROM (outcome, detail)
      LIMIT %(limit)s) AS ch
WHERE rd.rollout_id = ch.rollout_id AND rd.device_id = ch.device_id
"""
#: Sent to a device that has not answered within the rollout's timeout: counted, while it is
#: online, from when it was issued or, if later, when it came online; once it went offline after
#: getting it, from when it was issued (a device an update took down for good fails here).
_TIMEOUTS: Final = """
UPDATE rollout_devices rd SET outcome = 'failed', settled_at = now(),
    detail = 'no answer within ' || ro.device_timeout_s || ' s'
FROM rollouts ro, devices d
WHERE ro.id = rd.rollout_id AND d.device_id = rd.device_id
  AND (rd.rollout_id, rd.device_id) IN (
    SELECT r.rollout_id, r.device_id FROM rollout_devices r
    JOIN rollouts o ON o.id = r.rollout_id JOIN devices v ON v.device_id = r.device_id
    WHERE r.batch IS NOT NULL AND r.outcome = 'sent'
      AND now() - CASE WHEN v.state = 'online' THEN greatest(r.issued_at, v.state_at)
                       ELSE r.issued_at END > make_interval(secs => o.device_timeout_s)
    LIMIT %(limit)s)
"""
_PROGRESS: Final = """
SELECT count(*) FILTER (WHERE r.batch IS NULL AND r.outcome = 'pending'),
       count(*) FILTER (WHERE r.outcome = 'ok'),
       count(*) FILTER (WHERE r.outcome = 'failed'),
       count(*) FILTER (WHERE r.batch IS NOT NULL AND (r.outcome = 'sent'
                        OR (r.outcome = 'pending' AND coalesce(d.state, 'offline') = 'online'))),
       count(*) FILTER (WHERE r.batch IS NOT NULL AND r.outcome = 'pending'
                        AND coalesce(d.state, 'offline') <> 'online')
FROM rollout_devices r LEFT JOIN devices d ON d.device_id = r.device_id
WHERE r.rollout_id = %s
"""


@dataclass(frozen=True, slots=True)
class RunnerHealth:
    alive: bool
    leader: bool
    stuck: tuple[str, ...] = ()


class RolloutRunner:
    """Steps every open rollout each tick; see the module doc."""

    TICK_S = 1.0
    BACKOFF_MAX_S = 5.0
    DB_CONNECT_TIMEOUT_S = 5

    def __init__(
        self,
        db_url: str,
        *,
        wake_control: Callable[[], None] | None = None,
        tick_s: float | None = None,
        stuck_after_s: float = 120.0,
    ) -> None:
        self.db_url = db_url
        self.wake_control = wake_control
        self.tick_s = self.TICK_S if tick_s is None else tick_s
        self.stuck_after_s = stuck_after_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._leader = False
        self._last_pass = time.monotonic()
        #: Passes of the loop so far (tests wait for some to see that nothing more happens).
        self.passes = 0
        self._thread = threading.Thread(target=self._run, name="rollout-runner", daemon=True)

    def start(self) -> RolloutRunner:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Step the rollouts now (the API calls this after a change)."""
        self._wake.set()

    def health(self) -> RunnerHealth:
        stuck = []
        if self._thread.ident is not None and not self._thread.is_alive():
            stuck.append("rollouts: the runner thread has died")
        elif (age := time.monotonic() - self._last_pass) > self.stuck_after_s:
            stuck.append(f"rollouts: the runner has not come round for {age:.0f} s")
        return RunnerHealth(self._thread.is_alive(), self._leader, tuple(stuck))

    def _run(self) -> None:
        delay = self.tick_s
        while not self._stop.is_set():
            try:
                conn = self._connect()
                self.tick(conn)
                delay = self.tick_s
                self._last_pass = time.monotonic()
                self.passes += 1
                self._wake.wait(self.tick_s)
                self._wake.clear()
            except psycopg.Error as exc:
                log.warning("rollouts: database error (%s); retrying", short(str(exc)))
                self._disconnect()
                self._stop.wait(delay)
                delay = min(delay * 2, self.BACKOFF_MAX_S)
            except Exception:  # a bug must not stop every rollout of the district
                log.exception("rollouts: unexpected error; going on")
                self._stop.wait(self.BACKOFF_MAX_S)
        self._disconnect()

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            self._conn = connect_session(
                self.db_url,
                application_name="campus-rollouts",
                connect_timeout=self.DB_CONNECT_TIMEOUT_S,
                migrate_first=True,
            )
            log.info("rollouts: connected to database %s", mask(self.db_url))
        return self._conn

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._leader = False  # the advisory lock went with the session
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    # -- one pass --------------------------------------------------------------------------

    def tick(self, conn: psycopg.Connection[Any]) -> None:
        """Record outcomes, then step each running rollout; only the leader does anything."""
        if not self._leader:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (RUNNER_LOCK_KEY,)).fetchone()
            self._leader = bool(row and row[0])
            if not self._leader:
                return
            log.info("rollouts: this server runs the rollouts")
        limit = {"limit": TICK_ROWS}
        with conn.transaction():
            conn.execute(_SETTLE_CONFIG, limit)
            conn.execute(_SETTLE_COMMAND, limit)
        self._reissue_expired(conn)
        with conn.transaction():
            conn.execute(_TIMEOUTS, limit)
            conn.execute(_PRESENCE, limit)
        running = conn.execute(
            "SELECT id FROM rollouts WHERE state = 'running' ORDER BY updated_at, id LIMIT %s",
            (TICK_ROLLOUTS,),
        ).fetchall()
        issued = False
        for (rollout_id,) in running:
            issued |= self._step(conn, int(rollout_id))
        if issued and self.wake_control is not None:
            self.wake_control()

    def _reissue_expired(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(_EXPIRED, {"limit": TICK_ROWS}).fetchall()
        reissued = False
        for rollout_id, device_id, school_id, attempts, name, args, ttl, state in rows:
            with conn.transaction():
                if attempts >= MAX_COMMAND_ATTEMPTS or state == "aborted":
                    conn.execute(
                        "UPDATE rollout_devices SET outcome = %s, detail = %s, settled_at = now()"
                        " WHERE rollout_id = %s AND device_id = %s",
                        (
                            "skipped" if state == "aborted" else "failed",
                            "withdrawn: the rollout was aborted"
                            if state == "aborted"
                            else f"expired unanswered {attempts} times",
                            rollout_id,
                            device_id,
                        ),
                    )
                    continue
                cmd_id = self._insert_command(
                    conn, rollout_id, device_id, school_id, (name, args, ttl)
                )
                conn.execute(
                    "UPDATE rollout_devices SET command_id = %s, attempts = attempts + 1,"
                    " issued_at = now() WHERE rollout_id = %s AND device_id = %s",
                    (cmd_id, rollout_id, device_id),
                )
                reissued = True
                log.info(
                    "rollout %s: command to %s expired unanswered; re-issued", rollout_id, device_id
                )
        if reissued and self.wake_control is not None:
            self.wake_control()

    def _step(self, conn: psycopg.Connection[Any], rollout_id: int) -> bool:
        """One decision for one running rollout; True when it issued a batch."""
        with conn.transaction():
            ro = conn.execute(
                "SELECT canary, batch_size, pause_s, max_failure_share, device_timeout_s,"
                " batches, settled_at, what, config, command_name, command_args, command_ttl_s"
                " FROM rollouts WHERE id = %s AND state = 'running' FOR UPDATE",
                (rollout_id,),
            ).fetchone()
            if ro is None:
                return False  # paused or aborted meanwhile
            strategy = Strategy(int(ro[0]), int(ro[1]), float(ro[2]), float(ro[3]), int(ro[4]))
            counts = conn.execute(_PROGRESS, (rollout_id,)).fetchone()
            assert counts is not None
            unissued, ok, failed, online, offline = (int(n) for n in counts)
            progress = Progress(unissued, ok, failed, online, offline, int(ro[5]), ro[6])
            now = datetime.now(UTC)
            action = decide(strategy, progress, now)
            match action:
                case Halt(reason):
                    log.warning("rollout %s halted: %s", rollout_id, reason)
                    self._set_state(conn, rollout_id, "halted", reason)
                case Done():
                    log.info("rollout %s done", rollout_id)
                    self._set_state(conn, rollout_id, "done", None)
                case MarkSettled():
                    conn.execute(
                        "UPDATE rollouts SET settled_at = now(), updated_at = now() WHERE id = %s",
                        (rollout_id,),
                    )
                case Issue(count):
                    self._issue(conn, rollout_id, count, progress.batches + 1, ro[7:])
                    return True
                case Wait():
                    pass
        return False

    @staticmethod
    def _set_state(
        conn: psycopg.Connection[Any], rollout_id: int, state: State, reason: str | None
    ) -> None:
        conn.execute(
            "UPDATE rollouts SET state = %s, reason = %s, updated_at = now(),"
            " finished_at = CASE WHEN %s = 'done' THEN now() END WHERE id = %s",
            (state, reason, state, rollout_id),
        )

    def _issue(
        self,
        conn: psycopg.Connection[Any],
        rollout_id: int,
        count: int,
        batch: int,
        what: tuple[Any, ...],
    ) -> None:
        kind, config, name, args, ttl = what
        rows = conn.execute(
            "SELECT device_id, school_id FROM rollout_devices"
            " WHERE rollout_id = %s AND batch IS NULL AND outcome = 'pending'"
            " ORDER BY position LIMIT %s",
            (rollout_id, count),
        ).fetchall()
        issued = datetime.now(UTC).isoformat(timespec="milliseconds")
        for device_id, school_id in rows:
            if kind == "config":
                version = desire_config(conn, device_id, school_id, config, issued)
                conn.execute(
                    "UPDATE rollout_devices SET batch = %s, issued_at = now(), attempts = 1,"
                    " config_version = %s WHERE rollout_id = %s AND device_id = %s",
                    (batch, version, rollout_id, device_id),
                )
            else:
                cmd_id = self._insert_command(
                    conn, rollout_id, device_id, school_id, (name, args, ttl)
                )
                conn.execute(
                    "UPDATE rollout_devices SET batch = %s, issued_at = now(), attempts = 1,"
                    " command_id = %s WHERE rollout_id = %s AND device_id = %s",
                    (batch, cmd_id, rollout_id, device_id),
                )
        conn.execute(
            "UPDATE rollouts SET batches = %s, settled_at = NULL, updated_at = now() WHERE id = %s",
            (batch, rollout_id),
        )
        log.info("rollout %s: batch %d issued to %d device(s)", rollout_id, batch, len(rows))

    @staticmethod
    def _insert_command(
        conn: psycopg.Connection[Any],
        rollout_id: int,
        device_id: str,
        school_id: str,
        command: tuple[str, dict[str, Any], int],
    ) -> str:
        name, args, ttl = command
        cmd_id = f"rollout-{rollout_id}-{uuid.uuid4().hex[:12]}"
        conn.execute(
            "INSERT INTO commands (id, device_id, school_id, name, args, expires_at, created_by)"
            " VALUES (%s, %s, %s, %s, %s, now() + make_interval(secs => %s), %s)",
            (cmd_id, device_id, school_id, name, Jsonb(args), ttl, f"rollout {rollout_id}"),
        )
        return cmd_id


__all__ = [
    "MAX_BATCH",
    "MAX_COMMAND_TTL_S",
    "OUTCOMES",
    "Done",
    "Halt",
    "Issue",
    "MarkSettled",
    "Progress",
    "RolloutRunner",
    "Strategy",
    "TransitionError",
    "Wait",
    "canary_count",
    "create_rollout",
    "decide",
    "transition",
]
