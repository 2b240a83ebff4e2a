"""A persistent-session MQTT subscriber over :mod:`.mqtt_codec`, for the ingest path.

One I/O thread owns the socket: it connects (clean start off, a session that outlives the
connection), subscribes, reads PUBLISH packets in large chunks and hands each chunk's messages
to ``deliver`` in one call. Acknowledgements come from other threads through :meth:`ack`: they
are queued, the I/O thread is woken through a socket pair and sends them in one write. So a
TLS connection is only ever touched by one thread, and a commit of 5,000 messages costs one
``send`` instead of 5,000 calls into a client library.

A message is acknowledged only on the connection that delivered it: after a reconnect the
broker resends what was not acknowledged, and acks from an earlier connection are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from ingest_server.ingest.mqtt_codec import (
    DISCONNECT_BYTES,
    MQTT5,
    PINGREQ_BYTES,
    PUBACK,
    PUBCOMP,
    PUBREC,
    ConnAck,
    Disconnect,
    MqttDecoder,
    MqttProtocolError,
    PingResp,
    Publish,
    PubRel,
    SubAck,
    encode_acks,
    encode_connect,
    encode_subscribe,
)

log = logging.getLogger(__name__)

_RECV_BYTES: Final = 256 * 1024
_SUBSCRIBE_ID: Final = 1

_CONNACK_311: Final = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorised",
}


class Ackable(Protocol):
    """What :meth:`MqttSubscriber.ack` needs of a delivered message."""

    @property
    def mid(self) -> int: ...
    @property
    def qos(self) -> int: ...
    @property
    def generation(self) -> int: ...


#: ``deliver(messages, generation, timeout_s) -> how many were taken`` (a prefix); may wait up
#: to ``timeout_s`` for room. What is not taken is offered again.
Deliver = Callable[[Sequence[Publish], int, float], int]


class ConnectRefused(Exception):
    """The broker answered CONNECT with a failure code; the message says which."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    host: str
    port: int
    client_id: str
    #: ``(filter, qos, retain_handling)`` subscribed on every connect.
    subscriptions: tuple[tuple[str, int, int], ...]
    protocol: int = MQTT5
    username: str | None = None
    password: str | None = None
    #: TLS when set; the broker's name is checked against ``host``.
    ssl_context: ssl.SSLContext | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 65535
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0


