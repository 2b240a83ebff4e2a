"""A district on one box: light devices over several worker processes, the single-box layout.

``campus-sim run SCENARIO --local`` takes this path when the scenario has a ``[layout]`` with
more than one worker or broker, or ``tls = true`` (deploy/scenarios/district-805.toml):

- ``brokers`` Mosquitto instances, the schools split between them (school *i* → broker
  *i mod brokers*), each with a TLS listener for devices and a loopback listener for its ingest
  worker, one password file and ACL for all (every device its own user, confined to its topics);
- one ``ingest-server`` per broker, all writing to one PostgreSQL;
- ``workers`` simulator processes (``simulators/fleet/district_worker.py``) sharing the devices,
  each under the per-process open-file limit.

The run accounts for every event as the one-process fleet does (``report.Report``), and adds
how long the fleet took to come online (``connect_s``), for each fault how long until every
device was back online (``reconnect_s``) and the backlog of the fault's moment was stored
(``recovered_s``), and CPU seconds per component. Faults here: ``broker_kill``/
``broker_restart`` (target ``all`` or a school: that school's broker), ``ingest_kill`` (the
ingest worker of the target school's broker, ``all``: every one), ``db_restart``, ``db_pause``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import msgspec
import psutil

from ingest_server.control.broker_auth import (
    DEVICE_PUBLISH,
    DEVICE_READ,
    SERVER_PUBLISH,
    SERVER_READ,
    BrokerRules,
    DeviceCredential,
    hash_password,
)
from simulators import faults
from simulators.fleet import report as rep
from simulators.fleet.district_worker import Job, device_password
from simulators.fleet.lite import DeviceSpec
from simulators.fleet.runner import HASH_KEY, FleetError, Progress, device_specs
from simulators.fleet.scenario import Fault, Scenario, clock_seconds
from simulators.harness import Mosquitto, Postgres, free_port, port_open, wait_until
from simulators.harness_pipeline import IngestServer

log = logging.getLogger(__name__)
DISTRICT_FAULTS: Final = {"broker_kill", "broker_restart", "ingest_kill", "db_restart", "db_pause"}
SERVER_USER: Final = "ingest"
#: Open files a worker may use for its devices (sockets), below the 20,000 hard limit.
WORKER_FD_BUDGET: Final = 15_000


class DistrictBroker(Mosquitto):
    """Mosquitto with a TLS listener for devices, a loopback one for ingest, auth files."""

    def __init__(self, workdir: Path, passwd: Path, acl: Path, tls: dict[str, Path] | None):
        super().__init__(workdir)
        self.tls_port = free_port() if tls else self.port
        user = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
            f"user {user}",
            "persistence true",
            f"persistence_location {workdir / 'data'}/",
            "autosave_interval 30",
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "max_inflight_messages 0",
            "max_keepalive 600",
            "message_size_limit 1048576",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            f"listener {self.port} 127.0.0.1",
        ]
        if tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {tls['ca']}",
                f"certfile {tls['cert']}",
                f"keyfile {tls['key']}",
                "tls_version tlsv1.2",
            ]
        self.conf.write_text("\n".join(lines) + "\n")

    #: Seconds a broker with ~14,000 TLS connections may take to stop or to listen again.
    STOP_S: Final = 60.0
    START_S: Final = 120.0

    def start(self) -> None:
        with self.log.open("ab") as out:
            proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=out, stderr=out)
        self.proc = proc

        def up() -> bool:
            return (port_open(self.port) and port_open(self.tls_port)) or proc.poll() is not None

        wait_until(up, self.START_S, "mosquitto listeners")
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM (sessions saved), SIGKILL if it has not gone within STOP_S."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto did not stop within %.0f s: killed", self.STOP_S)
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@dataclass(slots=True)
class DistrictServices:
    brokers: list[DistrictBroker]
    ingests: list[IngestServer]
    postgres: Postgres
    db_url: str
    ca: Path | None
    password_key: bytes = field(repr=False)

    def broker_of(self, school_index: int) -> int:
        return school_index % len(self.brokers)

    def processes(self) -> dict[str, list[int]]:
        """Live pids per component, for CPU accounting."""
        out: dict[str, list[int]] = {"broker": [], "ingest": [], "postgres": []}
        for b in self.brokers:
            if b.proc is not None and b.proc.poll() is None:
                out["broker"].append(b.proc.pid)
        for i in self.ingests:
            if i.proc is not None and i.proc.poll() is None:
                out["ingest"].append(i.proc.pid)
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            pid = int((self.postgres.datadir / "postmaster.pid").read_text().split()[0])
            pm = psutil.Process(pid)
            out["postgres"] = [pid, *(c.pid for c in pm.children())]
        return out


def pattern_acl() -> str:
    """Mosquitto's ACL for the district: ``%u`` patterns keep every device to the topics of its
    own id. (A ``user`` block per device, as ``ingest-server broker-auth`` writes, also binds the
    school, but Mosquitto 2.0 loads such a file in time quadratic in its users: 186 s for
    27,847 devices on this box; see docs/capacity.md.)"""
    lines = ["# campus-sim district layout: every device confined to its own id's topics", ""]
    lines += [f"user {SERVER_USER}"]
    lines += [f"topic read campus/v1/+/+/{c}" for c in SERVER_READ]
    lines += [f"topic write campus/v1/+/+/{c}" for c in SERVER_PUBLISH]
    lines += [""]
    lines += [f"pattern write campus/v1/+/%u/{c}" for c in DEVICE_PUBLISH]
    lines += [f"pattern read campus/v1/+/%u/{c}" for c in DEVICE_READ]
    return "\n".join(lines) + "\n"


def _tls_files(root: Path) -> dict[str, Path]:
    import trustme  # noqa: PLC0415 - a dev dependency, only for --local TLS runs

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    cert = ca.issue_cert("127.0.0.1", "localhost", key_type=trustme.KeyType.ECDSA)
    out = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key"}
    ca.cert_pem.write_to_path(str(out["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(out["cert"]))
    cert.private_key_pem.write_to_path(str(out["key"]))
    out["key"].chmod(0o600)
    return out


@contextlib.contextmanager
def district_services(s: Scenario, specs: list[DeviceSpec], root: Path) -> Iterator[Any]:
    """The single-box layout of ``s.layout``: brokers, an ingest worker each, one database."""
    _raise_fd_limit()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    key = secrets.token_bytes(32)
    server_pw = secrets.token_urlsafe(24)
    server_hash = hash_password(server_pw)
    nb = s.layout.brokers
    broker_of = {sc.id: i % nb for i, sc in enumerate(s.all_schools)}
    acl = root / "acl"
    acl.write_text(pattern_acl())
    passwds = []
    for n in range(nb):
        # each broker knows only the devices of its own schools
        creds = {
            d.id: DeviceCredential(d.id, d.school_id, hash_password(device_password(key, d.id)))
            for d in specs
            if broker_of[d.school_id] == n
        }
        passwds.append(root / f"passwd-{n}")
        passwds[-1].write_text(BrokerRules(creds, SERVER_USER, server_hash).passwd_text())
        passwds[-1].chmod(0o600)
    tls = _tls_files(root) if s.layout.tls else None
    brokers: list[DistrictBroker] = []
    ingests: list[IngestServer] = []
    (root / "postgres").mkdir(exist_ok=True)
    (root / "postgres").chmod(0o755)
    pg = Postgres(root / "postgres")
    try:
        for n in range(s.layout.brokers):
            d = root / f"broker-{n}"
            d.mkdir(exist_ok=True)
            brokers.append(DistrictBroker(d, passwds[n], acl, tls))
            brokers[-1].start()
        pg.start()
        db_url = pg.create_database("campus")
        for n, b in enumerate(brokers):
            ing = IngestServer(root, None, db_url, name=f"ingest-{n}")
            # the server's password goes by environment, never on a command line
            ing.env["CAMPUS_BROKER_URL"] = f"mqtt://{SERVER_USER}:{server_pw}@127.0.0.1:{b.port}"
            ing.start()
            ing.wait_healthy(90)  # one at a time: the first applies the migrations
            ingests.append(ing)
        yield DistrictServices(brokers, ingests, pg, db_url, tls["ca"] if tls else None, key)
    finally:
        for ing in ingests:
            ing.terminate()
        for b in brokers:
            b.kill()
        with contextlib.suppress(Exception):
            pg.stop("immediate")


def _raise_fd_limit() -> None:
    import resource  # noqa: PLC0415 - POSIX only

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass(slots=True)
class _WorkerProc:
    proc: asyncio.subprocess.Process
    stat: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    #: Its stdout is read to the end: everything it said has been taken in.
    eof: bool = False

    def failed(self) -> bool:
        """Exited with an error, or cleanly but without its final line: a worker that has
        exited 0 and whose last lines are still being read has not failed (yet)."""
        code = self.proc.returncode
        return code is not None and (code != 0 or (self.eof and self.final is None))


class District:
    """``await District(scenario, services, workdir).run()`` → the accounting report."""

    CONNECT_TIMEOUT_S = 600.0
    DRAIN_TIMEOUT_S = 300.0

    def __init__(
        self,
        scenario: Scenario,
        services: DistrictServices,
        workdir: Path,
        *,
        progress: Progress | None = None,
        drain_timeout_s: float | None = None,
    ) -> None:
        self.s = scenario
        self.svc = services
        self.workdir = workdir
        self.progress = progress or Progress(quiet=True)
        self.drain_timeout_s = drain_timeout_s or self.DRAIN_TIMEOUT_S
        self.specs = device_specs(scenario)
        check_district(scenario, len(self.specs))
        self.school_index = {sc.id: i for i, sc in enumerate(scenario.all_schools)}
        self.workers: list[_WorkerProc] = []
        self.stored = 0
        self.fault_log: list[dict[str, Any]] = []
        #: Wall-clock (fault, recovered) per fault, in fault_log's order; None while recovering.
        self.fault_windows: list[tuple[float, float | None]] = []
        self.start_epoch = time.time()
        self._cpu_by_pid: dict[tuple[str, int], float] = {}
        self.connected = 0

    def _jobs(self) -> list[Job]:
        w = self.s.layout.workers
        shares: list[list[tuple[str, str, str, str, int]]] = [[] for _ in range(w)]
        for n, d in enumerate(self.specs):
            b = self.svc.brokers[self.svc.broker_of(self.school_index[d.school_id])]
            shares[n % w].append((d.id, d.school_id, d.kind.value, b.host, b.tls_port))
        (self.workdir / "outbox").mkdir(parents=True, exist_ok=True)
        return [
            Job(
                devices=share,
                scenario=self.s,
                password_key=self.svc.password_key.hex(),
                hash_key=HASH_KEY.hex(),
                outbox=str(self.workdir / "outbox" / f"worker-{i}.db"),
                ca=str(self.svc.ca) if self.svc.ca else None,
                worker=i,
            )
            for i, share in enumerate(shares)
        ]

    def _sum(self, key: str) -> int:
        return sum(int(w.stat.get(key, 0)) for w in self.workers)

    async def _send(self, line: str) -> None:
        for w in self.workers:
            assert w.proc.stdin is not None
            w.proc.stdin.write(line.encode() + b"\n")
            await w.proc.stdin.drain()

    async def _read(self, w: _WorkerProc) -> None:
        assert w.proc.stdout is not None
        try:
            while line := await w.proc.stdout.readline():
                msg = json.loads(line)
                if msg.get("t") == "final":
                    w.final = msg
                w.stat = msg
        finally:
            w.eof = True

    async def _poll(self) -> None:
        ids = [d.id for d in self.specs]
        while True:
            with contextlib.suppress(Exception):  # the database may be down on purpose
                self.stored = await asyncio.to_thread(rep.count_stored, self.svc.db_url, ids)
            self._sample_cpu()
            await asyncio.sleep(1.0)

    def _sample_cpu(self) -> None:
        """CPU seconds of every process of each component, by pid: a process restarted by a
        fault keeps what its predecessor used."""
        groups = self.svc.processes()
        groups["simulator"] = [w.proc.pid for w in self.workers if w.proc.returncode is None]
        for name, pids in groups.items():
            for pid in pids:
                with contextlib.suppress(psutil.Error):
                    c = psutil.Process(pid).cpu_times()
                    self._cpu_by_pid[(name, pid)] = c.user + c.system

    def _cpu(self) -> dict[str, float]:
        self._sample_cpu()
        out: dict[str, float] = dict.fromkeys(("broker", "ingest", "postgres", "simulator"), 0.0)
        for (name, _), v in self._cpu_by_pid.items():
            out[name] = out.get(name, 0.0) + v
        return out

    async def _until(self, cond: Any, limit_s: float, what: str) -> float:
        t0 = time.monotonic()
        while not cond():
            for w in self.workers:
                # at "stop" the workers exit one by one, each after its final line
                if w.failed():
                    raise FleetError(f"a simulator worker exited ({w.proc.returncode}) {what}")
            if time.monotonic() - t0 > limit_s:
                raise FleetError(f"timed out after {limit_s:.0f} s {what}")
            await asyncio.sleep(0.2)
        return time.monotonic() - t0

    async def run(self) -> rep.Report:
        n = len(self.specs)
        jobs = self._jobs()
        t0 = time.monotonic()
        for job in jobs:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "simulators.fleet.district_worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 26,
            )
            self.workers.append(_WorkerProc(proc))
            assert proc.stdin is not None
            proc.stdin.write(msgspec.json.encode(job) + b"\n")
            await proc.stdin.drain()
        readers = [asyncio.create_task(self._read(w)) for w in self.workers]
        poller = asyncio.create_task(self._poll())
        try:
            return await self._day(n, t0)
        finally:
            poller.cancel()
            for w in self.workers:
                if w.proc.returncode is None:
                    w.proc.kill()
                    await w.proc.wait()
            for r in readers:
                r.cancel()

    async def _day(self, n: int, t0: float) -> rep.Report:
        def online() -> int:
            return self._sum("online")

        async def show_connect() -> None:
            while True:
                self.progress.show(0.0, f"connecting: {online()}/{n} online")
                await asyncio.sleep(1)

        shower = asyncio.create_task(show_connect())
        try:
            await self._until(lambda: online() >= n, self.CONNECT_TIMEOUT_S, "connecting")
        finally:
            shower.cancel()
        connect_s = time.monotonic() - t0
        cpu0 = self._cpu()
        start_epoch = time.time() + 1.0
        self.start_epoch = start_epoch
        started = time.monotonic() + 1.0
        await self._send(f"go {start_epoch}")
        faults_t = [asyncio.create_task(self._fault(f, started)) for f in self.s.faults]
        wall = self.s.wall_seconds
        while time.monotonic() - started < wall or not all(
            w.stat.get("done") for w in self.workers
        ):
            frac = min(1.0, (time.monotonic() - started) / wall) * 0.9
            self.progress.show(frac, self._line("run"))
            await asyncio.sleep(1.0)
            for w in self.workers:
                if w.proc.returncode is not None:
                    raise FleetError(f"a simulator worker exited ({w.proc.returncode})")
            for t in faults_t:  # a fault that failed ends the run now, not at the day's end
                if t.done() and t.exception() is not None:
                    await t
        await asyncio.gather(*faults_t)
        # drain: every device's outbox empty and every event made stored
        deadline = time.monotonic() + self.drain_timeout_s
        while time.monotonic() < deadline:
            made = self._sum("made")
            if self._sum("pending") == 0 and self.stored >= made:
                break
            self.progress.show(
                0.9 + 0.1 * min(1.0, self.stored / max(made, 1)), self._line("drain")
            )
            await asyncio.sleep(0.5)
        else:
            log.warning("drain timed out after %.0f s", self.drain_timeout_s)
        wall_s = time.monotonic() - started
        cpu1 = self._cpu()
        self.connected = self._sum("online")
        await self._send("stop")
        await self._until(lambda: all(w.final for w in self.workers), 120, "stopping")
        self.progress.done()
        cpu = {k: round(max(0.0, cpu1.get(k, 0.0) - cpu0.get(k, 0.0)), 1) for k in cpu1}
        return await asyncio.to_thread(self._report, wall_s, connect_s, cpu)

    def _sim_minute(self, t: datetime) -> str:
        """The scenario's clock (HH:MM) at wall time ``t``."""
        sim = clock_seconds(self.s.start) + (t.timestamp() - self.start_epoch) * self.s.speed
        sim = round(max(0.0, sim)) % 86_400
        return f"{int(sim // 3600):02d}:{int(sim % 3600 // 60):02d}"

    def _line(self, phase: str) -> str:
        return (
            f"{phase}: online {self._sum('online')} generated {self._sum('made')} "
            f"acked {self._sum('acked')} stored {self.stored}"
        )

    def _brokers_of(self, target: str) -> list[int]:
        if target == "all":
            return list(range(len(self.svc.brokers)))
        school = target if target in self.school_index else target.split("-", 1)[0]
        return [self.svc.broker_of(self.school_index[school])]

    async def _fault(self, f: Fault, started: float) -> None:
        await asyncio.sleep(max(0.0, started + self.s.fault_offset_s(f) - time.monotonic()))
        entry: dict[str, Any] = {
            "at": f.at,
            "action": f.action,
            "target": f.target,
            "t_s": round(time.monotonic() - started, 2),
        }
        self.fault_log.append(entry)
        t_fault = time.monotonic()
        self.fault_windows.append((time.time(), None))
        window = len(self.fault_windows) - 1
        a, svc = f.action, self.svc
        if a in ("broker_kill", "broker_restart"):
            which = [svc.brokers[i] for i in self._brokers_of(f.target)]
            # every targeted broker at once: the whole fleet is thrown off together
            await asyncio.gather(
                *(asyncio.to_thread(b.kill if a == "broker_kill" else b.stop) for b in which)
            )
            await asyncio.sleep(f.duration_s)
            await asyncio.gather(*(asyncio.to_thread(b.start) for b in which))
        elif a == "ingest_kill":
            which_i = [svc.ingests[i] for i in self._brokers_of(f.target)]
            for i in which_i:
                await asyncio.to_thread(i.kill)
            await asyncio.sleep(f.duration_s)
            for i in which_i:
                await asyncio.to_thread(i.start)
            for i in which_i:
                await asyncio.to_thread(i.wait_healthy, 90)
        elif a == "db_restart":
            await asyncio.to_thread(svc.postgres.stop, "fast")
            await asyncio.sleep(f.duration_s)
            await asyncio.to_thread(svc.postgres.start)
        elif a == "db_pause":
            pids = faults.db_pause(svc.postgres)
            try:
                await asyncio.sleep(f.duration_s)
            finally:
                faults.db_resume(pids)
        back = time.monotonic()
        backlog = self._sum("made")  # every event made by the time the service is back
        n = len(self.specs)
        reconnect = await self._until(lambda: self._sum("online") >= n, 600, "reconnecting")
        await self._until(lambda: self.stored >= backlog, 600, "catching up")
        if a.startswith("broker"):
            entry["reconnect_s"] = round(reconnect, 2)
        entry["recovered_s"] = round(time.monotonic() - back, 2)
        self.fault_windows[window] = (self.fault_windows[window][0], time.time())
        entry["outage_s"] = round(back - t_fault, 2)

    def _report(self, wall: float, connect_s: float, cpu: dict[str, float]) -> rep.Report:
        db = self.svc.db_url
        outboxed: dict[str, int] = {}
        pending = 0
        for w in self.workers:
            assert w.final is not None
            for dev, (seq, pend) in w.final["devices"].items():
                outboxed[dev] = int(seq)
                pending += int(pend)
        by_dev = rep.stored_by_device(db, outboxed)
        gaps, pct, quarantined = rep.gaps_and_latency(db, list(outboxed), list(outboxed))
        end = time.time()
        windows = [
            (datetime.fromtimestamp(a, UTC), datetime.fromtimestamp(b or end, UTC))
            for a, b in self.fault_windows
        ]
        # the scenario's minutes in wall time: their length at its speed, and where one starts
        sim0 = clock_seconds(self.s.start)
        first = self.start_epoch + ((-sim0) % 60) / self.s.speed
        minute = (timedelta(seconds=60 / self.s.speed), datetime.fromtimestamp(first, UTC))
        steady, per_window, by_minute = rep.window_latency(
            db, list(outboxed), windows, self._sim_minute, minute
        )
        for f, w99 in zip(self.fault_log, per_window, strict=False):
            f["latency_p99_s"] = None if w99 is None else round(w99, 3)
        generated = sum(outboxed.values())
        stored = sum(v[0] for v in by_dev.values())
        lost_by = {d: m - by_dev.get(d, (0, 0, 0))[0] for d, m in outboxed.items()}
        dropped = 0.0
        for ing in self.svc.ingests:
            with contextlib.suppress(Exception):
                dropped += ing.metric("campus_ingest_events_duplicate_total")
        stored_n = max(1, stored)
        recov = [f["recovered_s"] for f in self.fault_log if "recovered_s" in f]
        return rep.Report(
            scenario=self.s.name,
            devices=len(self.specs),
            wall_s=round(wall, 2),
            generated=generated,
            outboxed=generated,
            acknowledged=generated - pending,
            stored=stored,
            duplicates_stored=sum(v[1] for v in by_dev.values()),
            duplicates_dropped=int(dropped),
            gaps=gaps,
            lost=generated - stored,
            unexpected=sum(v[2] for v in by_dev.values()),
            quarantined=quarantined,
            latency_p50_s=pct[0],
            latency_p95_s=pct[1],
            latency_p99_s=pct[2],
            latency_steady_p50_s=steady[0],
            latency_steady_p99_s=steady[1],
            latency_by_minute=by_minute,
            replayed=self._sum("replayed"),
            faults=self.fault_log,
            lost_by_device=dict(sorted((d, v) for d, v in lost_by.items() if v)[:20]),
            connected=self.connected,
            connect_s=round(connect_s, 2),
            recovery_s=max(recov) if recov else None,
            cpu_s=cpu,
            cpu_ms_per_event={k: round(v * 1000 / stored_n, 3) for k, v in cpu.items()},
            layout={
                "workers": self.s.layout.workers,
                "brokers": len(self.svc.brokers),
                "ingest_workers": len(self.svc.ingests),
                "tls": self.s.layout.tls,
                "reconnects": self._sum("connects") - len(self.specs),
                "connect_failures": self._sum("connect_failures"),
            },
        )


