"""The agent's TOML config file → a frozen, typed :class:`AgentConfig`.

Every error is a :class:`ConfigError` naming the file, the key and what was expected. Secrets
(the MQTT password, the district hashing key) never appear in a repr, a log or an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
from msgspec import Meta

from edge_agent.clock import parse_reference
from edge_agent.portable import default_outbox
from edge_agent.remote_policy import RemoteAllowList, RemoteRefused, check_drivers
from schemas.events import DeviceKind
from schemas.keyfile import key_from_file
from schemas.patterns import whole
from schemas.release import MAX_WHEEL_BYTES, ReleaseError, load_public_key
from schemas.topics import ID_PATTERN
from schemas.uplink import DEFAULT_MAX_BYTES

Id = Annotated[str, Meta(pattern=whole(ID_PATTERN))]
Positive = Annotated[float, Meta(gt=0)]
#: This platform's outbox path (edge_agent.portable chooses per platform).
DEFAULT_OUTBOX: Final = str(default_outbox())
_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}


class ConfigError(Exception):
    """The config file is unusable; the message says where and why, in one line."""


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class DeviceConfig(_Section, frozen=True):
    id: Id
    school_id: Id
    kind: DeviceKind


class OutboxQuota(_Section, frozen=True):
    """When either bound is reached, the outbox drops its lowest-priority events first."""

    #: Bytes the unsent events may take (their wire size); unset: no bound.
    max_bytes: Annotated[int, Meta(ge=4096)] | None = None
    #: Unsent events kept at most; unset: no bound.
    max_events: Annotated[int, Meta(ge=10)] | None = None


class OutboxConfig(OutboxQuota, frozen=True):
    path: str = DEFAULT_OUTBOX


class MqttConfig(_Section, frozen=True):
    url: str
    #: Default "5"; the url may also say ``?protocol=3.1.1`` (as the embedded broker's does).
    protocol: Literal["5", "3.1.1"] | None = None
    client_id: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    keepalive_s: Annotated[int, Meta(ge=5, le=65535)] = 30
    ca_file: str = ""

    def __repr__(self) -> str:
        return f"MqttConfig(protocol={self.protocol!r}, client_id={self.client_id!r}, ...)"


class PublishConfig(_Section, frozen=True):
    max_batch_events: Annotated[int, Meta(ge=1, le=10_000)] = 500
    max_batch_bytes: Annotated[int, Meta(ge=1024, le=DEFAULT_MAX_BYTES)] = 65536
    inflight: Annotated[int, Meta(ge=1, le=1000)] = 8
    linger_ms: Annotated[int, Meta(ge=0, le=10_000)] = 20
    #: Events per second at most while sending a backlog; 0 sends it unpaced.
    replay_rate: Annotated[int, Meta(ge=0)] = 5000
    #: Reconnect backoff; unset means the publisher's defaults (0.5 s doubling up to 30 s).
    backoff_initial_s: Positive | None = None
    backoff_max_s: Positive | None = None


class PrivacyConfig(_Section, frozen=True):
    hash_key_file: str = ""
    hash_key_hex: str = ""
    send_raw_uid: bool = False

    def __repr__(self) -> str:
        return f"PrivacyConfig(send_raw_uid={self.send_raw_uid})"


class HealthConfig(_Section, frozen=True):
    #: Seconds between ``agent.health`` events; 0 sends none.
    interval_s: Annotated[float, Meta(ge=0)] = 60.0


class ClockConfig(_Section, frozen=True):
    """Where the agent reads the time to report its clock offset; no reference: no offset."""

    #: ``http(s)://HOST[:PORT]/healthz`` (the ingest server) or ``ntp://HOST[:PORT]``.
    reference: str = ""
    #: Seconds between measurements.
    interval_s: Annotated[float, Meta(ge=1)] = 300.0
    #: Seconds one measurement may take at most.
    timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0


class RemoteSection(_Section, frozen=True):
    """What remote ``config`` documents may point drivers at (see :mod:`edge_agent.remote_policy`).

    The local config's own values of each kind are always allowed besides these.
    """

    #: Camera sources (URLs, files, device indexes) a remote config may give a ``camera`` driver.
    camera_sources: list[str | int] = []
    #: Modbus TCP hosts a remote config may give ``modbus_env`` or a gate's thermometer.
    modbus_hosts: list[str] = []
    #: ``host:port`` of signage screens a remote config may give a ``signage`` driver.
    screens: list[str] = []


class UpdateSection(_Section, frozen=True):
    """Self-updates (``update_agent``); local only: a remote config can never set it."""

    #: PEM Ed25519 public key of the district's release key; unset: every update is refused.
    public_key_file: str = ""
    #: Allow ``http://`` downloads from hosts other than loopback (tests, labs): the signature
    #: still protects the wheel, but the download is then visible on the network.
    insecure_http: bool = False
    #: Seconds a new version has to connect to the broker before it is rolled back.
    healthy_within_s: Annotated[float, Meta(ge=5, le=3600)] = 120.0
    #: The largest wheel downloaded.
    max_wheel_bytes: Annotated[int, Meta(ge=1024, le=MAX_WHEEL_BYTES)] = MAX_WHEEL_BYTES


@dataclass(frozen=True, slots=True)
class UpdateSettings:
    #: The raw Ed25519 release public key; None when the config names none.
    public_key: bytes | None = None
    insecure_http: bool = False
    healthy_within_s: float = 120.0
    max_wheel_bytes: int = MAX_WHEEL_BYTES


class _File(_Section, frozen=True):
    device: DeviceConfig
    mqtt: MqttConfig
    outbox: OutboxConfig = OutboxConfig()
    publish: PublishConfig = PublishConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    health: HealthConfig = HealthConfig()
    clock: ClockConfig = ClockConfig()
    remote: RemoteSection = RemoteSection()
    update: UpdateSection = UpdateSection()
    drivers: list[dict[str, Any]] = []


@dataclass(frozen=True, slots=True)
class Broker:
    """Where and how to connect, resolved from ``[mqtt]``."""

    host: str
    port: int
    tls: bool
    protocol: Literal["5", "3.1.1"]
    client_id: str
    keepalive_s: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None

    @property
    def address(self) -> str:
        """For logs: never carries credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DriverConfig:
    type: str
    name: str
    options: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    source: Path
    device: DeviceConfig
    outbox_path: Path
    broker: Broker
    publish: PublishConfig
    drivers: tuple[DriverConfig, ...]
    send_raw_uid: bool = False
    #: The district key for UID hashes; None when the config gives none.
    hash_key: bytes | None = field(default=None, repr=False)
    health: HealthConfig = field(default_factory=HealthConfig)
    outbox_quota: OutboxQuota = field(default_factory=OutboxQuota)
    clock: ClockConfig = field(default_factory=ClockConfig)
    remote: RemoteAllowList = field(default_factory=RemoteAllowList)
    update: UpdateSettings = field(default_factory=UpdateSettings)


