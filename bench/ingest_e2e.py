"""End-to-end ingest throughput beside the raw COPY ceiling, measured in the same run.

    python -m bench ingest_e2e [--events 200000] [--per-message 100] [--type card.tap]

Each workload (``--type``, repeatable; default both) is one event type, and every baseline
writes what the ingest writes for it:

- ``card.tap`` (a card reader's tap, UID as an HMAC): one ``events`` row per event.
- ``env.reading`` (temperature and CO2): one ``events`` row and two ``readings`` rows per event
  (the metrics ``schemas.uplink.metrics_of`` finds).

1. Ceiling: one binary COPY stream of the same rows, in one transaction, into a fresh database
   with the same tables and indexes (unique ``(device_id, seq, time)`` included): ``events``
   for card.tap; ``events`` and then ``readings`` for env.reading. For env.reading the
   events-only COPY is printed too: what the ceiling was before it wrote the readings.
2. Naive consumer: one event per message; ``INSERT … ON CONFLICT DO NOTHING RETURNING`` of the
   event, for env.reading an ``INSERT`` of its readings when the event was new, and a commit.
3. End to end: the events are queued in Mosquitto (QoS 1) for the ingest server's persistent
   session while it is stopped; then it starts and drains them with ack-after-commit and
   de-duplication. The rate is taken from the first stored row to the last. The stored set is
   checked afterwards (exit 1 if any event is missing or doubled).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import psycopg

from ingest_server.ingest.writer import _RawJsonbDumper
from schemas.uplink import decode_uplink, metrics_of
from simulators.harness import Mosquitto, Postgres, shared_tmpdir, wait_until
from simulators.harness_pipeline import HASH_KEY_HEX, IngestServer

SCHOOL = "s001"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
_KEY = bytes.fromhex(HASH_KEY_HEX)
#: The hashes of the 5,000 cards the readers see, as an agent would send them.
_CARDS = [
    hmac.new(_KEY, (0x04000000 + i).to_bytes(4, "big"), hashlib.sha256).hexdigest()
    for i in range(5000)
]


def _card(seq: int) -> dict[str, object]:
    return {"uid_hash": _CARDS[seq % len(_CARDS)], "tech": "iso14443a", "reader": "door-1"}


def _env(seq: int) -> dict[str, object]:
    return {"sensor": "room", "temperature_c": 21.5, "co2_ppm": 600 + seq % 400}


@dataclass(frozen=True)
class Workload:
    """One event type as devices of one kind send it."""

    type: str
    kind: str
    prefix: str
    data: Callable[[int], dict[str, object]]


WORKLOADS = {
    "card.tap": Workload("card.tap", "card_reader", "reader", _card),
    "env.reading": Workload("env.reading", "env_sensor", "env", _env),
}
EVENT_TYPES = [
    "timestamptz",
    "text",
    "text",
    "text",
    "int8",
    "text",
    "jsonb",
    "timestamptz",
    "bool",
]
READING_TYPES = ["timestamptz", "text", "text", "text", "float8"]
#: Messages a filling publisher leaves unacknowledged at most.
PUBLISH_WINDOW = 20_000
#: Mosquitto saves its persistence file as deploy/mosquitto/mosquitto.conf has it, not each
#: second as the tests' broker does: a save writes every queued message (~90 MB for 200,000
#: one-event messages) while the one thread that would deliver them waits, once a second
#: through every drain, which no deployment does and the ceiling never meets.
DEPLOYED_AUTOSAVE = "autosave_interval 30\nautosave_on_changes false\n"
COPY_EVENTS = (
    "COPY events (time, school_id, device_id, device_kind, seq, type, data, received_at,"
    " synced) FROM STDIN (FORMAT BINARY)"
)
COPY_READINGS = (
    "COPY readings (time, school_id, device_id, metric, value) FROM STDIN (FORMAT BINARY)"
)


def event(seq: int, w: Workload = WORKLOADS["env.reading"]) -> dict[str, object]:
    return {
        "seq": seq,
        "ts": (T0 + timedelta(milliseconds=seq)).isoformat(),
        "type": w.type,
        "data": w.data(seq),
        "synced": True,
    }


def payloads(
    devices: int, per_device: int, per_message: int, etype: str = "env.reading"
) -> list[tuple[str, bytes]]:
    w = WORKLOADS[etype]
    out = []
    for d in range(devices):
        dev = f"{w.prefix}-{d:04d}"
        for start in range(1, per_device + 1, per_message):
            evs = [event(s, w) for s in range(start, min(start + per_message, per_device + 1))]
            body = {"v": 1, "device_id": dev, "kind": w.kind, "sent_at": T0.isoformat()}
            body["events"] = evs
            out.append((f"campus/v1/{SCHOOL}/{dev}/up", json.dumps(body).encode()))
    return out


@dataclass(frozen=True)
class CeilingRows:
    events: list[tuple[Any, ...]]
    #: The readings rows of each event, in the order of ``events``.
    readings: list[list[tuple[Any, ...]]]

    @property
    def n_readings(self) -> int:
        return sum(len(r) for r in self.readings)


def ceiling_rows(msgs: list[tuple[str, bytes]]) -> CeilingRows:
    """The rows the ingest stores for ``msgs``, decoded by the same schema code it uses."""
    events: list[tuple[Any, ...]] = []
    readings: list[list[tuple[Any, ...]]] = []
    now = datetime.now(UTC)
    for topic, body in msgs:
        up = decode_uplink(topic, body)
        if up.rejected:
            raise ValueError(f"the bench made an invalid event: {up.rejected[0].reason}")
        school, device = up.topic.school_id, up.topic.device_id
        for e in up.events:
            events.append((e.ts, school, device, up.kind, e.seq, e.type, e.data_json, now, True))
            readings.append([(e.ts, school, device, m, v) for m, v in metrics_of(e)])
    return CeilingRows(events, readings)


def copy_ceiling(
    url: str, rows: CeilingRows, *, readings: bool, pg: Postgres
) -> tuple[float, float]:
    """Events per second of one transaction COPYing the events (and their readings), and
    PostgreSQL's CPU seconds per event for it (all its processes)."""
    cpu = CpuMeter([], None, pg)
    with psycopg.connect(url) as conn:
        cpu.start()
        start = time.perf_counter()
        cur = conn.cursor()
        # jsonb from the JSON bytes as they are, exactly as the ingest writer sends it
        cur.adapters.register_dumper(None, _RawJsonbDumper)
        with cur.copy(COPY_EVENTS) as copy:
            copy.set_types(EVENT_TYPES)
            for row in rows.events:
                copy.write_row(row)
        if readings:
            with cur.copy(COPY_READINGS) as copy:
                copy.set_types(READING_TYPES)
                for of_event in rows.readings:
                    for row in of_event:
                        copy.write_row(row)
        conn.commit()
        elapsed = time.perf_counter() - start
        cpu.stop()
    return len(rows.events) / elapsed, cpu.used["postgres"] / len(rows.events)