def _exit_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def check_district(s: Scenario, devices: int) -> None:
    """What the district runner cannot do, said before anything starts."""
    for i, f in enumerate(s.faults):
        if f.action not in DISTRICT_FAULTS:
            raise FleetError(
                f"faults[{i}]: {f.action} is not available with a [layout] (multi-process) "
                f"run; use one of {', '.join(sorted(DISTRICT_FAULTS))}"
            )
        if f.target != "all" and f.target.split("-", 1)[0] not in {x.id for x in s.all_schools}:
            raise FleetError(f"faults[{i}].target: {f.target!r} is not 'all' or a school")
    per_worker = -(-devices // s.layout.workers)
    if per_worker > WORKER_FD_BUDGET:
        raise FleetError(
            f"{devices} devices over {s.layout.workers} workers is {per_worker} connections per "
            f"process, over the {WORKER_FD_BUDGET} open files a worker may use: raise "
            "[layout] workers"
        )


async def run_local(
    s: Scenario, workdir: Path, *, progress: Progress | None = None, drain_timeout_s: float = 0
) -> rep.Report:
    """Start the layout, run the district, tear it down; the report."""
    specs = device_specs(s)
    check_district(s, len(specs))
    # SIGTERM (a timeout, a stopped job) unwinds like ^C: every service this run started stops
    signal.signal(signal.SIGTERM, _exit_on_term)
    with district_services(s, specs, workdir / "services") as svc:
        return await District(
            s, svc, workdir, progress=progress, drain_timeout_s=drain_timeout_s or None
        ).run()
