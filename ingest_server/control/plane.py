"""The control plane: commands and desired configuration out to devices, their outcomes back.

The database is the queue. The API inserts a ``commands`` row (``pending``) or a new
``device_config`` version; the worker thread here publishes what is pending (QoS 1; a config
document retained), marks it ``sent`` / published on the broker's PUBACK, and records what the
devices answer on ``cmd/ack`` and ``config/ack``. A command is published once per server
process; one still pending after a restart is published again (the agent runs a command id at
most once). Its paho client has an id of its own (``<client-id>-control``) and a persistent
session, and acknowledges an ack to the broker only after its row is committed. A malformed
ack, or one nobody asked for, goes to ``quarantine`` with the reason. Servers sharing a
database all record acks; only the one holding an advisory lock publishes.

No ack can hold the others up: one beyond :data:`ACK_LIMITS` (size, nesting, string length, a
``\\u0000`` the database cannot store) is quarantined before it reaches the database, its
``detail`` included (refused, not truncated: a device's truncated answer would read as its
answer). One the database still refuses (DataError, IntegrityError, ...) is quarantined with the
database's reason at once; one that keeps losing the connection is retried with backoff, up to
:attr:`ControlPlane.MAX_ATTEMPTS` times, then quarantined. Quarantined means recorded and
acknowledged to the broker, never redelivered.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Literal

import msgspec
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from psycopg.types.json import Jsonb

from ingest_server.ingest.batch import QUARANTINE_KEEP_BYTES
from ingest_server.logbound import short
from ingest_server.metrics import IngestMetrics
from ingest_server.settings import BrokerUrl, Settings, mask
from ingest_server.storage.db import connect_session
from schemas import topics
from schemas.errors import TopicError
from schemas.limits import JsonLimits, check_json
from schemas.state import (
    Command,
    CommandAck,
    ConfigAck,
    ConfigDocument,
    ack_decoder,
    config_ack_decoder,
    config_decoder,
)

log = logging.getLogger(__name__)

_MQTT5: Final = 5
#: Advisory lock held by the one server (per database) that publishes; "campus\0\x30".
LEADER_LOCK_KEY: Final = 0x6361_6D70_7573_0030
#: What an ack may be. The agent's acks are well under a kilobyte; a config ack's ``detail`` is
#: a validation error's text, rarely over 1 KB.
ACK_LIMITS: Final = JsonLimits(max_bytes=32 * 1024, max_depth=16, max_string=8 * 1024)


class ControlError(ValueError):
    """An ack that cannot be used; the message says what is wrong with it, ``kind`` its class
    for ``campus_control_quarantined_total{reason}``."""

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


class AckKind(StrEnum):
    COMMAND = "cmd/ack"
    CONFIG = "config/ack"


_config_ack_decoder: Final = config_ack_decoder
_config_doc_decoder: Final = config_decoder


@dataclass(frozen=True, slots=True)
class AckTopic:
    school_id: str
    device_id: str
    kind: AckKind


def ack_filters() -> list[str]:
    """The subscriptions of the control plane: every device's ``cmd/ack`` and ``config/ack``."""
    return [f"{topics.PREFIX}/+/+/{kind.value}" for kind in AckKind]


def parse_ack_topic(topic: str) -> AckTopic:
    """``campus/v1/{school}/{device}/cmd/ack`` or ``.../config/ack``; else :class:`ControlError`."""
    parts = topic.split("/")
    channel = "/".join(parts[4:])
    if len(parts) != 6 or "/".join(parts[:2]) != topics.PREFIX or channel not in set(AckKind):
        raise ControlError(
            f"topic {short(topic)!r} is not a device's cmd/ack or config/ack", "topic"
        )
    try:
        topics.check_id(parts[2], "school_id")
        topics.check_id(parts[3], "device_id")
    except TopicError as exc:
        raise ControlError(short(str(exc)), "topic") from None
    return AckTopic(parts[2], parts[3], AckKind(channel))


def decode_ack(kind: AckKind, payload: bytes) -> CommandAck | ConfigAck:
    """Decode an ack payload within :data:`ACK_LIMITS`; :class:`ControlError` says which field
    or bound is wrong."""
    exceeded = check_json(payload, ACK_LIMITS)
    if exceeded is not None:
        raise ControlError(f"{kind.value} refused: {exceeded.reason}", exceeded.kind)
    try:
        if kind is AckKind.COMMAND:
            return ack_decoder.decode(payload)
        return _config_ack_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        # (ValidationError is a DecodeError; the others are caught by the limits above)
        raise ControlError(f"malformed {kind.value}: {short(str(exc))}") from None


