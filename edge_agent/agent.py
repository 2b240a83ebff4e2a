"""The running agent: drivers → a bounded queue → the outbox writer → the publisher.

:class:`Agent` is an async context manager owning one TaskGroup of named tasks: ``driver:NAME``
per driver (restarted with backoff when it crashes), ``outbox-writer`` (group commits),
``publisher``, ``commands`` (the server's commands, see :mod:`edge_agent.commands`) and
``health`` (see :mod:`edge_agent.health`; absent when ``[health] interval_s = 0``). Leaving the
context stops them in this order: commands, drivers and health, then the writer stores whatever
is still queued, then the publisher says ``offline`` and disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from device_drivers.base import (
    Driver,
    DriverContext,
    DriverError,
    DriverState,
    Reading,
    UidHasher,
    build_driver,
)
from edge_agent.commands import AckLog, CommandHandler
from edge_agent.config import AgentConfig, ConfigError, DriverConfig
from edge_agent.health import HealthReporter
from edge_agent.outbox import AsyncOutbox
from edge_agent.publisher import LinkState, Publisher

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

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.boot = 0
        self.outbox = AsyncOutbox(config.outbox_path)
        self._queue: asyncio.Queue[Reading] = asyncio.Queue(self.QUEUE_SIZE)
        #: The outbox's highest seq at start, and readings ``emit`` has accepted since.
        self._base_seq = 0
        self._accepted = 0
        key = config.hash_key
        hasher = UidHasher(key, send_raw=config.send_raw_uid) if key else _NoKeyHasher()
        self._ctx = DriverContext(
            config.device.id,
            hasher,
            accepted_events=lambda: self._base_seq + self._accepted,
        )
        self._slots: list[_Slot] = []
        self._publisher: Publisher | None = None
        self._acks = AckLog(config.outbox_path)
        self.commands: CommandHandler | None = None
        self._command_tasks: list[asyncio.Task[None]] = []
        self._tg = asyncio.TaskGroup()
        self._driver_tasks: list[asyncio.Task[None]] = []
        self._service_tasks: list[asyncio.Task[None]] = []

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
        self.commands = CommandHandler([s.driver for s in self._slots], self.outbox, self._acks)
        self._publisher = Publisher(
            self.config.device,
            self.config.broker,
            self.config.publish,
            self.outbox,
            boot=self.boot,
            commands=self.commands,
        )
        await self._tg.__aenter__()
        self._service_tasks = [
            self._tg.create_task(self._write(), name="outbox-writer"),
            self._tg.create_task(self._publisher.run(), name="publisher"),
        ]
        self._driver_tasks = [
            self._tg.create_task(self._supervise(s), name=f"driver:{s.config.name}")
            for s in self._slots
        ]
        self._command_tasks = [self._tg.create_task(self.commands.run(), name="commands")]
        if interval := self.config.health.interval_s:
            drivers = [s.driver for s in self._slots]
            health = HealthReporter(interval, self._emit, self.outbox, drivers)
            self._driver_tasks.append(self._tg.create_task(health.run(), name="health"))
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

    def _build(self, index: int, d: DriverConfig) -> Driver:
        try:
            return build_driver(d.type, d.name, d.options, self._ctx)
        except DriverError as exc:
            raise ConfigError(f"{self.config.source}: drivers[{index}] ({d.name}): {exc}") from None

    def status(self) -> AgentStatus:
        return AgentStatus(
            boot=self.boot,
            link=self.publisher.state,
            highest_seq=self.outbox.highest_seq,
            queued=self._base_seq + self._accepted - self.outbox.highest_seq,
            drivers=tuple(
                DriverStatus(
                    s.config.name, s.config.type, s.driver.state, s.driver.last_error, s.restarts
                )
                for s in self._slots
            ),
        )

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
        """Store queued readings in group commits; when cancelled, store what is left first."""
        commit: asyncio.Future[list[int]] | None = None
        try:
            while True:
                group = [await self._queue.get(), *self._take_group(self.WRITE_GROUP_MAX - 1)]
                commit = asyncio.ensure_future(self.outbox.append_many(group))
                await asyncio.shield(commit)
                commit = None
        except asyncio.CancelledError:
            if commit is not None:
                await commit
            while rest := self._take_group(self.WRITE_GROUP_MAX):
                await self.outbox.append_many(rest)
            raise