class MqttSubscriber:
    """Connects, subscribes, delivers, acknowledges on request, reconnects with backoff."""

    def __init__(
        self,
        config: SessionConfig,
        deliver: Deliver,
        on_ready: Callable[[bool], None] = lambda _ready: None,
    ) -> None:
        self.config = config
        self._deliver = deliver
        self._on_ready = on_ready
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._out: list[bytes] = []
        self._woken = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        #: Counts connections; a message carries the one that delivered it.
        self.generation = 0
        self._sock: socket.socket | None = None
        self._last_sent = 0.0
        self._thread = threading.Thread(target=self._run, name="ingest-mqtt", daemon=True)

    # -- public, any thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Send the acks already queued, then DISCONNECT (the session stays on the broker)."""
        self._stopping.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def ack(self, messages: Iterable[Ackable]) -> int:
        """Queue the acknowledgement of ``messages``; returns how many were from an earlier
        connection and so are not acknowledged (the broker resends those)."""
        msgs = messages if isinstance(messages, Sequence) else list(messages)
        pubrecs: list[int] = []
        stale = 0
        with self._lock:
            current = self.generation
            # the usual case in one pass: every message QoS 1 and of this connection
            pubacks = [m.mid for m in msgs if m.qos == 1 and m.generation == current]
            if len(pubacks) != len(msgs):
                pubacks = []
                for m in msgs:
                    if m.qos == 0:
                        continue
                    if m.generation != current:
                        stale += 1
                    elif m.qos == 1:
                        pubacks.append(m.mid)
                    else:
                        pubrecs.append(m.mid)
            if pubacks:
                self._out.append(encode_acks(PUBACK, pubacks))
            if pubrecs:
                self._out.append(encode_acks(PUBREC, pubrecs))
            wake = (pubacks or pubrecs) and not self._woken
            if wake:
                self._woken = True
        if wake:
            self._wake()
        return stale

    # -- the I/O thread ----------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed (stopped)
            self._wake_w.send(b"\x00")

    def _run(self) -> None:
        c = self.config
        delay = c.reconnect_min_s
        while not self._stopping.is_set():
            connected = False
            try:
                sock = self._connect()
                connected = True
                delay = c.reconnect_min_s
                self._serve(sock)
            except (OSError, MqttProtocolError, ConnectRefused) as exc:
                if not self._stopping.is_set():
                    what = "lost the connection to" if connected else "cannot connect to"
                    log.warning(
                        "MQTT: %s %s:%d (%s: %s); retrying in %.1f s",
                        what,
                        c.host,
                        c.port,
                        type(exc).__name__,
                        " ".join(str(exc).split()),
                        delay,
                    )
            except Exception:
                log.exception("the MQTT session failed")
                self._close(graceful=False)
                raise
            self._close(graceful=self._stopping.is_set())
            if self._stopping.wait(delay * random.uniform(0.5, 1.0)):  # noqa: S311
                break
            delay = min(delay * 2, c.reconnect_max_s)
        self._close(graceful=True)

    def _connect(self) -> socket.socket:
        c = self.config
        raw = socket.create_connection((c.host, c.port), timeout=c.connect_timeout_s)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = c.ssl_context.wrap_socket(raw, server_hostname=c.host) if c.ssl_context else raw
        except BaseException:
            raw.close()
            raise
        self._sock = sock
        self._send(
            sock,
            encode_connect(
                c.client_id,
                protocol=c.protocol,
                keepalive_s=c.keepalive_s,
                clean_start=False,
                session_expiry_s=c.session_expiry_s,
                receive_maximum=c.receive_maximum,
                username=c.username,
                password=c.password,
            ),
        )
        return sock

    def _send(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        self._last_sent = time.monotonic()

    def _flush(self, sock: socket.socket) -> None:
        with self._lock:
            out, self._out = self._out, []
            self._woken = False
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        if out:
            self._send(sock, b"".join(out))

    def _serve(self, sock: socket.socket) -> None:
        c = self.config
        decoder = MqttDecoder(c.protocol)
        sock.settimeout(c.connect_timeout_s)
        packets = self._until_connack(sock, decoder)
        sock.settimeout(max(c.keepalive_s, 1))
        ping_every = c.keepalive_s / 2
        last_heard = time.monotonic()
        while True:
            # TLS may hold decrypted bytes that select() cannot see
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            if not packets and not pending:
                readable, _, _ = select.select([sock, self._wake_r], [], [], ping_every)
                if self._stopping.is_set():
                    self._flush(sock)
                    return
                if self._wake_r in readable:
                    self._flush(sock)
                if sock in readable:
                    pending = True
            if pending:
                data = sock.recv(_RECV_BYTES)
                if not data:
                    raise ConnectionError("the broker closed the connection")
                last_heard = time.monotonic()
                packets += decoder.feed(data)
            if packets:
                self._handle(sock, packets)
                packets = []
            now = time.monotonic()
            if now - last_heard > c.keepalive_s * 1.5:
                raise TimeoutError(f"no answer from the broker for {now - last_heard:.0f} s")
            if now - self._last_sent >= ping_every:
                self._send(sock, PINGREQ_BYTES)

    def _until_connack(self, sock: socket.socket, decoder: MqttDecoder) -> list[object]:
        c = self.config
        while True:
            data = sock.recv(_RECV_BYTES)
            if not data:
                raise ConnectionError("the broker closed the connection before CONNACK")
            packets = decoder.feed(data)
            if packets:
                break
        ack = packets[0]
        if not isinstance(ack, ConnAck):
            raise MqttProtocolError(f"expected CONNACK, got {type(ack).__name__}")
        if ack.reason_code:
            why = _CONNACK_311.get(ack.reason_code, "") if c.protocol != MQTT5 else ack.reason
            raise ConnectRefused(f"the broker refused the connection: {ack.reason_code} {why}")
        with self._lock:
            self.generation += 1
            self._out = []  # acks for the previous connection are meaningless now
            reconnect = self.generation > 1
        log.info(
            "connected to MQTT broker %s:%d (session present: %s)",
            c.host,
            c.port,
            ack.session_present,
        )
        if reconnect and not ack.session_present:
            log.warning("the broker lost this client's session: messages queued in it are gone")
        self._send(sock, encode_subscribe(_SUBSCRIBE_ID, c.subscriptions, protocol=c.protocol))
        return list(packets[1:])

    def _handle(self, sock: socket.socket, packets: list[object]) -> None:
        publishes: list[Publish] = []
        for p in packets:
            if type(p) is Publish:
                publishes.append(p)
            elif isinstance(p, SubAck):
                self._subscribed(p)
            elif isinstance(p, PubRel):
                # QoS 2: the PUBREC went out after the commit; releasing is all that is left
                self._send(sock, encode_acks(PUBCOMP, [p.packet_id]))
            elif isinstance(p, Disconnect):
                raise ConnectionError(
                    f"the broker disconnected this client: 0x{p.reason_code:02x} {p.reason}"
                )
            elif not isinstance(p, PingResp):
                raise MqttProtocolError(f"unexpected {type(p).__name__} from the broker")
        if publishes:
            self._hand_over(sock, publishes)

    def _hand_over(self, sock: socket.socket, publishes: Sequence[Publish]) -> None:
        """Give ``publishes`` to ``deliver``; while it has no room, keep acks and pings going."""
        generation = self.generation
        while publishes:
            taken = self._deliver(publishes, generation, 0.5)
            publishes = publishes[taken:]
            if publishes:
                if self._stopping.is_set():
                    return  # never acknowledged: the broker resends them
                self._flush(sock)
                if time.monotonic() - self._last_sent >= self.config.keepalive_s / 2:
                    self._send(sock, PINGREQ_BYTES)

    def _subscribed(self, ack: SubAck) -> None:
        refused = [code for code in ack.reason_codes if code >= 0x80]
        if refused:
            log.error(
                "the broker refused a subscription: %s",
                ", ".join(f"0x{code:02x}" for code in refused),
            )
            self._on_ready(False)
        else:  # connected means consuming: only once the subscriptions are in place
            self._on_ready(True)

    def _close(self, *, graceful: bool) -> None:
        sock, self._sock = self._sock, None
        self._on_ready(False)
        if sock is None:
            return
        if graceful:
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(DISCONNECT_BYTES)
                # Wait for the broker to close its side: closing ours with bytes still unread
                # sends a TCP reset, and a reset can make the broker drop acks it has not read.
                if not isinstance(sock, ssl.SSLSocket):  # TLS: the broker closes after DISCONNECT
                    sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + 2.0
                while sock.recv(_RECV_BYTES) and time.monotonic() < deadline:
                    pass
        with contextlib.suppress(OSError):
            sock.close()


__all__ = ["Ackable", "ConnectRefused", "Deliver", "MqttSubscriber", "SessionConfig"]
