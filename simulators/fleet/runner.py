"""Run a scenario: lightweight devices in one loop, the school-day generator, faults, the report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

from edge_agent.config import Broker, PublishConfig
from edge_agent.publisher import LinkState
from schemas.events import DeviceKind
from simulators import faults
from simulators.fleet import report as rep
from simulators.fleet.events import keyed_hasher
from simulators.fleet.lite import DeviceSpec, LiteDevice
from simulators.fleet.scenario import Fault, Scenario, clock_seconds, rate_factor
from simulators.harness import Mosquitto, Postgres, shared_tmpdir
from simulators.harness_pipeline import IngestServer

log = logging.getLogger(__name__)
KIND_CODE: Final = {
    DeviceKind.CARD_READER: "cr",
    DeviceKind.CLASS_SIGNAGE: "sg",
    DeviceKind.SMART_BOARD: "sb",
    DeviceKind.RECORDING_UNIT: "ru",
    DeviceKind.ENV_SENSOR: "env",
    DeviceKind.ACCESS_GATE: "gate",
    DeviceKind.LIBRARY_TERMINAL: "lib",
    DeviceKind.GATEWAY: "gw",
}
HASH_KEY: Final = bytes.fromhex("00112233445566778899aabbccddeeff")
_NETWORK: Final = {"network_drop", "network_cut", "network_blackhole"}
_SERVICE: Final = {"broker_kill", "broker_restart", "db_restart", "db_pause", "ingest_kill"}


class FleetError(Exception):
    """The fleet cannot run as asked; the message says why."""


def device_specs(s: Scenario) -> list[DeviceSpec]:
    """Every device: per room ``{school}-{kind}-r{room}-{n}``, per school ``…-r000-{n}``."""
    specs = []
    for school in s.all_schools:
        rooms = [(room, school.devices) for room in range(1, school.rooms + 1)]
        for room, devices in [(0, school.school_devices), *rooms]:
            for kind, n in devices.items():
                profile = s.profile(kind)
                if profile is None or n == 0:
                    continue
                for i in range(1, n + 1):
                    dev = f"{school.id}-{KIND_CODE[kind]}-r{room:03d}-{i}"
                    specs.append(DeviceSpec(dev, school.id, kind, tuple(profile.event_types)))
    return specs


def targets(fault: Fault, devices: list[LiteDevice]) -> list[LiteDevice]:
    t = fault.target
    return [d for d in devices if t in ("all", d.spec.school_id, d.spec.id)]


@dataclass(slots=True)
class Services:
    """What the run talks to; the objects are set only for services this run started."""

    broker_url: str
    db_url: str
    mosquitto: Mosquitto | None = None
    postgres: Postgres | None = None
    ingest: IngestServer | None = None
    workdir: Path | None = None

    def need(self, action: str) -> None:
        have = {
            "broker": self.mosquitto is not None,
            "db": self.postgres is not None,
            "ingest": self.ingest is not None,
        }
        if not have[action.split("_", maxsplit=1)[0]]:
            raise FleetError(f"fault {action} needs a service this run started: run with --local")


@contextlib.contextmanager
def local_services(workdir: Path | None = None) -> Iterator[Services]:
    """Mosquitto, PostgreSQL and an ingest server on loopback, torn down afterwards."""
    _raise_fd_limit()
    root = workdir or shared_tmpdir("campus-sim-")
    mdir, pdir = root / "mosquitto", root / "postgres"
    for d in (mdir, pdir):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    broker = Mosquitto(mdir)
    pg = Postgres(pdir)
    ingest = None
    try:
        broker.start()
        pg.start()
        db_url = pg.create_database("campus")
        ingest = IngestServer(root, broker.url, db_url)
        ingest.start()
        ingest.wait_healthy(90)
        yield Services(broker.url, db_url, broker, pg, ingest, root)
    finally:
        if ingest is not None:
            ingest.terminate()
        broker.kill()
        with contextlib.suppress(Exception):
            pg.stop("immediate")
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


class Progress:
    """A bar on a tty, a plain line every few seconds otherwise; both on ``stream``."""

    EVERY_S: Final = 5.0

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self._last = 0.0

    def show(self, frac: float, text: str) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r[{bar:<30}] {frac * 100:3.0f}% {text}\033[K")
            self.stream.flush()
        elif now - self._last >= self.EVERY_S:
            self.stream.write(f"campus-sim {frac * 100:3.0f}% {text}\n")
            self.stream.flush()
            self._last = now

    def done(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")


@dataclass(slots=True)
class _Run:
    devices: list[LiteDevice]
    proxies: dict[str, faults.TcpProxy] = field(default_factory=dict)
    disks: dict[str, faults.Tmpfs] = field(default_factory=dict)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    stored: int = 0
    phase: str = "run"


class Fleet:
    """``await Fleet(scenario, services, workdir).run()`` → the accounting report."""

    #: Seconds the run may spend, after generation ends, for every event to reach the database.
    DRAIN_TIMEOUT_S = 120.0
    POLL_S = 1.0
    #: Seconds the fleet may take to come online before the day starts anyway.
    CONNECT_TIMEOUT_S = 60.0

    def __init__(
        self,
        scenario: Scenario,
        services: Services,
        workdir: Path,
        *,
        progress: Progress | None = None,
        drain_timeout_s: float | None = None,
    ) -> None:
        self.s = scenario
        self.services = services
        self.workdir = workdir
        self.progress = progress or Progress(quiet=True)
        self.drain_timeout_s = drain_timeout_s or self.DRAIN_TIMEOUT_S
        self.specs = device_specs(scenario)
        if not self.specs:
            raise FleetError("the scenario has no devices")
        for f in scenario.faults:
            if f.action in _SERVICE:
                services.need(f.action)

    def _broker(self, dev: str, port: int | None) -> Broker:
        u = urlsplit(self.services.broker_url)
        return Broker(
            host=u.hostname or "127.0.0.1",
            port=port or u.port or 1883,
            tls=u.scheme == "mqtts",
            protocol="5",
            client_id=f"agent-{dev}",
            keepalive_s=self.s.tuning.keepalive_s,
            username=u.username,
            password=u.password,
        )

    async def run(self) -> rep.Report:
        _raise_fd_limit()
        ids = [d.id for d in self.specs]
        taken = await asyncio.to_thread(rep.existing_devices, self.services.db_url, ids)
        if taken:
            raise FleetError(
                f"the database already holds events of {', '.join(taken)}: use a fresh database "
                "or another district/school id"
            )
        t = self.s.tuning
        publish = PublishConfig(
            max_batch_events=t.max_batch_events,
            inflight=t.inflight,
            linger_ms=t.linger_ms,
            replay_rate=t.replay_rate,
            backoff_initial_s=t.backoff_initial_s,
            backoff_max_s=t.backoff_max_s,
        )
        hasher = keyed_hasher(HASH_KEY)
        async with contextlib.AsyncExitStack() as stack:
            run = _Run([])
            bport = urlsplit(self.services.broker_url).port or 1883
            for f in self.s.faults:
                if f.action in _NETWORK and f.target not in run.proxies:
                    run.proxies[f.target] = await stack.enter_async_context(
                        faults.TcpProxy(bport, urlsplit(self.services.broker_url).hostname or "")
                    )
                if f.action == "disk_full" and f.target not in run.disks:
                    path = self.workdir / f"disk-{len(run.disks)}"
                    run.disks[f.target] = stack.enter_context(faults.Tmpfs(path, 64))
            for spec in self.specs:
                proxy = next(
                    (p for tg, p in run.proxies.items() if tg in ("all", spec.school_id, spec.id)),
                    None,
                )
                disk = next(
                    (d for tg, d in run.disks.items() if tg in ("all", spec.school_id, spec.id)),
                    None,
                )
                base = disk.path if disk else self.workdir / "outbox"
                base.mkdir(parents=True, exist_ok=True)
                run.devices.append(
                    LiteDevice(
                        spec,
                        self._broker(spec.id, proxy.port if proxy else None),
                        publish,
                        base / f"{spec.id}.db",
                        hasher,
                        puback_timeout_s=t.puback_timeout_s,
                    )
                )
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(d.run(), name=f"device:{d.spec.id}") for d in run.devices]
                await asyncio.gather(*(d.wait_open() for d in run.devices))
                await self._connected(run)
                started = time.monotonic()
                poller = tg.create_task(self._poll(run), name="poll-stored")
                fault_tasks = [
                    tg.create_task(self._fault(f, run, started), name=f"fault:{f.action}")
                    for f in self.s.faults
                ]
                try:
                    await self._generate(run, started)
                    await asyncio.gather(*fault_tasks)
                    await self._drain(run, started)
                    wall = time.monotonic() - started
                    outboxed = {d.spec.id: d.outboxed for d in run.devices}
                    depths = {d.spec.id: await d.depth() for d in run.devices}
                finally:
                    for task in (*tasks, poller, *fault_tasks):
                        task.cancel()
        self.progress.done()
        return await asyncio.to_thread(self._report, run, wall, outboxed, depths)

    async def _connected(self, run: _Run) -> None:
        """The school day starts once every device is online (or CONNECT_TIMEOUT_S passed)."""
        deadline = time.monotonic() + self.CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            online = sum(
                d.publisher is not None and d.publisher.state is LinkState.ONLINE
                for d in run.devices
            )
            self.progress.show(0.0, f"connecting: {online}/{len(run.devices)} online")
            if online == len(run.devices):
                return
            await asyncio.sleep(0.1)
        log.warning("not every device connected within %.0f s", self.CONNECT_TIMEOUT_S)

    async def _generate(self, run: _Run, started: float) -> None:
        rng = random.Random(self.s.seed)  # noqa: S311 - reproducible load, not security
        acc = [rng.random() for _ in run.devices]
        profiles = [self.s.profile(d.spec.kind) for d in run.devices]
        sim0, wall = clock_seconds(self.s.start), self.s.wall_seconds
        last = 0.0
        while last < wall:
            await asyncio.sleep(self.s.tick_s)
            now = min(time.monotonic() - started, wall)
            sim_a, sim_b = sim0 + last * self.s.speed, sim0 + now * self.s.speed
            dt_h = (sim_b - sim_a) / 3600
            last = now
            todo = []
            for i, (dev, prof) in enumerate(zip(run.devices, profiles, strict=True)):
                if prof is None:
                    continue
                acc[i] += prof.per_hour * rate_factor(prof, (sim_a + sim_b) / 2) * dt_h
                n = int(acc[i])
                acc[i] -= n
                if n or dev.pending:
                    todo.append(dev.produce(n))
            await asyncio.gather(*todo)
            sim_now = int(sim_b)
            self._show(run, now / wall * 0.9, f"{sim_now // 3600:02d}:{sim_now % 3600 // 60:02d}")

    def _show(self, run: _Run, frac: float, clock: str) -> None:
        gen = sum(d.made for d in run.devices)
        acked = sum(d.publisher.stats.events for d in run.devices if d.publisher)
        self.progress.show(
            frac, f"{clock} {run.phase}: generated {gen} acked {acked} stored {run.stored}"
        )

    async def _poll(self, run: _Run) -> None:
        ids = [d.spec.id for d in run.devices]
        while True:
            with contextlib.suppress(Exception):  # the database may be down on purpose
                run.stored = await asyncio.to_thread(rep.count_stored, self.services.db_url, ids)
            await asyncio.sleep(self.POLL_S)

    async def _drain(self, run: _Run, started: float) -> None:
        """Store what is pending, then wait until every outbox is empty and the rows are in."""
        run.phase = "drain"
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            for d in run.devices:
                if d.pending:
                    await d.flush()
            made = sum(d.made for d in run.devices)
            outboxed = sum(d.outboxed for d in run.devices)
            if outboxed == made - sum(d.dropped for d in run.devices) and run.stored >= outboxed:
                depths = await asyncio.gather(*(d.depth() for d in run.devices))
                if not any(depths):
                    return
            self._show(run, 0.9 + 0.1 * min(1.0, run.stored / max(outboxed, 1)), "drain")
            await asyncio.sleep(0.25)
        log.warning("drain timed out after %.0f s", self.drain_timeout_s)

    async def _fault(self, f: Fault, run: _Run, started: float) -> None:
        await asyncio.sleep(max(0.0, started + self.s.fault_offset_s(f) - time.monotonic()))
        svc, hit = self.services, targets(f, run.devices)
        entry: dict[str, Any] = {
            "at": f.at,
            "action": f.action,
            "target": f.target,
            "t_s": round(time.monotonic() - started, 2),
        }
        run.fault_log.append(entry)
        log.info("fault %s on %s at %s", f.action, f.target, f.at)
        a = f.action
        if a in ("broker_kill", "broker_restart"):
            assert svc.mosquitto is not None
            stop = svc.mosquitto.kill if a == "broker_kill" else svc.mosquitto.stop
            await asyncio.to_thread(stop)
            await asyncio.sleep(f.duration_s)
            await asyncio.to_thread(svc.mosquitto.start)
        elif a == "db_restart":
            assert svc.postgres is not None
            await asyncio.to_thread(svc.postgres.stop, "fast")
            await asyncio.sleep(f.duration_s)
            await asyncio.to_thread(svc.postgres.start)
        elif a == "db_pause":
            assert svc.postgres is not None
            pids = faults.db_pause(svc.postgres)
            try:
                await asyncio.sleep(f.duration_s)
            finally:
                faults.db_resume(pids)
        elif a == "ingest_kill":
            assert svc.ingest is not None
            await asyncio.to_thread(svc.ingest.kill)
            await asyncio.sleep(f.duration_s)
            await asyncio.to_thread(svc.ingest.start)
            await asyncio.to_thread(svc.ingest.wait_healthy, 90)
        elif a in _NETWORK:
            proxy = run.proxies[f.target]
            if a == "network_drop":
                entry["detail"] = f"{proxy.drop()} connections"
            else:
                mode = faults.LinkMode.CUT if a == "network_cut" else faults.LinkMode.BLACKHOLE
                proxy.set_mode(mode)
                try:
                    await asyncio.sleep(f.duration_s)
                finally:
                    proxy.set_mode(faults.LinkMode.UP)
        elif a == "disk_full":
            disk = run.disks[f.target]
            entry["detail"] = f"{await asyncio.to_thread(disk.fill)} bytes of ballast"
            try:
                await asyncio.sleep(f.duration_s)
            finally:
                disk.free()
            entry["detail"] += f"; {sum(d.store_errors > 0 for d in hit)} outboxes refused writes"
        elif a == "clock_skew":
            for d in hit:
                d.clock_offset_s = f.skew_s
            entry["detail"] = f"{len(hit)} devices {f.skew_s:+.0f} s"
        elif a == "malformed":
            school = self.specs[0].school_id
            msgs = faults.malformed_messages(school, f"{school}-malformed", f.count)
            entry["detail"] = f"{await asyncio.to_thread(faults.publish_raw, svc.broker_url, msgs)}"
        elif a == "duplicate_storm":
            msgs = [(d.up_topic, p) for d in hit for p in d.recent]
            if msgs:
                storm = [msgs[i % len(msgs)] for i in range(f.count)]
                sent = await asyncio.to_thread(faults.publish_raw, svc.broker_url, storm)
                entry["detail"] = f"{sent} batches re-published"
            else:
                entry["detail"] = "nothing sent yet to repeat"

    def _report(
        self, run: _Run, wall: float, outboxed: dict[str, int], depths: dict[str, int]
    ) -> rep.Report:
        db = self.services.db_url
        by_dev = rep.stored_by_device(db, outboxed)
        clean = [d.spec.id for d in run.devices if d.clock_offset_s == 0]
        gaps, pct, quarantined = rep.gaps_and_latency(db, list(outboxed), clean)
        generated = sum(d.made for d in run.devices)
        stored = sum(v[0] for v in by_dev.values())
        lost_by = {
            d.spec.id: n
            for d in run.devices
            if (n := d.made - d.reported_drops - by_dev.get(d.spec.id, (0, 0, 0))[0])
        }
        dropped_reported = sum(d.reported_drops for d in run.devices)
        dropped = None
        if self.services.ingest is not None:
            with contextlib.suppress(Exception):
                dropped = int(self.services.ingest.metric("campus_ingest_events_duplicate_total"))
        return rep.Report(
            scenario=self.s.name,
            devices=len(run.devices),
            wall_s=round(wall, 2),
            generated=generated,
            outboxed=sum(outboxed.values()),
            acknowledged=sum(outboxed.values()) - sum(depths.values()),
            stored=stored,
            duplicates_stored=sum(v[1] for v in by_dev.values()),
            duplicates_dropped=dropped,
            gaps=gaps,
            lost=generated - stored - dropped_reported,
            unexpected=sum(v[2] for v in by_dev.values()),
            quarantined=quarantined,
            latency_p50_s=pct[0],
            latency_p95_s=pct[1],
            latency_p99_s=pct[2],
            replayed=sum(d.publisher.stats.replayed_events for d in run.devices if d.publisher),
            dropped=dropped_reported,
            store_errors=sum(d.store_errors for d in run.devices),
            publisher_crashes=sum(d.publisher_crashes for d in run.devices),
            faults=run.fault_log,
            lost_by_device=dict(sorted(lost_by.items())[:20]),
        )


def _raise_fd_limit() -> None:
    """Each device holds a socket and four outbox files: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
