"""The embedded default mode's in-process MQTT broker (amqtt 0.12), on loopback only.

    async with EmbeddedBroker() as broker:      # amqtt 0.12 on 127.0.0.1, a free port
        broker.url                              # mqtt://127.0.0.1:PORT?protocol=3.1.1
    with EmbeddedBroker().start_in_thread() as broker: ...   # for a synchronous (paho) program

What amqtt 0.12 does, as tests/integration/test_embedded.py pins down:

- Its stock ``AnonymousAuthPlugin`` flags every session anonymous, and amqtt neither queues
  messages for anonymous sessions nor keeps them after disconnect. :class:`LoopbackAuthPlugin`
  admits every client of the loopback listener without that flag, so ``clean_session=False``
  sessions keep their subscriptions and queue QoS 1 messages while the client is away.
- Messages queued for an offline session arrive with the RETAIN flag set.
- A message goes out at the subscription's QoS even when published at a lower one; a will goes
  out at the will's QoS even above the QoS the subscription was granted.
- A QoS 1 message sent but not yet PUBACKed when the subscriber disconnects is dropped, not
  redelivered on reconnect. amqtt also gives up on a PUBACK after 5 s (logging an ERROR) and
  never resends that message: only the copy the client already holds remains.
- Queues live in memory only, without a size limit: a restart of the process loses them, and a
  session unused for ``SESSION_EXPIRY_S`` is dropped with its queue.

Given ``rules`` (a :class:`~ingest_server.control.broker_auth.RulesHolder` the server keeps
current from
the device registry), the broker enforces what Mosquitto's password and ACL files do: a client
that names a user must give its password, and a device may publish and subscribe only under its
own prefix. Beyond Mosquitto, a CONNECT is checked before amqtt acts on it
(:meth:`EmbeddedBroker.admission`): client ids are bound to users (``reserved_client_ids`` are the
server's), and a will must be a topic the client may publish. Clients without a user are admitted
only with ``allow_anonymous`` (the demo's agents), to publish uplinks of devices outside the
registry and read nothing. Retained and queued messages go out only through the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import threading
from collections.abc import Collection
from typing import Any, Final, Self

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from ingest_server.control.broker_auth import RulesHolder
from ingest_server.embedded import EmbeddedError

log = logging.getLogger(__name__)

_LISTENER: Final = "default"


#: CONNACK return codes of MQTT 3.1.1 the gate answers with.
_UNACCEPTABLE_PROTOCOL: Final = 0x01
_IDENTIFIER_REJECTED: Final = 0x02
_NOT_AUTHORISED: Final = 0x05


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What a CONNECT packet asks for (MQTT 3.1 / 3.1.1; other levels carry only ``level``)."""

    level: int
    clean_session: bool = True
    client_id: str = ""
    will_topic: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ValueError("CONNECT packet truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def blob(self) -> bytes:
        return self.take(int.from_bytes(self.take(2), "big"))

    def text(self) -> str:
        return self.blob().decode("utf-8")  # UnicodeDecodeError is a ValueError


def parse_connect(body: bytes) -> ConnectRequest:
    """The CONNECT's variable header and payload (after the fixed header); ValueError if bad."""
    c = _Cursor(body)
    c.text()  # protocol name: amqtt checks it
    level, flags = c.take(1)[0], c.take(1)[0]
    c.take(2)  # keep-alive
    if level not in (3, 4):
        return ConnectRequest(level)
    client_id = c.text()
    will_topic = None
    if flags & 0x04:
        will_topic = c.text()
        c.blob()
    username = c.text() if flags & 0x80 else None
    password = c.blob().decode("utf-8") if flags & 0x40 else None
    return ConnectRequest(level, bool(flags & 0x02), client_id, will_topic, username, password)


async def _read_connect(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    """The first packet's fixed header and body, which must be a CONNECT of at most ``limit``."""
    head = bytearray(await reader.readexactly(1))
    if head[0] != 0x10:
        raise ValueError(f"the first packet is not a CONNECT (type byte {head[0]:#04x})")
    length = 0
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        head.append(byte)
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise ValueError("malformed remaining length in CONNECT")
    if length > limit:
        raise ValueError(f"a CONNECT of {length} bytes (at most {limit})")
    return bytes(head), await reader.readexactly(length)


class _ReplayReader(StreamReaderAdapter):  # type: ignore[misc]
    """The stream with the CONNECT the gate has read put back in front, for amqtt."""

    def __init__(self, reader: asyncio.StreamReader, head: bytes) -> None:
        super().__init__(reader)
        self._head = head

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            return bytes(await super().read(n))
        if n == -1:
            head, self._head = self._head, b""
            return head + bytes(await super().read(-1))
        out, self._head = self._head[:n], self._head[n:]
        if len(out) < n:
            out += bytes(await super().read(n - len(out)))
        return out


class _GuardedBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with retained and queued messages sent only through the topic rules.

    amqtt 0.12 sends retained messages without asking the topic plugin, and on every connect
    it sends those matching *any* session's subscriptions (another device's ``config``, every
    device's ``state``) to the new client. Here a session gets retained messages only for its
    own subscriptions and only on topics it may read; queued ones are checked again on the way
    out, as the rules may have changed (a revoked device) while it was away.
    """

    async def _may_receive(self, session: Session, topic: str) -> bool:
        return bool(await self._topic_filtering(session, topic=topic, action=Action.RECEIVE))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        own = self._subscriptions.get(topic_filter, ())
        handler = self._get_handler(session)
        if handler is None or all(s.client_id != session.client_id for s, _ in own):
            return
        sends = [
            asyncio.ensure_future(
                handler.mqtt_publish(m.topic, m.data, min(qos, m.qos or qos), retain=True)
            )
            for topic, m in list(self._retained_messages.items())
            if self._matches(topic, topic_filter) and await self._may_receive(session, topic)
        ]
        if sends:
            await asyncio.wait(sends)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        while not session.retained_messages.empty():
            m = session.retained_messages.get_nowait()
            if await self._may_receive(session, m.topic):
                sends.append(
                    asyncio.ensure_future(handler.mqtt_publish(m.topic, m.data, m.qos, retain=True))
                )
            else:
                log.warning(
                    "embedded broker: dropped a queued message on %s for %r (no longer allowed)",
                    m.topic,
                    session.client_id,
                )
        if sends:
            await asyncio.wait(sends)


#: The rules of each running broker, by key (amqtt builds plugins from plain config values).
_RULES: dict[str, RulesHolder] = {}


@dataclasses.dataclass
class _PluginConfig:
    rules_key: str = ""
    allow_anonymous: bool = True


class LoopbackAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """Admit clients of the loopback-only listener (without amqtt's ``is_anonymous`` flag), and
    with rules only those whose user and password the registry knows (or anonymous, if allowed).
    """

    Config = _PluginConfig

    async def authenticate(self, *, session: Session) -> bool:
        if (
            session.remote_address is None
            or not ipaddress.ip_address(session.remote_address).is_loopback
        ):
            return False
        holder = _RULES.get(self.config.rules_key)
        if holder is None:
            return True
        if session.username is None:
            return bool(self.config.allow_anonymous)
        ok = holder.rules.authenticate(session.username, session.password)
        if not ok:
            log.warning(
                "embedded broker: refused user %r (unknown or wrong password)", session.username
            )
        return ok


class RegistryTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Confine each user to its topics, as the Mosquitto ACL written from the registry does."""

    Config = _PluginConfig

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        holder = _RULES.get(self.config.rules_key)
        if holder is None:
            return True
        if session is None or topic is None:
            return False
        if session.username is None:
            # Anonymous (demo only): a device's own channels, by exact topic, of devices
            # outside the registry; no wildcard, so no other device's data ever reaches it.
            if not self.config.allow_anonymous:
                return False
            if action == Action.PUBLISH:
                return holder.rules.anonymous_may_publish(topic)
            return holder.rules.anonymous_may_read(topic)
        if action == Action.PUBLISH:
            return holder.rules.may_publish(session.username, topic)
        return holder.rules.may_subscribe(session.username, topic)


class EmbeddedBroker:
    """An in-process amqtt broker (MQTT 3.1.1) listening on loopback only."""

    #: Persistent sessions of clients gone for longer than this are dropped with their queues.
    SESSION_EXPIRY_S = 7 * 24 * 3600
    MAX_CONNECTIONS = 1024
    #: How long shutdown waits for client connections to wind down before cancelling them.
    CLOSE_TIMEOUT_S = 5.0
    #: A client has this long to send its CONNECT, of at most this many bytes (the will too).
    CONNECT_TIMEOUT_S = 10.0
    MAX_CONNECT_BYTES = 64 * 1024

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        rules: RulesHolder | None = None,
        allow_anonymous: bool = False,
        reserved_client_ids: Collection[str] = (),
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the embedded broker listens on loopback only, not {host}")
        self.host = host
        self._rules = rules
        self._allow_anonymous = allow_anonymous
        #: Client ids only the server user may connect with (its consumer and control plane).
        self._reserved = frozenset(reserved_client_ids)
        self._rules_key = f"broker-{id(self)}"
        self._requested_port = port
        self.port = 0
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        if not self.port:
            raise EmbeddedError("the embedded broker is not running")
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    async def __aenter__(self) -> Self:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        plugins: dict[str, Any] = {f"{__name__}.{LoopbackAuthPlugin.__name__}": {}}
        if self._rules is not None:
            # Only with rules: a topic plugin changes the order amqtt delivers a queue in.
            _RULES[self._rules_key] = self._rules
            conf = {"rules_key": self._rules_key, "allow_anonymous": self._allow_anonymous}
            plugins = {
                f"{__name__}.{LoopbackAuthPlugin.__name__}": conf,
                f"{__name__}.{RegistryTopicPlugin.__name__}": conf,
            }
        broker = _GuardedBroker(
            {
                # An "external" listener: we own the socket, so binding stays on loopback and the
                # port chosen at run time is known. (amqtt ignores its default bind for it.)
                "listeners": {_LISTENER: {"type": "external"}},
                "plugins": plugins,
                "session_expiry_interval": self.SESSION_EXPIRY_S,
            }
        )
        await broker.start()
        try:
            self._server = await asyncio.start_server(
                self._connected, self.host, self._requested_port
            )
        except OSError as exc:
            await broker.shutdown()
            raise EmbeddedError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc}"
            ) from exc
        self._broker = broker
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("embedded MQTT broker listening on %s", self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, broker = self._server, self._broker
        self._server = self._broker = None
        _RULES.pop(self._rules_key, None)
        self.port = 0
        if server is not None:
            server.close()
        if broker is not None:
            await broker.shutdown()
        if self._conns:
            _, stragglers = await asyncio.wait(self._conns, timeout=self.CLOSE_TIMEOUT_S)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker = self._broker
        if broker is None or len(self._conns) >= self.MAX_CONNECTIONS:
            log.warning("embedded broker: refusing a connection (stopping or at the limit)")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            connect = await self._gate(reader, writer)
            if connect is not None:
                await broker.external_connected(
                    _ReplayReader(reader, connect), StreamWriterAdapter(writer), _LISTENER
                )
        finally:
            self._conns.discard(task)

    async def _gate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """Read the CONNECT and refuse it here, before amqtt sees it; the packet if admitted.

        amqtt 0.12 acts on a CONNECT before it authenticates: a clean session deletes the
        stored session of that client id, a persistent one gets its will and user overwritten,
        and a connected one is taken over, even when the CONNACK then refuses the client.
        """
        try:
            async with asyncio.timeout(self.CONNECT_TIMEOUT_S):
                head, body = await _read_connect(reader, self.MAX_CONNECT_BYTES)
            request = parse_connect(body)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            log.warning("embedded broker: dropped a connection without a valid CONNECT: %s", exc)
            writer.close()
            return None
        code, why = self.admission(request)
        if code == 0:
            return head + body
        log.warning(
            "embedded broker: refused client id %r (%s): %s",
            request.client_id[:80],
            "anonymous" if request.username is None else f"user {request.username[:80]!r}",
            why,
        )
        writer.write(bytes((0x20, 0x02, 0x00, code)))  # CONNACK with the refusal
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        return None

    def admission(self, req: ConnectRequest) -> tuple[int, str]:
        """The CONNACK return code for ``req`` (0: admitted) and, if refused, why."""
        if req.level not in (3, 4):
            return _UNACCEPTABLE_PROTOCOL, f"MQTT protocol level {req.level} (3.1.1 only)"
        if self._rules is None:
            return 0, ""
        rules = self._rules.rules
        if req.username is None:
            if not self._allow_anonymous:
                return _NOT_AUTHORISED, "anonymous clients are not admitted"
        elif not rules.authenticate(req.username, req.password):
            return _NOT_AUTHORISED, "unknown user or wrong password"
        if not req.client_id and not req.clean_session:
            return _IDENTIFIER_REJECTED, "an empty client id needs a clean session"
        if not rules.may_use_client_id(req.username, req.client_id, self._reserved):
            return _IDENTIFIER_REJECTED, "the client id belongs to the server or another device"
        if req.will_topic is not None and not (
            rules.anonymous_may_publish(req.will_topic)
            if req.username is None
            else rules.may_publish(req.username, req.will_topic)
        ):
            # amqtt publishes (and retains) a will without asking the topic plugin
            return _NOT_AUTHORISED, f"a will on {req.will_topic[:200]!r}, which it may not publish"
        return 0, ""

    def sessions(self) -> dict[str, str]:
        """Each client id the broker holds a session for, and its state (``connected``, ...)."""
        if self._broker is None:
            return {}
        return {cid: str(s.transitions.state) for cid, (s, _) in self._broker.sessions.items()}

    def start_in_thread(self, timeout: float = 10.0) -> BrokerThread:
        """Run this broker on an event loop of its own thread; stop it with ``.stop()``."""
        return BrokerThread(self, timeout)


class BrokerThread:
    """An :class:`EmbeddedBroker` hosted on a daemon thread, for a synchronous program."""

    def __init__(self, broker: EmbeddedBroker, timeout: float = 10.0) -> None:
        self.broker = broker
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), name="embedded-mqtt", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise EmbeddedError(f"the embedded broker did not start within {timeout:.0f} s")
        if self._error is not None:
            raise EmbeddedError(
                f"the embedded broker failed to start: {self._error}"
            ) from self._error

    @property
    def host(self) -> str:
        return self.broker.host

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return self.broker.url

    async def _main(self) -> None:
        try:
            async with self.broker:
                self._loop = asyncio.get_running_loop()
                self._stopping = asyncio.Event()
                self._ready.set()
                await self._stopping.wait()
        except BaseException as exc:  # reported to the starting thread; nothing else can see it
            self._error = exc
            if self._ready.is_set():
                log.exception("embedded MQTT broker stopped with an error")
            self._ready.set()

    def sessions(self, timeout: float = 5.0) -> dict[str, str]:
        """:meth:`EmbeddedBroker.sessions`, read on the broker's own loop."""
        if self._loop is None:
            return {}

        async def read() -> dict[str, str]:
            return self.broker.sessions()

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise EmbeddedError(f"the embedded broker did not stop within {timeout:.0f} s")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "BrokerThread",
    "EmbeddedBroker",
    "LoopbackAuthPlugin",
    "RegistryTopicPlugin",
]
