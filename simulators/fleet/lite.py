"""A lightweight simulated device: the agent's real :class:`AsyncOutbox` and :class:`Publisher`.

Many run in one asyncio loop, each with its own SQLite outbox and MQTT connection, so the
durable path (seq assignment, delete after PUBACK, replay) is the shipped one. Only the
driver is replaced: the fleet's generator hands readings straight to :meth:`LiteDevice.produce`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from edge_agent.config import Broker, DeviceConfig, PublishConfig
from edge_agent.outbox import AsyncOutbox, OutboxError, OutboxRow
from edge_agent.publisher import Publisher
from schemas.events import DeviceKind
from schemas.reading import Reading
from simulators.fleet.events import MAKERS, Hasher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    id: str
    school_id: str
    kind: DeviceKind
    event_types: tuple[str, ...]


class _RecordingPublisher(Publisher):
    """Keeps the last few ``up`` payloads it sent, for duplicate storms."""

    def __init__(self, *args: object, recent: collections.deque[bytes], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._recent = recent

    def encode(self, rows: object, *, replay: bool = False) -> bytes:
        payload = super().encode(rows, replay=replay)  # type: ignore[arg-type]
        self._recent.append(payload)
        return payload


class LiteDevice:
    """One simulated device; :meth:`run` until cancelled, :meth:`produce` to make events."""

    #: Readings kept in memory while the outbox cannot take them (disk full); beyond, the
    #: outbox makes room by priority, and what it drops is reported (:attr:`reported_drops`).
    MAX_PENDING: Final = 20_000
    RECENT: Final = 8
    RESTART_S: Final = 0.5

    def __init__(
        self,
        spec: DeviceSpec,
        broker: Broker,
        publish: PublishConfig,
        outbox_path: Path,
        hasher: Hasher,
        *,
        puback_timeout_s: float = 10.0,
    ) -> None:
        self.spec = spec
        self.broker = broker
        self.publish = publish
        self.outbox_path = outbox_path
        self.hasher = hasher
        self.puback_timeout_s = puback_timeout_s
        #: Seconds added to this device's clock (the clock_skew fault).
        self.clock_offset_s = 0.0
        self.made = 0
        #: Readings the outbox dropped unstored (no seq); part of :attr:`reported_drops`.
        self.dropped = 0
        #: Events the outbox dropped on purpose and reported (``agent.outbox_dropped``).
        self.reported_drops = 0
        self.store_errors = 0
        self.publisher_crashes = 0
        self.last_store_error: str | None = None
        self.recent: collections.deque[bytes] = collections.deque(maxlen=self.RECENT)
        self.outbox = AsyncOutbox(outbox_path)
        self.publisher: Publisher | None = None
        self._pending: list[Reading] = []
        self._opened = asyncio.Event()

    @property
    def up_topic(self) -> str:
        return f"campus/v1/{self.spec.school_id}/{self.spec.id}/up"

    @property
    def outboxed(self) -> int:
        """Events that got a seq (the outbox's highest)."""
        return self.outbox.highest_seq

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def wait_open(self) -> None:
        await self._opened.wait()

    async def run(self) -> None:
        device = DeviceConfig(id=self.spec.id, school_id=self.spec.school_id, kind=self.spec.kind)
        async with self.outbox:
            boot = 1
            while True:
                pub = _RecordingPublisher(
                    device, self.broker, self.publish, self.outbox, boot=boot, recent=self.recent
                )
                pub.PUBACK_TIMEOUT_S = self.puback_timeout_s
                pub.CONNECT_TIMEOUT_S = min(pub.CONNECT_TIMEOUT_S, self.puback_timeout_s)
                if self.publisher is not None:
                    pub.stats = self.publisher.stats
                self.publisher = pub
                self._opened.set()
                try:
                    await pub.run()
                except Exception as exc:  # noqa: BLE001 - any crash is counted, not fatal
                    # The shipped publisher must survive outbox errors; should it not, count it
                    # and start again, as systemd would restart the agent.
                    self.publisher_crashes += 1
                    log.warning("%s: publisher crashed: %r; restarting", self.spec.id, exc)
                    boot += 1
                    await asyncio.sleep(self.RESTART_S)

    def _reading(self) -> Reading:
        i = self.made
        self.made += 1
        etype = self.spec.event_types[i % len(self.spec.event_types)]
        data = MAKERS[etype](i, self.spec.id, self.hasher)
        ts = datetime.now(UTC) + timedelta(seconds=self.clock_offset_s)
        return Reading(etype, data, ts=ts.astimezone(), synced=self.clock_offset_s == 0)

    async def produce(self, n: int) -> None:
        """Make ``n`` events and store every pending one in the outbox, if it can."""
        self._pending.extend(self._reading() for _ in range(n))
        await self.flush()

    async def flush(self) -> bool:
        """Store pending readings; False when the outbox refused them (they stay pending).

        Past :attr:`MAX_PENDING` the outbox is asked to make room by priority.
        """
        if not self._pending:
            return True
        batch = self._pending
        make_room = len(batch) > self.MAX_PENDING
        try:
            seqs = await self.outbox.append_many(batch, make_room=make_room)
        except (OutboxError, sqlite3.Error, OSError) as exc:
            self.store_errors += 1
            if str(exc) != self.last_store_error:
                log.warning("%s: outbox refused %d events: %s", self.spec.id, len(batch), exc)
            self.last_store_error = str(exc)
            return False
        self._pending = self._pending[len(batch) :]
        self.dropped += len(batch) - len(seqs)
        if (drops := await self.outbox.take_drops()) is not None:
            self.reported_drops += sum(drops.counts.values())
        return True

    async def depth(self) -> int:
        return await self.outbox.depth()

    async def peek_all(self) -> list[OutboxRow]:
        return await self.outbox.peek(0, 1 << 30, 1 << 40)
