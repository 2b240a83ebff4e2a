"""Outbox → MQTT: ``up`` batches, deletes only after PUBACK, reconnects, paced replay, presence.

One connection at a time. On each connect the publisher says ``online`` (retained, with a will
saying ``offline``), then sends every row still in the outbox from the start: rows leave the
outbox only when their batch's PUBACK arrives, so whatever was in flight when a link dropped is
sent again with the same seq, ts and data. A delete that fails after a PUBACK (a full disk)
never stops the publisher: the rows stay and the delete is tried again later. Rows that were
already waiting when the link came up are backlog: they go in ``replay: true`` batches, paced,
and never share a batch with live rows.

A stop (the task cancelled) is bounded whatever the link is doing: every wait on the broker
has its own deadline, a connect given up on leaves no socket behind, ``offline`` and the
DISCONNECT get ``CLOSE_TIMEOUT_S`` each. Batches still awaiting their PUBACK are abandoned,
which loses nothing: their rows are still in the outbox and go again after the next start.

With a :class:`~edge_agent.commands.CommandHandler`, each connection also subscribes to the
device's ``cmd`` topic, hands what arrives to it and publishes its acks on ``cmd/ack``. With a
:class:`~edge_agent.remote_config.ConfigChannel`, likewise ``config`` → ``config/ack`` (retained),
and ``state`` is said again with the new ``config_version`` after each outcome.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sqlite3
import ssl
import threading
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal, TypeVar

import aiomqtt
import msgspec

from edge_agent import __version__
from edge_agent.commands import CommandHandler
from edge_agent.config import Broker, DeviceConfig, PublishConfig
from edge_agent.outbox import AsyncOutbox, OutboxError, OutboxRow
from edge_agent.remote_config import ConfigChannel
from schemas import topics
from schemas.state import DeviceState
from schemas.uplink import UplinkBatch, UplinkEvent, encode_batch

log = logging.getLogger(__name__)
T = TypeVar("T")
_ts_decoder: Final = msgspec.json.Decoder(datetime)
#: Bytes of an ``up`` batch besides its events (keys, v, sent_at, replay) and the two ids.
ENVELOPE_OVERHEAD: Final = 128


class LinkState(StrEnum):
    CONNECTING = "connecting"
    ONLINE = "online"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(slots=True)
class PublisherStats:
    connects: int = 0
    batches: int = 0
    events: int = 0
    replayed_events: int = 0


def _now() -> datetime:
    return datetime.now(UTC).astimezone()


async def _within(seconds: float, aw: Awaitable[T]) -> T:
    """``aw`` bounded by ``asyncio.timeout``; running out raises aiomqtt's ``MqttError``.

    Every wait on the broker goes through here, with aiomqtt's own timeout off (``math.inf``):
    on Python 3.11 aiomqtt's timeout is ``asyncio.wait_for``, which swallows a cancel landing
    just as the awaited PUBACK arrives. The cancelled task then runs on, and a TaskGroup child
    that does so (``mqtt-acks`` idling on its queue) keeps the publisher from ever stopping:
    the group cancels its children only once. ``asyncio.timeout`` passes every cancel on.
    """
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        raise aiomqtt.MqttError("Operation timed out") from None


async def _drop(client: aiomqtt.Client) -> None:
    """Close the client's socket now, without a word to the broker, and end aiomqtt's helper task.

    For a connect given up on (cancelled or timed out: aiomqtt then leaves its socket open and
    its keepalive task running) and a DISCONNECT the socket would not take in time. aiomqtt has
    no call for this: paho's socket close runs aiomqtt's hook, which unregisters the socket from
    the loop; unlike a lost connection it does not run ``on_disconnect``, which would trip over
    the connect future a cancel left cancelled.
    """
    client._client._sock_close()
    misc = client._misc_task
    if misc is not None and not misc.done():
        misc.cancel()
        await asyncio.wait([misc])


class _Children:
    """A session's TaskGroup, keeping its running tasks to cancel them again at a stop."""

    #: A child still running this long after a cancel is cancelled again, up to RECANCELS times.
    RECANCEL_S = 1.0
    RECANCELS = 30

    def __init__(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        self.running: set[asyncio.Task[None]] = set()

    def create_task(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = self._tg.create_task(coro, name=name)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    async def cancel(self) -> None:
        """Cancel every child and wait until they are done, cancelling stragglers again.

        A TaskGroup cancels its children once, and further cancels of its parent do not reach
        them: a child that swallowed that one cancel (as ``asyncio.wait_for`` can on 3.11)
        held the publisher, and so the agent's stop, for ever. Our own further cancels (the
        agent's nudges) are taken as what they ask for: this is already stopping.
        """
        for _ in range(self.RECANCELS):
            if not self.running:
                return
            for task in self.running:
                task.cancel()
            try:
                await asyncio.wait(set(self.running), timeout=self.RECANCEL_S)
            except asyncio.CancelledError:
                continue
            for task in self.running:
                log.warning("task %s ignored a cancel; cancelling it again", task.get_name())
        left = ", ".join(sorted(t.get_name() for t in self.running))
        if left:
            log.error("tasks %s do not stop; the publisher waits for them", left)


class Publisher:
    """Publishes the outbox over MQTT until cancelled; see the module docstring."""

    #: Used when ``[publish]`` leaves the backoff unset; tests patch these.
    BACKOFF_INITIAL_S = 0.5
    BACKOFF_MAX_S = 30.0
    #: Each delay is scaled by a random factor in 1 ± this.
    BACKOFF_JITTER = 0.25
    CONNECT_TIMEOUT_S = 10.0
    PUBACK_TIMEOUT_S = 30.0
    #: How long a clean shutdown may spend saying ``offline``.
    CLOSE_TIMEOUT_S = 3.0
    #: How often a delete that failed after its PUBACK is tried again.
    DELETE_RETRY_S = 1.0

    def __init__(
        self,
        device: DeviceConfig,
        broker: Broker,
        publish: PublishConfig,
        outbox: AsyncOutbox,
        *,
        boot: int,
        commands: CommandHandler | None = None,
        config: ConfigChannel | None = None,
    ) -> None:
        self.device = device
        self.broker = broker
        self.boot = boot
        self.state = LinkState.STOPPED
        self.last_error: str | None = None
        #: The backlog of the current connection: seqs up to this one go as replay.
        self.replay_until = 0
        self.stats = PublisherStats()
        #: Seqs the broker acknowledged whose delete failed: still in the outbox, to delete.
        self.undeleted: set[int] = set()
        self._outbox = outbox
        self._commands = commands
        self._config = config
        self._up_topic = topics.build(device.school_id, device.id, topics.Channel.UP)
        self._state_topic = topics.build(device.school_id, device.id, topics.Channel.STATE)
        self._cmd_topic = topics.build(device.school_id, device.id, topics.Channel.CMD)
        self._ack_topic = topics.build(device.school_id, device.id, topics.Channel.CMD_ACK)
        self._config_topic = topics.build(device.school_id, device.id, topics.Channel.CONFIG)
        self._config_ack_topic = topics.build(
            device.school_id, device.id, topics.Channel.CONFIG_ACK
        )
        self.reconfigure(publish)

    def reconfigure(self, publish: PublishConfig) -> None:
        """New ``[publish]`` settings: batching, linger and replay pace apply to the next batch,
        ``inflight`` and the backoff from the next connection."""
        self.publish = publish
        device = self.device
        self._budget = (
            publish.max_batch_bytes - ENVELOPE_OVERHEAD - len(device.id) - len(device.kind)
        )

    async def run(self) -> None:
        """Connect, publish, reconnect with jittered exponential backoff; until cancelled."""
        delay, this = (
            self.publish.backoff_initial_s or self.BACKOFF_INITIAL_S,
            asyncio.current_task(),
        )
        try:
            while True:
                initial = self.publish.backoff_initial_s or self.BACKOFF_INITIAL_S
                ceiling = self.publish.backoff_max_s or self.BACKOFF_MAX_S
                self.state = LinkState.CONNECTING
                connects = self.stats.connects
                error, level = "the session ended", logging.WARNING
                try:
                    await self._session()
                except* aiomqtt.MqttError as group:
                    exc = group.exceptions[0]
                    error = str(exc.__cause__ or exc) or type(exc).__name__
                    if self.stats.connects == connects and "timed out" in error:
                        error = f"no answer to CONNECT ({error}){self._hint}"
                    # Say it once; the same error on every retry of a long outage is noise.
                    level = logging.DEBUG if error == self.last_error else logging.WARNING
                    self.last_error = error
                # A cancellation can be swallowed while a task group reports a link error.
                if this is not None and this.cancelling():
                    raise asyncio.CancelledError
                if self.stats.connects > connects:
                    delay = initial
                wait = delay * random.uniform(1 - self.BACKOFF_JITTER, 1 + self.BACKOFF_JITTER)  # noqa: S311 - jitter
                log.log(level, "MQTT %s: %s; retrying in %.1f s", self.broker.address, error, wait)
                self.state = LinkState.BACKOFF
                await asyncio.sleep(wait)
                delay = min(delay * 2, ceiling)
        finally:
            self.state = LinkState.STOPPED

    @property
    def _hint(self) -> str:
        if self.broker.protocol != "5":
            return ""
        return '; a broker that speaks only MQTT 3.1.1 ignores MQTT 5: try protocol = "3.1.1"'

    def _client(self) -> aiomqtt.Client:
        b = self.broker
        v5 = b.protocol == "5"
        tls = None
        if b.tls:
            tls = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
        return aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.password,
            identifier=b.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else True,
            will=aiomqtt.Will(self._state_topic, self._presence("offline"), qos=1, retain=True),
            keepalive=b.keepalive_s,
            timeout=math.inf,  # every wait is bounded by _within instead: see there
            max_inflight_messages=self.publish.inflight + 2,
            tls_context=tls,
            logger=logging.getLogger("edge_agent.mqtt"),
        )

    async def _session(self) -> None:
        client = self._client()
        await self._connect(client)
        try:
            self.stats.connects += 1
            try:
                if self._commands is not None or self._config is not None:
                    await self._subscribe(client)  # before ``online``: what is sent then arrives
                await self._publish(client, self._state_topic, self._presence("online"), True)
                backlog = await self._outbox.peek(0, 1, 1 << 30)
                self.replay_until = replay_until = self._outbox.highest_seq if backlog else 0
                self.state = LinkState.ONLINE
                log.info(
                    "connected to %s as %r (MQTT %s, boot %d)%s",
                    self.broker.address,
                    self.broker.client_id,
                    self.broker.protocol,
                    self.boot,
                    f"; replaying backlog up to seq {replay_until}" if replay_until else "",
                )
                # The pump runs in the group's body, not as a task: on Python 3.11 a task
                # failing after the body has ended leaves this task marked as cancelling.
                async with asyncio.TaskGroup() as group:
                    tg = _Children(group)
                    tg.create_task(self._watch(client), name="mqtt-watch")
                    tg.create_task(self._retry_deletes(), name="outbox-delete-retry")
                    if self._commands is not None:
                        tg.create_task(
                            self._commands.send_acks(
                                lambda ack: self._publish(client, self._ack_topic, ack)
                            ),
                            name="mqtt-acks",
                        )
                    if self._config is not None:
                        tg.create_task(
                            self._config.send_acks(lambda ack: self._config_ack(client, ack)),
                            name="mqtt-config-acks",
                        )
                    try:
                        await self._pump(client, tg, replay_until)
                    except asyncio.CancelledError:
                        await tg.cancel()
                        raise
            except asyncio.CancelledError:
                await self._say_offline(client)
                raise
        finally:
            await self._disconnect(client)

    async def _connect(self, client: aiomqtt.Client) -> None:
        """Connect within ``CONNECT_TIMEOUT_S``; a connect that fails or is cancelled leaves
        no socket and no task behind."""
        # aiomqtt makes the TCP connection on an executor thread, which a cancel does not stop:
        # given up on, it must not open a socket afterwards, or one still opening is waited for
        # (paho gives up after its connect_timeout) so that it can be closed.
        loop, lock, finished = asyncio.get_running_loop(), threading.Lock(), asyncio.Event()
        state = {"abandoned": False, "running": False}
        tcp_connect = client._client_connect

        def connect_unless_abandoned() -> None:
            with lock:
                if state["abandoned"]:
                    return
                state["running"] = True
            try:
                tcp_connect()
            finally:  # queued after paho's socket callbacks: when it runs, they have run
                loop.call_soon_threadsafe(finished.set)

        client._client_connect = connect_unless_abandoned  # type: ignore[method-assign]
        try:
            await _within(self.CONNECT_TIMEOUT_S, client.__aenter__())
        except BaseException:
            with lock:
                state["abandoned"] = True
                running = state["running"]
            try:
                if running and not finished.is_set():
                    async with asyncio.timeout(self.CONNECT_TIMEOUT_S):
                        await finished.wait()
            except TimeoutError:
                log.error("MQTT %s: the TCP connect does not return", self.broker.address)
            finally:
                await _drop(client)
            raise

    async def _disconnect(self, client: aiomqtt.Client) -> None:
        """Disconnect politely within ``CLOSE_TIMEOUT_S``, else (or when cancelled) drop the
        socket: a stop must not wait on a broker that stopped reading."""
        try:
            await _within(self.CLOSE_TIMEOUT_S, client.__aexit__(None, None, None))
        except aiomqtt.MqttError as exc:
            log.debug("MQTT %s: DISCONNECT not sent (%s)", self.broker.address, exc)
        finally:
            await _drop(client)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        wanted = [
            (t, 1)
            for t, on in ((self._cmd_topic, self._commands), (self._config_topic, self._config))
            if on is not None
        ]
        granted = await _within(self.PUBACK_TIMEOUT_S, client.subscribe(wanted))
        codes = [g if isinstance(g, int) else g.value for g in granted]
        for (topic, _), code in zip(wanted, codes, strict=False):
            if code >= 0x80:
                log.warning("the broker refused the subscription to %s: it will not arrive", topic)

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes, retain: bool = False
    ) -> None:
        """Publish at QoS 1 and wait for the PUBACK, at most ``PUBACK_TIMEOUT_S``."""
        await _within(self.PUBACK_TIMEOUT_S, client.publish(topic, payload, qos=1, retain=retain))

    async def _config_ack(self, client: aiomqtt.Client, ack: bytes) -> None:
        await self._publish(client, self._config_ack_topic, ack, True)
        await self._publish(client, self._state_topic, self._presence("online"), True)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """A clean shutdown disconnects politely, so the will is not sent: say it ourselves."""
        try:
            offline = self._presence("offline")
            await _within(
                self.CLOSE_TIMEOUT_S,
                client.publish(self._state_topic, offline, qos=1, retain=True),
            )
        except aiomqtt.MqttError as exc:
            log.warning("could not publish the offline state: %s", exc)

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Hand ``cmd`` messages to the command handler; raise when the connection drops."""
        async for message in client.messages:
            payload = message.payload
            raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            if self._commands is not None and message.topic.matches(self._cmd_topic):
                self._commands.receive(raw)
            elif self._config is not None and message.topic.matches(self._config_topic):
                self._config.receive(raw)
        raise aiomqtt.MqttError("the connection closed")

    async def _pump(self, client: aiomqtt.Client, tg: _Children, replay_until: int) -> None:
        """Turn outbox rows into batches, keeping at most ``inflight`` awaiting PUBACK."""
        loop = asyncio.get_running_loop()
        window = asyncio.Semaphore(self.publish.inflight)
        cursor, replay_at = 0, loop.time()
        while True:
            await window.acquire()
            p = self.publish
            replay = cursor < replay_until
            upto = replay_until if replay else None
            top = self._outbox.highest_seq  # read first: what is stored meanwhile lies above it
            rows = await self._outbox.peek(cursor, p.max_batch_events, self._budget, upto=upto)
            if not rows:
                window.release()
                if replay:
                    cursor = replay_until
                else:
                    # Nothing unsent above the cursor up to ``top``: each of those seqs was sent
                    # or deleted. (Seqs go on across restarts, so a new session's cursor starts
                    # below the top of an empty outbox; waiting beyond the cursor alone returned
                    # at once, and the pump spun at full CPU until the next event was stored.)
                    cursor = max(cursor, top)
                    await self._outbox.wait_beyond(cursor)
                continue
            if replay and p.replay_rate:
                replay_at = max(replay_at, loop.time())
                await asyncio.sleep(replay_at - loop.time())
                replay_at += len(rows) / p.replay_rate
            elif (
                not replay
                and p.linger_ms
                and len(rows) < p.max_batch_events
                and self._outbox.highest_seq == rows[-1].seq  # not cut short by the byte limit
            ):
                await asyncio.sleep(p.linger_ms / 1000)
                rows = await self._outbox.peek(cursor, p.max_batch_events, self._budget)
            cursor = rows[-1].seq
            tg.create_task(
                self._send(client, rows, replay, window), name=f"mqtt-send-{rows[0].seq}"
            )

    async def _send(
        self,
        client: aiomqtt.Client,
        rows: Sequence[OutboxRow],
        replay: bool,
        window: asyncio.Semaphore,
    ) -> None:
        try:
            # Cancelled before the PUBACK (a stop), the rows stay in the outbox and go again
            # after the next connect, same seq: abandoning the wait loses nothing.
            await self._publish(client, self._up_topic, self.encode(rows, replay=replay))
            await self._delete([r.seq for r in rows])
        finally:
            window.release()
        self.stats.batches += 1
        self.stats.events += len(rows)
        if replay:
            self.stats.replayed_events += len(rows)

    async def _delete(self, seqs: Sequence[int]) -> None:
        """Delete acknowledged rows and any whose delete failed before; on an outbox error keep
        them for a later try (until then a reconnect may send them again: the server dedups)."""
        todo = sorted(self.undeleted.union(seqs))
        if not todo:
            return
        try:
            await self._outbox.delete(todo)
        except (OutboxError, sqlite3.Error) as exc:
            if not self.undeleted:
                log.error("outbox: cannot delete %d sent event(s), kept: %s", len(todo), exc)
            self.undeleted.update(seqs)
            return
        if self.undeleted:
            log.info("outbox: deleted %d sent event(s) after an earlier failure", len(todo))
        self.undeleted.difference_update(todo)

    async def _retry_deletes(self) -> None:
        while True:
            await asyncio.sleep(self.DELETE_RETRY_S)
            if self.undeleted:
                await self._delete(())

    def encode(self, rows: Sequence[OutboxRow], *, replay: bool = False) -> bytes:
        """An ``up`` batch of these rows, with ts and data exactly as stored."""
        events = [
            UplinkEvent(
                seq=r.seq,
                ts=_ts_decoder.decode(f'"{r.ts}"'),
                type=r.type,
                data=msgspec.Raw(r.data),
                synced=r.synced,
            )
            for r in rows
        ]
        batch = UplinkBatch(
            device_id=self.device.id,
            kind=self.device.kind,
            sent_at=_now(),
            events=events,
            replay=replay,
        )
        return encode_batch(batch)

    def _presence(self, state: Literal["online", "offline"]) -> bytes:
        presence = DeviceState(
            state=state,
            boot=self.boot,
            agent_version=__version__,
            ts=_now(),
            config_version=None if self._config is None else self._config.version,
        )
        return msgspec.json.encode(presence)
