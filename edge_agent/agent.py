"""The running agent: drivers → a bounded queue → the outbox writer → the publisher.

:class:`Agent` is an async context manager owning one TaskGroup of named tasks: ``driver:NAME``
per driver (restarted with backoff when it crashes), ``outbox-writer`` (group commits),
``publisher``, ``commands`` (the server's commands, see :mod:`edge_agent.commands`) and
``health`` (see :mod:`edge_agent.health`; absent when ``[health] interval_s = 0``) and
``config`` (the server's desired config, see :mod:`edge_agent.remote_config`). Leaving the
context stops them in this order: commands and config, drivers and health, then the writer
stores whatever is still queued, then the publisher says ``offline`` and disconnects.

:meth:`Agent.reconfigure` changes the running agent: only drivers whose table changed are
rebuilt and restarted, ``[publish]``, ``[health]`` and the outbox quota take effect at once.
A remote document that does not validate is rejected untouched; one whose new drivers do not
reach ``ok`` within :attr:`Agent.DRIVER_START_TIMEOUT_S` (or that raises) is rolled back to the
config that ran before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from device_drivers.base import (
    Driver,
    DriverContext,
    DriverError,
    DriverState,
    UidHasher,
    build_driver,
)
from edge_agent.clock import ClockWatch
from edge_agent.commands import AckLog, CommandHandler
from edge_agent.config import AgentConfig, ConfigError, DriverConfig, apply_remote
from edge_agent.health import HealthReporter
from edge_agent.outbox import AsyncOutbox, OutboxError, OutboxFull
from edge_agent.publisher import LinkState, Publisher
from edge_agent.remote_config import ConfigChannel, ConfigStore, StoredConfig, now
from edge_agent.update import Updater
from schemas.events import AgentOutboxDropped
from schemas.reading import Reading
from schemas.state import ConfigAck, ConfigDocument

log = logging.getLogger(__name__)
_NO_KEY: Final = (
    "no district hashing key is configured: set [privacy] hash_key_file or hash_key_hex"
)


class _NoKeyHasher(UidHasher):
    """Stands in when the config has no key: a driver that needs one fails, saying why."""

    def __init__(self) -> None:
        super().__init__(bytes(16))

    def hash(self, uid: bytes) -> str:
        raise DriverError(_NO_KEY)

    def __repr__(self) -> str:
        return "UidHasher(no key)"


@dataclass(frozen=True, slots=True)
class DriverStatus:
    name: str
    type: str
    state: DriverState
    last_error: str | None
    restarts: int


@dataclass(frozen=True, slots=True)
class AgentStatus:
    boot: int
    link: LinkState
    highest_seq: int
    queued: int
    drivers: tuple[DriverStatus, ...]


@dataclass(slots=True)
class _Slot:
    config: DriverConfig
    driver: Driver
    restarts: int = 0
    task: asyncio.Task[None] | None = None


class StartFailed(Exception):
    """Drivers of a new config did not come up; the message says which and why."""


def config_store_path(outbox_path: Path) -> Path:
    """Where the last applied remote config is kept: beside the outbox."""
    return outbox_path.with_name(outbox_path.name + ".config.json")


class Agent:
    """See the module docstring. ``async with Agent(config) as agent: ...``"""

    #: Readings waiting for the outbox writer; when full, a driver's ``emit`` waits.
    QUEUE_SIZE = 10_000
    #: Readings stored in one transaction at most.
    WRITE_GROUP_MAX = 1000
    DRIVER_BACKOFF_INITIAL_S = 1.0
    DRIVER_BACKOFF_MAX_S = 60.0
    #: A driver that ran this long before crashing restarts at the initial backoff.
    DRIVER_HEALTHY_S = 60.0
    #: How long each shutdown stage may take before its tasks are cancelled again.
    STOP_TIMEOUT_S = 10.0
    #: How long a driver of a new config has to reach ``ok`` before the config is rolled back.
    DRIVER_START_TIMEOUT_S = 15.0
    #: At most one ``agent.outbox_dropped`` report per this many seconds.
    DROP_REPORT_S = 10.0
    #: Readings held in memory while the disk is full; beyond, the outbox makes room by priority.
    PENDING_MAX = 20_000
    #: How often a full disk is tried again.
    DISK_RETRY_S = 0.5

    def __init__(self, config: AgentConfig) -> None:
        #: The config file's; a remote document's sections are laid over it.
        self.file_config = config
        self.config_version: int | None = None
        self._store = ConfigStore(config_store_path(config.outbox_path))
        if (stored := self._store.load()) is not None:
            try:
                config = apply_remote(config, stored.config)
                self.config_version = stored.version
            except ConfigError as exc:
                log.error(
                    "the stored remote config (version %d) no longer fits the config file: %s; "
                    "running on the file alone",
                    stored.version,
                    exc,
                )
        self.config = config
        self.boot = 0
        q = config.outbox_quota
        self.outbox = AsyncOutbox(
            config.outbox_path, max_events=q.max_events, max_bytes=q.max_bytes
        )
        self._queue: asyncio.Queue[Reading] = asyncio.Queue(self.QUEUE_SIZE)
        #: The outbox's highest seq at start, and readings ``emit`` has accepted since.
        self._base_seq = 0
        self._accepted = 0
        #: Readings the outbox dropped unstored (reported): they never got a seq.
        self._lost = 0
        #: Readings taken from the queue that the outbox has not stored yet (a full disk).
        self._pending: list[Reading] = []
        key = config.hash_key
        hasher = UidHasher(key, send_raw=config.send_raw_uid) if key else _NoKeyHasher()
        self._ctx = DriverContext(
            config.device.id,
            hasher,
            accepted_events=lambda: self._base_seq + self._accepted - self._lost,
        )
        self._slots: list[_Slot] = []
        self._publisher: Publisher | None = None
        self._acks = AckLog(config.outbox_path)
        self.commands: CommandHandler | None = None
        self.updater: Updater | None = None
        self.remote = ConfigChannel(self.apply_config)
        self.remote.version = self.config_version
        self._command_tasks: list[asyncio.Task[None]] = []
        self._tg = asyncio.TaskGroup()
        self._health_task: asyncio.Task[None] | None = None
        self._service_tasks: list[asyncio.Task[None]] = []
        #: Driver restarts and config changes, one at a time.
        self._changing = asyncio.Lock()
        self._last_drop_report = -self.DROP_REPORT_S

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            raise RuntimeError("the agent is not running")
        return self._publisher

    @property
    def counters(self) -> dict[str, int]:
        """Counters the drivers keep (skipped frames, reconnects, ...)."""
        return self._ctx.counters

    async def __aenter__(self) -> Self:
        self._slots = [_Slot(d, self._build(i, d)) for i, d in enumerate(self.config.drivers)]
        await self.outbox.__aenter__()
        try:
            self.boot = await self.outbox.next_boot()
            self._base_seq = self.outbox.highest_seq
            await self._acks.__aenter__()
        except BaseException:
            await self.outbox.__aexit__(None, None, None)
            raise
        self.commands = CommandHandler(self, self.outbox, self._acks)
        self._publisher = Publisher(
            self.config.device,
            self.config.broker,
            self.config.publish,
            self.outbox,
            boot=self.boot,
            commands=self.commands,
            config=self.remote,
        )
        await self._tg.__aenter__()
        self._service_tasks = [
            self._tg.create_task(self._write(), name="outbox-writer"),
            self._tg.create_task(self._publisher.run(), name="publisher"),
        ]
        for slot in self._slots:
            self._start(slot)
        self.updater = Updater(
            self.config.update,
            self.commands,
            lambda: self._publisher is not None and self._publisher.state is LinkState.ONLINE,
        )
        self.commands.handlers["update_agent"] = self.updater.handle
        self.commands.timeouts["update_agent"] = self.updater.TIMEOUT_S
        self._command_tasks = [
            self._tg.create_task(self.commands.run(), name="commands"),
            self._tg.create_task(self.remote.run(), name="config"),
            self._tg.create_task(self.updater.run(), name="update"),
        ]
        self._start_health()
        log.info(
            "agent %s started: boot %d, %d driver(s), outbox %s (highest seq %d)",
            self.config.device.id,
            self.boot,
            len(self._slots),
            self.config.outbox_path,
            self.outbox.highest_seq,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            stages = (self._command_tasks, self._driver_tasks, *([t] for t in self._service_tasks))
            for stage in stages:
                await self._stop(stage)
        finally:
            for task in (*self._command_tasks, *self._driver_tasks, *self._service_tasks):
                task.cancel()  # whatever an interrupted orderly stop did not reach
            self._health_task = None
            for slot in self._slots:
                slot.task = None
            try:
                await self._tg.__aexit__(exc_type, exc, tb)
            finally:
                await self._acks.__aexit__(None, None, None)
                await self.outbox.__aexit__(None, None, None)
                log.info("agent %s stopped", self.config.device.id)

    async def _stop(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        for task in tasks:
            task.cancel()
        while pending := [t for t in tasks if not t.done()]:
            await asyncio.wait(pending, timeout=self.STOP_TIMEOUT_S)
            for task in pending:
                if not task.done():
                    log.warning("task %s is slow to stop; cancelling it again", task.get_name())
                    task.cancel()

    @property
    def _driver_tasks(self) -> list[asyncio.Task[None]]:
        tasks = [s.task for s in self._slots if s.task is not None]
        return tasks + ([self._health_task] if self._health_task is not None else [])

    def _build(self, index: int, d: DriverConfig, where: str | None = None) -> Driver:
        try:
            return build_driver(d.type, d.name, d.options, self._ctx)
        except DriverError as exc:
            prefix = where or str(self.config.source)
            raise ConfigError(f"{prefix}: drivers[{index}] ({d.name}): {exc}") from None

    def _start(self, slot: _Slot) -> None:
        slot.task = self._tg.create_task(self._supervise(slot), name=f"driver:{slot.config.name}")

    def _start_health(self) -> None:
        if interval := self.config.health.interval_s:
            c = self.config.clock
            watch = ClockWatch(c.reference, c.interval_s, c.timeout_s) if c.reference else None
            health = HealthReporter(interval, self._emit, self.outbox, self.drivers, watch)
            self._health_task = self._tg.create_task(health.run(), name="health")

    # -- live changes ----------------------------------------------------------------------------

    def drivers(self) -> list[Driver]:
        """The running drivers, as of now."""
        return [s.driver for s in self._slots]

    def driver_type(self, name: str) -> str | None:
        return next((s.config.type for s in self._slots if s.config.name == name), None)

    def _slot(self, name: str) -> _Slot:
        for slot in self._slots:
            if slot.config.name == name:
                return slot
        known = ", ".join(s.config.name for s in self._slots) or "none"
        raise KeyError(f"no driver named {name!r} (drivers here: {known})")

    async def restart_driver(self, name: str) -> None:
        """Stop a driver and start a fresh one from the same config table."""
        async with self._changing:
            slot = self._slot(name)
            index = self._slots.index(slot)
            driver = self._build(index, slot.config, "restart")
            await self._stop([t for t in (slot.task,) if t is not None])
            slot.driver, slot.restarts = driver, slot.restarts + 1
            self._start(slot)
            log.info("driver %s restarted on request", name)

    async def set_driver_options(self, name: str, changes: Mapping[str, Any]) -> None:
        """Restart a driver with some options changed; the driver validates them first.

        The change lasts until the agent restarts or a config document sets the drivers.
        """
        async with self._changing:
            slot = self._slot(name)
            new = DriverConfig(slot.config.type, name, {**slot.config.options, **changes})
            try:
                driver = build_driver(new.type, name, new.options, self._ctx)
            except DriverError as exc:
                raise ValueError(str(exc)) from None
            await self._stop([t for t in (slot.task,) if t is not None])
            slot.config, slot.driver = new, driver
            self._start(slot)
            drivers = tuple(new if d.name == name else d for d in self.config.drivers)
            self.config = replace(self.config, drivers=drivers)
            log.info("driver %s restarted with %s", name, dict(changes))

    async def apply_config(self, doc: ConfigDocument) -> ConfigAck | None:
        """Apply a remote config document (see the module docstring); None when it is stale."""
        if self.config_version is not None and doc.version <= self.config_version:
            log.debug("config version %d ignored: running %d", doc.version, self.config_version)
            return None
        try:
            new = apply_remote(self.file_config, doc.config)
        except ConfigError as exc:
            log.error("config version %d rejected: %s", doc.version, exc)
            return ConfigAck(version=doc.version, status="rejected", detail=str(exc), ts=now())
        old = self.config
        try:
            await self.reconfigure(new)
        except ConfigError as exc:  # a driver table its driver refused: nothing was changed
            log.error("config version %d rejected: %s", doc.version, exc)
            return ConfigAck(version=doc.version, status="rejected", detail=str(exc), ts=now())
        except Exception as exc:  # noqa: BLE001 - whatever broke, the old config must run again
            why = str(exc) if isinstance(exc, StartFailed) else f"{type(exc).__name__}: {exc}"
            log.error("config version %d failed (%s): rolling back", doc.version, why)
            try:
                await self.reconfigure(old, wait=False)
            except Exception:
                log.exception("rolling back to the previous config failed")
            return ConfigAck(version=doc.version, status="rolled_back", detail=why, ts=now())
        await asyncio.to_thread(
            self._store.save, StoredConfig(version=doc.version, config=doc.config)
        )
        self.config_version = self.remote.version = doc.version
        log.info("config version %d applied", doc.version)
        return ConfigAck(version=doc.version, status="applied", ts=now())

    async def reconfigure(self, new: AgentConfig, *, wait: bool = True) -> None:
        """Run on ``new``: restart only changed drivers; with ``wait``, raise
        :class:`StartFailed` unless each restarted driver reaches ``ok`` in time."""
        async with self._changing:
            current = {s.config.name: s for s in self._slots}
            slots: list[_Slot] = []
            fresh: list[_Slot] = []
            for i, d in enumerate(new.drivers):
                old = current.get(d.name)
                if old is not None and old.config == d:
                    slots.append(old)
                else:  # built before anything stops, so a bad table changes nothing
                    slot = _Slot(d, self._build(i, d, "config"))
                    slots.append(slot)
                    fresh.append(slot)
            kept = {id(s) for s in slots}
            await self._stop([s.task for s in self._slots if id(s) not in kept and s.task])
            self._slots = slots
            for slot in fresh:
                self._start(slot)
            if new.publish != self.config.publish:
                self.publisher.reconfigure(new.publish)
            if new.health != self.config.health:
                await self._stop([self._health_task] if self._health_task else [])
                self._health_task = None
                self.config = replace(self.config, health=new.health)
                self._start_health()
            if new.outbox_quota != self.config.outbox_quota:
                q = new.outbox_quota
                await self.outbox.set_quota(q.max_events, q.max_bytes)
            self.config = new
            if fresh:
                log.info("drivers (re)started: %s", ", ".join(s.config.name for s in fresh))
            if wait and fresh:
                await self._await_ok(fresh)

    async def _await_ok(self, slots: Sequence[_Slot]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.DRIVER_START_TIMEOUT_S
        late = list(slots)
        for _ in range(int(self.DRIVER_START_TIMEOUT_S / 0.05) + 1):
            late = [s for s in slots if s.driver.state != DriverState.OK]
            if not late or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)  # drivers signal no event when they come up: poll
        if late:
            raise StartFailed(
                "; ".join(
                    f"driver {s.config.name} did not come up in {self.DRIVER_START_TIMEOUT_S:g} s "
                    f"({s.driver.state.value}: {s.driver.last_error or 'no error given'})"
                    for s in late
                )
            )

    def status(self) -> AgentStatus:
        return AgentStatus(
            boot=self.boot,
            link=self.publisher.state,
            highest_seq=self.outbox.highest_seq,
            queued=self._base_seq + self._accepted - self._lost - self.outbox.highest_seq,
            drivers=tuple(
                DriverStatus(
                    s.config.name, s.config.type, s.driver.state, s.driver.last_error, s.restarts
                )
                for s in self._slots
            ),
        )

    async def _report_drops(self) -> None:
        """Turn the outbox's drops into an ``agent.outbox_dropped`` event, at most so often."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_drop_report < self.DROP_REPORT_S:
            return
        drops = await self.outbox.take_drops()
        if drops is None:
            return
        self._last_drop_report = loop.time()
        log.error(
            "outbox: %d unsent event(s) dropped since %s (%s): %s",
            sum(drops.counts.values()),
            drops.since.isoformat(),
            drops.reason,
            drops.counts,
        )
        data = AgentOutboxDropped(dropped=drops.counts, since=drops.since, reason=drops.reason)
        self._accepted += 1  # the writer stores it itself, so it is counted like an emitted one
        self._pending.append(Reading("agent.outbox_dropped", data))

    async def _emit(self, reading: Reading) -> None:
        self._accepted += 1
        try:
            await self._queue.put(reading)
        except BaseException:
            self._accepted -= 1
            raise

    async def _supervise(self, slot: _Slot) -> None:
        """Run a driver; when it crashes, record why and restart it after a backoff."""
        loop, name = asyncio.get_running_loop(), slot.config.name
        delay = self.DRIVER_BACKOFF_INITIAL_S
        while True:
            started = loop.time()
            try:
                await slot.driver.run(self._emit)
            except Exception as exc:  # any crash of a driver is survivable: restart it
                slot.driver.state = DriverState.FAILED
                slot.driver.last_error = f"{type(exc).__name__}: {exc}"
                log.error("driver %s crashed: %s", name, slot.driver.last_error, exc_info=exc)
            else:
                log.info("driver %s finished", name)
                return
            if loop.time() - started >= self.DRIVER_HEALTHY_S:
                delay = self.DRIVER_BACKOFF_INITIAL_S
            slot.restarts += 1
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, self.DRIVER_BACKOFF_MAX_S)

    def _take_group(self, limit: int) -> list[Reading]:
        group: list[Reading] = []
        while len(group) < limit and not self._queue.empty():
            group.append(self._queue.get_nowait())
        return group

    async def _write(self) -> None:
        """Store queued readings in group commits; when cancelled, store what is left first.

        A full disk loses nothing: readings wait in ``_pending`` and the write is tried again
        every ``DISK_RETRY_S``; only past ``PENDING_MAX`` does the outbox make room by priority
        (dropping and reporting the least important events).
        """
        commit: asyncio.Future[list[int]] | None = None
        group: list[Reading] = []
        full = False
        try:
            while True:
                if full:  # take everything queued, so that drivers' emit does not wait
                    await asyncio.sleep(self.DISK_RETRY_S)
                    self._pending += self._take_group(self.QUEUE_SIZE)
                else:
                    if not self._pending:
                        self._pending.append(await self._queue.get())
                    self._pending += self._take_group(self.WRITE_GROUP_MAX - len(self._pending))
                make_room = len(self._pending) > self.PENDING_MAX
                group = self._pending[: self.WRITE_GROUP_MAX]
                commit = asyncio.ensure_future(self.outbox.append_many(group, make_room=make_room))
                try:
                    stored = await asyncio.shield(commit)
                except OutboxFull as exc:
                    commit = None
                    if not full:
                        log.error("%s; %d reading(s) kept in memory", exc, len(self._pending))
                    full = True
                    continue
                commit = None  # not in a finally: a cancelled wait must still see the commit
                if full:
                    log.info("the outbox takes writes again")
                full = False
                self._stored(group, stored)
                await self._report_drops()
        except asyncio.CancelledError:
            if commit is not None:
                with contextlib.suppress(OutboxFull):
                    self._stored(group, await commit)
            self._pending += self._take_group(self.QUEUE_SIZE)
            while self._pending:
                group = self._pending[: self.WRITE_GROUP_MAX]
                try:
                    self._stored(group, await self.outbox.append_many(group, make_room=True))
                except OutboxError as exc:
                    log.error("outbox: %d reading(s) lost at shutdown: %s", len(self._pending), exc)
                    break
            raise

    def _stored(self, group: list[Reading], seqs: list[int]) -> None:
        del self._pending[: len(group)]
        self._lost += len(group) - len(seqs)