#: Commands and configs waiting to be published, and the age (s) of the oldest of them.
_PENDING: Final = """
WITH cmd AS (
    SELECT count(*) AS n, min(created_at) AS oldest FROM commands
    WHERE status = 'pending' AND expires_at > now()
), cfg AS (
    SELECT count(*) AS n, min(updated_at) AS oldest FROM device_config
    WHERE published_version IS DISTINCT FROM version
)
SELECT cmd.n, cfg.n, extract(epoch FROM now() - least(cmd.oldest, cfg.oldest))::float8
FROM cmd, cfg
"""


def _device_of(topic: str) -> str | None:
    try:
        return parse_ack_topic(topic).device_id
    except ControlError:
        return None


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL: make it visible instead (a topic may carry one)."""
    # (a lone surrogate, which cannot be encoded, the same way)
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


def command_payload(cmd_id: str, name: str, args: dict[str, Any], expires_at: datetime) -> bytes:
    """The ``cmd`` message for one command, as the contract's :class:`Command`."""
    return msgspec.json.encode(Command(id=cmd_id, name=name, args=args, expires_at=expires_at))


_DESIRE_CONFIG: Final = """
INSERT INTO device_config AS c (device_id, school_id, version, document)
VALUES (%(device)s, %(school)s, 1,
        jsonb_build_object('version', 1, 'issued_at', %(issued)s::text, 'config', %(config)s))
ON CONFLICT (device_id) DO UPDATE SET
    version = c.version + 1,
    document = jsonb_build_object(
        'version', c.version + 1, 'issued_at', %(issued)s::text, 'config', %(config)s),
    status = 'pending', detail = NULL, updated_at = now(), acked_at = NULL
RETURNING version
"""


def desire_config(
    conn: psycopg.Connection[Any],
    device_id: str,
    school_id: str,
    config: dict[str, Any],
    issued_at: str | None = None,
) -> int:
    """Make ``config`` the device's desired configuration (the next version, pending until the
    worker publishes it); its version. The API and the rollout runner both issue configs here."""
    issued = issued_at or datetime.now(UTC).isoformat(timespec="milliseconds")
    row = conn.execute(
        _DESIRE_CONFIG,
        {"device": device_id, "school": school_id, "issued": issued, "config": Jsonb(config)},
    ).fetchone()
    assert row is not None
    return int(row[0])


def check_document(text: str) -> bytes:
    """A stored config document as it goes on the wire, checked against its struct."""
    raw = text.encode()
    _config_doc_decoder.decode(raw)
    return raw