def insert_per_message(url: str, n: int, w: Workload) -> float:
    """Events per second of the naive consumer: one event per message, one commit each."""
    rows = ceiling_rows(payloads(1, n, 1, w.type))
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        for (ts, school, device, kind, seq, etype, data, _, _), mine in zip(
            rows.events, rows.readings, strict=True
        ):
            new = conn.execute(
                "INSERT INTO events (time, school_id, device_id, device_kind, seq, type, data)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) ON CONFLICT DO NOTHING RETURNING seq",
                (ts, school, f"naive-{device}", kind, seq, etype, data.decode()),
            ).fetchone()
            if new and mine:
                conn.cursor().executemany(
                    "INSERT INTO readings (time, school_id, device_id, metric, value)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    [(t, s, f"naive-{d}", m, v) for t, s, d, m, v in mine],
                )
            conn.commit()
        return len(rows.events) / (time.perf_counter() - start)


def fill_broker(broker: Mosquitto, msgs: list[tuple[str, bytes]]) -> None:
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(200)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        # paho refuses a message whose id (16 bits, wrapping) is still outstanding: keep fewer
        # than 65,535 unacknowledged, waiting on the one WINDOW behind before each publish
        infos: list[mqtt.MQTTMessageInfo] = []
        for k, (topic, body) in enumerate(msgs):
            if k >= PUBLISH_WINDOW:
                infos[k - PUBLISH_WINDOW].wait_for_publish(60)
            infos.append(pub.publish(topic, body, qos=1))
        for info in infos[-PUBLISH_WINDOW:]:
            info.wait_for_publish(60)
    finally:
        pub.disconnect()
        pub.loop_stop()