class ManagedConfig(_Section, frozen=True):
    """The sections a remote ``config`` document may set (see :func:`apply_remote`)."""

    drivers: list[dict[str, Any]] | None = None
    publish: PublishConfig | None = None
    health: HealthConfig | None = None
    outbox: OutboxQuota | None = None


_ENUMS: Final = {
    "device.kind": ", ".join(k.value for k in DeviceKind),
    "mqtt.protocol": '"5", "3.1.1"',
}
_SECTIONS: Final[dict[str, type[msgspec.Struct]]] = {
    "": _File,
    "device": DeviceConfig,
    "outbox": OutboxConfig,
    "mqtt": MqttConfig,
    "publish": PublishConfig,
    "privacy": PrivacyConfig,
    "health": HealthConfig,
    "clock": ClockConfig,
    "remote": RemoteSection,
    "update": UpdateSection,
}
_MANAGED: Final[dict[str, type[msgspec.Struct]]] = {
    "": ManagedConfig,
    "publish": PublishConfig,
    "health": HealthConfig,
    "outbox": OutboxQuota,
}


def _explain(
    err: msgspec.ValidationError, sections: Mapping[str, type[msgspec.Struct]] = _SECTIONS
) -> str:
    """msgspec's ``Expected X - at `$.a.b``` → ``a.b: expected X`` with the allowed choices."""
    text, _, where = str(err).partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    if text.startswith("Object contains unknown field"):
        key = text.split("`")[1]
        known = ", ".join(f.name for f in msgspec.structs.fields(sections[where]))
        local = _SECTIONS.get(where)
        if sections is _MANAGED and local is not None and key in _field_names(local):
            return (
                f"{f'{where}.' if where else ''}{key}: may not be set remotely, only in the "
                f"local config file (a remote config may set here: {known})"
            )
        return f"{f'{where}.' if where else ''}{key}: unknown key (known here: {known})"
    if text.startswith("Object missing required field"):
        key = text.split("`")[1]
        return f"{f'{where}.' if where else ''}{key}: required but missing"
    what = text[:1].lower() + text[1:]
    if where in _ENUMS:
        what += f" (expected one of {_ENUMS[where]})"
    return f"{where}: {what}" if where else what


