"""Fault injection for scenarios and tests: break real services, links, disks and clocks on purpose.

Each fault is a small object or function over the real thing: a Mosquitto or PostgreSQL from
:mod:`simulators.harness`, an ingest server process, a loopback TCP proxy between agents and
the broker, a size-limited tmpfs, a pty. Nothing here listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulators.harness import Mosquitto, Postgres, wait_until


class FaultUnavailable(Exception):
    """This fault cannot be injected here (no root, no mount, an external service)."""


# -- services -------------------------------------------------------------------------------


def broker_kill(broker: Mosquitto) -> None:
    """SIGKILL: in-flight messages and unsaved sessions since the last autosave are at risk."""
    broker.kill()


def broker_start(broker: Mosquitto) -> None:
    broker.start()


def db_restart(pg: Postgres, down_s: float = 0.0) -> None:
    pg.stop("fast")
    time.sleep(down_s)  # the outage itself, not synchronisation
    pg.start()


def _pg_pids(pg: Postgres) -> list[int]:
    """The postmaster and every backend and worker it forked."""
    head = (pg.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
    master = int(head)
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == master:
                    pids.append(int(entry.name))
    return pids


def db_pause(pg: Postgres) -> list[int]:
    """SIGSTOP the whole server: connections stay open and every query hangs."""
    pids = _pg_pids(pg)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def db_resume(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- network --------------------------------------------------------------------------------


class LinkMode(StrEnum):
    UP = "up"
    #: New connections are refused (closed at once); existing ones were dropped.
    CUT = "cut"
    #: Connections are accepted and kept, but nothing is forwarded either way.
    BLACKHOLE = "blackhole"


class TcpProxy:
    """A loopback TCP proxy between agents and the broker, that can drop, cut or black-hole.

    ``async with TcpProxy(target_port) as proxy``: agents connect to ``proxy.port``.
    """

    CHUNK: Final = 65536

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = LinkMode.UP
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def drop(self) -> int:
        """Close every current connection (both sides); return how many there were."""
        pairs, self._pairs = self._pairs, set()
        for a, b in pairs:
            for w in (a, b):
                with contextlib.suppress(Exception):
                    w.transport.abort()
        return len(pairs)

    def set_mode(self, mode: LinkMode) -> None:
        self.mode = mode
        if mode is LinkMode.CUT:
            self.drop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode is LinkMode.CUT:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        pair = (writer, up_w)
        self._pairs.add(pair)
        for src, dst in ((reader, up_w), (up_r, writer)):
            task = asyncio.create_task(self._pipe(src, dst, pair), name="proxy-pipe")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await src.read(self.CHUNK):
                if self.mode is LinkMode.BLACKHOLE:
                    continue  # swallowed: the peer sees silence, not a reset
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if pair in self._pairs:
                self._pairs.discard(pair)
                for w in pair:
                    w.transport.abort()


# -- disk -----------------------------------------------------------------------------------


class Tmpfs:
    """A size-limited tmpfs mounted at ``path`` (root only) that can be filled to the last byte."""

    def __init__(self, path: Path, size_mb: int = 16) -> None:
        self.path = path
        self.size_mb = size_mb
        self._ballast = path / ".ballast"
        self.mounted = False

    def __enter__(self) -> Self:
        if os.geteuid() != 0:
            raise FaultUnavailable("disk_full needs root to mount a size-limited tmpfs")
        self.path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            raise FaultUnavailable(f"cannot mount a tmpfs at {self.path}: {done.stderr.strip()}")
        self.mounted = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self.mounted = False

    def fill(self) -> int:
        """Write ballast until the filesystem is full; return the bytes written."""
        written = 0
        block = b"\0" * 65536
        with self._ballast.open("ab", buffering=0) as f:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        f.write(block[:size])
                        written += size
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._ballast.unlink()

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


# -- serial ---------------------------------------------------------------------------------


class Pluggable(Protocol):
    """A pty device simulator (``simulators.em4100.Em4100Simulator`` and others)."""

    def unplug(self) -> None: ...

    def replug(self) -> str: ...


@contextlib.contextmanager
def unplugged(device: Pluggable) -> Iterator[None]:
    """The device is gone inside the block (its pty closed, the link removed) and back after."""
    device.unplug()
    try:
        yield
    finally:
        device.replug()


# -- MQTT payloads --------------------------------------------------------------------------

#: Broken ``up`` payloads, each quarantined by a correct ingest server for a different reason.
MALFORMED: Final[tuple[bytes, ...]] = (
    b"{not json",
    b"\xff\xfe\x00binary",
    b'{"v": 1, "device_id": "someone-else", "kind": "card_reader", "sent_at": '
    b'"2026-01-01T08:00:00+08:00", "events": []}',
    b'{"v": 99, "device_id": "DEV", "kind": "card_reader", "sent_at": '
    b'"2026-01-01T08:00:00+08:00", "events": []}',
    b'{"v": 1, "device_id": "DEV", "kind": "card_reader", "sent_at": '
    b'"2026-01-01T08:00:00+08:00", "events": [{"seq": 1, "ts": "2026-01-01T08:00:00+08:00", '
    b'"type": "no.such.type", "data": {}}]}',
    b'{"v": 1, "device_id": "DEV", "kind": "env_sensor", "sent_at": '
    b'"2026-01-01T08:00:00+08:00", "events": [{"seq": 2, "ts": "yesterday", '
    b'"type": "env.reading", "data": {"temperature_c": 500}}]}',
)


def publish_raw(
    broker_url: str, messages: Iterable[tuple[str, bytes]], *, timeout: float = 30
) -> int:
    """Publish each ``(topic, payload)`` at QoS 1 and wait for every PUBACK; return the count."""
    u = urlsplit(broker_url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"campus-fault-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    if u.username:
        client.username_pw_set(u.username, u.password)
    client.connect(u.hostname or "127.0.0.1", u.port or 1883)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("the broker did not acknowledge an injected message")
        return len(infos)
    finally:
        client.disconnect()
        client.loop_stop()


def malformed_messages(school_id: str, device_id: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` broken ``up`` messages for ``device_id`` (a device that sends nothing else)."""
    topic = f"campus/v1/{school_id}/{device_id}/up"
    return [
        (topic, MALFORMED[i % len(MALFORMED)].replace(b"DEV", device_id.encode()))
        for i in range(count)
    ]


__all__ = [
    "MALFORMED",
    "FaultUnavailable",
    "LinkMode",
    "Pluggable",
    "TcpProxy",
    "Tmpfs",
    "broker_kill",
    "broker_start",
    "db_pause",
    "db_restart",
    "db_resume",
    "malformed_messages",
    "publish_raw",
    "unplugged",
    "wait_until",
]
