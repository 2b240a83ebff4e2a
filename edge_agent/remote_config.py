"""The server's desired config (``config``, retained) → applied live → an outcome on ``config/ack``.

The publisher hands every ``config`` payload to :meth:`ConfigChannel.receive`, which keeps only
the newest (a retained document supersedes the one before it). :meth:`ConfigChannel.run` decodes
it and hands it to the agent's ``apply`` (see :meth:`edge_agent.agent.Agent.apply_config`),
which ignores versions at or below the one it runs, and otherwise answers ``applied``,
``rejected`` (invalid: nothing changed) or ``rolled_back`` (valid, but it did not run: the
previous config runs again). The last applied document is kept by :class:`ConfigStore` in a file
beside the outbox, so it survives a restart. Only the newest outcome waits for the link: it is
published retained, so the server always reads the latest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from schemas.state import ConfigAck, ConfigDocument, config_decoder

log = logging.getLogger(__name__)

Apply = Callable[[ConfigDocument], Awaitable[ConfigAck | None]]
Publish = Callable[[bytes], Awaitable[object]]


def now() -> datetime:
    return datetime.now(UTC).astimezone()


class StoredConfig(msgspec.Struct, frozen=True, kw_only=True):
    version: Annotated[int, Meta(ge=1)]
    config: dict[str, Any]


class ConfigStore:
    """The last applied remote config, as JSON in one file replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> StoredConfig | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(raw, type=StoredConfig)
        except msgspec.DecodeError as exc:
            log.error("ignoring the stored remote config %s: %s", self.path, exc)
            return None

    def save(self, stored: StoredConfig) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(msgspec.json.encode(stored))
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o600)
        tmp.replace(self.path)


def _recover_version(payload: bytes) -> int | None:
    with contextlib.suppress(msgspec.DecodeError):
        doc = msgspec.json.decode(payload)
        version = doc.get("version") if isinstance(doc, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
            return version
    return None


class ConfigChannel:
    """Newest document in, outcome out; see the module docstring."""

    def __init__(self, apply: Apply) -> None:
        self._apply = apply
        self._newest: bytes | None = None
        self._arrived = asyncio.Event()
        self._ack: ConfigAck | None = None
        self._ack_ready = asyncio.Event()
        #: The version running now, for the retained ``state``; set by the agent.
        self.version: int | None = None

    @property
    def pending_ack(self) -> ConfigAck | None:
        return self._ack

    def receive(self, payload: bytes) -> None:
        """Keep ``payload`` as the newest document; never blocks the receive path."""
        if not payload:  # the server cleared the retained document: nothing to apply
            return
        self._newest = payload
        self._arrived.set()

    async def run(self) -> None:
        """Apply documents as they arrive, one at a time, until cancelled."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            payload, self._newest = self._newest, None
            if payload is None:
                continue
            try:
                ack = await self.handle(payload)
            except Exception:  # a bug here must not stop later documents
                log.exception("applying a config document failed")
                continue
            if ack is not None:
                self._ack = ack
                self._ack_ready.set()

    async def handle(self, payload: bytes) -> ConfigAck | None:
        try:
            doc = config_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            version = _recover_version(payload)
            log.error("malformed config document (version %s): %s", version, exc)
            if version is None or (self.version is not None and version <= self.version):
                return None
            return ConfigAck(
                version=version, status="rejected", detail=f"malformed document: {exc}", ts=now()
            )
        return await self._apply(doc)

    async def send_acks(self, publish: Publish) -> None:
        """Publish the newest outcome while the link is up; it is cleared only once sent."""
        while True:
            while (ack := self._ack) is not None:
                await publish(msgspec.json.encode(ack))
                if self._ack is ack:
                    self._ack = None
            self._ack_ready.clear()
            await self._ack_ready.wait()
