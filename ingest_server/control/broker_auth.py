"""Broker credentials and topic rules from the device registry, for Mosquitto and amqtt alike.

A device's MQTT username is its ``device_id``; it may publish ``up``, ``state``, ``cmd/ack`` and
``config/ack`` and read ``cmd`` and ``config``, all under its own ``campus/v1/{school}/{device}/``.
The server user reads every device's uplink channels and writes ``cmd`` and ``config``.

    rules = load_rules(conn, server_user="ingest", server_hash=hash_password(pw))
    rules.passwd_text(), rules.acl_text()          # Mosquitto password_file / acl_file
    rules.authenticate(user, pw), rules.may_publish(user, topic), rules.may_subscribe(...)
    BrokerAuthWriter(db_url, passwd, acl, ...)     # a thread that keeps both files current
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import shlex
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Self

import psycopg

from ingest_server.storage.files import put_file

log = logging.getLogger(__name__)

#: mosquitto_passwd 2.0 writes ``$7$`` (PBKDF2-SHA512), 101 iterations, 12-byte salt, 64-byte key.
PBKDF2_ITERATIONS: Final = 101
_SALT_BYTES: Final = 12
_KEY_BYTES: Final = 64

DEVICE_PUBLISH: Final = ("up", "state", "cmd/ack", "config/ack")
DEVICE_READ: Final = ("cmd", "config")
SERVER_READ: Final = ("up", "state", "cmd/ack", "config/ack")
SERVER_PUBLISH: Final = ("cmd", "config")
#: What the edge agent calls itself by default (``agent-{device_id}``); a device may also use
#: its bare ``device_id``. The embedded broker holds each device to these (see
#: :meth:`BrokerRules.may_use_client_id`).
AGENT_CLIENT_ID_PREFIX: Final = "agent-"


class BrokerAuthError(RuntimeError):
    """The broker's files could not be written or the broker not told to reload."""


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The ``$7$`` PBKDF2-SHA512 form Mosquitto's password_file holds."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _KEY_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (ours or mosquitto_passwd's)."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"] or not parts[2].isdigit():
        return False
    try:
        salt, key = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4])
    except ValueError:
        return False
    iterations = int(parts[2])
    if not 1 <= iterations <= 10_000_000:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(key))
    return hmac.compare_digest(got, key)


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic ``topic_filter`` can match is matched by ``pattern`` (both MQTT
    filters); for a plain topic this is ordinary matching."""
    pat, flt = pattern.split("/"), topic_filter.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(flt):
            return False
        f = flt[i]
        if f == "#" or (f == "+" and p != "+") or (p not in ("+", f)):
            return False
    return len(pat) == len(flt)


@dataclass(frozen=True, slots=True)
class DeviceCredential:
    device_id: str
    school_id: str
    password_hash: str = field(repr=False)

    def prefix(self) -> str:
        return f"campus/v1/{self.school_id}/{self.device_id}/"


@dataclass(frozen=True, slots=True)
class BrokerRules:
    """Who may connect, publish and subscribe; the same answers for Mosquitto and amqtt."""

    devices: Mapping[str, DeviceCredential]
    server_user: str | None = None
    server_hash: str | None = field(default=None, repr=False)

    def authenticate(self, username: str | None, password: str | None) -> bool:
        if not username or password is None:
            return False
        if username == self.server_user and self.server_hash:
            return verify_password(password, self.server_hash)
        cred = self.devices.get(username)
        return cred is not None and verify_password(password, cred.password_hash)

    def _patterns(self, username: str | None, write: bool) -> list[str]:
        if username is None:
            return []
        if username == self.server_user:
            return [f"campus/v1/+/+/{c}" for c in (SERVER_PUBLISH if write else SERVER_READ)]
        cred = self.devices.get(username)
        if cred is None:
            return []
        return [cred.prefix() + c for c in (DEVICE_PUBLISH if write else DEVICE_READ)]

    def may_publish(self, username: str | None, topic: str) -> bool:
        return any(filter_covers(p, topic) for p in self._patterns(username, write=True))

    def anonymous_may_publish(self, topic: str) -> bool:
        """A client without a user (the embedded broker's explicit demo mode) may only publish a
        device's uplink channels, and never as a device of the registry."""
        parts = topic.split("/")
        if len(parts) < 5 or parts[3] in self.devices or "+" in topic or "#" in topic:
            return False
        return any(filter_covers(f"campus/v1/+/+/{c}", topic) for c in DEVICE_PUBLISH)

    def anonymous_may_read(self, topic_filter: str) -> bool:
        """A client without a user (demo mode only) may read exactly one device's ``cmd`` or
        ``config`` (no wildcards), and never those of a device of the registry: the demo's
        agents take commands, nobody reads what is meant for an enrolled device."""
        parts = topic_filter.split("/")
        if len(parts) < 5 or parts[3] in self.devices or "+" in topic_filter:
            return False
        if "#" in topic_filter or topic_filter.startswith("$"):
            return False
        return any(filter_covers(f"campus/v1/+/+/{c}", topic_filter) for c in DEVICE_READ)

    def client_id_owner(self, client_id: str) -> str | None:
        """The device a client id is bound to (``{device}`` or ``agent-{device}``), if any."""
        if client_id in self.devices:
            return client_id
        bare = client_id.removeprefix(AGENT_CLIENT_ID_PREFIX)
        return bare if bare != client_id and bare in self.devices else None

    def may_use_client_id(
        self, username: str | None, client_id: str, reserved: frozenset[str] = frozenset()
    ) -> bool:
        """Whether ``username`` (None: anonymous) may connect as ``client_id``: ``reserved``
        (the server's own sessions) are the server user's only, a device uses only its own ids,
        and nobody else takes a device's. An empty id gets one made up by the broker."""
        if username is not None and username == self.server_user:
            return True
        if client_id in reserved:
            return False
        if username is None:
            return client_id == "" or self.client_id_owner(client_id) is None
        return username in self.devices and client_id in (
            "",
            username,
            AGENT_CLIENT_ID_PREFIX + username,
        )

    def may_subscribe(self, username: str | None, topic_filter: str) -> bool:
        """Only filters wholly inside what the user may read (``$share/G/`` is looked through)."""
        if topic_filter.startswith("$share/"):
            parts = topic_filter.split("/", 2)
            topic_filter = parts[2] if len(parts) == 3 else ""
        return any(filter_covers(p, topic_filter) for p in self._patterns(username, write=False))

    def passwd_text(self) -> str:
        lines = [f"{self.server_user}:{self.server_hash}"] if self.server_user else []
        lines += [f"{d}:{c.password_hash}" for d, c in sorted(self.devices.items())]
        return "".join(line + "\n" for line in lines)

    def acl_text(self) -> str:
        out = ["# written by ingest-server from the device registry; edits are overwritten\n"]
        if self.server_user:
            out.append(f"\nuser {self.server_user}\n")
            out += [f"topic read campus/v1/+/+/{c}\n" for c in SERVER_READ]
            out += [f"topic write campus/v1/+/+/{c}\n" for c in SERVER_PUBLISH]
        for dev, cred in sorted(self.devices.items()):
            out.append(f"\nuser {dev}\n")
            out += [f"topic write {cred.prefix()}{c}\n" for c in DEVICE_PUBLISH]
            out += [f"topic read {cred.prefix()}{c}\n" for c in DEVICE_READ]
        return "".join(out)


def load_rules(
    conn: psycopg.Connection[Any], server_user: str | None = None, server_hash: str | None = None
) -> BrokerRules:
    """The live credentials of the registry (revoked ones left out)."""
    rows = conn.execute(
        "SELECT device_id, school_id, password_hash FROM device_credentials"
        " WHERE revoked_at IS NULL ORDER BY device_id"
    ).fetchall()
    devices = {r[0]: DeviceCredential(r[0], r[1], r[2]) for r in rows}
    if server_user is not None and server_user in devices:
        raise BrokerAuthError(f"the server's MQTT user {server_user!r} is also a device_id")
    return BrokerRules(devices, server_user, server_hash)


def write_atomically(path: Path, text: str, mode: int = 0o640) -> bool:
    """Replace ``path`` with ``text`` in one rename (readers see old or new, never half);
    return False when it already held exactly that."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    put_file(path, text, mode, replace=True)
    return True


def server_hash_for(passwd_file: Path, user: str, password: str) -> str:
    """The server user's hash: the one already in ``passwd_file`` if it still matches (so an
    unchanged registry rewrites nothing), else a new one."""
    try:
        for line in passwd_file.read_text(encoding="utf-8").splitlines():
            name, _, stored = line.partition(":")
            if name == user and verify_password(password, stored):
                return stored
    except FileNotFoundError:
        pass
    return hash_password(password)


def reload_broker(pid_file: Path | None = None, command: str | None = None) -> str:
    """SIGHUP the broker whose pid is in ``pid_file``, or run ``command``; say which."""
    if pid_file is not None:
        try:
            pid = int(pid_file.read_text(encoding="ascii").split()[0])
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError, IndexError) as exc:
            raise BrokerAuthError(f"cannot signal the broker in {pid_file}: {exc}") from exc
        return f"sent SIGHUP to pid {pid}"
    if command:
        done = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise BrokerAuthError(
                f"reload command {command!r} exited {done.returncode}: {done.stderr.strip()[:500]}"
            )
        return f"ran {command!r}"
    return "no reload configured"


@dataclass(frozen=True, slots=True)
class FileTargets:
    passwd: Path
    acl: Path
    pid_file: Path | None = None
    reload_command: str | None = None


def write_files(rules: BrokerRules, targets: FileTargets) -> str | None:
    """Write both files; reload the broker if either changed. Return what was done, or None."""
    # The ACL first: a new device must never be able to log in before its ACL confines it.
    acl_changed = write_atomically(targets.acl, rules.acl_text(), 0o644)
    pw_changed = write_atomically(targets.passwd, rules.passwd_text(), 0o640)
    if not (acl_changed or pw_changed):
        return None
    how = reload_broker(targets.pid_file, targets.reload_command)
    return f"broker auth files updated ({len(rules.devices)} devices); {how}"


class RulesHolder:
    """The current :class:`BrokerRules`, swapped whole by the refresher and read by amqtt."""

    def __init__(self, rules: BrokerRules | None = None) -> None:
        self.rules = rules or BrokerRules({})


class BrokerAuthRefresher:
    """A thread that reloads the registry's credentials every ``interval`` seconds and hands
    them to Mosquitto's files (``targets``) and/or an embedded broker (``holder``)."""

    def __init__(
        self,
        db_url: str,
        *,
        server_user: str | None,
        server_password: str | None,
        targets: FileTargets | None = None,
        holder: RulesHolder | None = None,
        interval: float = 5.0,
    ) -> None:
        self._db_url = db_url
        self._user = server_user
        self._password = server_password
        self._targets = targets
        self._holder = holder
        self._interval = interval
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-auth", daemon=True)
        self.refreshed = 0  # completed refreshes, for tests and health

    def _server_hash(self) -> str | None:
        if self._user is None or self._password is None:
            return None
        if self._targets is not None:
            return server_hash_for(self._targets.passwd, self._user, self._password)
        return hash_password(self._password)

    def refresh_once(self) -> None:
        with psycopg.connect(self._db_url, autocommit=True, connect_timeout=5) as conn:
            rules = load_rules(conn, self._user, self._server_hash())
        if self._holder is not None:
            self._holder.rules = rules
        if self._targets is not None and (done := write_files(rules, self._targets)):
            log.info("%s", done)

    def kick(self) -> None:
        """Refresh now (after an enrolment), not at the next tick."""
        self._kick.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh_once()
                self.refreshed += 1
            except psycopg.errors.UndefinedTable:
                log.debug("broker auth waits for the database migrations")
                self._kick.wait(min(self._interval, 1.0))
                continue
            except (psycopg.Error, OSError, BrokerAuthError) as exc:
                log.warning("broker auth not refreshed: %s", exc)
            self._kick.wait(self._interval)
            self._kick.clear()

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread.is_alive():
            self._thread.join(10)