class CpuMeter:
    """CPU seconds (user + system) used by the ingest server, Mosquitto and PostgreSQL (all its
    processes) between :meth:`start` and :meth:`stop`: a figure the machine's other load does
    not inflate the way it inflates wall-clock time."""

    def __init__(self, ingest_pids: list[int], broker_pid: int | None, pg: Postgres) -> None:
        postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        self._pg_url = pg.url()
        self.groups = {"ingest": ingest_pids, "postgres": [postmaster]}
        if broker_pid is not None:
            self.groups["mosquitto"] = [broker_pid]
        self.used: dict[str, float] = {}
        #: PostgreSQL's CPU seconds by process: the ingest's writer lanes, other sessions (the
        #: server's other threads, the bench's poll), autovacuum workers, other background
        #: processes (WAL writer, checkpointer...), and processes that exited meanwhile.
        self.pg_split: dict[str, float] = {}
        self._pg_start: dict[int, float] = {}
        #: Wall-clock seconds between start and stop.
        self.wall = 0.0
        #: CPU seconds the whole machine was busy (every process, ours included).
        self.machine = 0.0
        self._start: dict[str, float] = {}
        self._t0 = 0.0
        self._machine0 = 0.0

    def _now(self, pg_procs: dict[int, tuple[str, float]] | None = None) -> dict[str, float]:
        apps = self._applications() if pg_procs is not None else {}
        out = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                try:
                    proc = psutil.Process(pid)
                    procs = [proc, *proc.children(recursive=True)] if name == "postgres" else [proc]
                    for p in procs:
                        try:
                            t = p.cpu_times()
                            mine = t.user + t.system
                            if name == "postgres" and pg_procs is not None and p.pid != pid:
                                pg_procs[p.pid] = (_pg_kind(p, apps), mine)
                        except psutil.NoSuchProcess:
                            continue
                        total += mine
                        if name == "postgres":  # backends that already exited
                            total += t.children_user + t.children_system
                except psutil.NoSuchProcess:
                    continue
            out[name] = total
        return out

    def _applications(self) -> dict[int, str]:
        """Each client backend's application_name (the server names its sessions)."""
        with psycopg.connect(self._pg_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid, application_name FROM pg_stat_activity"
                " WHERE backend_type = 'client backend'"
            ).fetchall()
        return {int(pid): str(name or "") for pid, name in rows}

    def start(self) -> None:
        procs: dict[int, tuple[str, float]] = {}
        self._start = self._now(procs)
        self._pg_start = {pid: cpu for pid, (_, cpu) in procs.items()}
        self._t0 = time.perf_counter()
        self._machine0 = _machine_busy()

    def stop(self) -> None:
        procs: dict[int, tuple[str, float]] = {}
        end = self._now(procs)
        self.wall = time.perf_counter() - self._t0
        self.machine = _machine_busy() - self._machine0
        self.used = {k: end[k] - self._start.get(k, 0.0) for k in end}
        split = dict.fromkeys(("writers", "other sessions", "autovacuum", "background"), 0.0)
        for pid, (kind, cpu) in procs.items():
            split[kind] += cpu - self._pg_start.get(pid, 0.0)
        split["exited"] = self.used.get("postgres", 0.0) - sum(split.values())
        self.pg_split = split

    @property
    def cores_in_use(self) -> float:
        """CPU seconds of the whole pipeline per wall second: how many cores it kept busy."""
        busy = sum(v for k, v in self.used.items() if k != "events")
        return busy / self.wall if self.wall else 0.0

    @property
    def cores_busy(self) -> float:
        """Cores the whole machine kept busy (the pipeline and everyone else's load)."""
        return self.machine / self.wall if self.wall else 0.0


