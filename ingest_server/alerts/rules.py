"""The built-in rules and the hysteresis that turns their conditions into transitions.

No I/O here: :class:`Evaluator` is fed committed events, device states, quarantine rows and seq
gaps (and, from the engine's tick, silent devices), keeps one :class:`Track` per rule and device
with a condition pending, holding or clearing, and :meth:`Evaluator.decide` says which alerts to
open, reopen or resolve. The engine applies those and reports back (:meth:`Evaluator.applied`).

Hysteresis: a condition must hold ``for_s`` before an alert opens and stay clear
``clear_hold_s`` before it resolves; thresholds have a lower clear level (a reading between the
two changes nothing); a re-trigger within ``reopen_window_s`` of an automatic resolution reopens
the same alert. An alert resolved by hand while its condition still holds stays resolved until
the condition has cleared once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ingest_server.alerts.config import RulesConfig
from ingest_server.ingest.batch import EventRow, QuarantineRow, StateRow

#: Events older than this (by their own ts) when they are committed are history being replayed:
#: they neither raise nor clear a condition.
MAX_EVENT_AGE_S: Final = 600.0
#: Tracks kept at most (rules x devices with something pending); past it new ones are refused.
MAX_TRACKS: Final = 200_000
#: Driver states that count as a driver being down (device_drivers.base.DriverState).
DRIVER_DOWN: Final = frozenset({"disconnected", "failed"})


@dataclass(slots=True)
class Track:
    """One rule at one device: its condition and the alert it has open, if any."""

    rule: str
    school_id: str
    device_id: str
    cond: bool = False
    #: when ``cond`` took its present value (Unix seconds)
    since: float = 0.0
    #: when the condition was last seen true
    last_true: float = 0.0
    #: sources (a camera, a sensor; "" the device itself) whose condition is true
    sources: set[str] = field(default_factory=set)
    #: episodic rules (seq_gap, quarantine_spike): true until then
    expires: float | None = None
    alert_id: int | None = None
    resolved_id: int | None = None
    resolved_at: float = 0.0
    #: resolved by a person while the condition held: not reopened until it clears once
    held_by_hand: bool = False
    message: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Action:
    kind: Literal["open", "reopen", "resolve"]
    track: Track
    at: float


def _fmt(value: float) -> str:
    return f"{value:g}"


class Evaluator:
    """Conditions per rule and device, and the transitions they call for."""

    def __init__(self, config: RulesConfig, max_event_age_s: float = MAX_EVENT_AGE_S) -> None:
        self.config = config
        self.max_event_age_s = max_event_age_s
        self.tracks: dict[tuple[str, str], Track] = {}
        #: tracks not kept because ``MAX_TRACKS`` were
        self.refused = 0
        self._dirty: set[tuple[str, str]] = set()
        self._quarantine: dict[str, list[float]] = {}  # device → [window start, count]
        self._env: dict[str, tuple[float, float, float, float, float]] = {}
        #: devices with a device_offline track (any event of theirs clears it)
        self._offline: set[str] = set()
        self._handlers: dict[str, Callable[[EventRow, float], None]] = {
            "access.pass": self._access_pass,
            "health.check": self._health_check,
            "env.reading": self._env_reading,
            "agent.health": self._agent_health,
            "recorder.status": self._recorder_status,
            "camera.health": self._camera_health,
        }

    # -- conditions --------------------------------------------------------------------

    def observe(
        self,
        rule: str,
        school: str,
        device: str,
        cond: bool | None,
        at: float,
        *,
        source: str = "",
        message: str = "",
        detail: dict[str, Any] | None = None,
    ) -> None:
        """The condition of ``rule`` at ``device`` as of ``at``; None (a reading between the
        clear level and the threshold) changes nothing."""
        if cond is None:
            return
        key = (rule, device)
        t = self.tracks.get(key)
        if t is None:
            if not cond:
                return
            if len(self.tracks) >= MAX_TRACKS:
                self.refused += 1
                return
            t = self.tracks[key] = Track(rule, school, device, since=at)
            if rule == "device_offline":
                self._offline.add(device)
        if cond:
            t.sources.add(source)
            t.last_true = at
            t.message = message
            t.detail = detail or {}
        else:
            t.sources.discard(source)
        now_true = bool(t.sources)
        if now_true != t.cond:
            t.cond, t.since = now_true, at
            if not now_true:
                t.held_by_hand = False
                t.expires = None
        self._dirty.add(key)

    def hit(
        self,
        rule: str,
        school: str,
        device: str,
        at: float,
        *,
        quiet_s: float,
        message: str,
        detail: dict[str, Any],
    ) -> None:
        """An episode (a gap, a spike): the condition holds until ``quiet_s`` without another."""
        self.observe(rule, school, device, True, at, message=message, detail=detail)
        t = self.tracks.get((rule, device))
        if t is not None:
            t.expires = at + quiet_s

    def events(self, rows: Sequence[EventRow], at: float) -> None:
        """Committed events (``at``: when they were committed)."""
        handlers = self._handlers
        offline = self._offline
        for row in rows:
            handler = handlers.get(row.event.type)
            if handler is not None:
                handler(row, at)
            if offline and row.device_id in offline:  # any event is a sign of life
                self.observe("device_offline", row.school_id, row.device_id, False, at)

    def states(self, rows: Iterable[StateRow], at: float) -> None:
        """Presence messages: ``offline`` is the agent's MQTT will (or its clean stop)."""
        for s in rows:
            offline = s.state.state == "offline"
            p = self.config.params("device_offline", s.school_id)
            if offline and not p.enabled:
                continue
            self.observe(
                "device_offline",
                s.school_id,
                s.device_id,
                offline,
                at,
                message=f"device {s.device_id} went offline (its MQTT will, or the agent stopped)",
                detail={"cause": "state", "boot": s.state.boot},
            )

    def silent(self, school: str, device: str, last_seen: float, now: float) -> None:
        """From the tick: ``device`` has sent nothing since ``last_seen``."""
        p = self.config.params("device_offline", school)
        if not p.enabled or now - last_seen < p["silent_s"]:
            return
        minutes = (now - last_seen) / 60
        self.observe(
            "device_offline",
            school,
            device,
            True,
            last_seen + p["silent_s"],
            message=f"device {device} has sent nothing for {minutes:.0f} min",
            detail={"cause": "silent", "silent_s": round(now - last_seen)},
        )

    def quarantined(self, rows: Iterable[QuarantineRow], at: float) -> None:
        """Quarantined messages, counted per device over the rule's window."""
        windows = self._quarantine
        for q in rows:
            device = q.device_id
            if device is None:
                continue
            school = _school_of(q.topic)
            p = self.config.params("quarantine_spike", school)
            if not p.enabled:
                continue
            w = windows.get(device)
            if w is None or at - w[0] > p["window_s"]:
                if len(windows) >= MAX_TRACKS:
                    windows.clear()
                w = windows[device] = [at, 0.0]
            w[1] += 1
            if w[1] >= p["threshold"]:
                self.hit(
                    "quarantine_spike",
                    school,
                    device,
                    at,
                    quiet_s=p["quiet_s"],
                    message=f"{w[1]:.0f} messages of {device} quarantined within "
                    f"{_fmt(p['window_s'])} s",
                    detail={
                        "count": int(w[1]),
                        "window_s": p["window_s"],
                        "last_reason": q.reason[:200],
                    },
                )

    def gaps(self, devices: Iterable[tuple[str, str, int]], at: float) -> None:
        """Devices whose ``missing`` count grew in a commit: (school, device, by how much)."""
        for school, device, grew in devices:
            p = self.config.params("seq_gap", school)
            if p.enabled and grew >= p["min_missing"]:
                self.hit(
                    "seq_gap",
                    school,
                    device,
                    at,
                    quiet_s=p["quiet_s"],
                    message=f"{grew} seq numbers of {device} never arrived (devices.missing grew)",
                    detail={"new_missing": grew},
                )

    # -- the rules on events -------------------------------------------------------------

    def _fresh(self, row: EventRow, at: float) -> bool:
        return at - row.event.ts.timestamp() <= self.max_event_age_s

    def _wanted(self, rule: str, row: EventRow, cond: bool | None, at: float) -> bool:
        """Whether a reading matters: its condition is true or the rule holds a track for the
        device (a clear reading of an untracked device, the usual case, costs nothing more),
        and it is fresh."""
        return bool(cond or (rule, row.device_id) in self.tracks) and self._fresh(row, at)

    def _access_pass(self, row: EventRow, at: float) -> None:
        data: Any = row.event.data
        temp = data.temperature_c
        if temp is None:
            return
        p = self.config.params("fever", row.school_id)
        if not p.enabled:
            return
        fever = temp >= p["threshold_c"]
        if not self._wanted("fever", row, fever, at):
            return
        self.observe(
            "fever",
            row.school_id,
            row.device_id,
            fever,
            at,
            message=f"fever at gate {data.gate}: {_fmt(temp)} °C "
            f"(threshold {_fmt(p['threshold_c'])} °C)",
            detail={"gate": data.gate, "temperature_c": temp, "uid_hash": data.uid_hash},
        )

    def _health_check(self, row: EventRow, at: float) -> None:
        """A morning-check station: the fever rule per station. The alert names the class and
        the temperature, never the student (an alert is read with a school-scoped token)."""
        data: Any = row.event.data
        temp = data.temperature_c
        if temp is None and "fever" not in data.symptoms:
            return
        p = self.config.params("fever", row.school_id)
        if not p.enabled:
            return
        fever = "fever" in data.symptoms or (temp is not None and temp >= p["threshold_c"])
        if not self._wanted("fever", row, fever, at):
            return
        shown = "reported" if temp is None else f"{_fmt(temp)} °C"
        self.observe(
            "fever",
            row.school_id,
            row.device_id,
            fever,
            at,
            message=f"fever at the morning check of class {data.class_id}: {shown} "
            f"(threshold {_fmt(p['threshold_c'])} °C)",
            detail={"class_id": data.class_id, "temperature_c": temp, "station": data.station},
        )

    def _env_limits(self, school: str) -> tuple[float, float, float, float, float]:
        """A school's CO2 and room temperature limits as plain numbers, cached (env.reading is
        the commonest reading; a disabled rule gets limits nothing can cross)."""
        got = self._env.get(school)
        if got is None:
            c = self.config.params("co2_high", school)
            t = self.config.params("temperature_out_of_range", school)
            inf = float("inf")
            got = (
                c["threshold_ppm"] if c.enabled else inf,
                c["clear_ppm"] if c.enabled else -inf,
                t["min_c"] if t.enabled else -inf,
                t["max_c"] if t.enabled else inf,
                t["margin_c"] if t.enabled else -inf,
            )
            if len(self._env) > MAX_TRACKS:
                self._env.clear()
            self._env[school] = got
        return got

    def _env_reading(self, row: EventRow, at: float) -> None:
        data: Any = row.event.data
        co2, temp = data.co2_ppm, data.temperature_c
        co2_up, co2_down, lo, hi, margin = self._env.get(row.school_id) or self._env_limits(
            row.school_id
        )
        # inline checks: the clear reading of an untracked device, the usual case, ends here
        tracks = self.tracks
        if co2 is not None:
            cond = True if co2 > co2_up else False if co2 < co2_down else None
            if (cond or ("co2_high", row.device_id) in tracks) and self._fresh(row, at):
                source = data.sensor or ""
                self.observe(
                    "co2_high",
                    row.school_id,
                    row.device_id,
                    cond,
                    at,
                    source=source,
                    message=f"CO2 {_fmt(co2)} ppm at {source or row.device_id}, above "
                    f"{_fmt(co2_up)} ppm",
                    detail={"sensor": data.sensor, "co2_ppm": co2},
                )
        if temp is not None:
            out = temp < lo or temp > hi
            cond = True if out else False if lo + margin <= temp <= hi - margin else None
            if (cond or ("temperature_out_of_range", row.device_id) in tracks) and self._fresh(
                row, at
            ):
                source = data.sensor or ""
                self.observe(
                    "temperature_out_of_range",
                    row.school_id,
                    row.device_id,
                    cond,
                    at,
                    source=source,
                    message=f"room temperature {_fmt(temp)} °C at {source or row.device_id}, "
                    f"outside {_fmt(lo)}-{_fmt(hi)} °C",
                    detail={"sensor": data.sensor, "temperature_c": temp},
                )

    def _agent_health(self, row: EventRow, at: float) -> None:
        data: Any = row.event.data
        school, device = row.school_id, row.device_id
        if not self._fresh(row, at):
            return
        cfg = self.config
        if ("device_offline", device) in self.tracks:
            self.observe("device_offline", school, device, False, at)
        p = cfg.params("driver_error", school)
        if p.enabled:
            down = sorted(n for n, s in data.drivers.items() if s in DRIVER_DOWN)
            self.observe(
                "driver_error",
                school,
                device,
                bool(down),
                at,
                message=f"driver(s) down on {device}: "
                + ", ".join(f"{n} ({data.drivers[n]})" for n in down[:10]),
                detail={"drivers": {n: data.drivers[n] for n in down[:50]}},
            )
        p = cfg.params("outbox_backlog", school)
        if p.enabled:
            age = data.oldest_unsent_s
            self.observe(
                "outbox_backlog",
                school,
                device,
                True if age >= p["threshold_s"] else False if age < p["clear_s"] else None,
                at,
                message=f"outbox of {device}: oldest unsent event is {age / 60:.0f} min old "
                f"({data.outbox_depth} queued)",
                detail={"oldest_unsent_s": age, "outbox_depth": data.outbox_depth},
            )
        offset = data.clock_offset_s
        p = cfg.params("clock_skew", school)
        if p.enabled and offset is not None:
            skew = abs(offset)
            self.observe(
                "clock_skew",
                school,
                device,
                True if skew >= p["threshold_s"] else False if skew < p["clear_s"] else None,
                at,
                message=f"clock of {device} is off by {offset:+.1f} s",
                detail={"clock_offset_s": offset},
            )

    def _recorder_status(self, row: EventRow, at: float) -> None:
        data: Any = row.event.data
        free = data.free_space_mb
        p = self.config.params("recorder_fault", row.school_id)
        if free is None or not p.enabled or not self._fresh(row, at):
            return
        lo, ok = p["min_free_mb"], p["clear_free_mb"]
        self.observe(
            "recorder_fault",
            row.school_id,
            row.device_id,
            True if free < lo else False if free >= ok else None,
            at,
            source=data.recorder or "",
            message=f"recorder {data.recorder or row.device_id}: {_fmt(free)} MB free "
            f"(below {_fmt(lo)} MB), state {data.state}",
            detail={"recorder": data.recorder, "free_space_mb": free, "state": data.state},
        )

    def _camera_health(self, row: EventRow, at: float) -> None:
        data: Any = row.event.data
        p = self.config.params("camera_black_or_frozen", row.school_id)
        if not p.enabled or not self._fresh(row, at):
            return
        faults = [
            n
            for n, bad in (
                ("black", data.black_frame),
                ("frozen", data.frozen),
                ("disconnected", not data.connected),
            )
            if bad
        ]
        self.observe(
            "camera_black_or_frozen",
            row.school_id,
            row.device_id,
            bool(faults),
            at,
            source=data.camera,
            message=f"camera {data.camera} on {row.device_id}: {', '.join(faults)}",
            detail={"camera": data.camera, "faults": faults},
        )

    # -- transitions ---------------------------------------------------------------------

    def decide(self, now: float, *, everything: bool = False) -> list[Action]:
        """The transitions due at ``now`` for tracks changed since the last call (or all)."""
        keys = list(self.tracks) if everything else list(self._dirty)
        self._dirty.clear()
        out: list[Action] = []
        for key in keys:
            t = self.tracks.get(key)
            if t is None:
                continue
            if t.expires is not None and now >= t.expires:
                t.sources.clear()
                t.cond, t.since, t.expires = False, t.expires, None
                t.held_by_hand = False
            p = self.config.params(t.rule, t.school_id)
            active = t.alert_id is not None
            if t.cond and p.enabled:
                due = now - t.since >= p.for_s and not t.held_by_hand
                if due and p.school_hours_only:
                    due = self.config.in_hours(t.school_id, now)
                if not active and due:
                    reopen = t.resolved_id is not None and now - t.resolved_at <= p.reopen_window_s
                    out.append(Action("reopen" if reopen else "open", t, now))
            elif active and (not p.enabled or now - t.since >= p.clear_hold_s):
                out.append(Action("resolve", t, now))
            elif (
                not active
                and not t.cond
                and (t.resolved_id is None or now - t.resolved_at > p.reopen_window_s)
            ):
                del self.tracks[key]  # nothing left to remember
                if t.rule == "device_offline":
                    self._offline.discard(t.device_id)
        return out

    def applied(self, action: Action, alert_id: int | None) -> None:
        """The engine wrote ``action`` (``alert_id``: the alert opened, reopened or resolved;
        None when the database had nothing to change, e.g. already resolved by hand)."""
        t = action.track
        if action.kind == "resolve":
            t.resolved_id, t.alert_id, t.resolved_at = t.alert_id, None, action.at
        elif alert_id is not None:
            t.alert_id = alert_id
            t.resolved_id = None
        self.tracks.setdefault((t.rule, t.device_id), t)

    def resolved_elsewhere(self, alert_id: int, at: float) -> None:
        """A person resolved ``alert_id`` through the API."""
        for t in self.tracks.values():
            if t.alert_id == alert_id:
                t.resolved_id, t.alert_id, t.resolved_at = alert_id, None, at
                t.held_by_hand = t.cond
                return

    def adopt(self, rule: str, school: str, device: str, alert_id: int, last_seen: float) -> None:
        """An alert already open at start: its condition is taken to hold until seen clear."""
        t = self.tracks.setdefault(
            (rule, device), Track(rule, school, device, cond=True, since=last_seen)
        )
        if rule == "device_offline":
            self._offline.add(device)
        t.sources.add("")
        t.cond, t.last_true, t.alert_id = True, last_seen, alert_id

    def active(self) -> dict[int, Track]:
        """Alerts the engine holds open, by id."""
        return {t.alert_id: t for t in self.tracks.values() if t.alert_id is not None}


def _school_of(topic: str) -> str:
    """The school segment of ``campus/v1/<school>/<device>/...`` ("" if not that shape)."""
    parts = topic.split("/", 4)
    return parts[2] if len(parts) > 3 else ""