def _field_names(struct: type[msgspec.Struct]) -> set[str]:
    return {f.name for f in msgspec.structs.fields(struct)}


def load_config(path: Path | str) -> AgentConfig:
    """Read, validate and resolve a config file (relative paths are relative to it)."""
    source = Path(path).absolute()
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
    try:
        return _resolve(source, msgspec.toml.decode(raw, type=_File))
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    except _Invalid as exc:
        raise ConfigError(f"{source}: {exc}") from None


class _Invalid(Exception):
    """A value that passed the types but not the rules; the message starts with its key."""


def _resolve(source: Path, f: _File) -> AgentConfig:
    base = source.parent
    low, high = f.publish.backoff_initial_s, f.publish.backoff_max_s
    if low is not None and high is not None and high < low:
        raise _Invalid("publish.backoff_max_s: must not be below publish.backoff_initial_s")
    if f.clock.reference:
        try:
            parse_reference(f.clock.reference)
        except ValueError as exc:
            raise _Invalid(f"clock.reference: {exc}") from None
    return AgentConfig(
        source=source,
        device=f.device,
        outbox_path=base / Path(f.outbox.path).expanduser(),
        broker=_broker(base, f.mqtt, f.device),
        publish=f.publish,
        drivers=_drivers(f.drivers),
        send_raw_uid=f.privacy.send_raw_uid,
        hash_key=_hash_key(base, f.privacy),
        health=f.health,
        outbox_quota=OutboxQuota(max_bytes=f.outbox.max_bytes, max_events=f.outbox.max_events),
        clock=f.clock,
        remote=RemoteAllowList(
            camera_sources=frozenset(str(s) for s in f.remote.camera_sources),
            modbus_hosts=frozenset(h.lower() for h in f.remote.modbus_hosts),
            screens=frozenset(f.remote.screens),
        ),
        update=_update(base, f.update),
    )


def _update(base: Path, u: UpdateSection) -> UpdateSettings:
    key = None
    if u.public_key_file:
        try:
            key = load_public_key(base / Path(u.public_key_file).expanduser())
        except ReleaseError as exc:
            raise _Invalid(f"update.public_key_file: {exc}") from None
    return UpdateSettings(key, u.insecure_http, u.healthy_within_s, u.max_wheel_bytes)


def apply_remote(base: AgentConfig, managed: Mapping[str, Any]) -> AgentConfig:
    """``base`` (the file's config) with the sections of a remote document's ``config``.

    Raises :class:`ConfigError` naming the field as ``config.<section>.<key>``, as for the file.
    Only what :mod:`edge_agent.remote_policy` allows passes: no file paths, no URL handlers,
    camera sources, Modbus hosts and screens only from ``base``'s ``[remote]`` allow-list.
    """
    try:
        m = msgspec.convert(managed, ManagedConfig)
        publish = base.publish if m.publish is None else m.publish
        low, high = publish.backoff_initial_s, publish.backoff_max_s
        if low is not None and high is not None and high < low:
            raise _Invalid("publish.backoff_max_s: must not be below publish.backoff_initial_s")
        drivers = base.drivers
        if m.drivers is not None:
            drivers = _drivers(m.drivers)
            local = [{"type": d.type, "name": d.name, **d.options} for d in base.drivers]
            check_drivers(m.drivers, local, base.remote)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config.{_explain(exc, _MANAGED)}") from None
    except (_Invalid, RemoteRefused) as exc:
        raise ConfigError(f"config.{exc}") from None
    return replace(
        base,
        publish=publish,
        drivers=drivers,
        health=base.health if m.health is None else m.health,
        outbox_quota=base.outbox_quota if m.outbox is None else m.outbox,
    )