def _pg_kind(proc: psutil.Process, apps: dict[int, str]) -> str:
    """writers (the ingest's lanes), other sessions (the server's other threads, the bench's
    poll), autovacuum or background, from a PostgreSQL child's title and application_name."""
    if proc.pid in apps:
        return "writers" if apps[proc.pid] == "campus-ingest" else "other sessions"
    try:
        title = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "background"
    if "autovacuum worker" in title:
        return "autovacuum"
    background = ("checkpointer", "background writer", "walwriter", "launcher", "logger")
    if any(b in title for b in background):
        return "background"
    return "other sessions"


def _machine_busy() -> float:
    """CPU seconds not idle, machine-wide; steal (time the hypervisor gave elsewhere) counts as
    busy, since it was not ours to use. Guest time is already inside user and nice."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    guests = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return float(sum(t) - idle - guests)


def e2e(
    work: Path,
    broker: Mosquitto,
    url: str,
    msgs: list[tuple[str, bytes]],
    total: int,
    *,
    pg: Postgres | None = None,
    meter: list[CpuMeter] | None = None,
    servers: int = 1,
    kill_at: float | None = None,
    writers: int | None = None,
    on_start: Callable[[], None] | None = None,
) -> float:
    """Drain ``msgs`` (queued while the servers are away) with ``servers`` ingest processes on
    one ``$share`` group when more than one; at ``kill_at`` (a fraction of ``total`` stored)
    the first is SIGKILLed and started again, as a supervisor would."""
    # a group of its own: Mosquitto keeps dealing a group's messages to members that are
    # offline but whose persistent sessions live on, such as the servers of an earlier run
    extra: tuple[str, ...] = (
        ("--share-group", f"ingest-{time.monotonic_ns()}") if servers > 1 else ()
    )
    if writers is not None:
        extra += ("--writers", str(writers))
    names = [f"ingest{k}-{time.monotonic_ns()}" for k in range(servers)]
    procs = [IngestServer(work, broker.url, url, *extra, name=n) for n in names]
    for server in procs:
        server.start()  # once, to create its persistent session and subscription
    for server in procs:
        server.wait_healthy()
        server.terminate()
    fill_broker(broker, msgs)
    for server in procs:
        server.start()
    # One connection reading the devices' counters (committed with the events): polling
    # count(*) over a new connection each time cost PostgreSQL a backend fork and a table scan
    # 50 times a second, on the same two cores as the server under test.
    with psycopg.connect(url, autocommit=True) as conn:

        def stored() -> int:
            row = conn.execute("SELECT coalesce(sum(event_count), 0) FROM devices").fetchone()
            return int(row[0]) if row else 0

        try:
            wait_until(lambda: stored() > 0, 60, "first stored event", interval=0.005)
            cpu = None
            pids = [s.proc.pid for s in procs if s.proc]
            if on_start is not None:
                on_start()
            if pg is not None and meter is not None and broker.proc and kill_at is None:
                cpu = CpuMeter(pids, broker.proc.pid, pg)
                cpu.start()
                meter.append(cpu)
            t0, n0 = time.perf_counter(), stored()
            if kill_at is not None:
                wait_until(lambda: stored() >= total * kill_at, 600, "the kill point", 0.01)
                procs[0].kill()
                procs[0].start()
            try:
                wait_until(lambda: stored() >= total, 300, f"{total} stored", interval=0.02)
            except TimeoutError:
                for server in procs:
                    print(f"--- {server.log.name} (stored {stored()})\n{server.tail()}")
                raise
            t1 = time.perf_counter()
            if cpu is not None:
                cpu.stop()
                cpu.used["events"] = total - n0
        finally:
            for server in procs:
                server.terminate()
            for k in range(servers):
                drop_session(broker, f"campus-{names[k]}")
    return (total - n0) / (t1 - t0)


def drop_session(broker: Mosquitto, client_id: str) -> None:
    """End a stopped server's persistent session (clean start, expiry 0). Each round's server
    has a session of its own that outlives it by a week: left behind, every later fill queues
    its events for every earlier round's session too, and Mosquitto (one thread) carries them
    all in memory and in each autosave of its persistence file (445 MB and 800 MB resident by
    the fifth round of 200,000 one-event messages), which is the wait the later drains met."""
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    sub.connect(broker.host, broker.port, clean_start=True)
    sub.loop_start()
    try:
        wait_until(sub.is_connected, 30, f"a clean session for {client_id}", interval=0.01)
    finally:
        sub.disconnect()
        sub.loop_stop()


@dataclass(frozen=True)
class Round:
    """One ceiling and the drain after it."""

    ceiling: float
    ceiling_pg: float
    e2e: float
    cpu: CpuMeter | None
    #: Every event stored once, and every readings row.
    exact: bool
    #: pg_stat_statements of the drain (``--statements``): (calls, ms, rows, query).
    statements: list[tuple[int, float, int, str]]


def statements_reset(pg: Postgres) -> None:
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def statements_of(pg: Postgres, dbname: str) -> list[tuple[int, float, int, str]]:
    """The drain's statements by total execution time (``--statements``)."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        got = conn.execute(
            "SELECT calls, total_exec_time, rows, query FROM pg_stat_statements s"
            " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s"
            " ORDER BY total_exec_time DESC LIMIT 12",
            (dbname,),
        ).fetchall()
    return [(int(c), float(t), int(r), " ".join(str(q).split())) for c, t, r, q in got]


