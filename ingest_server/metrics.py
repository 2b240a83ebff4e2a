"""Counters, gauges and histograms in the Prometheus text format (0.0.4), thread-safe."""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar, Final

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{inner}}} {_number(value)}"


class _Metric:
    type: ClassVar[str]

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple((k, labels[k]) for k in self.labelnames)

    def samples(self) -> Iterator[str]:
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]
        lines += self.samples()
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    type = "counter"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[Labels, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted(self._values.items())
        for key, value in items:
            yield _sample(self.name, key, value)


class Gauge(Counter):
    type = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    type = "histogram"
    DEFAULT_BUCKETS: ClassVar = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(
        self,
        name: str,
        help: str,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Iterable[float]) -> None:
        """Record many observations under one lock (per-event latencies of a batch)."""
        buckets, counts = self.buckets, [0] * len(self._counts)
        total = 0.0
        for v in values:
            counts[bisect_left(buckets, v)] += 1
            total += v
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def observe_ages(self, now: float, times: Sequence[float], unit: float = 1.0) -> None:
        """Record the age ``now - t`` of every ``t`` of ``times``, which must be ascending, both
        counted in ``unit`` seconds: one bisection per bucket, however many times there are."""
        n = len(times)
        if not n:
            return
        counts = [0] * len(self._counts)
        below = 0  # how many ages are at most the bound so far
        for i, bound in enumerate(self.buckets):
            # now - t <= bound  <=>  t >= now - bound
            within = n - bisect_left(times, now - bound / unit)
            counts[i] = within - below
            below = within
        counts[-1] = n - below
        total = (now * n - math.fsum(times)) * unit
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def samples(self) -> Iterator[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
            cumulative += n
            yield _sample(f"{self.name}_bucket", (("le", _number(bound)),), cumulative)
        yield _sample(f"{self.name}_sum", (), total)
        yield _sample(f"{self.name}_count", (), cumulative)


class IngestMetrics:
    """Every metric the ingest server exports."""

    def __init__(self) -> None:
        p = "campus_ingest"
        self.messages_received = Counter(f"{p}_messages_received_total", "MQTT messages received.")
        self.events_received = Counter(
            f"{p}_events_received_total", "Events received in uplink messages, valid or not."
        )
        self.events_stored = Counter(f"{p}_events_stored_total", "Events inserted into events.")
        self.events_duplicate = Counter(
            f"{p}_events_duplicate_total", "Events dropped as already stored (device_id, seq)."
        )
        self.quarantined = Counter(
            f"{p}_quarantined_total",
            "Rows written to quarantine, by kind of failure.",
            ["reason"],
        )
        self.seq_gaps = Counter(
            f"{p}_seq_gaps_detected_total", "Sequence numbers newly found missing."
        )
        self.seq_missing = Gauge(
            f"{p}_seq_missing", "Sequence numbers missing, summed over devices (from devices)."
        )
        self.batch_latency = Histogram(
            f"{p}_batch_latency_seconds", "Time to write and commit one batch."
        )
        self.event_latency = Histogram(
            f"{p}_event_latency_seconds",
            "From an event's ts to the commit that stored it.",
            (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0),
        )
        self.mqtt_connected = Gauge(f"{p}_mqtt_connected", "1 while connected to the broker.")
        self.db_connected = Gauge(f"{p}_db_connected", "1 while the database is reachable.")
        self.queue_depth = Gauge(
            f"{p}_queue_messages", "Messages received and waiting for the writer."
        )
        c = "campus_control"
        self.control_inbox = Gauge(
            f"{c}_inbox_messages", "Acks received by the control plane and not yet recorded."
        )
        self.control_pending_commands = Gauge(
            f"{c}_pending_commands", "Commands waiting to be published (leader only)."
        )
        self.control_pending_configs = Gauge(
            f"{c}_pending_configs",
            "Devices whose newest config is not yet published (leader only).",
        )
        self.control_inflight = Gauge(
            f"{c}_inflight", "Commands and configs published and awaiting the broker's PUBACK."
        )
        self.control_retries = Counter(
            f"{c}_retries_total", "Database errors the control plane backed off and retried after."
        )
        self.control_quarantined = Counter(
            f"{c}_quarantined_total",
            "Acks written to quarantine, by kind of failure.",
            ["reason"],
        )
        self.stuck = Gauge(
            "campus_stuck", "1 while /healthz reports work not progressing (see its stuck list)."
        )
        self.maintenance_lock_retries = Counter(
            f"{p}_maintenance_lock_retries_total",
            "Storage maintenance steps that gave up waiting for a lock (tried again later).",
            ["step"],
        )
        self.api_answer_cache = Counter(
            "campus_api_answer_cache_total",
            "Rollup requests by how they were answered: hit (an answer kept while its table is "
            "unchanged), not_modified (304 to If-None-Match), miss (rendered, kept), bypass "
            "(Cache-Control: no-cache), uncacheable (a view: always rendered).",
            ["result"],
        )
        self.api_answer_cache_bytes = Gauge(
            "campus_api_answer_cache_bytes", "Bytes of rollup answers kept by the API."
        )
        a = "campus_alert"
        self.alert_notifications = Counter(
            f"{a}_notifications_total",
            "Alert notifications by receiver and outcome: sent, failed (gave up, reason in "
            "alert_notifications.last_error), dropped (info in quiet hours), stale (an event "
            "older than the retry window when first routed; receiver -).",
            ["receiver", "outcome"],
        )
        self.alert_notify_retries = Counter(
            f"{a}_notify_retries_total",
            "Failed delivery attempts of alert notifications that will be tried again.",
            ["receiver"],
        )
        self.alert_notify_pending = Gauge(
            f"{a}_notify_pending", "Alert notifications waiting to be delivered (leader only)."
        )
        self.alert_notify_leader = Gauge(
            f"{a}_notify_leader", "1 on the server that sends alert notifications."
        )
        a = "campus_alerts"
        self.alerts_open = Gauge(f"{a}_open", "Alerts open or acknowledged, by rule.", ["rule"])
        self.alert_transitions = Counter(
            f"{a}_transitions_total",
            "Alert transitions written (opened, acknowledged, resolved, reopened), by rule.",
            ["rule", "transition"],
        )
        self.alerts_dropped = Counter(
            f"{a}_dropped_total", "Commits the alert engine dropped unread (its queue was full)."
        )
        self.alerts_errors = Counter(
            f"{a}_errors_total", "Faults in the alert engine (database, a rule); retried."
        )
        self.alerts_queue = Gauge(f"{a}_queue_commits", "Commits waiting for the alert engine.")
        self.all: tuple[_Metric, ...] = tuple(
            m for m in vars(self).values() if isinstance(m, _Metric)
        )

    def render(self) -> str:
        return "".join(m.render() for m in self.all)