def _broker(base: Path, m: MqttConfig, device: DeviceConfig) -> Broker:
    url = urlsplit(m.url)
    if url.scheme not in _PORTS:
        raise _Invalid(
            f"mqtt.url: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {_safe(m.url)!r}"
        )
    try:
        port = url.port or _PORTS[url.scheme]
    except ValueError:
        raise _Invalid(f"mqtt.url: the port is not a number in {_safe(m.url)!r}") from None
    query = parse_qs(url.query, keep_blank_values=True)
    if not url.hostname or url.path not in ("", "/") or url.fragment or set(query) - {"protocol"}:
        raise _Invalid(
            f"mqtt.url: expected mqtt://HOST[:PORT][?protocol=5|3.1.1], got {_safe(m.url)!r}"
        )
    protocols = {p for p in (*query.get("protocol", ()), m.protocol) if p is not None}
    if not protocols <= {"5", "3.1.1"} or len(protocols) > 1:
        raise _Invalid(
            f'mqtt.protocol: expected one of "5", "3.1.1", given once (in mqtt.url or '
            f"mqtt.protocol), got {', '.join(sorted(protocols))}"
        )
    usernames = [u for u in (unquote(url.username or ""), m.username) if u]
    if len(usernames) > 1:
        raise _Invalid("mqtt.username: given both here and in mqtt.url: give it once")
    passwords = [p for p in (unquote(url.password or ""), m.password) if p]
    if m.password_file:
        passwords.append(_read_secret(base, m.password_file, "mqtt.password_file").decode())
    if len(passwords) > 1:
        raise _Invalid(
            "mqtt.password: give the password once: in mqtt.url, mqtt.password or "
            "mqtt.password_file"
        )
    ca_file = None
    if m.ca_file:
        if url.scheme != "mqtts":
            raise _Invalid("mqtt.ca_file: only used with an mqtts:// url")
        ca_file = base / Path(m.ca_file).expanduser()
        if not ca_file.is_file():
            raise _Invalid(f"mqtt.ca_file: no such file {str(ca_file)!r}")
    return Broker(
        host=url.hostname,
        port=port,
        tls=url.scheme == "mqtts",
        protocol="3.1.1" if protocols == {"3.1.1"} else "5",
        client_id=m.client_id or f"agent-{device.id}",
        keepalive_s=m.keepalive_s,
        username=usernames[0] if usernames else None,
        password=passwords[0] if passwords else None,
        ca_file=ca_file,
    )


def _safe(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _read_secret(base: Path, name: str, key: str, *, strip: bool = True) -> bytes:
    path = base / Path(name).expanduser()
    try:
        data = path.read_bytes()
        data = data.strip() if strip else data
    except OSError as exc:
        raise _Invalid(f"{key}: cannot read {str(path)!r}: {exc.strerror}") from None
    if not data:
        raise _Invalid(f"{key}: {str(path)!r} is empty")
    return data


def _hash_key(base: Path, p: PrivacyConfig) -> bytes | None:
    if p.hash_key_file and p.hash_key_hex:
        raise _Invalid("privacy.hash_key_hex: give either hash_key_file or hash_key_hex, not both")
    if p.hash_key_file:
        raw = _read_secret(base, p.hash_key_file, "privacy.hash_key_file", strip=False)
        key, where = key_from_file(raw), "hash_key_file"
    elif p.hash_key_hex:
        where = "hash_key_hex"
        try:
            key = bytes.fromhex(p.hash_key_hex)
        except ValueError:
            raise _Invalid("privacy.hash_key_hex: expected hex digits") from None
    else:
        return None
    if len(key) < 16:
        raise _Invalid(f"privacy.{where}: the key must be at least 16 bytes, got {len(key)}")
    return key


def _drivers(tables: list[dict[str, Any]]) -> tuple[DriverConfig, ...]:
    out: list[DriverConfig] = []
    for i, table in enumerate(tables):
        where = f"drivers[{i}]"
        kind, name = table.get("type"), table.get("name", table.get("type"))
        if not isinstance(kind, str) or not kind:
            raise _Invalid(f'{where}.type: required: the driver type, e.g. "synthetic"')
        if not isinstance(name, str) or not name:
            raise _Invalid(f"{where}.name: expected a non-empty string")
        if any(d.name == name for d in out):
            raise _Invalid(f"{where}.name: {name!r} is used by another driver")
        options = {k: v for k, v in table.items() if k not in ("type", "name")}
        out.append(DriverConfig(kind, name, options))
    return tuple(out)