def enable_statements(pg: Postgres) -> None:
    """Load pg_stat_statements (a restart), for ``--statements``: its own cost is then in
    every figure, so those runs are for the shares of each statement, not for the ratios."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    pg.restart()
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def target_of(w: Workload, per_message: int) -> float:
    """Issue 22's bar for the median of the rounds' e2e / ceiling ratios."""
    return 0.7 if per_message == 1 else 0.8


def run_workload(
    work: Path, pg: Postgres, broker: Mosquitto, w: Workload, args: argparse.Namespace
) -> dict[str, Any]:
    per_device = args.events // args.devices
    total = per_device * args.devices
    from ingest_server.storage.migrate import migrate_url

    tag = w.type.replace(".", "_")
    msgs = payloads(args.devices, per_device, args.per_message, w.type)
    rows = ceiling_rows(msgs)
    out: dict[str, Any] = {"total": total, "messages": len(msgs), "readings": rows.n_readings}

    def fresh(name: str) -> str:
        url = pg.create_database(f"{tag}_{name}")
        migrate_url(url)
        return url

    if w.type == "env.reading":
        out["copy_events"], out["copy_events_pg"] = copy_ceiling(
            fresh("copy_events"), rows, readings=False, pg=pg
        )
    out["naive"] = insert_per_message(fresh("naive"), min(3000, total), w)
    # The ceiling and the drain alternate, round after round, each into a fresh database: on
    # a shared (virtual) machine either one can move by half between runs a minute apart, and
    # the ratio of the medians is what one noisy pair of runs cannot give.
    rounds: list[Round] = []
    for k in range(args.rounds):
        ceiling_url = fresh(f"copy_all_{k}")
        ceiling, ceiling_pg = copy_ceiling(ceiling_url, rows, readings=True, pg=pg)
        pg.drop_database(f"{tag}_copy_all_{k}")  # nor is it vacuumed during the next drain
        meters: list[CpuMeter] = []
        url = fresh(f"e2e_{k}")
        rate = e2e(
            work,
            broker,
            url,
            msgs,
            total,
            pg=pg,
            meter=meters,
            writers=args.writers,
            on_start=(lambda: statements_reset(pg)) if args.statements else None,
        )
        stats = statements_of(pg, f"{tag}_e2e_{k}") if args.statements else []
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*), count(DISTINCT (device_id, seq)) FROM events")
            stored, distinct = row.fetchone() or (0, 0)
            row = conn.execute("SELECT count(*) FROM readings")
            stored_readings = (row.fetchone() or (0,))[0]
        # earlier rounds' databases are not left for autovacuum to work on during later drains
        pg.drop_database(f"{tag}_e2e_{k}")
        exact = stored == distinct == total and stored_readings == rows.n_readings
        rounds.append(Round(ceiling, ceiling_pg, rate, meters[0] if meters else None, exact, stats))
        r = rounds[-1]
        # the whole machine's beside it: a drain short of cores with the machine full was
        # out-run by other load, not kept waiting
        cores = f"{r.cpu.cores_in_use:.2f} (machine {r.cpu.cores_busy:.2f})" if r.cpu else "-"
        print(
            f"{w.type} round {k + 1}: e2e {rate:,.0f} / ceiling {ceiling:,.0f} ev/s ="
            f" {rate / ceiling:.2f}; cores in use during the drain {cores}; stored {stored},"
            f" distinct {distinct}, expected {total}; readings {stored_readings} of"
            f" {rows.n_readings}: {'exactly once' if exact else 'NOT EXACTLY ONCE'}",
            flush=True,
        )
    del rows
    exact = all(r.exact for r in rounds)
    out["each"] = rounds
    out["rounds"] = [(r.ceiling, r.e2e) for r in rounds]
    out["copy_all"] = statistics.median(r.ceiling for r in rounds)
    out["copy_all_pg"] = statistics.median(r.ceiling_pg for r in rounds)
    out["e2e"] = statistics.median(r.e2e for r in rounds)
    middle = sorted(rounds, key=lambda r: r.e2e)[len(rounds) // 2]
    out["cpu"] = middle.cpu  # the CPU figures of the median drain
    out["statements"] = middle.statements
    out["exact"] = exact
    out["load"] = os.getloadavg()[0]
    return out


def report(w: Workload, r: dict[str, Any], args: argparse.Namespace) -> bool:
    rate, total = r["e2e"], r["total"]
    what = "events" if w.type == "card.tap" else "events + readings"
    print(
        f"\n{w.type}: {total} events ({r['readings']} readings rows) in {r['messages']} messages"
        f" ({args.per_message}/message, {args.devices} devices), Mosquitto → PostgreSQL 15;"
        f" load average {r['load']:.1f} on {os.cpu_count()} cores\n"
    )
    print(f"{'figure':50} {'value':>10} {'baseline':>10} {'ratio':>7} {'target':>7}")

    def line(name: str, value: float, base: float | None = None, target: str = "") -> None:
        if base is None:
            print(f"{name:50} {value:10,.0f} {'-':>10} {'-':>7} {target or '-':>7}")
        else:
            print(f"{name:50} {value:10,.0f} {base:10,.0f} {value / base:7.2f} {target:>7}")

    print(f"(ceiling and drain alternate over {len(r['rounds'])} rounds; rates are the medians)")
    line(f"COPY ceiling, {what} (ev/s)", r["copy_all"])
    if "copy_events" in r:
        line("COPY ceiling, events rows only (ev/s)", r["copy_events"])
    line(f"INSERT+commit per message, {what} (ev/s)", r["naive"])
    target = target_of(w, args.per_message)
    line(f"e2e durable ingest vs COPY {what} (ev/s)", rate, r["copy_all"], f">={target:.2f}")
    if "copy_events" in r:
        line("e2e durable ingest vs COPY events only (ev/s)", rate, r["copy_events"], "")
    line("e2e durable ingest vs INSERT+commit (ev/s)", rate, r["naive"], ">=10")
    cpu: CpuMeter | None = r["cpu"]
    if cpu is not None and not cpu.used.get("events"):
        print("\n(the drain ended before the first poll saw it start: use more --events)")
        cpu = None
    if cpu is not None:
        used = dict(cpu.used)
        n = used.pop("events")
        parts = ", ".join(f"{k} {v * 1e6 / n:.1f}" for k, v in used.items())
        print(f"\nCPU per stored event during the drain (µs): {parts}")
        print(f"ingest events per CPU-second of the ingest process: {n / used['ingest']:,.0f}")
        ceil = f"{r['copy_all_pg'] * 1e6:.1f}"
        if "copy_events_pg" in r:
            ceil += f" ({r['copy_events_pg'] * 1e6:.1f} for the events rows only)"
        print(f"PostgreSQL CPU per event in the COPY ceiling (µs): {ceil}")
        split = ", ".join(f"{k} {v * 1e6 / n:.1f}" for k, v in cpu.pg_split.items())
        print(f"PostgreSQL CPU per stored event during the drain, by process (µs): {split}")
        print(
            f"cores in use during the drain: pipeline {cpu.cores_in_use:.2f}, whole machine"
            f" {cpu.cores_busy:.2f} of {os.cpu_count()}"
        )
    each = "; ".join(f"{e:,.0f} / {c:,.0f} = {e / c:.2f}" for c, e in r["rounds"])
    print(f"each round, e2e / COPY ceiling (ev/s): {each}")
    paired = sorted(e / c for c, e in r["rounds"])
    median = statistics.median(paired)
    print(
        f"e2e / COPY ceiling of each round (the pair a minute apart), median"
        f" {median:.2f}, lowest {paired[0]:.2f}: target >= {target:.2f}"
        f" {'MET' if median >= target else 'NOT MET'}"
    )
    cores = [
        f"{x.cpu.cores_in_use:.2f} ({x.cpu.cores_busy:.2f})" for x in r["each"] if x.cpu is not None
    ]
    print(f"cores the pipeline kept busy during each drain (the whole machine): {', '.join(cores)}")
    once = sum(x.exact for x in r["each"])
    print(f"rounds with every event stored exactly once: {once} of {len(r['each'])}")
    if r["statements"]:
        print("\nstatements of the median drain (pg_stat_statements), time per stored event:")
        for calls, ms, nrows, query in r["statements"]:
            print(f"  {ms * 1e3 / total:7.2f} µs  {calls:6} calls {nrows:8} rows  {query[:90]}")
    return bool(r["exact"])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ingest_e2e", description=__doc__)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-message", type=int, default=100)
    ap.add_argument(
        "--rounds", type=int, default=5, help="ceiling/drain pairs, alternating (default 5)"
    )
    ap.add_argument(
        "--type",
        action="append",
        choices=sorted(WORKLOADS),
        help="workload event type (repeatable; default: card.tap and env.reading)",
    )
    ap.add_argument(
        "--writers",
        type=int,
        help="the ingest server's --writers (default: its own default)",
    )
    ap.add_argument(
        "--statements",
        action="store_true",
        help="load pg_stat_statements and print the drain's statements by time per event"
        " (its own cost is then in every figure: for the shares, not the ratios)",
    )
    args = ap.parse_args(argv)
    types = args.type or ["card.tap", "env.reading"]

    work = shared_tmpdir("campus-bench-")
    pg = Postgres(work)
    pg.start()
    if args.statements:
        enable_statements(pg)
    mqdir = shared_tmpdir("campus-bench-mq-")
    broker = Mosquitto(mqdir, extra_conf=DEPLOYED_AUTOSAVE)
    broker.start()
    results = {}
    try:
        for t in types:
            results[t] = run_workload(work, pg, broker, WORKLOADS[t], args)
    finally:
        broker.kill()
        pg.stop("immediate")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mqdir, ignore_errors=True)  # the broker's persistence file
    ok = [report(WORKLOADS[t], r, args) for t, r in results.items()]
    return 0 if all(ok) else 1