@dataclass(frozen=True, slots=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    generation: int


@dataclass(frozen=True, slots=True)
class _Sent:
    """What a published message in flight was: a command id, or a device's config version."""

    kind: Literal["command", "config"]
    key: str
    version: int = 0


@dataclass(frozen=True, slots=True)
class ControlHealth:
    mqtt_connected: bool
    db_ok: bool
    #: Whether this server is the one publishing for its database.
    leader: bool
    inflight: int
    #: Acks received and not yet recorded (the one in hand included).
    inbox: int = 0
    #: Commands waiting to be published, and devices whose newest config is (as last counted).
    pending_commands: int = 0
    pending_configs: int = 0
    #: Why the control plane is not making progress; empty when it is.
    stuck: tuple[str, ...] = ()


class ControlPlane:
    """Publishes commands and configs from the database, records acks; see the module doc."""

    #: How often pending work is looked for and open commands are checked for expiry.
    TICK_S = 0.5
    #: Published messages awaiting their PUBACK, at most (paho slows with many in flight).
    MAX_INFLIGHT = 100
    #: Acks received and not yet recorded; when full paho's network thread waits.
    QUEUE_MESSAGES = 10_000
    BACKOFF_MIN_S = 0.1
    BACKOFF_MAX_S = 5.0
    MQTT_KEEPALIVE_S = 30
    MQTT_RECONNECT_S = (1, 30)
    SESSION_EXPIRY_S = 7 * 24 * 3600
    DB_CONNECT_TIMEOUT_S = 5
    #: Tries of one ack whose database connection keeps failing before it is quarantined.
    MAX_ATTEMPTS = 8

    def __init__(
        self,
        settings: Settings,
        broker: BrokerUrl,
        db_url: str,
        metrics: IngestMetrics | None = None,
    ) -> None:
        self.broker = broker
        self.db_url = db_url
        self.metrics = metrics or IngestMetrics()
        self.stuck_after_s = settings.stuck_after_s
        self.client_id = f"{settings.client_id}-control"
        # None wakes the worker; only acks are bounded by the queue's size.
        self._inbox: queue.Queue[_Inbound | None] = queue.Queue(self.QUEUE_MESSAGES)
        # PUBACKs, from paho's network thread; bounded by MAX_INFLIGHT. Never a lock there:
        # paho calls on_publish holding its own message lock, which publish() also takes.
        self._published: queue.SimpleQueue[tuple[int, str | None]] = queue.SimpleQueue()
        self._inflight: dict[int, _Sent] = {}
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._gen_lock = threading.Lock()
        self._generation = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False
        self._leader = False
        self._retry: _Inbound | None = None
        #: Failed tries of the ack in hand; since when it is in hand (monotonic).
        self._attempts = 0
        self._busy_since: float | None = None
        #: When the worker last finished a pass of its loop; the oldest pending work's age (s).
        self._last_pass = time.monotonic()
        self._pending = (0, 0)
        self._pending_age_s = 0.0
        self._client = self._make_client()
        self._thread = threading.Thread(target=self._run, name="control-worker", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        b = self.broker
        log.info("control plane: connecting to MQTT broker %s as %r", b, self.client_id)
        props = None
        if b.protocol == _MQTT5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
            props.SessionExpiryInterval = self.SESSION_EXPIRY_S
        self._client.connect_async(
            b.host,
            b.port,
            keepalive=self.MQTT_KEEPALIVE_S,
            clean_start=False if b.protocol == _MQTT5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self._client.loop_start()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (what is in flight stays pending), then leave the broker."""
        self._stopping.set()
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def wake(self) -> None:
        """Look for pending work now (the API calls this after writing some)."""
        with contextlib.suppress(queue.Full):
            self._inbox.put_nowait(None)

    def health(self) -> ControlHealth:
        now, limit = time.monotonic(), self.stuck_after_s
        stuck = []
        if self._thread.ident is not None and not self._thread.is_alive():
            stuck.append("control: the worker thread has died")
        busy = self._busy_since
        if busy is not None and now - busy > limit:
            stuck.append(f"control: an ack has waited {now - busy:.0f} s to be recorded")
        elif now - self._last_pass > limit:
            stuck.append(
                f"control: the worker has not come round for {now - self._last_pass:.0f} s"
            )
        if self._leader and self._connected.is_set() and self._pending_age_s > limit:
            stuck.append(f"control: commands or configs pending for {self._pending_age_s:.0f} s")
        inbox = self._inbox.qsize() + (busy is not None)
        return ControlHealth(
            mqtt_connected=self._connected.is_set(),
            db_ok=self._conn is not None and self._thread.is_alive(),
            leader=self._leader,
            inflight=len(self._inflight),
            inbox=inbox,
            pending_commands=self._pending[0],
            pending_configs=self._pending[1],
            stuck=tuple(stuck),
        )

    # -- MQTT (paho's network thread) ------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        b = self.broker
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if b.protocol == _MQTT5 else False,
            protocol=mqtt.MQTTv5 if b.protocol == _MQTT5 else mqtt.MQTTv311,
            manual_ack=True,
        )
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.tls:
            client.tls_set(ca_certs=b.ca)
        client.reconnect_delay_set(*self.MQTT_RECONNECT_S)
        client.max_inflight_messages_set(self.MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning("control plane: broker %s refused the connection: %s", self.broker, reason)
            return
        with self._gen_lock:
            self._generation += 1
        log.info("control plane connected (session present: %s)", flags.session_present)
        if self.broker.protocol == _MQTT5:
            opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            client.subscribe([(f, opts) for f in ack_filters()])
        else:
            client.subscribe([(f, 1) for f in ack_filters()])

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        refused = [str(code) for code in reasons if code.is_failure]
        if refused:
            log.error("control plane: the broker refused a subscription: %s", ", ".join(refused))
            return
        self._connected.set()
        self.wake()  # what waited for the broker goes now

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._stopping.is_set():
            log.warning("control plane disconnected from MQTT broker (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = "<topic is not UTF-8>"
        item = _Inbound(topic, bytes(msg.payload), msg.mid, msg.qos, self._generation)
        while not self._stopping.is_set():
            with contextlib.suppress(queue.Full):
                self._inbox.put(item, timeout=self.TICK_S)
                return

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self._published.put((mid, str(reason) if reason.is_failure else None))
        self.wake()

    # -- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        delay = self.BACKOFF_MIN_S
        next_tick = 0.0
        while not self._stopping.is_set():
            try:
                conn = self._connect_db()
                self._record_published(conn)
                item = self._retry
                if item is None:
                    wait = max(0.0, next_tick - time.monotonic())
                    try:
                        item = self._inbox.get(timeout=wait)
                    except queue.Empty:
                        item = None
                    if item is None:  # woken, or time for the next tick
                        next_tick = 0.0
                if item is not None:
                    if self._retry is None:
                        self._retry, self._busy_since = item, time.monotonic()
                    self._record_ack(conn, item)
                    self._retry = self._busy_since = None
                    self._attempts = 0
                    self._ack_broker(item)
                if time.monotonic() >= next_tick:
                    self._tick(conn)
                    next_tick = time.monotonic() + self.TICK_S
                delay = self.BACKOFF_MIN_S
                self._last_pass = time.monotonic()
                self._update_metrics()
            except psycopg.Error as exc:
                log.warning(
                    "control plane: database error (%s); retrying in %.1f s",
                    short(" ".join(str(exc).split())),
                    delay,
                )
                self.metrics.control_retries.inc()
                self._disconnect_db()
                self._stopping.wait(delay * random.uniform(0.5, 1.0))  # noqa: S311
                delay = min(delay * 2, self.BACKOFF_MAX_S)
            except Exception:  # a bug must not stop commands for the whole district
                log.exception("control plane: unexpected error; going on")
                self._stopping.wait(self.BACKOFF_MAX_S)
        self._disconnect_db()

    def _record_ack(self, conn: psycopg.Connection[Any], item: _Inbound) -> None:
        """Record ``item``, or quarantine it: only a lost connection (raised) is tried again,
        and only :attr:`MAX_ATTEMPTS` times."""
        try:
            self._handle(conn, item)
            return
        except psycopg.Error as exc:
            why = short(" ".join((exc.diag.message_primary or str(exc)).split()))
            if not conn.closed and not isinstance(
                exc, (psycopg.OperationalError, psycopg.InterfaceError)
            ):
                reason, kind = (
                    f"the database refused this ack: {type(exc).__name__}: {why}",
                    "database",
                )
            else:
                self._attempts += 1
                if self._attempts < self.MAX_ATTEMPTS:
                    raise
                reason = f"not recorded after {self._attempts} tries: {type(exc).__name__}: {why}"
                kind = "retries"
                self._disconnect_db()  # the failure may have left the session unusable
                conn = self._connect_db()
        except Exception as exc:  # a bug on one ack must not hold up the others
            log.exception("control plane: cannot record an ack on %s", short(item.topic))
            reason, kind = f"internal error while recording: {short(repr(exc))}", "internal"
        try:
            self._quarantine(conn, item, reason, _device_of(item.topic), kind)
        except psycopg.Error as exc:
            if conn.closed or isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                raise
            log.error(
                "control plane: an ack on %s cannot even be quarantined (%s); dropped",
                short(item.topic),
                short(str(exc)),
            )
            self.metrics.control_quarantined.inc(reason="dropped")

    def _connect_db(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            conn = connect_session(
                self.db_url,
                application_name="campus-control",
                connect_timeout=self.DB_CONNECT_TIMEOUT_S,
                migrate_first=not self._migrated,
            )
            self._migrated = True
            log.info("control plane: connected to database %s", mask(self.db_url))
            self._conn = conn
        return self._conn

    def _disconnect_db(self) -> None:
        conn, self._conn = self._conn, None
        self._leader = False  # the advisory lock went with the session
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _ack_broker(self, item: _Inbound) -> None:
        with self._gen_lock:
            if item.qos and item.generation == self._generation:
                self._client.ack(item.mid, item.qos)

    def _tick(self, conn: psycopg.Connection[Any]) -> None:
        expired = conn.execute(
            "UPDATE commands SET status = 'expired' WHERE status IN ('pending', 'sent')"
            " AND expires_at <= now() RETURNING id, device_id, name"
        ).fetchall()
        for cmd_id, device_id, name in expired:
            log.info("command %s (%s) to %s expired without an ack", cmd_id, name, device_id)
        if not self._leader:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()
            self._leader = bool(row and row[0])
            if self._leader:
                log.info("control plane: this server publishes commands and configs")
        if self._leader and self._connected.is_set():
            self._send(conn)
        if self._leader:
            self._count_pending(conn)
        else:
            self._pending, self._pending_age_s = (0, 0), 0.0

    def _count_pending(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute(_PENDING).fetchone()
        if row is not None:
            self._pending = (int(row[0]), int(row[1]))
            self._pending_age_s = float(row[2] or 0.0)

    def _send(self, conn: psycopg.Connection[Any]) -> None:
        room = self.MAX_INFLIGHT - len(self._inflight)
        busy_cmds = [s.key for s in self._inflight.values() if s.kind == "command"]
        busy_devs = [s.key for s in self._inflight.values() if s.kind == "config"]
        if room > 0:
            rows = conn.execute(
                "SELECT id, school_id, device_id, name, args, expires_at FROM commands"
                " WHERE status = 'pending' AND expires_at > now() AND NOT id = ANY(%s)"
                " ORDER BY created_at, id LIMIT %s",
                (busy_cmds, room),
            ).fetchall()
            for cmd_id, school_id, device_id, name, args, expires_at in rows:
                topic = topics.build(school_id, device_id, topics.Channel.CMD)
                payload = command_payload(cmd_id, name, args, expires_at)
                self._publish(topic, payload, False, _Sent("command", cmd_id))
            room -= len(rows)
        if room > 0:
            rows = conn.execute(
                "SELECT device_id, school_id, version, document::text FROM device_config"
                " WHERE published_version IS DISTINCT FROM version AND NOT device_id = ANY(%s)"
                " ORDER BY updated_at, device_id LIMIT %s",
                (busy_devs, room),
            ).fetchall()
            for device_id, school_id, version, document in rows:
                topic = topics.build(school_id, device_id, topics.Channel.CONFIG)
                try:
                    payload = check_document(document)
                except msgspec.ValidationError as exc:  # never retried: it would fail again
                    log.error("config v%d of %s not published: %s", version, device_id, exc)
                    conn.execute(
                        "UPDATE device_config SET published_version = version,"
                        " detail = %s WHERE device_id = %s AND version = %s",
                        (f"not published, invalid document: {exc}", device_id, version),
                    )
                    continue
                self._publish(topic, payload, True, _Sent("config", device_id, version))

    def _publish(self, topic: str, payload: bytes, retain: bool, what: _Sent) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        # NO_CONN: paho keeps a QoS 1 message and sends it once reconnected.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("control plane: could not publish to %s: %s", topic, info.rc)
            return
        self._inflight[info.mid] = what

    def _record_published(self, conn: psycopg.Connection[Any]) -> None:
        while True:
            try:
                mid, refused = self._published.get_nowait()
            except queue.Empty:
                return
            sent = self._inflight.get(mid)
            if sent is None:
                continue
            try:
                self._mark_published(conn, sent, refused)
            except BaseException:
                self._published.put((mid, refused))  # not lost: recorded on the next try
                raise
            del self._inflight[mid]

    def _mark_published(
        self, conn: psycopg.Connection[Any], sent: _Sent, refused: str | None
    ) -> None:
        if sent.kind == "command":
            if refused:
                log.error("the broker refused command %s: %s", sent.key, refused)
                detail = Jsonb({"broker": f"the broker refused the command: {refused}"})
                conn.execute(
                    "UPDATE commands SET status = 'error', detail = %s"
                    " WHERE id = %s AND status = 'pending'",
                    (detail, sent.key),
                )
            else:
                conn.execute(
                    "UPDATE commands SET status = 'sent', sent_at = now()"
                    " WHERE id = %s AND status = 'pending'",
                    (sent.key,),
                )
            return
        if refused:
            log.error("the broker refused config v%d of %s: %s", sent.version, sent.key, refused)
        conn.execute(
            "UPDATE device_config SET published_version = %s, published_at = now(),"
            " detail = coalesce(%s, detail) WHERE device_id = %s"
            " AND (published_version IS NULL OR published_version < %s)",
            (
                sent.version,
                f"the broker refused the document: {refused}" if refused else None,
                sent.key,
                sent.version,
            ),
        )

    # -- acks ------------------------------------------------------------------------------

    def _handle(self, conn: psycopg.Connection[Any], item: _Inbound) -> None:
        try:
            where = parse_ack_topic(item.topic)
        except ControlError as exc:
            self._quarantine(conn, item, str(exc), None, exc.kind)
            return
        try:
            ack = decode_ack(where.kind, item.payload)
        except ControlError as exc:
            self._quarantine(conn, item, str(exc), where.device_id, exc.kind)
            return
        with conn.transaction():
            if isinstance(ack, CommandAck):
                problem = self._command_ack(conn, where, ack)
            else:
                problem = self._config_ack(conn, where, ack)
            if problem:
                self._quarantine(conn, item, problem, where.device_id, "unexpected")

    def _command_ack(
        self, conn: psycopg.Connection[Any], where: AckTopic, ack: CommandAck
    ) -> str | None:
        """Record ``ack``; the reason it cannot be, if so. A late ack still beats ``expired``."""
        detail = None if ack.detail is None else Jsonb(ack.detail)
        done = conn.execute(
            "UPDATE commands SET status = %s, detail = %s, acked_at = now()"
            " WHERE id = %s AND device_id = %s AND acked_at IS NULL RETURNING name",
            (ack.status, detail, ack.id, where.device_id),
        ).fetchone()
        if done is not None:
            log.info("command %s (%s) on %s: %s", ack.id, done[0], where.device_id, ack.status)
            return None
        row = conn.execute("SELECT device_id FROM commands WHERE id = %s", (ack.id,)).fetchone()
        if row is None:
            return f"ack for unknown command id {ack.id!r}"
        if row[0] != where.device_id:
            return f"ack from {where.device_id} for command {ack.id!r}, which was sent to {row[0]}"
        log.debug("command %s: repeated ack ignored", ack.id)
        return None

    def _config_ack(
        self, conn: psycopg.Connection[Any], where: AckTopic, ack: ConfigAck
    ) -> str | None:
        done = conn.execute(
            "UPDATE device_config SET status = %s, detail = %s, acked_at = now()"
            " WHERE device_id = %s AND version = %s"
            " AND (acked_at IS NULL OR status <> %s OR detail IS DISTINCT FROM %s)"
            " RETURNING 1",
            (ack.status, ack.detail, where.device_id, ack.version, ack.status, ack.detail),
        ).fetchone()
        if done is not None:
            log.info("config v%d on %s: %s", ack.version, where.device_id, ack.status)
            return None
        row = conn.execute(
            "SELECT version FROM device_config WHERE device_id = %s", (where.device_id,)
        ).fetchone()
        if row is None:
            return f"config ack from {where.device_id}, which has no desired configuration"
        if ack.version > row[0]:
            return f"config ack for version {ack.version}, but the newest issued is {row[0]}"
        if ack.version < row[0]:
            log.info(
                "config ack from %s for version %d ignored: version %d is desired now",
                where.device_id,
                ack.version,
                row[0],
            )
        return None

    def _quarantine(
        self,
        conn: psycopg.Connection[Any],
        item: _Inbound,
        reason: str,
        device_id: str | None,
        kind: str,
    ) -> None:
        """Keep ``item`` (its first :data:`QUARANTINE_KEEP_BYTES`) with ``reason``."""
        payload = item.payload[:QUARANTINE_KEEP_BYTES]
        if len(payload) < len(item.payload):
            reason += f"; only its first {len(payload)} bytes of {len(item.payload)} are kept here"
        log.warning(
            "control plane: %s (topic %s); kept in quarantine", short(reason), short(item.topic)
        )
        conn.execute(
            "INSERT INTO quarantine (topic, payload, reason, device_id) VALUES (%s, %s, %s, %s)",
            (_text(item.topic), payload, _text(reason), device_id),
        )
        self.metrics.control_quarantined.inc(reason=kind)

    def _update_metrics(self) -> None:
        m = self.metrics
        m.control_inbox.set(self._inbox.qsize() + (self._busy_since is not None))
        m.control_inflight.set(len(self._inflight))
        m.control_pending_commands.set(self._pending[0])
        m.control_pending_configs.set(self._pending[1])


__all__ = [
    "AckKind",
    "AckTopic",
    "ConfigAck",
    "ConfigDocument",
    "ControlError",
    "ControlHealth",
    "ControlPlane",
    "ack_filters",
    "check_document",
    "command_payload",
    "decode_ack",
    "parse_ack_topic",
]
